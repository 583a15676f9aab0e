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
from fishprune import atomic, cachekeys, distributed
from fishprune import tensorfiles as tf
from fishprune.collapse import CollapseError, collapse_report
from fishprune.config import ConfigError, RunConfig
from fishprune.criteria import get_criterion
from fishprune.data import (
    DatasetTensors,
    FolderData,
    ImageBatches,
    TensorBatches,
    load_dataset,
    make_batches,
    scoring_indices,
    stratified_split,
)
from fishprune.models import build_model
from fishprune.progress import Counted, Progress
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
    """Run (or resume, or skip if finished) the experiment ``cfg``; return its result dict.

    Under ``torchrun`` every rank calls this; the ranks split the work
    (:mod:`fishprune.distributed`) and only rank 0 writes or prints.
    """
    say = echo or (lambda _msg: None)
    cfg.validate()
    check_out(cfg)
    world = distributed.init_from_env(resolve_device(cfg.device).type)  # distributed (torchrun)
    if world.size > 1:  # distributed: from here on this process splits its work over the ranks
        distributed.use_data_parallel(torch.distributed.group.WORLD)
        distributed.check_identical("run configuration", cfg.run_id())
        distributed.per_rank_batch_size(cfg.data.batch_size, world.size)
        if not world.is_main:
            say, show_progress = (lambda _msg: None), False
    main = world.is_main
    rd = RunDir.of(cfg)
    problems = rd.verify(cfg, repair=True) if main else []
    if distributed.agree(bool(problems)):  # never resume from, or skip on, what was not written
        if main:
            moved = rd.quarantine()
            say(f"WARNING: {problems[0]}"
                + (f" (and {len(problems) - 1} more)" if problems[1:] else "")
                + f"; the run directory was moved to {moved} and the run is recomputed")
        distributed.barrier()
    if distributed.agree(rd.is_finished()):
        say(f"already finished: {rd.result}")
        return json.loads(rd.result.read_text())
    if main:
        rd.remove_stale_temps()  # left by a killed write; the files they replace are intact
        rd.error.unlink(missing_ok=True)  # a new attempt
    try:
        return _run(cfg, rd, world, show_progress, say)
    except Exception as err:
        if main and rd.path.is_dir():  # the failure is recorded where the run lives (rundir)
            rd.record_error(cfg, f"{type(err).__name__}: {err}", traceback.format_exc())
        raise


def _run(cfg: RunConfig, rd: RunDir, world: distributed.World, show_progress: bool, say: Say
         ) -> dict[str, Any]:
    main = world.is_main
    prep = prepare(cfg, say, show_progress=show_progress)
    ds, model, device = prep.ds, prep.model, prep.device
    check_ranks_agree(prep)  # distributed: same data, split and (warmed-up) weights everywhere

    # The run directory appears with the first artifact: a bad input fails before it exists.
    masks, score_seconds = pruning_masks(cfg, prep, rd, say, show_progress=show_progress)
    distributed.check_identical("mask", masks)  # distributed: a mismatch names the ranks
    if main:
        rd.write_config(cfg)
        rd.write_json(PROVENANCE, provenance(device, world.size, world.backend,
                                             data_source=ds.source))
    if cfg.prune.sanity == "reinit":
        reinitialize_(model, fresh_model(cfg, ds, seed=cfg.seed + 1_000_003).to(device))
    report = collapse_report(model, masks, tuple(ds.train_x.shape[1:]))
    if main:
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
    if main:
        rd.write_json(RESULT, result)
        rd.discard(CHECKPOINT)  # the result and the best weights supersede it
    distributed.barrier()  # distributed: no rank returns before the result exists
    say(f"best validation accuracy {_pct(result['best_val_acc'])} (epoch {best_epoch}); "
        f"test accuracy {_pct(test_acc)}  →  {rd.path}")
    return result


def check_ranks_agree(prep: Prepared) -> None:
    """Under torchrun: every rank must hold the same data, split and starting weights, or
    the reduced scores would silently mix different experiments (a no-op in one process)."""
    if distributed.current_world().size == 1:
        return
    ds = prep.ds
    distributed.check_identical("data", {"train_x": ds.train_x, "train_y": ds.train_y,
                                         "test_x": ds.test_x, "test_y": ds.test_y,
                                         "train_idx": prep.train_idx, "val_idx": prep.val_idx})
    distributed.check_identical("initial (warmed-up) model", prep.model.state_dict())


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.2f}%"


