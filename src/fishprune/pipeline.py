"""The experiment protocol as one straight-line function, :func:`run`.

data → model → (warm-up) → scores → mask → masked training → evaluation → stored result.
Every expensive stage leaves an artifact in the run directory (:mod:`fishprune.rundir`) or, for
work shared by many runs, in ``<out>/_cache`` (:mod:`fishprune.cachekeys`), so a rerun skips
what is done and a killed run resumes from its last finished epoch. All files are written
atomically.
"""

from __future__ import annotations

import json
import sys
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

import fishprune as fp
from fishprune import atomic, cachekeys
from fishprune import tensorfiles as tf
from fishprune.collapse import CollapseError, collapse_report
from fishprune.config import ConfigError, RunConfig
from fishprune.data import (
    DatasetTensors,
    TensorBatches,
    load_dataset,
    scoring_indices,
    stratified_split,
)
from fishprune.models import build_model
from fishprune.provenance import provenance
from fishprune.rundir import (
    BEST,
    CHECKPOINT,
    LAYERS,
    MASKS,
    MASKS_INFO,
    METRICS,
    PROVENANCE,
    RESULT,
    RunDir,
)
from fishprune.sanity import invert_scores, randomize_labels, reinitialize_, shuffle_masks
from fishprune.timing import timed
from fishprune.train import (
    DivergedError,
    EpochMetrics,
    bn_warmup_,
    evaluate,
    lr_at,
    make_optimizer,
    set_lr_,
    train_epoch,
)

Say = Callable[[str], None]


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but torch sees no CUDA GPU (use auto/cpu)")
    return torch.device(name)


def run(cfg: RunConfig, *, show_progress: bool = True, echo: Say | None = None
        ) -> dict[str, Any]:
    """Run (or resume, or skip if finished) the experiment ``cfg``; return its result dict."""
    say = echo or (lambda _msg: None)
    cfg.validate()
    check_out(cfg)
    rd = RunDir.of(cfg)
    problems = rd.verify(cfg)
    if problems:  # never resume from, or skip on, artifacts that are not what was written
        moved = rd.quarantine()
        say(f"WARNING: {problems[0]}" + (f" (and {len(problems) - 1} more)" if problems[1:] else "")
            + f"; the run directory was moved to {moved} and the run is recomputed")
    if rd.is_finished():
        say(f"already finished: {rd.result}")
        return json.loads(rd.result.read_text())
    rd.remove_stale_temps()  # left by a killed write; the files they were to replace are intact
    rd.error.unlink(missing_ok=True)  # a new attempt
    try:
        return _run(cfg, rd, show_progress, say)
    except Exception as err:
        if rd.path.is_dir():  # the failure is recorded where the run lives (see rundir)
            rd.record_error(cfg, f"{type(err).__name__}: {err}", traceback.format_exc())
        raise


