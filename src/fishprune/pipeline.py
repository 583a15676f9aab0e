"""The experiment protocol as one straight-line function, :func:`run`.

data → model → (warm-up) → scores → mask → masked training → evaluation → stored result.
Every expensive stage leaves an artifact in the run directory (or, for work shared by many
runs, in ``<out>/_cache``), so a rerun skips what is done and a killed run resumes from its last
finished epoch. All files are written atomically.
"""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

import fishprune as fp
from fishprune import io
from fishprune.collapse import CollapseError, collapse_report
from fishprune.config import RunConfig
from fishprune.data import (
    DatasetTensors,
    TensorBatches,
    load_dataset,
    scoring_indices,
    stratified_split,
)
from fishprune.models import build_model
from fishprune.provenance import provenance
from fishprune.sanity import invert_scores, randomize_labels, reinitialize_, shuffle_masks
from fishprune.train import (
    EpochMetrics,
    bn_warmup_,
    evaluate,
    lr_at,
    make_optimizer,
    set_lr_,
    timed,
    train_epoch,
)

log = logging.getLogger("fishprune")
RESULT = "result.json"


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` without a GPU is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' was asked for, but torch sees no CUDA GPU (use auto/cpu)")
    return torch.device(name)


def run(cfg: RunConfig, *, show_progress: bool = True, echo: Callable[[str], None] | None = None
        ) -> dict[str, Any]:
    """Run (or resume, or skip if finished) the experiment ``cfg``; return its result dict."""
    say = echo or (lambda _msg: None)
    cfg.validate()
    out = cfg.directory()
    if (out / RESULT).exists():
        say(f"already finished: {out / RESULT}")
        return json.loads((out / RESULT).read_text())
    remove_stale_temps(out)  # left by a killed write; the files they were to replace are intact
    prep = prepare(cfg, say)
    ds, train_idx, loaders, model, device = (prep.ds, prep.train_idx, prep.loaders, prep.model,
                                             prep.device)
    warm_seconds = prep.warmup_seconds

    # The run directory appears with the first artifact: a bad input fails before it exists.
    masks, score_seconds = pruning_masks(cfg, ds, train_idx, model, device, out, say)
    io.atomic_write_json(out / "config.json", {"run_id": cfg.run_id(), "label": cfg.label(),
                                               **cfg.to_dict()})
    io.atomic_write_json(out / "provenance.json", provenance(device))
    if cfg.prune.sanity == "reinit":
        reinitialize_(model, fresh_model(cfg, ds, seed=cfg.seed + 1_000_003).to(device))
    report = collapse_report(model, masks, tuple(ds.train_x.shape[1:]))
    io.atomic_write_json(out / "layers.json", report.to_dict())
    say(report.table())
    if (report.collapsed or report.disconnected) and cfg.prune.on_collapse != "ignore":
        message = report.warning()
        if cfg.prune.on_collapse == "error":
            raise CollapseError(message)
        say(f"WARNING: {message}")
    fp.apply_masks(model, masks)

    history, best_epoch = fit(cfg, model, masks, loaders, device, out, show_progress, say)
    test_loss, test_acc = evaluate(model, loaders["test"], device=device)
    dense = sum(p.numel() for p in model.parameters())
    result = {
        "run_id": cfg.run_id(),
        "label": cfg.label(),
        "criterion": "dense" if cfg.prune.sparsity == 0 else cfg.prune.criterion,
        "sparsity": cfg.prune.sparsity,
        "density": fp.density_of(masks),
        "parameters": dense,
        "prunable": sum(m.numel() for m in masks.values()),
        "kept": sum(int(m.sum()) for m in masks.values()),
        "collapsed_layers": report.collapsed,
        "disconnected_layers": report.disconnected,
        "best_epoch": best_epoch,
        "best_val_acc": history[best_epoch - 1].val_acc if best_epoch else None,
        "test_acc": test_acc,
        "test_loss": test_loss,
        "warmup_seconds": warm_seconds,
        "score_seconds": score_seconds,
        "train_seconds": sum(h.seconds for h in history),
        "epochs": len(history),
    }
    io.atomic_write_json(out / RESULT, result)
    (out / CHECKPOINT).unlink(missing_ok=True)  # the result and best.safetensors supersede it
    say(f"best validation accuracy {_pct(result['best_val_acc'])} (epoch {best_epoch}); "
        f"test accuracy {_pct(test_acc)}  →  {out}")
    return result


def remove_stale_temps(out: Path) -> None:
    """Delete the hidden temporary files of atomic writes that a killed process left in ``out``."""
    if out.is_dir():
        for tmp in out.glob(".*.tmp*"):
            tmp.unlink(missing_ok=True)


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


def _key(*parts: Any) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def fresh_model(cfg: RunConfig, ds: DatasetTensors, *, seed: int) -> nn.Module:
    """The model of ``cfg`` for ``ds``, initialized from ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return build_model(cfg.model.model, in_channels=ds.in_channels, num_classes=ds.num_classes,
                       image_size=ds.image_size, width=cfg.model.width, init=cfg.model.init)


def cache_dir(cfg: RunConfig) -> Path:
    """Where work shared by several runs (initializations, warm-ups) is cached."""
    return Path(cfg.out) / "_cache"


def init_path(cfg: RunConfig, ds: DatasetTensors) -> Path:
    """The cached initialization: one per (model settings, input shape, classes, seed)."""
    key = _key(asdict(cfg.model), ds.in_channels, ds.num_classes, ds.image_size, cfg.seed)
    return cache_dir(cfg) / f"init-{key}.safetensors"


def warmup_path(cfg: RunConfig, device: torch.device) -> Path:
    """The cached warm-up: keyed by everything that changes it (not the number of epochs
    trained after pruning, nor where the data lives)."""
    data = {k: v for k, v in asdict(cfg.data).items() if k != "data_dir"}
    train = {k: v for k, v in asdict(cfg.train).items() if k != "epochs"}
    key = _key(asdict(cfg.model), data, asdict(cfg.warmup), train, cfg.seed, device.type)
    return cache_dir(cfg) / f"warmup-{key}.safetensors"


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


def prepare(cfg: RunConfig, say: Callable[[str], None] = lambda _m: None) -> Prepared:
    """data → model → warm-up: the stages shared by runs, sweeps and ``fishprune analyze``."""
    device = resolve_device(cfg.device)
    ds = load_dataset(cfg.data.dataset, cfg.data.data_dir)
    train_idx, val_idx = stratified_split(ds.train_y, cfg.data.val_fraction, cfg.data.split_seed)
    loaders = make_loaders(cfg, ds, train_idx, val_idx, device)
    model = initial_model(cfg, ds, device)
    seconds = warm_up(cfg, model, loaders, device, say=say)
    return Prepared(ds, train_idx, val_idx, loaders, model, device, seconds)


def initial_model(cfg: RunConfig, ds: DatasetTensors, device: torch.device) -> nn.Module:
    """The seeded initialization, cached per (model, input shape, seed) for every run sharing it."""
    model = fresh_model(cfg, ds, seed=cfg.seed)
    path = init_path(cfg, ds)
    cache = path.parent
    if path.exists():
        model.load_state_dict(io.load_state(path))
    else:
        cache.mkdir(parents=True, exist_ok=True)
        io.save_state(path, model)
    model.to(device)
    if device.type == "cuda" and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        model.to(memory_format=torch.channels_last)
    return model


def warm_up(cfg: RunConfig, model: nn.Module, loaders: dict[str, TensorBatches],
            device: torch.device, *, say: Callable[[str], None]) -> float:
    """Dense warm-up epochs and/or the BN-statistics pass, in place; cached like the init.

    Returns the seconds the warm-up took (also when it is loaded from the cache, where the
    time of the run that computed it is stored).
    """
    w = cfg.warmup
    if w.warmup_epochs == 0 and not w.bn_warmup:
        return 0.0
    path = warmup_path(cfg, device)
    if path.exists():
        model.load_state_dict(io.load_state(path))
        say(f"warm-up loaded from {path}")
        return float(io.read_metadata(path).get("seconds", 0.0))
    with timed() as elapsed:
        if w.warmup_epochs:
            optimizer = make_optimizer(model, cfg.train)  # discarded afterwards: no momentum leaks
            for epoch in range(w.warmup_epochs):
                set_lr_(optimizer, lr_at(epoch, cfg.train))
                loaders["train"].set_epoch(epoch)
                loss, acc = train_epoch(model, loaders["train"], optimizer, None, device=device)
                say(f"warm-up epoch {epoch + 1}/{w.warmup_epochs}: loss {loss:.4f}, "
                    f"train acc {_pct(acc)}")
        if w.bn_warmup:
            bn_warmup_(model, loaders["train_plain"])
    io.save_state(path, model, metadata={"seconds": f"{elapsed():.3f}"})
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


def pruning_masks(cfg: RunConfig, ds: DatasetTensors, train_idx: torch.Tensor, model: nn.Module,
                  device: torch.device, out: Path, say: Callable[[str], None]
                  ) -> tuple[dict[str, torch.Tensor], float]:
    """Score and select (or load the stored masks). Leaves the model's weights untouched."""
    path = out / "masks.safetensors"
    if path.exists():
        return io.load_masks(path), json.loads((out / "masks.json").read_text())["score_seconds"]
    p = cfg.prune
    params = fp.prunable_parameters(model, p.exclude)
    if p.sparsity == 0:
        masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in params.items()}
        seconds = 0.0
    else:
        batches = scoring_batches(cfg, ds, train_idx, device)
        saved = {n: w.detach().clone() for n, w in params.items()}
        common = {"seed": cfg.seed, "mode": p.score_mode, "exclude": p.exclude,
                  **p.criterion_options()}
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
    out.mkdir(parents=True, exist_ok=True)
    # masks.safetensors last: its existence is what marks this stage done (see above).
    io.atomic_write_json(out / "masks.json", {"score_seconds": seconds})
    io.save_masks(path, masks)
    return masks, seconds


def fit(cfg: RunConfig, model: nn.Module, masks: dict[str, torch.Tensor],
        loaders: dict[str, TensorBatches], device: torch.device, out: Path,
        show_progress: bool, say: Callable[[str], None]) -> tuple[list[EpochMetrics], int]:
    """Masked training with a fresh optimizer; resumes from the last finished epoch.

    Keeps the best-validation weights (``best.safetensors``; the last epoch's without a
    validation split, the pruned initialization for 0 epochs) and loads them into ``model``
    at the end; returns the per-epoch history and the best epoch (1-based; 0 = no training).
    """
    t = cfg.train
    optimizer = make_optimizer(model, t)
    # A fresh optimizer: masking the gradients alone keeps pruned weights exactly 0 (tested),
    # and violations() checks it after every epoch.
    masker = fp.Masker(model, masks, guard=False)
    history = load_checkpoint(out, model, optimizer)
    best = max(history, key=lambda h: (h.val_acc if h.val_acc is not None else -1, -h.epoch),
               default=None)
    offset = cfg.warmup.warmup_epochs
    for epoch in range(len(history), t.epochs):
        set_lr_(optimizer, lr_at(epoch, t))
        loaders["train"].set_epoch(offset + epoch)
        bar = tqdm(total=len(loaders["train"]), desc=f"epoch {epoch + 1}/{t.epochs}",
                   disable=not show_progress, leave=False, file=sys.stderr, dynamic_ncols=True)
        with timed() as elapsed, bar:
            train_loss, train_acc = train_epoch(model, loaders["train"], optimizer, masker,
                                                device=device, progress=bar.update)
        if masker.violations():
            raise RuntimeError(f"epoch {epoch + 1}: {masker.violations()} pruned weights are "
                               "non-zero after training steps (a bug: please report it)")
        val = evaluate(model, loaders["val"], device=device) if "val" in loaders else (None, None)
        metrics = EpochMetrics(epoch + 1, lr_at(epoch, t), train_loss, train_acc, *val, elapsed())
        history.append(metrics)
        # Without a validation split the stored weights are the last epoch's (the ones tested).
        if best is None or (metrics.val_acc or -1) > (best.val_acc or -1) or "val" not in loaders:
            best = metrics
            io.save_state(out / "best.safetensors", model)
        save_checkpoint(out, model, optimizer, history)
        say(f"epoch {metrics.epoch:3d}/{t.epochs}  loss {train_loss:.4f}  train {_pct(train_acc)}"
            f"  val {_pct(metrics.val_acc)}  lr {metrics.lr:.4g}  {metrics.seconds:.1f}s")
    if best is None:  # no training (epochs 0): store the pruned initialization that is tested
        io.save_state(out / "best.safetensors", model)
    elif "val" in loaders:
        model.load_state_dict(io.load_state(out / "best.safetensors"))
    else:  # no validation split: the last epoch, never a test-set choice
        best = history[-1]
    return history, (best.epoch if best else 0)


CHECKPOINT = "checkpoint.safetensors"


def save_checkpoint(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer,
                    history: list[EpochMetrics]) -> None:
    """Model, optimizer state, RNG and history after an epoch, in ONE atomic file.

    A single file means a kill can never leave weights of one epoch beside the history of
    another; ``metrics.json`` is a human-readable copy written afterwards.
    """
    state = {f"model/{k}": v for k, v in model.state_dict().items()}
    for index, slots in optimizer.state_dict()["state"].items():
        for key, value in slots.items():
            if isinstance(value, torch.Tensor):
                state[f"optim/{index}/{key}"] = value
    state["rng/cpu"] = torch.get_rng_state()
    history_json = json.dumps([asdict(h) for h in history])
    io.save_state(out / CHECKPOINT, state, metadata={"history": history_json})
    io.atomic_write_json(out / "metrics.json", [asdict(h) for h in history])


def load_checkpoint(out: Path, model: nn.Module, optimizer: torch.optim.Optimizer
                    ) -> list[EpochMetrics]:
    """Restore the last finished epoch, if any; return its history (empty for a new run)."""
    path = out / CHECKPOINT
    if not path.exists():
        return []
    flat = io.load_state(path)
    history = [EpochMetrics(**h) for h in json.loads(io.read_metadata(path)["history"])]
    model.load_state_dict({k[6:]: v for k, v in flat.items() if k.startswith("model/")})
    torch.set_rng_state(flat["rng/cpu"])
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    if state:
        optimizer.load_state_dict({"state": state,
                                   "param_groups": optimizer.state_dict()["param_groups"]})
    return history
