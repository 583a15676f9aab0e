"""FBSS (Fisher Brain Surgeon Sensitivity): s_q = ½ F̂_qq (w_q − ḡ_q / F̂_qq)².

Gollini Navarrete et al. 2025, eq. 19 with a diagonal F̂ (so [F̂⁻¹]_qq = 1/F̂_qq and
e_qᵀF̂⁻¹ḡ = ḡ_q/F̂_qq). Deliberate deviation: F̂ is damped, F̂ + λ with λ = ``damping`` · max F̂
(the largest entry over all scored tensors), because F̂_qq = 0 gives 0/0. By Jensen ḡ_q² ≤ F̂_qq,
so F̂_qq = 0 implies ḡ_q = 0 and the damped score is ½λw_q², finite and small. The damping is
relative so that the ranking does not depend on the scale of the loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from fishprune.autograd import gradient_moments
from fishprune.batches import Batches
from fishprune.criteria._registry import Context, register


@dataclass(frozen=True)
class FBSSOptions:
    """``damping``: λ relative to max F̂; ``per_sample``: per-sample Fisher (eq. 8)."""

    damping: float = field(default=1e-8, metadata={"help": "FBSS damping, relative to max F"})
    per_sample: bool = field(default=False, metadata={
        "help": "per-sample empirical Fisher: every sample its own batch (eq. 8)"})

    def validate(self) -> None:
        if not (0 < self.damping < float("inf")):
            raise ValueError(f"damping must be a finite number > 0, got {self.damping!r}")


@register("fbss", options=FBSSOptions)
def fbss(
    model: nn.Module, params: dict[str, nn.Parameter], batches: Batches, ctx: Context,
    opts: FBSSOptions,
) -> dict[str, Tensor]:
    m = gradient_moments(model, params, batches, ctx.loss_fn, per_sample=opts.per_sample)
    largest = torch.stack([f.max() for f in m.sq_mean.values()]).max()
    floor = torch.finfo(torch.float32).tiny
    lam = (opts.damping * largest).clamp_min(floor)
    scores = {}
    for name, g in m.mean.items():
        f = m.sq_mean[name] + lam
        w = params[name].detach().to(g.dtype)
        scores[name] = 0.5 * f * (w - g / f).square()
    return scores
