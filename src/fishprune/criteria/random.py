"""Random: i.i.d. uniform scores, seeded; the baseline every criterion must beat.

s_q ~ U(0, 1), drawn on the CPU from a generator seeded with ``seed``, one tensor after another in
the order of the prunable parameters, so a seed gives the same mask on every device.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from fishprune.batches import Batches
from fishprune.criteria._registry import Context, NoOptions, register


@register("random", data="none", seeded=True)
def random(
    model: nn.Module, params: dict[str, nn.Parameter], batches: Batches, ctx: Context,
    opts: NoOptions,
) -> dict[str, Tensor]:
    gen = ctx.generator()
    return {n: torch.rand(p.shape, generator=gen).to(p.device) for n, p in params.items()}
