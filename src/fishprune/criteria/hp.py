"""HP: s_q = ½ w_q² ĥ_q, OBD saliency with Hutchinson's Hessian diagonal (arXiv 2502.11450).

ĥ as in :mod:`fishprune.criteria.hd` (signed, so negative-curvature weights rank lowest).
"""

from __future__ import annotations

from torch import Tensor, nn

from fishprune.batches import Batches
from fishprune.criteria._hutchinson import HutchinsonOptions
from fishprune.criteria._registry import Context, register
from fishprune.hvp import hutchinson_diagonal


@register("hp", options=HutchinsonOptions, seeded=True)
def hp(
    model: nn.Module, params: dict[str, nn.Parameter], batches: Batches, ctx: Context,
    opts: HutchinsonOptions,
) -> dict[str, Tensor]:
    _, h = hutchinson_diagonal(
        model, params, batches, ctx.loss_fn,
        probes=opts.probes, temperature=opts.temperature, generator=ctx.generator(),
    )
    return {n: 0.5 * params[n].detach().to(v.dtype).square() * v for n, v in h.items()}
