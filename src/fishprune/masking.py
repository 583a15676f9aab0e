"""Applying masks: zero pruned weights once, then keep them exactly zero through training.

No forward pre-hooks and no ``weight_orig`` re-parametrisation: the model stays a plain
``nn.Module`` whose ``state_dict`` has its usual keys. During training, :class:`Masker` zeroes the
gradients of pruned weights before ``optimizer.step()`` and the weights after it. Zeros are
*assigned*, never multiplied in: a NaN or inf gradient times 0 is NaN, and a pruned weight must
stay exactly 0 whatever the gradient holds. The assignment is a bitwise AND of the values' bits
with an all-ones (kept) or all-zeros (pruned) integer mask of the same width: exactly +0.0 where
pruned, the value untouched where kept, as fast as a multiplication (``masked_fill_`` with a
boolean mask is several times slower on the CPU).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def _check(model: nn.Module, masks: dict[str, Tensor]) -> dict[str, tuple[nn.Parameter, Tensor]]:
    named = dict(model.named_parameters())
    pairs = {}
    for name, mask in masks.items():
        if name not in named:
            raise ValueError(
                f"mask for {name!r}, which is not a parameter of {type(model).__name__}"
            )
        param = named[name]
        if tuple(mask.shape) != tuple(param.shape):
            raise ValueError(
                f"mask for {name} has shape {tuple(mask.shape)}, parameter has {tuple(param.shape)}"
            )
        if mask.dtype != torch.bool:
            raise ValueError(f"mask for {name} must be a bool tensor, got {mask.dtype}")
        pairs[name] = (param, mask.to(param.device))
    return pairs


@torch.no_grad()
def apply_masks(model: nn.Module, masks: dict[str, Tensor]) -> nn.Module:
    """Zero, in place, every weight whose mask entry is False; return ``model``."""
    for param, mask in _check(model, masks).values():
        param.masked_fill_(~mask, 0)
    return model


class Masker:
    """Keeps pruned weights exactly zero under any optimizer (SGD momentum, weight decay, Adam).

    Call :meth:`mask_grads_` after ``backward()`` and before ``optimizer.step()`` so no update
    (momentum or weight-decay term included) ever sees a pruned gradient, and
    :meth:`mask_weights_` after the step, which guards against optimizer state that was not
    reset at pruning time. Both assign zeros, so NaN or inf gradients cannot reach a pruned
    weight.

    With an optimizer created after pruning, masking the gradients alone is exact (a zero
    weight with a zero gradient gets a zero update from SGD with momentum and finite weight
    decay, Adam and AdamW); ``guard=False`` records that the caller relies on this and skips
    the weight assignment (a few % of a LeNet-300-100 step on a CPU). :meth:`violations`
    counts pruned weights that are not exactly zero, for a cheap per-epoch check.
    """

    def __init__(self, model: nn.Module, masks: dict[str, Tensor], *, guard: bool = True) -> None:
        pairs = _check(model, masks)
        self.params = [p for p, _ in pairs.values()]
        # Per weight, an integer mask of the weight's element width, laid out like the weight
        # (channels_last on CUDA): all ones where kept, zero where pruned.
        self.bits = [torch.empty_like(p, dtype=_INT[p.element_size()]).copy_(
            torch.where(m, -1, 0)) for p, m in pairs.values()]
        self.guard = guard

    @torch.no_grad()
    def mask_grads_(self) -> None:
        for p, bits in zip(self.params, self.bits):
            if p.grad is not None:
                p.grad.view(bits.dtype).bitwise_and_(bits)

    @torch.no_grad()
    def mask_weights_(self) -> None:
        for p, bits in zip(self.params, self.bits):
            p.detach().view(bits.dtype).bitwise_and_(bits)

    @torch.no_grad()
    def violations(self) -> int:
        """Number of pruned weights that are not exactly zero (0 when all is well)."""
        return sum(int((p.ne(0) & bits.eq(0)).sum()) for p, bits in zip(self.params, self.bits))


#: The integer type of each element width: the bits of a float are masked through it.
_INT = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
