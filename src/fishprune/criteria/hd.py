"""HD: s_q = ĥ_q, Hutchinson's estimate of the Hessian diagonal, signed.

ĥ = mean over batches b and S Rademacher probes z of z ⊙ (H_b z), unbiased for diag(H)
(Gollini Navarrete et al., arXiv 2502.11450). Logits divided by T = 200, S = 10 by default.
"""

from __future__ import annotations

from torch import Tensor, nn

from fishprune.batches import Batches
from fishprune.criteria._hutchinson import HutchinsonOptions
from fishprune.criteria._registry import Context, register
from fishprune.hvp import hutchinson_diagonal


@register("hd", options=HutchinsonOptions, seeded=True)
def hd(
    model: nn.Module, params: dict[str, nn.Parameter], batches: Batches, ctx: Context,
    opts: HutchinsonOptions,
) -> dict[str, Tensor]:
    _, h = hutchinson_diagonal(
        model, params, batches, ctx.loss_fn,
        probes=opts.probes, temperature=opts.temperature, generator=ctx.generator(),
    )
    return h