def _run(cfg: RunConfig, rd: RunDir, show_progress: bool, say: Say) -> dict[str, Any]:
    prep = prepare(cfg, say)
    ds, model, device = prep.ds, prep.model, prep.device

    # The run directory appears with the first artifact: a bad input fails before it exists.
    masks, score_seconds = pruning_masks(cfg, ds, prep.train_idx, model, device, rd, say)
    rd.write_config(cfg)
    rd.write_json(PROVENANCE, provenance(device, data_source=ds.source))
    if cfg.prune.sanity == "reinit":
        reinitialize_(model, fresh_model(cfg, ds, seed=cfg.seed + 1_000_003).to(device))
    report = collapse_report(model, masks, tuple(ds.train_x.shape[1:]))
    rd.write_json(LAYERS, report.to_dict())
    say(report.table())
    if (report.collapsed or report.disconnected) and cfg.prune.on_collapse != "ignore":
        message = report.warning()
        if cfg.prune.on_collapse == "error":
            raise CollapseError(message)
        say(f"WARNING: {message}")
    fp.apply_masks(model, masks)

    history, best_epoch = fit(cfg, model, masks, prep.loaders, device, rd, show_progress, say)
    test_loss, test_acc = evaluate(model, prep.loaders["test"], device=device)
    result = {
        "run_id": cfg.run_id(),
        "label": cfg.label(),
        "criterion": "dense" if cfg.prune.sparsity == 0 else cfg.prune.criterion,
        "sparsity": cfg.prune.sparsity,
        "density": fp.density_of(masks),
        "parameters": sum(p.numel() for p in model.parameters()),
        "prunable": sum(m.numel() for m in masks.values()),
        "kept": sum(int(m.sum()) for m in masks.values()),
        "collapsed_layers": report.collapsed,
        "disconnected_layers": report.disconnected,
        "best_epoch": best_epoch,
        "best_val_acc": history[best_epoch - 1].val_acc if best_epoch else None,
        "test_acc": test_acc,
        "test_loss": test_loss,
        "warmup_seconds": prep.warmup_seconds,
        "score_seconds": score_seconds,
        "train_seconds": sum(h.seconds for h in history),
        "epochs": len(history),
    }
    rd.write_json(RESULT, result)
    rd.discard(CHECKPOINT)  # the result and the best weights supersede it
    say(f"best validation accuracy {_pct(result['best_val_acc'])} (epoch {best_epoch}); "
        f"test accuracy {_pct(test_acc)}  →  {rd.path}")
    return result


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def make_loaders(cfg: RunConfig, ds: DatasetTensors, train_idx: torch.Tensor, val_idx: torch.Tensor,
                 device: torch.device) -> dict[str, TensorBatches]:
    """Train (shuffled, augmented where the dataset wants it), validation and test batches."""
    augment = cfg.data.augment if cfg.data.augment is not None else ds.in_channels == 3
    common = {"mean": ds.mean, "std": ds.std, "device": device}
    b = cfg.data.batch_size
    loaders = {
        "train": TensorBatches(ds.train_x[train_idx], ds.train_y[train_idx], batch_size=b,
                               shuffle=True, seed=cfg.seed, augment=augment, **common),
        "train_plain": TensorBatches(ds.train_x[train_idx], ds.train_y[train_idx], batch_size=b,
                                     **common),
        "test": TensorBatches(ds.test_x, ds.test_y, batch_size=1024, **common),
    }
    if len(val_idx):
        loaders["val"] = TensorBatches(ds.train_x[val_idx], ds.train_y[val_idx], batch_size=1024,
                                       **common)
    return loaders


