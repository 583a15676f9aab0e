"""Training and evaluation: plain loops over resident tensor batches, masks enforced each step."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fishprune import distributed
from fishprune.config import TrainConfig
from fishprune.masking import Masker
from fishprune.modes import restored_modes


class DivergedError(RuntimeError):
    """Training produced a non-finite loss (a learning rate too high, for instance)."""


@dataclass(frozen=True)
class EpochMetrics:
    """What one epoch produced; ``val_*`` is None without a validation split."""

    epoch: int
    lr: float
    train_loss: float
    train_acc: float
    val_loss: float | None
    val_acc: float | None
    seconds: float


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    """A *fresh* optimizer (no momentum carried over from earlier training)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
        nesterov=cfg.nesterov and cfg.momentum > 0,
    )


def lr_at(epoch: int, cfg: TrainConfig) -> float:
    """Multi-step decay: ``lr · lr_gamma^k`` in (0-based) ``epoch``, k = milestones <= epoch.

    A pure function of the epoch rather than a scheduler object, so a resumed run needs no
    scheduler state to be bit-identical to an uninterrupted one.
    """
    return cfg.lr * cfg.lr_gamma ** sum(1 for m in cfg.lr_milestones if m <= epoch)


def set_lr_(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def autocast(device: torch.device) -> contextlib.AbstractContextManager:
    """bf16 autocast on CUDA (the fast path); nothing on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def train_epoch(
    model: nn.Module,
    batches: Iterable[tuple[Tensor, Tensor]],
    optimizer: torch.optim.Optimizer,
    masker: Masker | None,
    *,
    device: torch.device,
    progress: Callable[[int], None] | None = None,
) -> tuple[float, float]:
    """One pass of SGD; pruned weights stay exactly zero. Returns (mean loss, accuracy).

    Raises :class:`DivergedError` when the loss was NaN or infinite (checked once, at the end:
    the loss is accumulated on the device, without a synchronization per step).

    Data-parallel (``model`` wrapped by :func:`fishprune.distributed.wrapped`): each rank
    trains on its slice of every batch and the metrics are summed over the ranks.
    """
    batches = distributed.shard(batches, training=True)  # distributed: this rank's slices
    model.train()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for inputs, targets in batches:
        with autocast(device):
            outputs = model(inputs)
            loss = F.cross_entropy(outputs, targets)
        optimizer.zero_grad(set_to_none=True)
        distributed.scaled_loss(loss, batches).backward()  # distributed: weight for DDP's mean
        if masker is not None:
            masker.mask_grads_()
        optimizer.step()
        if masker is not None and masker.guard:
            masker.mask_weights_()
        n = targets.shape[0]
        loss_sum += loss.detach() * n  # accumulated on device: no sync per step
        correct += (outputs.detach().argmax(1) == targets).sum()
        seen += n
        if progress is not None:
            progress(1)
    loss_sum, correct, total = distributed.reduce_metrics(  # distributed: sums over ranks
        loss_sum, correct, torch.tensor(seen))
    mean_loss = float(loss_sum) / max(int(total), 1)
    if not math.isfinite(mean_loss):
        raise DivergedError(f"training diverged: the loss is {mean_loss}")
    return mean_loss, int(correct) / max(int(total), 1)


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]], *, device: torch.device
) -> tuple[float, float]:
    """(mean cross-entropy, top-1 accuracy) in eval mode (data-parallel: each rank its slice
    of every batch, the sums of losses, corrects and counts reduced over the ranks)."""
    batches = distributed.shard(batches)  # distributed: this rank's slices
    model.eval()
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    for inputs, targets in batches:
        with autocast(device):
            outputs = model(inputs)
        loss_sum += F.cross_entropy(outputs.float(), targets, reduction="sum")
        correct += (outputs.argmax(1) == targets).sum()
        seen += targets.shape[0]
    loss_sum, correct, total = distributed.reduce_metrics(  # distributed: sums over ranks
        loss_sum, correct, torch.tensor(seen))
    return float(loss_sum) / max(int(total), 1), int(correct) / max(int(total), 1)


@torch.no_grad()
def bn_warmup_(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> nn.Module:
    """Refresh BatchNorm running statistics: one train-mode pass, no gradients, no updates.

    The batch-norm-statistics warm-up of Gollini Navarrete et al. (arXiv 2502.11450). Momentum
    is set to None (cumulative average) during the pass, so the running statistics are the
    plain average of the per-batch statistics (every batch weighted equally, the last partial
    one included), independent of the previous values and of the default momentum 0.1; the
    caller's flags are restored.
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return model
    momenta = [(m, m.momentum) for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    try:
        with restored_modes(model):
            model.train()
            for _, (inputs, _) in distributed.owned(batches):  # distributed: b on rank b mod W
                model(inputs)
        distributed.reduce_running_stats_(norms)  # distributed: average over all ranks' batches
    finally:
        for m, momentum in momenta:
            m.momentum = momentum
    return model
