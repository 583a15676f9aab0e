"""Scoring batches: validation, device placement, and replay for multi-pass criteria."""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import Tensor

Batch = tuple[Tensor, Tensor]


class Batches:
    """A re-iterable view of the caller's ``(inputs, targets)`` pairs, moved to ``device``.

    The batches *are* the estimator (each batch contributes one gradient), so they must be the
    same on every pass. A list or tuple is replayed as is; any other iterable (a DataLoader, a
    generator) is read once and, when ``replay`` is true, cached so that later passes see exactly
    the same batches. Without ``replay`` a second pass raises.
    """

    def __init__(self, source: Iterable[Any], device: torch.device, *, replay: bool) -> None:
        if source is None:
            raise ValueError("batches is None: this criterion needs (inputs, targets) batches")
        if isinstance(source, Tensor) or not isinstance(source, Iterable):
            raise ValueError(
                "batches must be an iterable of (inputs, targets) pairs, such as a DataLoader or "
                f"a list; got {type(source).__name__}"
            )
        self._device = device
        self._sequence = source if isinstance(source, Sequence) else None
        self._source = source
        self._cache: list[Batch] | None = [] if replay and self._sequence is None else None
        self._passes = 0

    def __iter__(self) -> Iterator[Batch]:
        self._passes += 1
        if self._sequence is None and self._passes > 1:
            if self._cache is None:
                raise RuntimeError("these batches were not cached for a second pass")
            yield from self._cache
            return
        count = 0
        for item in self._sequence if self._sequence is not None else self._source:
            batch = _check_batch(item, count, self._device)
            count += 1
            if self._cache is not None and self._passes == 1:
                self._cache.append(batch)
            yield batch
        if count == 0:
            raise ValueError("batches is empty: scoring needs at least one (inputs, targets) batch")

    def first(self) -> Batch:
        """The first batch (used by data-free criteria that only need the input shape)."""
        for batch in self:
            return batch
        raise ValueError("batches is empty: scoring needs at least one (inputs, targets) batch")


def _check_batch(item: Any, index: int, device: torch.device) -> Batch:
    if not isinstance(item, (tuple, list)) or len(item) != 2:
        raise ValueError(
            f"batch {index} is a {type(item).__name__}, expected an (inputs, targets) pair"
        )
    inputs, targets = item
    if not isinstance(inputs, Tensor) or not isinstance(targets, Tensor):
        raise ValueError(f"batch {index}: inputs and targets must be tensors")
    if inputs.dim() == 0 or targets.dim() == 0:
        raise ValueError(f"batch {index}: inputs of shape {tuple(inputs.shape)} and targets of "
                         f"shape {tuple(targets.shape)} (need a leading batch dimension)")
    if inputs.shape[0] == 0 or inputs.shape[0] != targets.shape[0]:
        raise ValueError(
            f"batch {index}: {inputs.shape[0]} inputs and {targets.shape[0]} targets "
            "(need the same, non-zero number)"
        )
    return inputs.to(device, non_blocking=True), targets.to(device, non_blocking=True)
