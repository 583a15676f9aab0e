"""Seeded, stratified index splits and per-class sample choices.

Everything here is vectorized: one random permutation, then a stable sort by class, puts each
class's samples in a random order; a sample's rank within its class decides where it goes.
Returned indices are sorted ascending, so they depend only on ``(targets, seed, ...)``.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _check_targets(targets: Tensor) -> Tensor:
    if targets.dim() != 1 or targets.dtype.is_floating_point or targets.dtype == torch.bool:
        raise ValueError(
            f"targets must be a 1-D integer tensor, got {targets.dtype} {tuple(targets.shape)}"
        )
    if targets.numel() and int(targets.min()) < 0:
        raise ValueError("targets must be non-negative class indices")
    return targets.detach().to("cpu", torch.int64)


def _ranks_within_class(targets: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """(order, rank): ``order`` lists indices grouped by class (ascending), each class in a
    random order; ``rank[i]`` is the position of ``order[i]`` within its class."""
    n = targets.numel()
    perm = torch.randperm(n, generator=generator)
    order = perm[torch.sort(targets[perm], stable=True).indices]
    counts = torch.bincount(targets)
    starts = torch.cumsum(counts, 0) - counts  # first position of each class in ``order``
    rank = torch.arange(n) - starts[targets[order]]
    return order, rank


def stratified_split(
    targets: Tensor, val_fraction: float = 0.2, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Split sample indices into (train_idx, val_idx), stratified by class.

    Class ``c`` with ``n_c`` samples puts ``floor(n_c * val_fraction + 0.5)`` of them (rounded
    half up, in float64) into validation, chosen uniformly at random with a
    ``torch.Generator`` seeded by ``seed``; the rest go to training. The two index tensors are
    int64, sorted ascending, disjoint, and together cover ``range(len(targets))``.

    Args:
        targets: 1-D integer class labels.
        val_fraction: in ``[0, 1)``; 0 gives an empty validation set.
        seed: random seed; the same inputs always give the same split.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    targets = _check_targets(targets)
    if targets.numel() == 0:
        empty = torch.empty(0, dtype=torch.int64)
        return empty, empty.clone()
    order, rank = _ranks_within_class(targets, torch.Generator().manual_seed(seed))
    n_val = torch.floor(torch.bincount(targets).double() * val_fraction + 0.5).long()
    is_val = rank < n_val[targets[order]]
    return order[~is_val].sort().values, order[is_val].sort().values


def scoring_indices(
    targets: Tensor,
    samples_per_class: int | None,
    seed: int = 0,
    *,
    indices: Tensor | None = None,
) -> Tensor:
    """Choose ``samples_per_class`` samples of every class, uniformly at random, seeded.

    Args:
        targets: 1-D integer class labels of the whole dataset.
        samples_per_class: ``k``; ``None`` keeps every candidate.
        seed: random seed for a ``torch.Generator``.
        indices: candidate positions into ``targets`` (e.g. the ``train_idx`` of
            :func:`stratified_split`); ``None`` means all of them.

    Returns:
        int64 positions into ``targets``, sorted ascending: ``k`` per class present among
        the candidates.

    Raises:
        ValueError: ``k < 1``, or a class has fewer than ``k`` candidates.
    """
    targets = _check_targets(targets)
    candidates = (
        torch.arange(targets.numel())
        if indices is None
        else indices.detach().to("cpu", torch.int64).reshape(-1)
    )
    if samples_per_class is None:
        return candidates.sort().values
    if samples_per_class < 1:
        raise ValueError(f"samples_per_class must be >= 1 or None, got {samples_per_class}")
    labels = targets[candidates]
    counts = torch.bincount(labels)
    short = [(c, int(n)) for c, n in enumerate(counts.tolist()) if 0 < n < samples_per_class]
    if short:
        detail = ", ".join(f"class {c} has {n}" for c, n in short)
        raise ValueError(f"cannot choose {samples_per_class} samples per class: {detail}")
    order, rank = _ranks_within_class(labels, torch.Generator().manual_seed(seed))
    return candidates[order[rank < samples_per_class]].sort().values
