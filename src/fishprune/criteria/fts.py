"""FTS (Fisher-Taylor Sensitivity): s_q = |w_q ḡ_q + ½ w_q² F̂_qq|.

Gollini Navarrete et al. 2025, eq. 15 and Algorithm 1: the magnitude of the second-order Taylor
change of the loss when w_q is removed, the Hessian diagonal replaced by the batch-wise empirical
Fisher diagonal F̂ = mean_b g_b ⊙ g_b; ḡ and F̂ come from the same single pass over the batches.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fishprune.autograd import gradient_moments
from fishprune.batches import Batches
from fishprune.criteria._moments import MomentOptions
from fishprune.criteria._registry import Context, register


@register("fts", options=MomentOptions)
def fts(
    model: nn.Module, params: dict[str, nn.Parameter], batches: Batches, ctx: Context,
    opts: MomentOptions,
) -> dict[str, Tensor]:
    m = gradient_moments(model, params, batches, ctx.loss_fn, per_sample=opts.per_sample)
    scores = {}
    for name, g in m.mean.items():
        w = params[name].detach().to(g.dtype)
        # |w g + (½ w²) F̂|, evaluated in that order in place (fewer parameter-sized buffers)
        second = w.square().mul_(0.5).mul_(m.sq_mean[name])
        scores[name] = torch.mul(w, g).add_(second).abs_()
    return scores