def make_loaders(cfg: RunConfig, ds: DatasetTensors | FolderData, train_idx: torch.Tensor,
                 val_idx: torch.Tensor, device: torch.device
                 ) -> dict[str, TensorBatches | ImageBatches]:
    """Train (shuffled, augmented where the dataset wants it), validation and test batches
    (streamed from disk for image folders)."""
    augment = cfg.data.augment if cfg.data.augment is not None else ds.in_channels == 3
    common = {"mean": ds.mean, "std": ds.std, "device": device,
              "num_workers": cfg.data.num_workers}
    b = cfg.data.batch_size
    loaders = {
        "train": make_batches(ds.train_x[train_idx], ds.train_y[train_idx], batch_size=b,
                              shuffle=True, seed=cfg.seed, augment=augment, **common),
        "train_plain": make_batches(ds.train_x[train_idx], ds.train_y[train_idx], batch_size=b,
                                    **common),
        "test": test_batches(cfg, ds, device),
    }
    if len(val_idx):
        loaders["val"] = make_batches(ds.train_x[val_idx], ds.train_y[val_idx], batch_size=1024,
                                      **common)
    return loaders


def test_batches(cfg: RunConfig, ds: DatasetTensors | FolderData, device: torch.device
                 ) -> TensorBatches | ImageBatches:
    """The test split in evaluation batches (the run's, and ``fishprune verify``'s)."""
    return make_batches(ds.test_x, ds.test_y, batch_size=1024, mean=ds.mean, std=ds.std,
                        device=device, num_workers=cfg.data.num_workers)


