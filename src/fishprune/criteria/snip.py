"""SNIP: s_q = |w_q ḡ_q|, connection sensitivity (Lee et al. 2019, eq. 6).

SNIP normalises by Σ_k |w_k ḡ_k|; a positive constant does not change the ranking, so it is
omitted. ḡ is the mean of the batch-mean gradients over the scoring batches.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fishprune.autograd import gradient_moments
from fishprune.batches import Batches
from fishprune.criteria._moments import MomentOptions
from fishprune.criteria._registry import Context, register


@register("snip", options=MomentOptions)
def snip(
    model: nn.Module, params: dict[str, nn.Parameter], batches: Batches, ctx: Context,
    opts: MomentOptions,
) -> dict[str, Tensor]:
    m = gradient_moments(model, params, batches, ctx.loss_fn, per_sample=opts.per_sample,
                         squares=False)
    return {n: torch.mul(params[n].detach().to(g.dtype), g).abs_() for n, g in m.mean.items()}
