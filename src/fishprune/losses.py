"""The loss of a batch and its gradients: the base that autograd.py, hvp.py and persample.py share.

Models are called as ``model(inputs)`` or ``model(**inputs)`` (dict inputs); their outputs go
through an ``output_fn`` to the logits (:func:`logits_of` by default: a tensor, the first element
of a tuple, or ``outputs["logits"]`` of a dict / Hugging Face ``ModelOutput``). :func:`batch_loss`
is ℓ(B) (refused when NaN or infinite), :func:`gradients` its gradients with zeros for unused
weights; :class:`Moments` holds ḡ and F̂ (notation in :mod:`fishprune.autograd`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fishprune.batches import Batch, Inputs

LossFn = Callable[[Tensor, Tensor], Tensor]
OutputFn = Callable[[Any], Tensor]


def logits_of(outputs: Any) -> Tensor:
    """The logits in a model's outputs: a tensor, the first element of a tuple or list, or the
    ``"logits"`` entry of a dict or Hugging Face ``ModelOutput``."""
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        if isinstance(outputs.get("logits"), Tensor):
            return outputs["logits"]
        raise ValueError(
            f"the model returned a {type(outputs).__name__} without a 'logits' tensor (keys: "
            f"{', '.join(map(str, outputs))}): pass output_fn=lambda out: ... to pick the logits"
        )
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], Tensor):
        return outputs[0]
    raise ValueError(
        f"cannot find the logits in the model's output (a {type(outputs).__name__}): pass "
        "output_fn=lambda out: ... to pick them"
    )


@dataclass(frozen=True)
class Loss:
    """``loss_fn(output_fn(model(inputs)), targets)``: what the criteria receive as ``loss_fn``.

    Calling it applies ``loss_fn`` to logits, so a criterion may also use it directly.
    """

    loss_fn: LossFn = F.cross_entropy
    output_fn: OutputFn = logits_of

    def __call__(self, logits: Tensor, targets: Tensor) -> Tensor:
        return self.loss_fn(logits, targets)


def call_model(model: nn.Module, inputs: Inputs) -> Any:
    """``model(**inputs)`` for dict inputs, ``model(inputs)`` otherwise."""
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


def gradients(outputs: Tensor | list[Tensor], inputs: list[Tensor], **kwargs) -> tuple[Tensor, ...]:
    """``torch.autograd.grad``, with zeros for weights the loss does not use (an unused head)."""
    return torch.autograd.grad(outputs, inputs, allow_unused=True, materialize_grads=True, **kwargs)


def _zeros(like: Tensor) -> Tensor:
    """An accumulator for ``like``: float32, or float64 for float64 weights (sums of squares
    in a lower precision than the weights would make float64 scoring no more exact than float32)."""
    return torch.zeros_like(like, dtype=torch.promote_types(like.dtype, torch.float32))


@dataclass(frozen=True)
class Moments:
    """First and second moments of the scoring gradients, keyed like the parameters."""

    mean: dict[str, Tensor]  # ḡ
    sq_mean: dict[str, Tensor]  # F̂
    count: int  # number of gradients averaged (batches, or samples when per-sample)


def batch_loss(
    model: nn.Module, batch: Batch, loss_fn: LossFn, temperature: float = 1.0,
    index: int | None = None,
) -> Tensor:
    """ℓ(B) with the logits divided by ``temperature`` (GraSP and Hutchinson use T = 200).

    A NaN or infinite loss is refused (``index`` names the batch): its gradients would turn
    into scores that look like numbers.
    """
    inputs, targets = batch
    output_fn = loss_fn.output_fn if isinstance(loss_fn, Loss) else logits_of
    logits = output_fn(call_model(model, inputs))
    if temperature != 1.0:
        logits = logits / temperature
    loss = loss_fn(logits, targets)
    if not bool(torch.isfinite(loss.detach()).all()):
        where = f" on batch {index}" if index is not None else ""
        kind = "NaN" if bool(torch.isnan(loss.detach()).any()) else "inf"
        raise ValueError(f"the loss is {kind}{where}: check the inputs, targets and the model "
                         "(scores from it would be meaningless)")
    return loss
