"""FTS (Fisher-Taylor Sensitivity): s_q = |w_q ḡ_q + ½ w_q² F̂_qq|.

Gollini Navarrete et al. 2025, eq. 15 and Algorithm 1: the magnitude of the second-order Taylor
change of the loss when w_q is removed, the Hessian diagonal replaced by the batch-wise empirical
Fisher diagonal F̂ = mean_b g_b ⊙ g_b; ḡ and F̂ come from the same single pass over the batches.

``signed=True`` scores s_q = −(w_q ḡ_q + ½ w_q² F̂_qq) instead: the weights whose Taylor term
t_q = w_q ḡ_q + ½ w_q² F̂_qq is most negative are kept first, then the others in increasing
order of t_q (fishprune keeps the highest score). This is the ``use_negative=True`` branch of
``fd_taylor`` in the authors' code for arXiv 2502.11450 (github Gollini/Scalable_Second_Order_PaI,
``batch_exp/experiments/utils/compressors.py``, commit bfb50ad: ``-(param * grad +
param**2 * fisher / 2)``, then the top-k highest are kept; their shipped runs use the magnitude).
t_q is the right-hand side of eq. 14 at δw_q = w_q, the quantity the paper calls the change δL
of the loss (eq. 13-15), so "signed" keeps the weights with the most negative δL in the
papers' convention. (For a removal, δw_q = −w_q in L(w + δw) − L(w) ≈ δwᵀḡ + ½δwᵀHδw, the
first-order term has the opposite sign, −w_q ḡ_q + ½ w_q² F̂_qq; fishprune follows the papers
and the code, for the signed score as for the magnitude.)
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fishprune.autograd import gradient_moments
from fishprune.batches import Batches
from fishprune.criteria._registry import Context, register


@dataclass(frozen=True)
class FTSOptions:
    """Options of FTS (``fishprune criteria`` lists them)."""

    per_sample: bool = field(default=False, metadata={
        "help": "every sample its own batch (eq. 8, the authors' setting), computed exactly "
                "without one backward pass per sample",
    })
    signed: bool = field(default=False, metadata={
        "help": "keep the most negative w·ḡ + ½w²F̂ first (score −(w·ḡ + ½w²F̂), the authors' "
                "use_negative) instead of the largest |w·ḡ + ½w²F̂|",
    })


@register("fts", options=FTSOptions)
def fts(
    model: nn.Module, params: dict[str, nn.Parameter], batches: Batches, ctx: Context,
    opts: FTSOptions,
) -> dict[str, Tensor]:
    m = gradient_moments(model, params, batches, ctx.loss_fn, per_sample=opts.per_sample)
    scores = {}
    for name, g in m.mean.items():
        w = params[name].detach().to(g.dtype)
        # w g + (½ w²) F̂, evaluated in that order in place (fewer parameter-sized buffers)
        second = w.square().mul_(0.5).mul_(m.sq_mean[name])
        taylor = torch.mul(w, g).add_(second)
        scores[name] = taylor.neg_() if opts.signed else taylor.abs_()
    return scores