def fresh_model(cfg: RunConfig, ds: DatasetTensors | FolderData, *, seed: int) -> nn.Module:
    """The model of ``cfg`` for ``ds``, initialized from ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return build_model(cfg.model.model, in_channels=ds.in_channels, num_classes=ds.num_classes,
                       image_size=cfg.data.image_size or ds.image_size, width=cfg.model.width,
                       init=cfg.model.init, kwargs=cfg.model.model_kwargs)


@dataclass
class Prepared:
    """Everything before scoring: data, split, loaders, and the (warmed-up) model."""

    ds: DatasetTensors | FolderData
    train_idx: torch.Tensor
    val_idx: torch.Tensor
    loaders: dict[str, TensorBatches | ImageBatches]
    model: nn.Module
    device: torch.device
    warmup_seconds: float


def check_out(cfg: RunConfig) -> None:
    """A usage error when ``out`` is empty or names something that is not a directory."""
    if not cfg.out.strip():
        raise ConfigError("out must name a directory; got an empty string")
    if Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise ConfigError(f"out {cfg.out} exists and is not a directory")


def prepare(cfg: RunConfig, say: Say = lambda _m: None, *, show_progress: bool = False
            ) -> Prepared:
    """data → model → warm-up: the stages shared by runs, sweeps and ``fishprune analyze``."""
    check_out(cfg)
    device = resolve_device(cfg.device)
    d = cfg.data
    if d.data_dir is not None and not Path(d.data_dir).expanduser().is_dir():
        raise ConfigError(f"data_dir {d.data_dir} is not a directory (a directory you name is "
                          "used as given, never replaced by another location)")
    ds = load_dataset(d.dataset, d.data_dir, image_size=d.image_size, num_workers=d.num_workers)
    if getattr(ds, "val_split", None) is not None:  # an image folder with its own val/
        train_idx, val_idx = ds.val_split
    else:
        train_idx, val_idx = stratified_split(ds.train_y, d.val_fraction, d.split_seed)
    missing = set(ds.train_y.unique().tolist()) - set(ds.train_y[train_idx].unique().tolist())
    if missing:
        raise ConfigError(f"val_fraction={d.val_fraction} leaves no training sample of "
                          f"{len(missing)} class(es) of {d.dataset}: use a smaller one")
    for note in getattr(ds, "notes", ()):
        say(f"{ds.name} {ds.source}: {note}")
    loaders = make_loaders(cfg, ds, train_idx, val_idx, device)
    atomic.remove_stale_temps(cachekeys.cache_dir(cfg))  # left by killed writers only
    model = initial_model(cfg, ds, device, say)
    seconds = warm_up(cfg, model, loaders, device, say=say, show_progress=show_progress)
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
    cached = load_cached(path, say) if distributed.agree(path.exists()) else None
    if cached is not None:
        model.load_state_dict(cached)
    elif distributed.is_main():  # distributed: the other ranks built the same weights
        path.parent.mkdir(parents=True, exist_ok=True)
        tf.save_state(path, model)
    model.to(device)
    if device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        model.to(memory_format=torch.channels_last)
    return model


def warm_up(cfg: RunConfig, model: nn.Module, loaders: dict[str, TensorBatches],
            device: torch.device, *, say: Say, show_progress: bool = False) -> float:
    """Dense warm-up epochs and/or the BN-statistics pass, in place; cached like the init.

    Returns the seconds the warm-up took (also when it is loaded from the cache, where the
    time of the run that computed it is stored).
    """
    w = cfg.warmup
    path = cachekeys.warmup_path(cfg, device.type)
    if path is None:
        return 0.0
    cached = load_cached(path, say) if distributed.agree(path.exists()) else None
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
                with Progress(f"warm-up epoch {epoch + 1}/{w.warmup_epochs}",
                              len(loaders["train"]), show=show_progress, say=say) as bar, \
                        distributed.wrapped(model) as net:  # distributed: DDP, synced BN
                    try:
                        loss, acc = train_epoch(net, loaders["train"], optimizer, None,
                                                device=device, progress=bar.update)
                    except DivergedError as err:
                        raise DivergedError(f"warm-up epoch {epoch + 1}: {err} (try a lower "
                                            "--lr)") from None
                say(f"warm-up epoch {epoch + 1}/{w.warmup_epochs}: loss {loss:.4f}, "
                    f"train acc {_pct(acc)}")
        if w.bn_warmup:
            with Progress("BN statistics", len(loaders["train_plain"]), show=show_progress,
                          say=say) as bar:
                bn_warmup_(model, Counted(loaders["train_plain"], bar), momentum=w.bn_momentum)
    if distributed.is_main():
        path.parent.mkdir(parents=True, exist_ok=True)
        tf.save_state(path, model, metadata={"seconds": f"{elapsed():.3f}"})
    say(f"warm-up took {elapsed():.1f}s")
    return elapsed()


def scoring_batches(cfg: RunConfig, ds: DatasetTensors, train_idx: torch.Tensor,
                    device: torch.device) -> TensorBatches:
    """The scoring data: a seeded subset of the training split (k per class, or all of it),
    unshuffled, in batches of ``score_batch_size`` (the Fisher estimate).

    Unaugmented by default. ``score_augment`` passes every image through the training
    augmentation (random crop with 4-pixel zero padding + horizontal flip), drawn from the run's
    seed, as the reference implementations score; the same draws serve every round."""
    p = cfg.prune
    idx = scoring_indices(ds.train_y, p.score_samples, cfg.seed, indices=train_idx)
    y = ds.train_y[idx]
    if p.sanity == "random-labels":
        y = randomize_labels(y, ds.num_classes, seed=cfg.seed)
    return make_batches(ds.train_x[idx], y, batch_size=p.score_batch_size, mean=ds.mean,
                        std=ds.std, device=device, num_workers=cfg.data.num_workers,
                        augment=p.score_augment, seed=cfg.seed)


def scored_parameters(cfg: RunConfig, model: nn.Module) -> dict[str, nn.Parameter]:
    """The weights the run scores and prunes; a usage error when ``exclude`` leaves none."""
    every = list(fp.prunable_parameters(model))
    unmatched = [pat for pat in cfg.prune.exclude if not any(fnmatchcase(n, pat) for n in every)]
    if unmatched:  # a typo would silently prune the weights it was meant to keep
        raise ConfigError(f"exclude pattern(s) {unmatched} match no prunable weight of "
                          f"{cfg.model.model} (its prunable weights: {', '.join(every)})")
    params = fp.prunable_parameters(model, cfg.prune.exclude)
    if not params:
        raise ConfigError(f"nothing is left to score: exclude={list(cfg.prune.exclude)} matches "
                          f"every prunable weight of {cfg.model.model}")
    return params


def pruning_masks(cfg: RunConfig, prep: Prepared, rd: RunDir, say: Say, *,
                  show_progress: bool = False
                  ) -> tuple[dict[str, torch.Tensor], float]:
    """Score and select, or run IMP (or load the stored masks). Leaves the model's weights
    untouched."""
    ds, train_idx, model, device = prep.ds, prep.train_idx, prep.model, prep.device
    p = cfg.prune
    params = scored_parameters(cfg, model)
    # Verified by run(): checksum, exact count, layer order; the same decision on every rank.
    if distributed.agree(rd.masks.exists()):
        masks = tf.load_masks(rd.masks)
        if list(masks) != list(params):
            raise ValueError(f"{rd.masks} masks {list(masks)}, the model's prunable weights are "
                             f"{list(params)}")
        return masks, rd.read_json(MASKS_INFO)["score_seconds"]
    scoring: dict[str, Any] | None = None
    if p.sparsity == 0:
        masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in params.items()}
        seconds = 0.0
    elif p.criterion == "imp":
        from fishprune.imp import imp_masks

        with timed() as elapsed:
            masks = imp_masks(cfg, model, prep.loaders, device, say)
        seconds = elapsed()
    else:
        batches = scoring_batches(cfg, ds, train_idx, device)
        saved = {n: w.detach().clone() for n, w in params.items()}
        common = {"seed": cfg.seed, "mode": p.score_mode, "exclude": p.exclude, **p.options}
        rounds = 1 if p.sanity == "invert" else (
            p.rounds or get_criterion(p.criterion).default_rounds)
        bar = (Progress(f"scoring ({p.criterion})", len(batches), show=show_progress, say=say)
               if rounds == 1 else Progress(f"pruning ({p.criterion})", rounds,
                                            show=show_progress, say=say, unit="rounds"))
        data = Counted(batches, bar) if rounds == 1 else batches
        with timed() as elapsed, bar:
            if p.sanity == "invert":  # keep the lowest-scored weights (one shot)
                scores, info = fp.score(model, p.criterion, data, return_info=True, **common)
                masks = fp.select(invert_scores(scores), p.sparsity, scope=p.scope,
                                  on_empty="ignore")  # the run reports collapse itself
            else:
                masks, info = fp.prune(model, p.criterion, p.sparsity, data, rounds=p.rounds,
                                       schedule=p.schedule, on_empty="ignore",
                                       return_info=True, scope=p.scope,
                                       on_round=lambda _r, _n: bar.update(1), **common)
        seconds = elapsed()
        scoring = asdict(info)
        if info.hvp not in (None, "exact"):
            say(f"NOTE: Hessian-vector products by {info.hvp} ({info.hvp_reason})")
        with torch.no_grad():  # undo prune's zeroing: sanity checks may move the mask
            for n, w in params.items():
                w.copy_(saved[n])
        say(f"scored {batches.num_samples} samples in {len(batches)} batches with {p.criterion} "
            f"in {seconds:.2f}s")
    masks = {n: m.cpu() for n, m in masks.items()}
    if p.sanity == "shuffle":  # stored shuffled: the file holds the mask that is trained
        masks = shuffle_masks(masks, seed=cfg.seed)
    if distributed.is_main():
        rd.path.mkdir(parents=True, exist_ok=True)
        # The masks last: their existence is what marks this stage done (see above).
        # How the scores were computed (the Hessian-vector product method, per-sample
        # fallbacks): a fallback never changes a result silently.
        rd.write_json(MASKS_INFO, {"score_seconds": seconds, "scoring": scoring})
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
    if history:
        say(f"resuming from epoch {len(history) + 1}/{t.epochs} ({rd.checkpoint.name})"
            if len(history) < t.epochs else
            f"resuming after the last epoch ({rd.checkpoint.name})")
    best = max(history, key=lambda h: (h.val_acc if h.val_acc is not None else -1, -h.epoch),
               default=None)
    offset = cfg.warmup.warmup_epochs
    main = distributed.is_main()
    for epoch in range(len(history), t.epochs):
        set_lr_(optimizer, lr_at(epoch, t))
        loaders["train"].set_epoch(offset + epoch)
        bar = tqdm(total=len(loaders["train"]), desc=f"epoch {epoch + 1}/{t.epochs}",
                   disable=not show_progress, leave=False, file=sys.stderr, dynamic_ncols=True)
        with timed() as elapsed, bar, distributed.wrapped(model) as net:  # distributed: DDP
            try:
                train_loss, train_acc = train_epoch(net, loaders["train"], optimizer, masker,
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
            if main:
                tf.save_state(rd.best, model)
        if main:
            save_history(rd, model, optimizer, history)
            rd.record(BEST, CHECKPOINT, METRICS)
        distributed.barrier()  # distributed: the epoch's files exist before any rank goes on
        say(f"epoch {metrics.epoch:3d}/{t.epochs}  loss {train_loss:.4f}  train {_pct(train_acc)}"
            f"  val {_pct(metrics.val_acc)}  lr {metrics.lr:.4g}  {metrics.seconds:.1f}s")
    if best is None:  # no training (epochs 0): store the pruned initialization that is tested
        if main:
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
    if not distributed.agree(rd.checkpoint.exists()):  # distributed: the same on every rank
        return []
    metadata = tf.load_checkpoint(rd.checkpoint, model, optimizer)
    return [EpochMetrics(**h) for h in json.loads(metadata["history"])]
