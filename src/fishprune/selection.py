"""``select``: turn scores into masks that keep exactly the requested number of weights.

:func:`select` is the one-shot rule; :class:`Survivors` applies the same rule round after round
of an iterative schedule (:func:`fishprune.prune`) on flat, preallocated buffers.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
from torch import Tensor

from fishprune.scoring import check_empty_layers, validate_sparsity

SCOPES = ("global", "layer")


def kept_count(density: float, total: int) -> int:
    """round(density · total), halves rounded up: the exact number of weights a mask keeps.

    The product is first rounded to 6 decimals so that float noise does not turn a half down
    (1 − 0.9 = 0.0999…98 in binary, and 0.1 · 25 = 2.5 must keep 3, not 2).
    """
    return min(total, math.floor(round(density * total, 6) + 0.5))


def select(
    scores: dict[str, Tensor], sparsity: float, *, scope: str = "global", on_empty: str = "warn"
) -> dict[str, Tensor]:
    """Keep the top ``round((1 − sparsity) · N)`` scores; return ``{name: BoolTensor}`` masks.

    ``scope="global"`` ranks all N scored weights together (the papers' setting);
    ``scope="layer"`` keeps that fraction of each tensor separately. Ties at the threshold are
    broken deterministically: weights earlier in the order of ``scores`` (the model's order) and,
    within a tensor, at a lower flat index are kept first. ``-inf`` is a valid score (never kept
    before a finite one); NaN is rejected with a ``ValueError`` naming the tensor, because a NaN
    score means the criterion failed, and any silent ranking of it would hide that.
    A tensor left without any kept weight gives a ``LayerCollapseWarning`` naming it
    (``on_empty="error"``: a ``ValueError``; ``"ignore"``: nothing).
    """
    masks = select_density(scores, 1.0 - validate_sparsity(sparsity), scope=scope)
    check_empty_layers(masks, on_empty)
    return masks


def select_density(scores: dict[str, Tensor], density: float, *, scope: str = "global") -> dict[
    str, Tensor
]:
    """:func:`select` by kept fraction ``density`` (schedules compute densities directly)."""
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if not scores:
        raise ValueError("scores is empty: nothing to select from")
    for name, s in scores.items():
        if not isinstance(s, Tensor):
            raise ValueError(f"scores[{name!r}] is a {type(s).__name__}, expected a tensor")
        _reject_nan(name, int(torch.isnan(s).sum()))
    if scope == "layer":
        return {n: _top(s.reshape(-1), kept_count(density, s.numel())).reshape(s.shape)
                for n, s in scores.items()}
    dtype = torch.float64 if any(s.dtype == torch.float64 for s in scores.values()) else (
        torch.float32
    )
    device = next(iter(scores.values())).device
    flat = torch.cat([s.detach().reshape(-1).to(device, dtype) for s in scores.values()])
    keep = _top(flat, kept_count(density, flat.numel()))
    masks, offset = {}, 0
    for name, s in scores.items():
        masks[name] = keep[offset : offset + s.numel()].reshape(s.shape).to(s.device)
        offset += s.numel()
    return masks


def _reject_nan(name: str, nans: int) -> None:
    if nans:
        raise ValueError(
            f"scores for {name} contain {nans} NaN value(s): the criterion failed on this "
            "model or data (check the loss and inputs for NaN/inf)"
        )


def _top(flat: Tensor, k: int) -> Tensor:
    """Boolean mask of the k largest entries of a 1-D tensor, ties to the lowest index, O(n)."""
    n = flat.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=flat.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=flat.device)
    if _numpy_ok(flat):
        return torch.from_numpy(_top_k(flat.detach().numpy(), k))
    return _top_k(flat, k)


# --- 1-D array passes, on NumPy views of CPU tensors or on tensors -------------------------------
#
# NumPy's one-thread kernels for these passes are several times faster than torch's on the CPU
# (430,500 float64 scores, one core: selection 1 ms against 5-7 ms for torch.kthvalue, counting
# a bool mask ~40× and compacting an index set ~2.5× faster), and a CPU tensor's NumPy view
# costs nothing. Both give exactly the same values, so the masks do not depend on the path.

Array = Tensor | np.ndarray

#: use NumPy views for CPU tensors (tests switch it off to run the torch path on the CPU)
USE_NUMPY = True


def _numpy_ok(t: Tensor) -> bool:
    return USE_NUMPY and t.device.type == "cpu" and t.dtype in (
        torch.float32, torch.float64, torch.bool, torch.int64)


def _top_k(values: Array, k: int) -> Array:
    """Mask of the k largest of n values (0 < k < n, no NaN), ties to the lowest index."""
    threshold = _kth_smallest(values, len(values) - k)  # the k-th largest value
    keep = values >= threshold
    if _count(keep) == k:  # no surplus ties at the threshold (the usual case)
        return keep
    above = values > threshold
    ties = values == threshold
    return above | (ties & (ties.cumsum(0) <= k - _count(above)))


def _kth_smallest(values: Array, j: int) -> Tensor | np.generic:
    """The (j+1)-th smallest value (``torch.kthvalue(values, j + 1)``), in the values' dtype."""
    if isinstance(values, np.ndarray):
        return np.partition(values, j)[j]  # introselect
    return torch.kthvalue(values, j + 1).values


def _count(mask: Array) -> int:
    return int(np.count_nonzero(mask)) if isinstance(mask, np.ndarray) else int(mask.sum())


def _indices(mask: Array) -> Array:
    return np.flatnonzero(mask) if isinstance(mask, np.ndarray) else mask.nonzero().squeeze(1)


def _all_finite(values: Array) -> bool:
    """True when the sum is finite, which it is not if any value is ±inf or NaN (an overflow
    also makes it infinite: then the caller checks exactly)."""
    if isinstance(values, np.ndarray):
        with np.errstate(over="ignore", invalid="ignore"):
            return bool(np.isfinite(values.sum()))
    return bool(torch.isfinite(values.sum()))


def _has_nan(values: Array) -> bool:
    """Whether a NaN may be present (a sum is NaN too for +inf with −inf: check exactly then)."""
    if isinstance(values, np.ndarray):
        with np.errstate(over="ignore", invalid="ignore"):
            return bool(np.isnan(values.sum()))
    return bool(torch.isnan(values.sum()))


def _tensor(a: Array) -> Tensor:
    return torch.from_numpy(a) if isinstance(a, np.ndarray) else a


class Survivors:
    """The weights still alive during an iterative prune, as flat index sets.

    Round after round, :meth:`update` keeps the top ``kept_count(density, ·)`` scores among
    the live weights (of all tensors for ``scope="global"``, of each tensor for ``"layer"``),
    ties to the lowest flat index: exactly the mask of :func:`select_density` on scores in which
    every pruned weight ranks below every live one, and from the second update on a live score
    of −inf counts as the lowest finite value of its dtype (so a live weight still outranks a
    pruned one). Pruned weights never come back.

    The work follows the live weights, not all N: the scores are copied into one preallocated
    flat buffer, the live ones gathered by index, the threshold found by one selection over
    them (:func:`_kth_smallest`), and the live index set compacted (on NumPy views of the
    buffers on the CPU). Masks are views of one flat buffer: :attr:`pruned` (per-tensor views,
    True = pruned) and :meth:`masks`; :attr:`just_pruned` holds, per tensor, the flat indices
    the last update pruned, so that a schedule zeroes only those weights (the earlier ones are
    zero already).
    """

    def __init__(
        self, shapes: dict[str, torch.Size], *, scope: str = "global",
        device: torch.device | str = "cpu",
    ) -> None:
        if scope not in SCOPES:
            raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
        if not shapes:
            raise ValueError("scores is empty: nothing to select from")
        self.names = list(shapes)
        self.shapes = [torch.Size(s) for s in shapes.values()]
        sizes = [math.prod(s) for s in self.shapes]
        self.offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        self.total = sum(sizes)
        spans = [(o, o + n) for o, n in zip(self.offsets, sizes)]
        #: slices of the flat order that select separately: one for "global", one per tensor
        self.groups = [(0, self.total)] if scope == "global" else spans
        self._dead = torch.zeros(self.total, dtype=torch.bool, device=device)
        self.pruned = self._views(self._dead)
        #: per tensor, the flat indices of its weights pruned by the last update (None: none)
        self.just_pruned: list[Tensor | None] = [None] * len(self.shapes)
        self._numpy = _numpy_ok(self._dead)
        self._dead_a: Array = self._dead.numpy() if self._numpy else self._dead
        self._starts: Array = (np.asarray(self.offsets) if self._numpy
                               else torch.tensor(self.offsets, device=device))
        self._live: list[Array | None] = [None] * len(self.groups)  # None: all alive
        self._flat: Tensor | None = None
        self._flat_a: Array | None = None
        self._flat_views: list[Tensor] = []
        self.updates = 0

    def _views(self, flat: Tensor) -> list[Tensor]:
        return [flat[o : o + s.numel()].view(s) for o, s in zip(self.offsets, self.shapes)]

    def update(self, scores: dict[str, Tensor], density: float) -> None:
        """Keep the top ``density`` fraction (of each group) among the live weights."""
        if list(scores) != self.names:
            raise ValueError(f"scores have keys {list(scores)}, expected {self.names}")
        values = list(scores.values())
        dtype = torch.float64 if any(s.dtype == torch.float64 for s in values) else torch.float32
        if self._flat is None or self._flat.dtype != dtype:
            self._flat = torch.empty(self.total, dtype=dtype, device=self._dead.device)
            self._flat_a = self._flat.numpy() if self._numpy else self._flat
            self._flat_views = self._views(self._flat)
        if all(s.device == self._dead.device for s in values):
            torch._foreach_copy_(self._flat_views, [s.detach() for s in values])
        else:
            for view, s in zip(self._flat_views, values):
                view.copy_(s.detach())
        if self.updates:  # −inf → the lowest finite value of the score's own dtype (below)
            for view, s in zip(self._flat_views, values):
                if s.dtype != dtype:
                    view.clamp_min_(torch.finfo(s.dtype).min)
        self.just_pruned = [None] * len(self.shapes)
        for group, (start, end) in enumerate(self.groups):
            self._select(group, start, end, density)
        self.updates += 1

    def _select(self, group: int, start: int, end: int, density: float) -> None:
        assert self._flat is not None and self._flat_a is not None
        live = self._live[group]
        segment = self._flat_a[start:end]
        values = segment if live is None else segment[live]
        if not _all_finite(values):  # else: no −inf to clamp, no NaN (one pass, usually)
            if self.updates:  # as the one-shot path's alive-first scores, clamped to rank
                lowest = torch.finfo(self._flat.dtype).min
                if isinstance(values, np.ndarray):
                    np.maximum(values, lowest, out=values)
                else:
                    values.clamp_min_(lowest)
            if _has_nan(values):
                self._reject_nan()
        k = kept_count(density, end - start)
        if k >= len(values):
            return  # nothing to prune in this group this round
        keep = _top_k(values, k) if k > 0 else values != values  # (no NaN: all False)
        if live is None:
            gone, live = _indices(~keep), _indices(keep)
        else:
            gone, live = live[~keep], live[keep]
        self._dead_a[start:end][gone] = True
        self._live[group] = live
        if len(self.groups) > 1:  # "layer": the group is one tensor
            self.just_pruned[group] = _tensor(gone)
            return
        if isinstance(gone, np.ndarray):
            bounds = [*np.searchsorted(gone, self._starts).tolist(), len(gone)]
        else:
            bounds = [*torch.searchsorted(gone, self._starts).tolist(), len(gone)]
        for i, (a, b) in enumerate(itertools.pairwise(bounds)):
            if b > a:
                self.just_pruned[i] = _tensor(gone[a:b] - self.offsets[i])

    def _reject_nan(self) -> None:
        for name, view, dead in zip(self.names, self._flat_views, self.pruned):
            _reject_nan(name, int((torch.isnan(view) & ~dead).sum()))

    def masks(self) -> dict[str, Tensor]:
        """``{name: BoolTensor}``, True = kept (a fresh flat buffer; later updates leave it)."""
        return dict(zip(self.names, self._views(~self._dead)))


def expected_kept(masks: dict[str, Tensor], sparsity: float, scope: str = "global") -> str | None:
    """Why ``masks`` do not keep exactly what :func:`select` keeps at ``sparsity`` (None: they
    do): the total for ``scope="global"``, every tensor's count for ``"layer"``."""
    density = 1.0 - sparsity
    if scope == "layer":
        for name, m in masks.items():
            want = kept_count(density, m.numel())
            if int(m.sum()) != want:
                return f"{name} keeps {int(m.sum())} weights, the exact count is {want}"
        return None
    total = sum(m.numel() for m in masks.values())
    kept, want = sum(int(m.sum()) for m in masks.values()), kept_count(density, total)
    return None if kept == want else f"the masks keep {kept} weights, the exact count is {want}"


def density_of(masks: dict[str, Tensor]) -> float:
    """Kept fraction of all masked weights."""
    total = sum(m.numel() for m in masks.values())
    return sum(int(m.sum()) for m in masks.values()) / max(total, 1)


def layer_densities(masks: dict[str, Tensor]) -> dict[str, float]:
    """Kept fraction per tensor."""
    return {n: int(m.sum()) / max(m.numel(), 1) for n, m in masks.items()}


