"""Pruning-at-initialization criteria: pure score functions, higher = keep.

Each criterion lives in its own module named after it and registers itself with
:func:`fishprune.criteria._registry.register`. The explicit import list below is the registry's
table of contents, in the order criteria appear in tables and CLI listings.

**Plug-ins.** Other packages add criteria through the entry-point group ``fishprune.criteria``,
loaded at the end of this module's import (after the built-in criteria)::

    # pyproject.toml of the plug-in
    [project.entry-points."fishprune.criteria"]
    mycrit = "mycrit_pkg.score"        # a module that registers on import, or a score function

The entry point is either a module that calls ``@register("mycrit", ...)`` when imported (import
it from ``fishprune.criteria``: ``fishprune`` itself is still being imported at that point), or
a score function ``fn(model, params, batches, ctx, options)``, registered under the entry point's
name with the options dataclass in its ``options`` attribute if it has one. A plug-in that fails
to load gives one warning naming it and is skipped. Its options become ``fishprune run`` flags.
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
import warnings
from importlib.metadata import entry_points

from fishprune.criteria._registry import (
    REGISTRY,
    Context,
    Criterion,
    NoOptions,
    OptionSpec,
    get_criterion,
    register,
    register_criterion,
)

#: The entry-point group through which other packages add criteria.
ENTRY_POINT_GROUP = "fishprune.criteria"


def criteria() -> list[str]:
    """Names of every registered criterion, in table order."""
    return list(REGISTRY)


def _load_plugins() -> None:
    """Import every ``fishprune.criteria`` entry point; a broken one is one warning, no crash."""
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        try:
            target = ep.load()
            if ep.name not in REGISTRY and callable(target) and not isinstance(target, type):
                register_criterion(ep.name, target,
                                   options=getattr(target, "options", NoOptions))
        except Exception as error:
            warnings.warn(
                f"fishprune: criterion plug-in {ep.name!r} ({ep.value}) was not loaded: "
                f"{type(error).__name__}: {error}", stacklevel=2,
            )


_load_plugins()

__all__ = [
    "ENTRY_POINT_GROUP", "REGISTRY", "Context", "Criterion", "NoOptions", "OptionSpec",
    "criteria", "get_criterion", "register", "register_criterion",
]
