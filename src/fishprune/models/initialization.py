"""Weight initialisation schemes selectable by name in ``build_model(init=...)``.

``default`` keeps PyTorch's own initialisation (e.g. Kaiming-uniform with a = √5 for
``nn.Linear``/``nn.Conv2d``). The others re-draw every ``nn.Conv2d`` and ``nn.Linear`` weight
and zero their biases; normalisation layers (BatchNorm, LayerNorm) and raw parameters such as
ViT's class token and position embedding keep their defaults:

- ``kaiming_normal``: w ~ N(0, 2 / fan_in) (He et al. 2015, mode ``fan_in``, ReLU gain).
- ``xavier_normal``: w ~ N(0, 2 / (fan_in + fan_out)) (Glorot & Bengio 2010).

Randomness comes from the global generator: seed with ``torch.manual_seed`` before building.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

INITS = ("default", "kaiming_normal", "xavier_normal")


def _kaiming_normal(weight: Tensor) -> None:
    nn.init.kaiming_normal_(weight, mode="fan_in", nonlinearity="relu")


def _xavier_normal(weight: Tensor) -> None:
    nn.init.xavier_normal_(weight)


_WEIGHT_INITS: dict[str, Callable[[Tensor], None]] = {
    "kaiming_normal": _kaiming_normal,
    "xavier_normal": _xavier_normal,
}


def check_init(init: str) -> None:
    """Raise ``ValueError`` if ``init`` is not one of :data:`INITS`."""
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; valid choices: {list(INITS)}")


def initialize_(model: nn.Module, init: str) -> nn.Module:
    """Re-initialise ``model``'s conv and linear layers in place with scheme ``init``."""
    check_init(init)
    if init == "default":
        return model
    weight_init = _WEIGHT_INITS[init]
    for module in model.modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            weight_init(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    return model
