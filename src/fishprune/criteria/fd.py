"""FD: s_q = F̂_qq, the empirical Fisher diagonal (Gollini Navarrete et al. 2025, eq. 17).

F̂ = mean_b g_b ⊙ g_b over the scoring batches (batch-wise estimate, eq. 16).
"""

from __future__ import annotations

from torch import Tensor, nn

from fishprune.autograd import gradient_moments
from fishprune.batches import Batches
from fishprune.criteria._moments import MomentOptions
from fishprune.criteria._registry import Context, register


@register("fd", options=MomentOptions)
def fd(
    model: nn.Module, params: dict[str, nn.Parameter], batches: Batches, ctx: Context,
    opts: MomentOptions,
) -> dict[str, Tensor]:
    return gradient_moments(model, params, batches, ctx.loss_fn, per_sample=opts.per_sample).sq_mean
