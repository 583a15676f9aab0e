"""Pruning-at-initialization criteria: pure score functions, higher = keep.

Each criterion lives in its own module named after it and registers itself with
:func:`fishprune.criteria._registry.register`. The explicit import list below is the registry's
table of contents, in the order criteria appear in tables and CLI listings.
"""

# The import order is the table order: sorting these imports would reorder the registry.
# isort: off
from fishprune.criteria import (  # noqa: F401  (imported for their @register side effect)
    random,
    magnitude,
    gn,
    snip,
    grasp,
    synflow,
    fd,
    fp,
    fts,
    fbss,
    hd,
    hp,
    hts,
)

# isort: on
from fishprune.criteria._registry import (
    REGISTRY,
    Context,
    Criterion,
    OptionSpec,
    get_criterion,
    register,
)


def criteria() -> list[str]:
    """Names of every registered criterion, in table order."""
    return list(REGISTRY)


__all__ = [
    "REGISTRY", "Context", "Criterion", "OptionSpec", "criteria", "get_criterion", "register",
]
