"""Applying masks: zero pruned weights once, then keep them exactly zero through training.

No forward pre-hooks and no ``weight_orig`` re-parametrisation: the model stays a plain
``nn.Module`` whose ``state_dict`` has its usual keys. During training, :class:`Masker` zeroes the
gradients of pruned weights before ``optimizer.step()`` and the weights after it. Zeros are
*assigned* (``masked_fill_``), never multiplied in: a NaN or inf gradient times 0 is NaN, and a
pruned weight must stay exactly 0 whatever the gradient holds.
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
        # True where the weight is pruned, laid out like the weight (channels_last on CUDA), so
        # the in-place fills run on matching strides.
        self.pruned = [torch.empty_like(p, dtype=torch.bool).copy_(~m) for p, m in pairs.values()]
        self.guard = guard

    @torch.no_grad()
    def mask_grads_(self) -> None:
        for p, pruned in zip(self.params, self.pruned):
            if p.grad is not None:
                p.grad.masked_fill_(pruned, 0)

    @torch.no_grad()
    def mask_weights_(self) -> None:
        for p, pruned in zip(self.params, self.pruned):
            p.masked_fill_(pruned, 0)

    @torch.no_grad()
    def violations(self) -> int:
        """Number of pruned weights that are not exactly zero (0 when all is well)."""
        return sum(int((p.ne(0) & pruned).sum()) for p, pruned in zip(self.params, self.pruned))