def fresh_model(cfg: RunConfig, ds: DatasetTensors, *, seed: int) -> nn.Module:
    """The model of ``cfg`` for ``ds``, initialized from ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return build_model(cfg.model.model, in_channels=ds.in_channels, num_classes=ds.num_classes,
                       image_size=ds.image_size, width=cfg.model.width, init=cfg.model.init)


@dataclass
class Prepared:
    """Everything before scoring: data, split, loaders, and the (warmed-up) model."""

    ds: DatasetTensors
    train_idx: torch.Tensor
    val_idx: torch.Tensor
    loaders: dict[str, TensorBatches]
    model: nn.Module
    device: torch.device
    warmup_seconds: float


def check_out(cfg: RunConfig) -> None:
    """A usage error when ``out`` is empty or names something that is not a directory."""
    if not cfg.out.strip():
        raise ConfigError("out must name a directory; got an empty string")
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise ConfigError(f"out {cfg.out} exists and is not a directory")


def prepare(cfg: RunConfig, say: Say = lambda _m: None) -> Prepared:
    """data → model → warm-up: the stages shared by runs, sweeps and ``fishprune analyze``."""
    check_out(cfg)
    device = resolve_device(cfg.device)
    data_dir = cfg.data.data_dir
    if data_dir is not None and not Path(data_dir).expanduser().is_dir():
        raise ConfigError(f"data_dir {data_dir} is not a directory (a directory you name is used "
                          "as given, never replaced by another location)")
    ds = load_dataset(cfg.data.dataset, data_dir)
    train_idx, val_idx = stratified_split(ds.train_y, cfg.data.val_fraction, cfg.data.split_seed)
    missing = set(ds.train_y.unique().tolist()) - set(ds.train_y[train_idx].unique().tolist())
    if missing:
        raise ConfigError(f"val_fraction={cfg.data.val_fraction} leaves no training sample of "
                          f"{len(missing)} class(es) of {cfg.data.dataset}: use a smaller one")
    loaders = make_loaders(cfg, ds, train_idx, val_idx, device)
    atomic.remove_stale_temps(cachekeys.cache_dir(cfg))  # left by killed writers only
    model = initial_model(cfg, ds, device, say)
    seconds = warm_up(cfg, model, loaders, device, say=say)
    return Prepared(ds, train_idx, val_idx, loaders, model, device, seconds)


def load_cached(path: Path, say: Say) -> dict[str, torch.Tensor] | None:
    """A cached state (verified by its checksum), or None when it is absent or corrupt (then
    deleted, with a warning naming it, and recomputed by the caller: the cache is derived)."""
    if not path.exists():
        return None
    try:
        return tf.load_state(path)
    except ValueError as err:
        say(f"WARNING: {err}; recomputing it")
        path.unlink(missing_ok=True)
        return None


def initial_model(cfg: RunConfig, ds: DatasetTensors, device: torch.device,
                  say: Say = lambda _m: None) -> nn.Module:
    """The seeded initialization, cached for every run sharing it (:mod:`fishprune.cachekeys`)."""
    model = fresh_model(cfg, ds, seed=cfg.seed)
    path = cachekeys.init_path(cfg)
    cached = load_cached(path, say)
    if cached is not None:
        model.load_state_dict(cached)
    else:
        path.parent.mkdir(parents=True, exist_ok=True)
        tf.save_state(path, model)
    model.to(device)
    if device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        model.to(memory_format=torch.channels_last)
    return model


def warm_up(cfg: RunConfig, model: nn.Module, loaders: dict[str, TensorBatches],
            device: torch.device, *, say: Say) -> float:
    """Dense warm-up epochs and/or the BN-statistics pass, in place; cached like the init.

    Returns the seconds the warm-up took (also when it is loaded from the cache, where the
    time of the run that computed it is stored).
    """
    w = cfg.warmup
    path = cachekeys.warmup_path(cfg, device.type)
    if path is None:
        return 0.0
    cached = load_cached(path, say)
    if cached is not None:
        model.load_state_dict(cached)
        say(f"warm-up loaded from {path}")
        return float(tf.read_metadata(path).get("seconds", 0.0))
    with timed() as elapsed:
        if w.warmup_epochs:
            optimizer = make_optimizer(model, cfg.train)  # discarded afterwards: no momentum leaks
            for epoch in range(w.warmup_epochs):
                set_lr_(optimizer, lr_at(epoch, cfg.train))
                loaders["train"].set_epoch(epoch)
                try:
                    loss, acc = train_epoch(model, loaders["train"], optimizer, None,
                                            device=device)
                except DivergedError as err:
                    raise DivergedError(f"warm-up epoch {epoch + 1}: {err} (try a lower --lr)"
                                        ) from None
                say(f"warm-up epoch {epoch + 1}/{w.warmup_epochs}: loss {loss:.4f}, "
                    f"train acc {_pct(acc)}")
        if w.bn_warmup:
            bn_warmup_(model, loaders["train_plain"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tf.save_state(path, model, metadata={"seconds": f"{elapsed():.3f}"})
    say(f"warm-up took {elapsed():.1f}s")
    return elapsed()


def scoring_batches(cfg: RunConfig, ds: DatasetTensors, train_idx: torch.Tensor,
                    device: torch.device) -> TensorBatches:
    """The scoring data: a seeded subset of the training split (k per class, or all of it),
    unshuffled and unaugmented, in batches of ``score_batch_size`` (the Fisher estimate)."""
    p = cfg.prune
    idx = scoring_indices(ds.train_y, p.score_samples, cfg.seed, indices=train_idx)
    y = ds.train_y[idx]
    if p.sanity == "random-labels":
        y = randomize_labels(y, ds.num_classes, seed=cfg.seed)
    return TensorBatches(ds.train_x[idx], y, batch_size=p.score_batch_size, mean=ds.mean,
                         std=ds.std, device=device)


def scored_parameters(cfg: RunConfig, model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights the run scores and prunes; a usage error when ``exclude`` leaves none."""
    params = fp.prunable_parameters(model, cfg.prune.exclude)
    if not params:
        raise ConfigError(f"nothing is left to score: exclude={list(cfg.prune.exclude)} matches "
                          f"every prunable weight of {cfg.model.model}")
    every = list(fp.prunable_parameters(model))
    unmatched = [pat for pat in cfg.prune.exclude if not any(fnmatchcase(n, pat) for n in every)]
    if unmatched:  # a typo would silently prune the weights it was meant to keep
        raise ConfigError(f"exclude pattern(s) {unmatched} match no prunable weight of "
                          f"{cfg.model.model} (its prunable weights: {', '.join(every)})")
    return params


