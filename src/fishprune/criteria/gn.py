"""GN ("gradient norm"): s_q = |ḡ_q|, the magnitude of the mean scoring gradient.

Baseline of Gollini Navarrete et al. 2025 ("Fishing for cheap and efficient pruners at
initialization", §4), where it is called gradient norm.
"""

from __future__ import annotations

from torch import Tensor, nn

from fishprune.autograd import gradient_moments
from fishprune.batches import Batches
from fishprune.criteria._moments import MomentOptions
from fishprune.criteria._registry import Context, register


@register("gn", options=MomentOptions)
def gn(
    model: nn.Module, params: dict[str, nn.Parameter], batches: Batches, ctx: Context,
    opts: MomentOptions,
) -> dict[str, Tensor]:
    m = gradient_moments(model, params, batches, ctx.loss_fn, per_sample=opts.per_sample,
                         squares=False)
    return {n: g.abs_() for n, g in m.mean.items()}  # ḡ is this call's own buffer
