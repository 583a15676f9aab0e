"""GraSP: s_q = w_q (H ḡ)_q, ḡ held constant, logits divided by T (Wang et al. 2020, eq. 8).

Wang et al. *remove* the weights with the highest −w ⊙ Hg; keeping the highest w ⊙ Hg is the
same mask in fishprune's "higher = keep" convention (some public code inverts this sign; a test
pins it). Two passes: ḡ = mean_b ∇ℓ_T(B_b), then mean_b H_b ḡ by double backpropagation.

ḡ and Hḡ run over *every* prunable weight, also those excluded from scoring (``exclude=``), and
only the included ones are scored, as in Wang et al.'s and the FTS authors' code: excluding the
classifier must not change the scores of the other layers (their Hḡ couples all weights).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from fishprune.autograd import mean_gradient
from fishprune.batches import Batches
from fishprune.criteria._registry import Context, positive, register
from fishprune.hvp import hessian_vector_mean


@dataclass(frozen=True)
class GraSPOptions:
    """``temperature``: logits are divided by T before the loss (200 in the reference code)."""

    temperature: float = field(default=200.0, metadata={"help": "logits are divided by T"})

    def validate(self) -> None:
        positive(self.temperature, "temperature")


@register("grasp", options=GraSPOptions, passes=2)
def grasp(
    model: nn.Module, params: dict[str, nn.Parameter], batches: Batches, ctx: Context,
    opts: GraSPOptions,
) -> dict[str, Tensor]:
    t = opts.temperature
    every = ctx.prunable or params
    for p in every.values():  # score() restores every flag afterwards
        p.requires_grad_(True)
    g = mean_gradient(model, every, batches, ctx.loss_fn, temperature=t)
    hg = hessian_vector_mean(model, every, batches, ctx.loss_fn, g, temperature=t)
    return {n: params[n].detach().to(hg[n].dtype) * hg[n] for n in params}
