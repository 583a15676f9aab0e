"""IMP: iterative magnitude pruning with rewinding, the upper bound pruning at initialization is
measured against (Frankle & Carbin 2019; Frankle et al. 2020, "Linear mode connectivity and the
lottery ticket hypothesis", rewinding to an early epoch).

From the rewind point θ_k (the initialization, or the weights after k dense epochs: the run's
warm-up, ``--warmup-epochs k``), round r trains the network masked by m_{r−1} with the run's own
training settings (a fresh optimizer, the full schedule), then keeps the globally (or per-layer,
``scope``) largest |w| of the trained weights among those still alive: the kept fraction after
round r is (1 − p)^r for the per-round pruned fraction p = ``imp_fraction``, and the last round
keeps exactly the target density. Masks are nested (a pruned weight never returns), and the
run then trains θ_k ⊙ m_R like every other mask. The pruning itself is :func:`fishprune.prune`'s
magnitude criterion on the trained weights; training is :func:`fishprune.train.train_epoch` with
the :class:`~fishprune.masking.Masker`: no copy of either.

Every round is cached in ``<out>/_cache/imp-<key>/`` (its mask and the validation accuracy of
the network it was pruned from), keyed by everything that determines it — so runs of one sweep
at several sparsities share their common rounds, a killed run resumes from its last finished
round, and one IMP curve yields every point of the accuracy-vs-sparsity table.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

import fishprune as fp
from fishprune import cachekeys
from fishprune import tensorfiles as tf
from fishprune.hashing import digest
from fishprune.train import evaluate, lr_at, make_optimizer, set_lr_, train_epoch

if TYPE_CHECKING:
    from fishprune.config import RunConfig
    from fishprune.data import TensorBatches

Say = Callable[[str], None]


def densities(target: float, fraction: float) -> list[float]:
    """Kept fraction after each round: (1 − p)^r while above ``target``, then ``target``."""
    if not 0 < fraction < 1:
        raise ValueError(f"imp_fraction must be in (0, 1); got {fraction!r}")
    rounds = 1 if target >= 1 - fraction else math.ceil(math.log(target) / math.log(1 - fraction))
    out = [(1 - fraction) ** r for r in range(1, rounds)]
    return [*[d for d in out if d > target], target]


def round_dir(cfg: RunConfig, device_type: str) -> Path:
    """The cache of this IMP curve: everything that determines its rounds, not the target."""
    key = digest(["imp", asdict(cfg.model), {k: v for k, v in asdict(cfg.data).items()
                                             if k != "data_dir"},
                  asdict(cfg.warmup), asdict(cfg.train), cfg.seed, cfg.prune.imp_fraction,
                  cfg.prune.scope, list(cfg.prune.exclude), device_type])
    return cachekeys.cache_dir(cfg) / f"imp-{key}"


def train_masked(cfg: RunConfig, model: nn.Module, masks: dict[str, Tensor],
                 loaders: dict[str, TensorBatches], device: torch.device) -> float | None:
    """Train ``model`` (in place) with ``masks`` for the run's epochs; return the last
    validation accuracy (None without a validation split)."""
    fp.apply_masks(model, masks)
    optimizer = make_optimizer(model, cfg.train)
    masker = fp.Masker(model, masks, guard=False)
    offset = cfg.warmup.warmup_epochs
    for epoch in range(cfg.train.epochs):
        set_lr_(optimizer, lr_at(epoch, cfg.train))
        loaders["train"].set_epoch(offset + epoch)
        train_epoch(model, loaders["train"], optimizer, masker, device=device)
    return evaluate(model, loaders["val"], device=device)[1] if "val" in loaders else None


def imp_masks(cfg: RunConfig, model: nn.Module, loaders: dict[str, TensorBatches],
              device: torch.device, say: Say) -> dict[str, Tensor]:
    """The IMP mask at ``cfg.prune.sparsity`` for the rewind point ``model`` (left unchanged)."""
    p = cfg.prune
    rewind = {k: v.detach().clone() for k, v in model.state_dict().items()}
    cache = round_dir(cfg, device.type)
    cache.mkdir(parents=True, exist_ok=True)
    masks = {n: torch.ones_like(w, dtype=torch.bool) for n, w in
             fp.prunable_parameters(model, p.exclude).items()}
    schedule = densities(1 - p.sparsity, p.imp_fraction)
    for r, density in enumerate(schedule, start=1):
        path = cache / f"round-{r}-density-{density:.12g}.safetensors"
        if path.exists():
            try:
                masks = tf.load_masks(path)
                continue
            except ValueError as err:  # corrupt: recompute this round
                say(f"WARNING: {err}; recomputing IMP round {r}")
        trained = copy.deepcopy(model)
        trained.load_state_dict(rewind)
        val = train_masked(cfg, trained, masks, loaders, device)
        alive = {n: m.to(device) for n, m in masks.items()}
        scores = fp.score(trained, "magnitude", None, exclude=p.exclude)
        scores = {n: torch.where(alive[n], s, torch.full_like(s, -math.inf))
                  for n, s in scores.items()}
        chosen = fp.select(scores, 1 - density, scope=p.scope, on_empty="ignore")
        masks = {n: m.cpu() for n, m in chosen.items()}
        tf.save_masks(path, masks, metadata={"round": str(r), "density": repr(density),
                                             "pruned_from_val_acc": repr(val)})
        say(f"IMP round {r}/{len(schedule)}: trained at density {_prev(schedule, r):.4g} "
            f"(val acc {val if val is None else f'{100 * val:.2f}%'}), kept {density:.4g}")
    return masks


def _prev(schedule: list[float], r: int) -> float:
    return 1.0 if r == 1 else schedule[r - 2]
