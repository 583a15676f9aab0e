"""Shared autograd math for the criteria: gradient moments, per-sample Fisher, Hessian products.

Every criterion calls these helpers; none re-implements them. Notation (REFERENCE.md): for
scoring batches B_1..B_M, g_b = ∇_w ℓ(B_b) is the gradient of the batch-mean loss,
ḡ = mean_b g_b and F̂ = mean_b g_b ⊙ g_b (the batch-wise empirical Fisher diagonal, eq. 16 of
Gollini Navarrete et al. 2025). With ``per_sample=True`` every sample is its own batch (eq. 8),
computed without one backward pass per sample.

This module holds the gradient moments (:func:`gradient_moments`, :func:`mean_gradient`) and is
the public home of every helper (``__all__``); they live in
:mod:`fishprune.losses` (logits, the batch loss, gradients), :mod:`fishprune.hvp`
(Hessian-vector products: exact, math SDPA kernel or finite differences; :class:`ScoreInfo`)
and :mod:`fishprune.persample` (per-sample Fisher).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor, nn

from fishprune import distributed
from fishprune.batches import Batch
from fishprune.hvp import (
    HVP_METHODS,
    ScoreInfo,
    fd_step,
    hessian_vector_mean,
    hutchinson_diagonal,
    hvp_setting,
)
from fishprune.losses import (
    Loss,
    LossFn,
    Moments,
    OutputFn,
    _zeros,
    batch_loss,
    call_model,
    gradients,
    logits_of,
)
from fishprune.persample import _per_sample_moments

__all__ = [
    "HVP_METHODS",
    "Loss",
    "LossFn",
    "Moments",
    "OutputFn",
    "ScoreInfo",
    "batch_loss",
    "call_model",
    "fd_step",
    "gradient_moments",
    "gradients",
    "hessian_vector_mean",
    "hutchinson_diagonal",
    "hvp_setting",
    "logits_of",
    "mean_gradient",
]


def gradient_moments(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    batches: Iterable[Batch],
    loss_fn: LossFn,
    *,
    per_sample: bool = False,
    squares: bool = True,
) -> Moments:
    """ḡ and F̂ in one forward+backward pass per batch (Algorithm 1 of the FTS paper).

    ``squares=False`` skips F̂ (``sq_mean`` is then empty) for criteria that only need ḡ. The
    first batch's gradients start the sums (no zero-filled accumulators) and a single batch is
    not divided by 1: on large models these parameter-sized passes cost as much as a layer.
    """
    if per_sample:
        return _per_sample_moments(model, params, batches, loss_fn)
    names, tensors = list(params), list(params.values())
    sums: list[Tensor] = []
    sq: list[Tensor] = []
    count = 0
    for index, batch in distributed.owned(batches):  # distributed: batch b on rank b mod W
        grads = gradients(batch_loss(model, batch, loss_fn, index=index), tensors)
        grads = [g.to(torch.promote_types(g.dtype, torch.float32)) for g in grads]
        if count == 0:
            sums = grads
            sq = torch._foreach_mul(grads, grads) if squares else []
        else:
            torch._foreach_add_(sums, grads)
            if squares:
                torch._foreach_addcmul_(sq, grads, grads)
        count += 1
    if distributed.active():  # distributed: sums over ranks (a rank may own no batch)
        if count == 0:
            sums = [_zeros(p) for p in tensors]
            sq = [_zeros(p) for p in tensors] if squares else []
        count = distributed.reduce_sums([*sums, *sq], count)
    if count > 1:
        torch._foreach_div_(sums, count)
        if squares:
            torch._foreach_div_(sq, count)
    return Moments(dict(zip(names, sums)), dict(zip(names, sq)), count)


def mean_gradient(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    batches: Iterable[Batch],
    loss_fn: LossFn,
    *,
    temperature: float = 1.0,
) -> dict[str, Tensor]:
    """ḡ = mean_b ∇_w ℓ(B_b), the outputs divided by ``temperature``."""
    names, tensors = list(params), list(params.values())
    sums = [_zeros(p) for p in tensors]
    count = 0
    for index, batch in distributed.owned(batches):  # distributed: batch b on rank b mod W
        grads = gradients(batch_loss(model, batch, loss_fn, temperature, index), tensors)
        torch._foreach_add_(sums, [g.to(s.dtype) for g, s in zip(grads, sums)])
        count += 1
    count = distributed.reduce_sums(sums, count)  # distributed: sums over ranks
    torch._foreach_div_(sums, count)
    return dict(zip(names, sums))
