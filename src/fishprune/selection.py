"""``select``: turn scores into masks that keep exactly the requested number of weights."""

from __future__ import annotations

import math

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
        nans = int(torch.isnan(s).sum())
        if nans:
            raise ValueError(
                f"scores for {name} contain {nans} NaN value(s): the criterion failed on this "
                "model or data (check the loss and inputs for NaN/inf)"
            )
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


def _top(flat: Tensor, k: int) -> Tensor:
    """Boolean mask of the k largest entries of a 1-D tensor, ties to the lowest index, O(n)."""
    n = flat.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool, device=flat.device)
    if k >= n:
        return torch.ones(n, dtype=torch.bool, device=flat.device)
    threshold = torch.kthvalue(flat, n - k + 1).values  # the k-th largest value
    above = flat > threshold
    ties = flat == threshold
    room = k - int(above.sum())
    return above | (ties & (torch.cumsum(ties, 0) <= room))


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


