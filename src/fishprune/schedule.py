"""``prune``: score, select and apply, for one round or an iterative schedule.

After round r of R the kept fraction is d^(r/R), d = 1 − sparsity (the exponential schedule of
SynFlow, Tanaka et al. 2020, driven by the *kept* fraction: driving it by the pruned fraction
would keep ~0.1% after the first round). Weights pruned in a round are zeroed before the next
scoring round and can never come back: they rank below every weight still alive.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from itertools import islice
from typing import Any

import torch
from torch import Tensor, nn

from fishprune.autograd import LossFn
from fishprune.criteria import get_criterion
from fishprune.masking import apply_masks
from fishprune.scoring import score, validate_sparsity
from fishprune.selection import SCOPES, select_density


def prune(
    model: nn.Module,
    criterion: str,
    sparsity: float,
    batches: Iterable[Any] | None,
    *,
    rounds: int | None = None,
    scope: str = "global",
    seed: int = 0,
    loss_fn: LossFn | None = None,
    mode: str = "eval",
    exclude: Iterable[str] = (),
    **options: Any,
) -> dict[str, Tensor]:
    """Prune ``model`` in place to ``sparsity`` with ``criterion``; return the masks.

    ``rounds`` defaults to the criterion's own (100 for synflow, 1 otherwise). Every round
    scores the partly pruned model with :func:`fishprune.score` (same ``seed``, ``loss_fn``,
    ``mode``, ``exclude`` and criterion ``options``) and keeps the top d^(r/R) fraction of the
    weights still alive (``scope`` "global" or "layer"). The returned masks keep exactly
    ``round((1 − sparsity) · N)`` weights (per tensor for ``scope="layer"``).
    """
    density = 1.0 - validate_sparsity(sparsity)
    crit = get_criterion(criterion)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    total = crit.default_rounds if rounds is None else rounds
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)  # read every round
    if total > 1 and batches is not None and not isinstance(batches, Sequence):
        # every round must see the same batches (a data-free criterion reads the first one)
        batches = list(batches) if crit.needs_data else list(islice(batches, 1))
    masks: dict[str, Tensor] | None = None
    for r in range(1, total + 1):
        scores = score(
            model, criterion, batches,
            loss_fn=loss_fn, seed=seed, mode=mode, exclude=exclude, **options,
        )
        if masks is not None:
            scores = {n: _alive_first(s, masks[n]) for n, s in scores.items()}
        round_density = density if r == total else density ** (r / total)
        masks = select_density(scores, round_density, scope=scope)
        apply_masks(model, masks)
    assert masks is not None
    return masks


def _alive_first(scores: Tensor, alive: Tensor) -> Tensor:
    """Scores where pruned weights rank below every live one (even a live one scored -inf)."""
    lowest = torch.finfo(scores.dtype).min
    return torch.where(alive, scores.clamp_min(lowest), torch.full_like(scores, float("-inf")))