def pruning_masks(cfg: RunConfig, ds: DatasetTensors, train_idx: torch.Tensor, model: nn.Module,
                  device: torch.device, rd: RunDir, say: Say
                  ) -> tuple[dict[str, torch.Tensor], float]:
    """Score and select (or load the stored masks). Leaves the model's weights untouched."""
    p = cfg.prune
    params = scored_parameters(cfg, model)
    if rd.masks.exists():  # verified by run(): its checksum, exact count and layer order
        masks = tf.load_masks(rd.masks)
        if list(masks) != list(params):
            raise ValueError(f"{rd.masks} masks {list(masks)}, the model's prunable weights are "
                             f"{list(params)}")
        return masks, rd.read_json(MASKS_INFO)["score_seconds"]
    if p.sparsity == 0:
        masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in params.items()}
        seconds = 0.0
    else:
        batches = scoring_batches(cfg, ds, train_idx, device)
        saved = {n: w.detach().clone() for n, w in params.items()}
        common = {"seed": cfg.seed, "mode": p.score_mode, "exclude": p.exclude, **p.options}
        with timed() as elapsed:
            if p.sanity == "invert":  # keep the lowest-scored weights (one shot)
                scores = invert_scores(fp.score(model, p.criterion, batches, **common))
                masks = fp.select(scores, p.sparsity, scope=p.scope)
            else:
                masks = fp.prune(model, p.criterion, p.sparsity, batches, rounds=p.rounds,
                                 scope=p.scope, **common)
        seconds = elapsed()
        with torch.no_grad():  # undo prune's zeroing: sanity checks may move the mask
            for n, w in params.items():
                w.copy_(saved[n])
        say(f"scored {batches.num_samples} samples in {len(batches)} batches with {p.criterion} "
            f"in {seconds:.2f}s")
    masks = {n: m.cpu() for n, m in masks.items()}
    if p.sanity == "shuffle":  # stored shuffled: the file holds the mask that is trained
        masks = shuffle_masks(masks, seed=cfg.seed)
    rd.path.mkdir(parents=True, exist_ok=True)
    # The masks last: their existence is what marks this stage done (see above).
    rd.write_json(MASKS_INFO, {"score_seconds": seconds})
    tf.save_masks(rd.masks, masks)
    rd.record(MASKS)
    return masks, seconds


