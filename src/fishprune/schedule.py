"""``prune``: score, select and apply, for one round or an iterative schedule.

Two schedules give the kept fraction after round r of R, for a final density d = 1 − sparsity
(both driven by the *kept* fraction, both exactly d after the last round):

- ``"exponential"``: d^(r/R), SynFlow's schedule (Tanaka et al. 2020, Algorithm 1). Driving it
  by the pruned fraction instead would keep ~0.1% after the first round.
- ``"linear"``: 1 − (1 − d) · r/R, the kept fraction falls in equal steps from 1 to d: the
  ``linear`` compression schedule of Synaptic-Flow's ``prune_loop`` (github
  ganguli-lab/Synaptic-Flow, ``prune.py``, where the ``sparsity`` argument is the kept
  fraction 10^(−compression)).

Weights pruned in a round are zeroed before the next scoring round and can never come back:
they rank below every weight still alive. The set-up that does not change between rounds (the
criterion, its options, the prunable parameters, the snapshot of the model's state) is done
once; each round then restores exactly the state :func:`fishprune.score` would start from, so
the masks are bit-identical to calling ``score`` → ``select`` → ``apply_masks`` R times.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

from fishprune.criteria import get_criterion
from fishprune.losses import LossFn
from fishprune.scoring import ON_EMPTY, check_empty_layers, score, validate_sparsity
from fishprune.selection import SCOPES, Survivors

SCHEDULES = ("exponential", "linear")


def round_densities(density: float, rounds: int, schedule: str = "exponential") -> list[float]:
    """Kept fraction after each of ``rounds`` rounds: d^(r/R) or 1 − (1 − d)·r/R, r = 1..R.

    The last entry is exactly ``density``; both sequences are non-increasing.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    if schedule == "exponential":
        steps = [density ** (r / rounds) for r in range(1, rounds)]
    else:
        steps = [1.0 - (1.0 - density) * (r / rounds) for r in range(1, rounds)]
    return [*steps, density]


def prune(
    model: nn.Module,
    criterion: str,
    sparsity: float,
    batches: Iterable[Any] | None,
    *,
    rounds: int | None = None,
    schedule: str = "exponential",
    scope: str = "global",
    seed: int = 0,
    loss_fn: LossFn | None = None,
    mode: str = "eval",
    exclude: Iterable[str] = (),
    on_round: Callable[[int, int], None] | None = None,
    on_empty: str = "warn",
    return_info: bool = False,
    **options: Any,
) -> Any:
    """Prune ``model`` in place to ``sparsity`` with ``criterion``; return the masks.

    ``rounds`` defaults to the criterion's own (100 for synflow, 1 otherwise). Every round
    scores the partly pruned model with :func:`fishprune.score` (same ``seed``, ``loss_fn``,
    ``mode``, ``exclude`` and criterion ``options``) and keeps, among the weights still alive,
    the fraction the ``schedule`` ("exponential" or "linear", see the module docstring) gives
    for that round (``scope`` "global" or "layer"), selected by :class:`Survivors` (only the
    live weights are ranked, only the newly pruned ones zeroed). The returned masks keep exactly
    ``round((1 − sparsity) · N)`` weights (per tensor for ``scope="layer"``). Every other
    keyword (``include``, ``output_fn``, ``hvp``) goes to :func:`fishprune.score`.

    A tensor left without any kept weight gives a ``LayerCollapseWarning`` naming it
    (``on_empty="error"``: a ``ValueError``). If any round fails, the model's weights are
    restored as they were before the call: never a partly pruned model. ``return_info=True``
    returns ``(masks, info)`` with the :class:`fishprune.ScoreInfo` of the last round.
    ``on_round(r, rounds)`` is called after round ``r`` (progress displays).
    """
    density = 1.0 - validate_sparsity(sparsity)
    crit = get_criterion(criterion)
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {', '.join(SCOPES)}, got {scope!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
    total = crit.default_rounds if rounds is None else rounds
    if isinstance(total, bool) or not isinstance(total, int) or total < 1:
        raise ValueError(f"rounds must be an integer >= 1, got {rounds!r}")
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)  # read every round
    if on_empty not in ON_EMPTY:
        raise ValueError(f"on_empty must be one of {', '.join(ON_EMPTY)}, got {on_empty!r}")
    densities = round_densities(density, total, schedule)
    if total > 1 and batches is not None and not isinstance(batches, Sequence):
        # Every round must see the same batches: read a one-shot iterable once, up front (only
        # its first batch for criteria that need just the input shape).
        batches = list(batches if crit.needs_data else itertools.islice(batches, 1))
    named = dict(model.named_parameters())
    saved = [(p, p.detach().clone()) for p in model.parameters()]
    survivors: Survivors | None = None
    try:
        for r, round_density in enumerate(densities, start=1):
            scores, info = score(
                model, criterion, batches, loss_fn=loss_fn, seed=seed, mode=mode,
                exclude=exclude, return_info=True, **options,
            )
            if survivors is None:
                device = next(iter(scores.values())).device
                survivors = Survivors({n: s.shape for n, s in scores.items()}, scope=scope,
                                      device=device)
            survivors.update(scores, round_density)
            # Zero the weights pruned in this round; those of earlier rounds are zero already
            # (a criterion leaves the weights as it found them: tests/test_criteria_contract.py).
            with torch.no_grad():
                for name, gone, pruned in zip(survivors.names, survivors.just_pruned,
                                              survivors.pruned):
                    if gone is None:
                        continue
                    weight = named[name]
                    if weight.is_contiguous():
                        weight.view(-1).index_fill_(0, gone.to(weight.device), 0)
                    else:
                        weight.masked_fill_(pruned.to(weight.device), 0)
            if on_round is not None:
                on_round(r, total)
        assert survivors is not None
        masks = survivors.masks()
        check_empty_layers(masks, on_empty)  # an error here, too, leaves the model as it was
    except BaseException:
        with torch.no_grad():
            for p, value in saved:
                p.copy_(value)
        raise
    return (masks, info) if return_info else masks
