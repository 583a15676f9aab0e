"""Model zoo for pruning-at-initialization experiments.

``build_model(name, ...)`` looks ``name`` up in :data:`MODELS` (a plain dict; adding a model is
one import and one line here), builds it for the given input shape and width multiplier, and
applies the initialisation scheme ``init`` (see :mod:`fishprune.models.initialization`).
A ``name`` with a colon is an external model (``timm:resnet18``, ``hf:vit``,
``mypackage.models:build``; see :mod:`fishprune.models.external`), built with ``kwargs``.

Seeding is the caller's job: call ``torch.manual_seed`` before ``build_model``; given the global
seed, building is deterministic. Every model is a plain ``nn.Module`` made of standard
``nn.Conv2d``/``nn.Linear``/``nn.BatchNorm2d``/``nn.LayerNorm`` layers, so the names from
``named_parameters()`` (e.g. ``features.0.weight``) are stable, and ``forward`` accepts
``channels_last`` inputs.
"""

from __future__ import annotations

from typing import Any, Protocol

from torch import nn

from fishprune.models.external import (
    ExternalModelError,
    LogitsOnly,
    build_external,
    check_spec,
    is_external,
)
from fishprune.models.initialization import INITS, check_init, initialize_
from fishprune.models.lenet import lenet5, lenet300
from fishprune.models.resnet import resnet18, resnet20
from fishprune.models.vgg import vgg11, vgg16, vgg19
from fishprune.models.vit import vit


class ModelBuilder(Protocol):
    """Signature shared by every registered builder."""

    def __call__(
        self, *, in_channels: int, num_classes: int, image_size: int, width: float
    ) -> nn.Module: ...


MODELS: dict[str, ModelBuilder] = {
    "lenet300": lenet300,
    "lenet5": lenet5,
    "vgg11": vgg11,
    "vgg16": vgg16,
    "vgg19": vgg19,
    "resnet18": resnet18,
    "resnet20": resnet20,
    "vit": vit,
}


def models() -> list[str]:
    """Return the registered model names, in registry order."""
    return list(MODELS)


def build_model(
    name: str,
    *,
    in_channels: int = 1,
    num_classes: int = 10,
    image_size: int = 28,
    width: float = 1.0,
    init: str = "default",
    kwargs: dict[str, Any] | None = None,
) -> nn.Module:
    """Build model ``name`` for ``in_channels``×``image_size``² inputs and ``num_classes`` outputs.

    ``width`` multiplies every hidden width / channel count (rounded, at least 1); ``init`` is one
    of ``INITS``; ``kwargs`` go to an external model's builder (zoo models take none). Raises
    ``ValueError`` for an unknown name, init, image size or width.
    """
    check_init(init)
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if is_external(name):
        if width != 1.0:
            raise ValueError(f"width applies to the zoo models only; {name} has width {width}")
        model = build_external(name, in_channels=in_channels, num_classes=num_classes,
                               image_size=image_size, kwargs=kwargs)
        return initialize_(model, init)
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid choices: {models()}")
    if kwargs:
        raise ValueError(f"model kwargs apply to external models only; {name} takes none")
    model = MODELS[name](
        in_channels=in_channels, num_classes=num_classes, image_size=image_size, width=width
    )
    return initialize_(model, init)


def has_batchnorm(name: str, *, width: float = 1.0) -> bool:
    """Whether zoo model ``name`` has BatchNorm layers (built on the meta device: no memory)."""
    import torch

    with torch.device("meta"):
        model = MODELS[name](in_channels=1, num_classes=10, image_size=32, width=width)
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Return the number of scalar parameters of ``model`` (weights, biases, norm affines)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


__all__ = [
    "INITS",
    "MODELS",
    "ExternalModelError",
    "LogitsOnly",
    "ModelBuilder",
    "build_external",
    "build_model",
    "check_spec",
    "count_parameters",
    "has_batchnorm",
    "is_external",
    "models",
]