def fit(cfg: RunConfig, model: nn.Module, masks: dict[str, torch.Tensor],
        loaders: dict[str, TensorBatches], device: torch.device, rd: RunDir,
        show_progress: bool, say: Say) -> tuple[list[EpochMetrics], int]:
    """Masked training with a fresh optimizer; resumes from the last finished epoch.

    Keeps the best-validation weights (the last epoch's without a validation split, the pruned
    initialization for 0 epochs) and loads them into ``model`` at the end; returns the
    per-epoch history and the best epoch (1-based; 0 = no training).
    """
    t = cfg.train
    optimizer = make_optimizer(model, t)
    # A fresh optimizer: masking the gradients alone keeps pruned weights exactly 0 (tested),
    # and violations() checks it after every epoch.
    masker = fp.Masker(model, masks, guard=False)
    history = load_history(rd, model, optimizer)
    best = max(history, key=lambda h: (h.val_acc if h.val_acc is not None else -1, -h.epoch),
               default=None)
    offset = cfg.warmup.warmup_epochs
    for epoch in range(len(history), t.epochs):
        set_lr_(optimizer, lr_at(epoch, t))
        loaders["train"].set_epoch(offset + epoch)
        bar = tqdm(total=len(loaders["train"]), desc=f"epoch {epoch + 1}/{t.epochs}",
                   disable=not show_progress, leave=False, file=sys.stderr, dynamic_ncols=True)
        with timed() as elapsed, bar:
            try:
                train_loss, train_acc = train_epoch(model, loaders["train"], optimizer, masker,
                                                    device=device, progress=bar.update)
            except DivergedError as err:
                raise DivergedError(f"epoch {epoch + 1}: {err} (try a lower --lr)") from None
        if masker.violations():
            raise RuntimeError(f"epoch {epoch + 1}: {masker.violations()} pruned weights are "
                               "non-zero after training steps (a bug: please report it)")
        val = evaluate(model, loaders["val"], device=device) if "val" in loaders else (None, None)
        metrics = EpochMetrics(epoch + 1, lr_at(epoch, t), train_loss, train_acc, *val, elapsed())
        history.append(metrics)
        # Without a validation split the stored weights are the last epoch's (the ones tested).
        if best is None or (metrics.val_acc or -1) > (best.val_acc or -1) or "val" not in loaders:
            best = metrics
            tf.save_state(rd.best, model)
        save_history(rd, model, optimizer, history)
        rd.record(BEST, CHECKPOINT, METRICS)
        say(f"epoch {metrics.epoch:3d}/{t.epochs}  loss {train_loss:.4f}  train {_pct(train_acc)}"
            f"  val {_pct(metrics.val_acc)}  lr {metrics.lr:.4g}  {metrics.seconds:.1f}s")
    if best is None:  # no training (epochs 0): store the pruned initialization that is tested
        tf.save_state(rd.best, model)
        rd.record(BEST)
    elif "val" in loaders:
        model.load_state_dict(tf.load_state(rd.best))
    else:  # no validation split: the last epoch, never a test-set choice
        best = history[-1]
    return history, (best.epoch if best else 0)


def save_history(rd: RunDir, model: nn.Module, optimizer: torch.optim.Optimizer,
                 history: list[EpochMetrics]) -> None:
    """The checkpoint after an epoch (its history in the same atomic file), then
    ``metrics.json``, a human-readable copy."""
    rows = [asdict(h) for h in history]
    tf.save_checkpoint(rd.checkpoint, model, optimizer, metadata={"history": json.dumps(rows)})
    atomic.write_json(rd.metrics, rows)


def load_history(rd: RunDir, model: nn.Module, optimizer: torch.optim.Optimizer
                 ) -> list[EpochMetrics]:
    """Restore the last finished epoch, if any; return its history (empty for a new run)."""
    if not rd.checkpoint.exists():
        return []
    metadata = tf.load_checkpoint(rd.checkpoint, model, optimizer)
    return [EpochMetrics(**h) for h in json.loads(metadata["history"])]
