"""FP (Fisher pruning): s_q = ½ w_q² F̂_qq, OBD with the Fisher in place of the Hessian.

Gollini Navarrete et al. 2025, eq. 18; Theis et al. 2018 after training; LeCun et al. 1989.
"""

from __future__ import annotations

from torch import Tensor, nn

from fishprune.autograd import gradient_moments
from fishprune.batches import Batches
from fishprune.criteria._moments import MomentOptions
from fishprune.criteria._registry import Context, register


@register("fp", options=MomentOptions)
def fp(
    model: nn.Module, params: dict[str, nn.Parameter], batches: Batches, ctx: Context,
    opts: MomentOptions,
) -> dict[str, Tensor]:
    m = gradient_moments(model, params, batches, ctx.loss_fn, per_sample=opts.per_sample)
    return {n: 0.5 * params[n].detach().to(f.dtype).square() * f for n, f in m.sq_mean.items()}
