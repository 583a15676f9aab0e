"""Which parameters are prunable: weights of Linear and Conv layers by default, more on request.

By default a parameter is prunable when it is the ``weight`` of a ``nn.Linear``,
``nn.Conv1d/2d/3d`` or Hugging Face transformers ``Conv1D`` (GPT-2's linear layers, weight stored
(in, out)) and it requires grad. Biases, norm weights, embeddings and attention projections held
as bare parameters (``nn.MultiheadAttention.in_proj_weight``) are not, unless named by
``include``; a weight tied to a prunable layer's weight (a tied output embedding) is prunable as
that layer's weight.

**Frozen weights** (``requires_grad=False``) are not prunable by default: freezing says "keep this
as it is" (a pretrained backbone, a fixed embedding), training will not adapt to their removal,
and a global ranking would spend the sparsity budget on them. Name them in ``include`` to prune
them anyway.

**Tied weights** (one parameter under several names) are scored and masked once, under their
first ``named_parameters()`` name; ``exclude`` and ``include`` patterns match any of the names.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import Union

from torch import nn

#: Module types whose ``weight`` is prunable by default (with transformers' ``Conv1D``).
PRUNABLE_MODULES: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)

#: An ``include`` entry: a glob pattern on parameter names, or a module type (its weights).
Selector = Union[str, type]  # noqa: UP007  (a runtime alias, Python 3.10 included)


@dataclass(frozen=True)
class PrunableReport:
    """The prunable weights of a model (``kept``, in order) and every other parameter name with
    the reason it is not pruned (``skipped``)."""

    kept: list[str]
    skipped: dict[str, str]

    def __str__(self) -> str:
        width = max((len(n) for n in [*self.kept, *self.skipped]), default=0)
        lines = [f"{n:<{width}}  prunable" for n in self.kept]
        lines += [f"{n:<{width}}  skipped: {why}" for n, why in self.skipped.items()]
        return "\n".join(lines)


def is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 blocks): a Linear with the weight stored (in, out)."""
    kind = type(module)
    return kind.__name__ == "Conv1D" and kind.__module__.startswith("transformers")


def _default_layer(module: nn.Module) -> bool:
    return isinstance(module, PRUNABLE_MODULES) or is_hf_conv1d(module)


def _patterns(value: Iterable[str] | str, what: str) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else tuple(value)
    for item in items:
        if not isinstance(item, str):
            raise ValueError(f"{what} takes glob patterns of parameter names, got {item!r}")
    return items


def _selectors(value: Iterable[Selector] | Selector) -> tuple[Selector, ...]:
    items = (value,) if isinstance(value, (str, type)) else tuple(value)
    for item in items:
        if not isinstance(item, (str, type)):
            raise ValueError(
                f"include takes glob patterns of parameter names or module types, got {item!r}"
            )
    return items


