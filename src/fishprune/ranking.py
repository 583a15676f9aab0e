"""Exact rank math behind global selection: every sparsity's mask from one set of scores.

A one-shot criterion's scores do not depend on the sparsity, so ONE scoring pass gives the masks
at every sparsity: with global selection the mask keeping k weights is "global rank < k", where
the rank orders all N prunable weights by score, ties to the earlier weight exactly as
:func:`fishprune.select` breaks them. Hence, exactly and without bisection:

- layer L keeps its first weight when k reaches r_L = 1 + (rank of L's best-ranked weight);
- no layer is empty iff k ≥ k* = max_L r_L, so the **critical sparsity** is 1 − k*/N (the
  highest sparsity whose mask keeps exactly k* weights; the layer with the largest r_L is the
  one that empties first);
- the **maximum possible** sparsity with no empty layer is 1 − L/N (one weight per layer).

A layer can keep weights yet be cut off from the output (see :mod:`fishprune.collapse`). Masks
are nested in k, so "every layer keeps a weight on an input→output path" is found by bisection
over the integer k with the path test of :func:`fishprune.collapse.connected_counts` (exact for
networks without max-pooling; with max-pooling the test follows the pooling argmax of an
all-ones input and monotonicity is a close approximation).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fishprune.collapse import connected_counts
from fishprune.selection import kept_count


@dataclass(frozen=True)
class CriticalSparsity:
    """Where global selection from one set of scores starts to break layers.

    ``first_kept[L]`` is the number of kept weights k at which layer L keeps its first weight.
    ``kept`` (k*) is the smallest k with no empty layer and ``sparsity`` = 1 − k*/N; the
    ``connected_*`` fields are the same for "no layer empty or cut off from the output" (None
    when no model was given or the path test is not informative for this model).
    """

    total: int
    numel: dict[str, int]
    first_kept: dict[str, int]
    kept: int
    sparsity: float
    limiting_layer: str
    max_sparsity: float
    connected_kept: int | None = None
    connected_sparsity: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_scores(scores: dict[str, Tensor]) -> None:
    if not scores:
        raise ValueError("scores is empty: nothing to analyze")
    for name, s in scores.items():
        if not isinstance(s, Tensor):
            raise ValueError(f"scores[{name!r}] is a {type(s).__name__}, expected a tensor")
        if s.numel() == 0:
            raise ValueError(f"scores[{name!r}] is empty (a layer without weights)")
        if torch.isnan(s).any():
            raise ValueError(f"scores for {name} contain NaN: the criterion failed")


def global_ranks(scores: dict[str, Tensor]) -> dict[str, Tensor]:
    """0-based global rank of every weight (0 = kept first), as :func:`fishprune.select` ranks.

    Higher score first; ties go to the weight earlier in ``scores`` order and, within a tensor,
    at the lower flat index. ``select(scores, s)[n]`` equals ``ranks[n] < kept_count(1 − s, N)``.
    Returns int64 CPU tensors of the scores' shapes.
    """
    _check_scores(scores)
    dtype = torch.float64 if any(s.dtype == torch.float64 for s in scores.values()) else (
        torch.float32
    )  # the dtype select compares in: a float64→float32 cast can create ties
    flat = torch.cat([s.detach().reshape(-1).to("cpu", dtype) for s in scores.values()])
    order = torch.sort(flat, descending=True, stable=True).indices  # stable: ties by index
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel())
    out, offset = {}, 0
    for name, s in scores.items():
        out[name] = ranks[offset : offset + s.numel()].reshape(s.shape)
        offset += s.numel()
    return out


def masks_at(ranks: dict[str, Tensor], kept: int) -> dict[str, Tensor]:
    """The global mask keeping the ``kept`` best-ranked weights."""
    return {n: r < kept for n, r in ranks.items()}


def _sparsity(kept: int, total: int) -> float:
    return 1.0 - kept / total


def critical_sparsity(scores: dict[str, Tensor], *, model: nn.Module | None = None,
                      input_shape: Sequence[int] | None = None) -> CriticalSparsity:
    """Exact critical sparsity of global selection from ``scores`` (see the module docstring).

    With ``model`` and ``input_shape`` (one input without the batch dimension) also the
    smallest kept count at which every layer keeps a weight on an input→output path.
    """
    ranks = global_ranks(scores)
    total = sum(r.numel() for r in ranks.values())
    first = {n: int(r.min()) + 1 for n, r in ranks.items()}
    limiting = max(first, key=lambda n: first[n])
    kept = first[limiting]
    connected = None
    if model is not None and input_shape is not None:
        connected = _connected_kept(model, ranks, tuple(input_shape), lo=kept, hi=total)
    return CriticalSparsity(
        total=total,
        numel={n: r.numel() for n, r in ranks.items()},
        first_kept=first,
        kept=kept,
        sparsity=_sparsity(kept, total),
        limiting_layer=limiting,
        max_sparsity=_sparsity(len(ranks), total),
        connected_kept=connected,
        connected_sparsity=None if connected is None else _sparsity(connected, total),
    )


def all_connected(model: nn.Module, masks: dict[str, Tensor], input_shape: tuple[int, ...]
                   ) -> bool | None:
    counts = connected_counts(model, masks, input_shape)
    return None if counts is None else all(c > 0 for c in counts.values())


def _connected_kept(model: nn.Module, ranks: dict[str, Tensor], input_shape: tuple[int, ...],
                    *, lo: int, hi: int) -> int | None:
    """Smallest k in [lo, hi] whose mask leaves no layer cut off (bisection; masks are nested)."""
    if not all_connected(model, masks_at(ranks, hi), input_shape):
        return None  # uninformative path test, or cut off even when dense
    while lo < hi:
        mid = (lo + hi) // 2
        if all_connected(model, masks_at(ranks, mid), input_shape):
            hi = mid
        else:
            lo = mid + 1
    return lo


def layer_densities_at(ranks: dict[str, Tensor], sparsities: Sequence[float]
                       ) -> dict[str, list[float]]:
    """Per-layer kept fraction at each sparsity, for global selection from ``ranks``."""
    total = sum(r.numel() for r in ranks.values())
    ks = torch.tensor([kept_count(1.0 - s, total) for s in sparsities])
    out = {}
    for name, r in ranks.items():
        counts = torch.searchsorted(r.reshape(-1).sort().values, ks)  # #ranks < k
        out[name] = (counts.double() / r.numel()).tolist()
    return out
