"""SynFlow: s_q = |w_q ∂R/∂w_q|, R = 1ᵀ f(1; |w|) (Tanaka et al. 2020, Algorithm 1).

R is the sum of the outputs of the network with every parameter and floating buffer replaced by
its absolute value, on an all-ones input of the data's shape, in eval mode and float64 (the
products of hundreds of weights underflow float32). Data-free: the batches only give the input
shape (or pass ``input_shape``). Meant to be iterated: :func:`fishprune.prune` runs 100 rounds
with the exponential schedule on the *kept* fraction, density d^(r/R) after round r.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fishprune.batches import Batches
from fishprune.criteria._registry import Context, register
from fishprune.losses import Loss, gradients, logits_of


@dataclass(frozen=True)
class SynFlowOptions:
    """``input_shape``: shape of one input without the batch dimension (default: from data)."""

    input_shape: tuple[int, ...] = field(default=(), metadata={
        "help": "shape of one input, without the batch dimension", "run_setting": False})


@register("synflow", options=SynFlowOptions, data="shape", dtype=torch.float64,
          default_rounds=100)
def synflow(
    model: nn.Module, params: dict[str, nn.Parameter], batches: Batches, ctx: Context,
    opts: SynFlowOptions,
) -> dict[str, Tensor]:
    if opts.input_shape:
        shape = tuple(opts.input_shape)
    elif batches is not None:
        inputs = batches.first()[0]
        if not isinstance(inputs, Tensor):
            raise ValueError(
                "synflow is defined for tensor inputs (it runs the network on an all-ones "
                "input); these batches hold keyword inputs: pass input_shape=(...) for a model "
                "called as model(tensor), or use another criterion"
            )
        if not inputs.is_floating_point():
            raise ValueError(
                f"synflow is defined for real-valued inputs (it runs the network on an all-ones "
                f"input); these inputs are {inputs.dtype} (token ids?): use another criterion"
            )
        shape = tuple(inputs.shape[1:])
    else:
        raise ValueError("synflow needs the input shape: pass batches or input_shape=(C, H, W)")
    device = next(iter(params.values())).device
    model.eval()  # SynFlow is defined in eval mode; score() restores the caller's mode
    state = {
        n: (t.detach().abs().double() if t.is_floating_point() else t.detach())
        for n, t in [*model.named_parameters(), *model.named_buffers()]
    }
    weights = {n: state[n].requires_grad_(True) for n in params}
    ones = torch.ones((1, *shape), dtype=torch.float64, device=device)
    output_fn = ctx.loss_fn.output_fn if isinstance(ctx.loss_fn, Loss) else logits_of
    r = output_fn(functional_call(model, state, (ones,))).sum()
    grads = gradients(r, list(weights.values()))
    return {n: (w.detach() * g).abs() for (n, w), g in zip(weights.items(), grads)}
