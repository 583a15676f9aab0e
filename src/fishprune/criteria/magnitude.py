"""Magnitude: s_q = |w_q| (Han et al. 2015, "Learning both weights and connections"), at init."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fishprune.batches import Batches
from fishprune.criteria._registry import Context, NoOptions, register


@register("magnitude", data="none")
def magnitude(
    model: nn.Module, params: dict[str, nn.Parameter], batches: Batches, ctx: Context,
    opts: NoOptions,
) -> dict[str, Tensor]:
    return {n: p.detach().abs().to(torch.promote_types(p.dtype, torch.float32))
            for n, p in params.items()}
