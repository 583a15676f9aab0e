"""Scoring batches: validation, device placement, and replay for multi-pass criteria.

A batch comes in one of three shapes, all normalised to an ``(inputs, targets)`` pair:

* ``(inputs, targets)`` with a tensor ``inputs``: the model is called as ``model(inputs)``;
* ``(dict_of_inputs, targets)``: the model is called as ``model(**inputs)``;
* a dict with a ``labels`` key (Hugging Face style): ``labels`` are the targets and the other
  entries the model's keyword inputs, e.g. ``{"input_ids", "attention_mask", "labels"}``.

The samples lie on dim 0 of every tensor input (the batch size N) and of the targets.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any, Union

import torch
from torch import Tensor

#: A model's inputs: one tensor, or keyword tensors (non-tensor values are passed as they are).
Inputs = Union[Tensor, dict[str, Any]]  # noqa: UP007  (a runtime alias, Python 3.10 included)
Batch = tuple[Inputs, Tensor]


class Batches:
    """A re-iterable view of the caller's batches, moved to ``device``.

    The batches *are* the estimator (each batch contributes one gradient), so they must be the
    same on every pass. A list or tuple is replayed as is; any other iterable (a DataLoader, a
    generator) is read once and, when ``replay`` is true, cached so that later passes see exactly
    the same batches. Without ``replay`` a second pass raises.
    """

    def __init__(self, source: Iterable[Any], device: torch.device, *, replay: bool) -> None:
        if source is None:
            raise ValueError("batches is None: this criterion needs (inputs, targets) batches")
        if isinstance(source, (Tensor, Mapping)) or not isinstance(source, Iterable):
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
            batch = check_batch(item, count, self._device)
            count += 1
            if self._cache is not None and self._passes == 1:
                self._cache.append(batch)
            yield batch
        if count == 0:
            raise ValueError("batches is empty: scoring needs at least one (inputs, targets) batch")

    def first(self) -> Batch:
        """The first batch (used by data-free criteria that only need the input shape).

        On a one-shot iterable without replay this consumes it: call it on replayable batches.
        """
        for batch in self:
            return batch
        raise ValueError("batches is empty: scoring needs at least one (inputs, targets) batch")


def check_batch(item: Any, index: int, device: torch.device) -> Batch:
    """One batch as a validated ``(inputs, targets)`` pair on ``device``, or a ``ValueError``."""
    if isinstance(item, Mapping):
        if "labels" not in item:
            raise ValueError(
                f"batch {index} is a dict without a 'labels' key: pass (inputs, targets) pairs, "
                "(dict_of_inputs, targets) pairs, or dicts with the targets under 'labels'"
            )
        inputs: Any = {k: v for k, v in item.items() if k != "labels"}
        targets = item["labels"]
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        inputs, targets = item
    else:
        raise ValueError(
            f"batch {index} is a {type(item).__name__}, expected an (inputs, targets) pair"
        )
    if isinstance(inputs, Mapping):
        inputs = dict(inputs)
        if not any(isinstance(v, Tensor) for v in inputs.values()):
            raise ValueError(f"batch {index}: the dict of inputs holds no tensor")
    elif not isinstance(inputs, Tensor):
        raise ValueError(f"batch {index}: inputs and targets must be tensors")
    if not isinstance(targets, Tensor):
        raise ValueError(f"batch {index}: inputs and targets must be tensors")
    for what, t in [("targets", targets), *_tensors(inputs)]:
        if t.dim() == 0:
            raise ValueError(
                f"batch {index}: {what} is a 0-dim tensor; samples must lie on dim 0 "
                "(a batch of one sample has shape (1, ...))"
            )
    n = batch_size(inputs)
    for what, t in _tensors(inputs):
        if t.shape[0] != n:
            raise ValueError(
                f"batch {index}: input {what} has {t.shape[0]} rows, another {n} "
                "(every tensor input needs the samples on dim 0)"
            )
    if n == 0 or n != targets.shape[0]:
        raise ValueError(
            f"batch {index}: {n} inputs and {targets.shape[0]} targets "
            "(need the same, non-zero number)"
        )
    return to_device(inputs, device), targets.to(device, non_blocking=True)


def _tensors(inputs: Inputs) -> list[tuple[str, Tensor]]:
    if isinstance(inputs, Tensor):
        return [("inputs", inputs)]
    return [(repr(k), v) for k, v in inputs.items() if isinstance(v, Tensor)]


def batch_size(inputs: Inputs) -> int:
    """N: the length of dim 0 of the (first tensor) input."""
    return _tensors(inputs)[0][1].shape[0]


def to_device(inputs: Inputs, device: torch.device) -> Inputs:
    """``inputs`` (a tensor or a dict of them) on ``device``; non-tensor values as they are."""
    if isinstance(inputs, Tensor):
        return inputs.to(device, non_blocking=True)
    return {k: v.to(device, non_blocking=True) if isinstance(v, Tensor) else v
            for k, v in inputs.items()}


def take(inputs: Inputs, rows: slice) -> Inputs:
    """Rows ``rows`` of every tensor input (the samples), non-tensor values as they are."""
    if isinstance(inputs, Tensor):
        return inputs[rows]
    return {k: v[rows] if isinstance(v, Tensor) else v for k, v in inputs.items()}
