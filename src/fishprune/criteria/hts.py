"""HTS (Hutchinson-Taylor Sensitivity): s_q = |w_q ḡ_q + ½ w_q² ĥ_q| (arXiv 2502.11450).

FTS with the Fisher diagonal replaced by Hutchinson's Hessian diagonal ĥ. As in the authors'
code, the logits are divided by T = 200 for both ḡ and ĥ, which come from the same pass.
"""

from __future__ import annotations

from torch import Tensor, nn

from fishprune.autograd import hutchinson_diagonal
from fishprune.batches import Batches
from fishprune.criteria._hutchinson import HutchinsonOptions
from fishprune.criteria._registry import Context, register


@register("hts", options=HutchinsonOptions, seeded=True)
def hts(
    model: nn.Module, params: dict[str, nn.Parameter], batches: Batches, ctx: Context,
    opts: HutchinsonOptions,
) -> dict[str, Tensor]:
    g, h = hutchinson_diagonal(
        model, params, batches, ctx.loss_fn,
        probes=opts.probes, temperature=opts.temperature, generator=ctx.generator(),
    )
    scores = {}
    for name, gq in g.items():
        w = params[name].detach().to(gq.dtype)
        scores[name] = (w * gq + 0.5 * w.square() * h[name]).abs()
    return scores
