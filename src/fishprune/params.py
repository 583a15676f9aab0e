"""Which parameters are prunable: weights of Linear and Conv1d/2d/3d layers by default."""

from __future__ import annotations

from collections.abc import Iterable
from fnmatch import fnmatchcase

from torch import nn

#: Module types whose ``weight`` is prunable by default (biases, norms and embeddings never are).
PRUNABLE_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def prunable_parameters(
    model: nn.Module, exclude: Iterable[str] = ()
) -> dict[str, nn.Parameter]:
    """Return the prunable weights of ``model``, keyed by their ``named_parameters()`` names.

    A weight is prunable when it belongs to a module in :data:`PRUNABLE_MODULES`. ``exclude``
    holds glob patterns (``fnmatch``, case-sensitive) matched against the full parameter name,
    e.g. ``("fc.*", "*.downsample.*")``. A weight shared by several modules appears once, under
    its first name. The order is the model's own ``named_modules()`` order.
    """
    patterns = tuple(exclude) if not isinstance(exclude, str) else (exclude,)
    names = {id(p): n for n, p in model.named_parameters()}
    out: dict[str, nn.Parameter] = {}
    seen: set[int] = set()
    for module in model.modules():
        if not isinstance(module, PRUNABLE_MODULES):
            continue
        weight = getattr(module, "weight", None)
        if not isinstance(weight, nn.Parameter) or id(weight) in seen:
            continue
        seen.add(id(weight))
        name = names[id(weight)]
        if any(fnmatchcase(name, pattern) for pattern in patterns):
            continue
        out[name] = weight
    return out


def require_prunable(model: nn.Module, exclude: Iterable[str] = ()) -> dict[str, nn.Parameter]:
    """Like :func:`prunable_parameters`, but raise a clear ``ValueError`` when nothing is left."""
    params = prunable_parameters(model, exclude)
    if not params:
        kinds = ", ".join(t.__name__ for t in PRUNABLE_MODULES)
        raise ValueError(
            f"{type(model).__name__} has no prunable weights (looked for {kinds} weights"
            + (f", excluding {list(exclude)}" if tuple(exclude) else "")
            + ")"
        )
    return params