def prunable_report(
    model: nn.Module, exclude: Iterable[str] = (), include: Iterable[Selector] = ()
) -> PrunableReport:
    """Which parameters :func:`prunable_parameters` returns, and why each other one is skipped.

    Raises ``ValueError`` naming any ``exclude`` or ``include`` entry that matches nothing (a
    typo would otherwise silently prune, or not prune, a whole layer).
    """
    excludes = _patterns(exclude, "exclude")
    includes = _selectors(include)
    # One pass over the modules (shared ones at every name): the order of named_parameters()
    # with remove_duplicate=False, whose first name of each parameter is its named_parameters()
    # name.
    entries = [(f"{prefix}.{attr}" if prefix else attr, module, attr, p)
               for prefix, module in model.named_modules(remove_duplicate=False)
               for attr, p in module._parameters.items() if p is not None]
    aliases: dict[int, list[str]] = {}
    for name, _, _, p in entries:
        aliases.setdefault(id(p), []).append(name)
    used: set[Selector] = set()
    kept: list[str] = []
    skipped: dict[str, str] = {}
    seen: set[int] = set()
    for _, module, attr, p in entries:
        if id(p) in seen:
            continue
        names = aliases[id(p)]
        chosen = [s for s in includes if (
            isinstance(s, str) and any(fnmatchcase(n, s) for n in names)
        ) or (isinstance(s, type) and isinstance(module, s) and attr.endswith("weight"))]
        used.update(chosen)
        default = attr == "weight" and _default_layer(module)
        if not (default or chosen):
            continue
        seen.add(id(p))
        hits = [pat for pat in excludes if any(fnmatchcase(n, pat) for n in names)]
        used.update(hits)
        if hits:
            skipped[names[0]] = f"excluded by {hits[0]!r}"
        elif not p.requires_grad and not chosen:
            skipped[names[0]] = "frozen (requires_grad=False); name it in include= to prune it"
        else:
            kept.append(names[0])
        for other in names[1:]:
            skipped[other] = f"tied to {names[0]} (scored and masked once, under that name)"
    for name, module, attr, p in entries:
        if id(p) in seen or name in skipped:
            continue
        first = aliases[id(p)][0]
        if name != first:
            skipped[name] = f"tied to {first}"
            continue
        kind = type(module).__name__
        skipped[name] = (f"{kind}.{attr}: a bias (include='*bias' adds biases)"
                         if attr.endswith("bias") else
                         f"{kind}.{attr}: not a Linear/Conv weight (include= adds it)")
    for s in (*includes, *excludes):
        if s in used:
            continue
        if isinstance(s, type):
            found = any(isinstance(m, s) for m in model.modules())
            target = "only modules without weights" if found else "no module"
            raise ValueError(f"include entry {s.__name__} matches {target} of "
                             f"{type(model).__name__}")
        what = "include" if s in includes else "exclude"
        target = "no prunable parameter" if what == "exclude" else "no parameter"
        raise ValueError(f"{what} pattern {s!r} matches {target} of {type(model).__name__} "
                         "(fishprune.prunable_report(model) lists the names)")
    return PrunableReport(kept, skipped)


def prunable_parameters(
    model: nn.Module, exclude: Iterable[str] = (), include: Iterable[Selector] = ()
) -> dict[str, nn.Parameter]:
    """Return the prunable weights of ``model``, keyed by their ``named_parameters()`` names.

    By default the (trainable) weights of Linear, Conv1d/2d/3d and transformers ``Conv1D``
    layers (see the module docstring for frozen and tied weights). ``include`` adds parameters:
    glob patterns (``fnmatch``, case-sensitive) on the full parameter name (``"*.bias"``,
    ``"*.in_proj_weight"``) or module types, whose weights (parameters named ``*weight``) are
    added (``nn.Embedding``, ``nn.LayerNorm``); ``exclude`` removes parameters by glob pattern,
    e.g. ``("fc.*", "*.downsample.*")``. A pattern or type that matches nothing raises a
    ``ValueError`` naming it. The order is the model's own ``named_modules()`` order.
    """
    params = dict(model.named_parameters())
    return {name: params[name] for name in prunable_report(model, exclude, include).kept}


def require_prunable(
    model: nn.Module, exclude: Iterable[str] = (), include: Iterable[Selector] = ()
) -> dict[str, nn.Parameter]:
    """Like :func:`prunable_parameters`, but raise a clear ``ValueError`` when nothing is left."""
    params = prunable_parameters(model, exclude, include)
    if not params:
        kinds = ", ".join(t.__name__ for t in PRUNABLE_MODULES)
        excluded = tuple(exclude) if not isinstance(exclude, str) else (exclude,)
        raise ValueError(
            f"{type(model).__name__} has no prunable weights (looked for {kinds} weights"
            + (f", excluding {list(excluded)}" if excluded else "")
            + "; fishprune.prunable_report(model) lists every parameter and why it is skipped)"
        )
    return params
