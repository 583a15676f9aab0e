"""Train/eval flags of every submodule: set for a while, then restored exactly as found."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def restored_modes(model: nn.Module) -> Iterator[nn.Module]:
    """Restore the ``training`` flag of ``model`` and of every submodule on exit (a caller's
    model may mix modes, e.g. a frozen BatchNorm in eval mode inside a training model)."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield model
    finally:
        for module, training in flags:
            module.training = training
