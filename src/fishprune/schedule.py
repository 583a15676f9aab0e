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

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fishprune.autograd import LossFn
from fishprune.batches import Batches
from fishprune.criteria import Context, get_criterion
from fishprune.params import require_prunable
from fishprune.scoring import (
    MODES,
    _checked,
    _has_batchnorm,
    preserved,
    seeded_rng,
    validate_sparsity,
)
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
    **options: Any,
) -> dict[str, Tensor]:
    """Prune ``model`` in place to ``sparsity`` with ``criterion``; return the masks.

    ``rounds`` defaults to the criterion's own (100 for synflow, 1 otherwise). Every round
    scores the partly pruned model exactly as :func:`fishprune.score` would (same ``seed``,
    ``loss_fn``, ``mode``, ``exclude`` and criterion ``options``) and keeps, among the weights
    still alive, the fraction the ``schedule`` ("exponential" or "linear", see the module
    docstring) gives for that round, by ``scope`` "global" or "layer". The returned masks keep
    exactly ``round((1 − sparsity) · N)`` weights (per tensor for ``scope="layer"``).
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
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    if total > 1 and crit.needs_data and batches is not None and not isinstance(batches, Sequence):
        batches = list(batches)  # every round must see the same batches

    # The set-up of fishprune.score, once (same checks, same order, same messages).
    opts = crit.parse_options(options)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    params = require_prunable(model, exclude)
    device = next(iter(params.values())).device
    if batches is None and crit.needs_data and crit.name != "synflow":
        raise ValueError(f"criterion '{crit.name}' needs (inputs, targets) batches, got None")
    if mode == "train" and getattr(opts, "per_sample", False) and _has_batchnorm(model):
        raise ValueError(
            "per_sample=True needs per-sample-independent forward passes: use mode='eval' "
            "(BatchNorm in train mode mixes the samples of a batch)"
        )
    ctx = Context(loss_fn=loss_fn or F.cross_entropy, seed=seed)
    survivors = Survivors({n: p.shape for n, p in params.items()}, scope=scope, device=device)
    weights = list(params.values())
    with preserved(model, params):
        rewind = _Rewind(model, training=mode == "train")
        for round_density in round_densities(density, total, schedule):
            with seeded_rng(seed, device):
                data = None if batches is None else Batches(batches, device,
                                                            replay=crit.passes > 1)
                raw = crit.fn(model, params, data, ctx, opts)
            rewind()
            survivors.update(_checked(raw, params, crit.name), round_density)
            # Zero the weights pruned in this round; those of earlier rounds are zero already
            # (a criterion leaves the weights as it found them: tests/test_criteria_contract.py).
            with torch.no_grad():
                for weight, gone, pruned in zip(weights, survivors.just_pruned,
                                                survivors.pruned):
                    if gone is None:
                        continue
                    if weight.is_contiguous():
                        weight.view(-1).index_fill_(0, gone.to(weight.device), 0)
                    else:
                        weight.masked_fill_(pruned.to(weight.device), 0)
    return survivors.masks()


class _Rewind:
    """Puts the model back into the state a fresh :func:`fishprune.scoring.preserved` gives.

    Taken right after entering ``preserved`` and with the train/eval flag ``score`` sets:
    after each round the buffers (BatchNorm statistics a train-mode criterion updated), the
    train/eval flags, ``requires_grad`` and ``.grad`` are restored, so that every round
    starts from the same state as a separate ``score`` call would.
    """

    def __init__(self, model: nn.Module, *, training: bool) -> None:
        self.model, self.training = model, training
        self.modules = list(model.modules())
        self.params = list(model.parameters())
        self.flags = [p.requires_grad for p in self.params]
        self.buffers = list(model.buffers())
        self.saved = [b.detach().clone() for b in self.buffers]
        model.train(training)

    def __call__(self) -> None:
        if self.buffers:
            with torch.no_grad():
                torch._foreach_copy_(self.buffers, self.saved)
        if any(m.training != self.training for m in self.modules):
            self.model.train(self.training)
        for p, flag in zip(self.params, self.flags):
            if p.requires_grad != flag:
                p.requires_grad_(flag)
            if p.grad is not None:
                p.grad = None
