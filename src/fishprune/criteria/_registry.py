"""The criterion registry: one small file per criterion, one ``@register`` line each.

A criterion declares everything the rest of fishprune needs to know about it here, once: its
options (a frozen dataclass whose fields carry ``metadata={"help": ...}``), what data it reads
(``data``), whether its scores depend on the seed (``seeded``), a fixed score dtype, how many
times it iterates the batches, and its default number of rounds. The run configuration, the
command line, TOML files and the contract tests all read these facts from :data:`REGISTRY`.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fishprune.batches import Batches
from fishprune.losses import LossFn

#: What a criterion reads from the scoring data: ``(inputs, targets)`` batches, only the input
#: shape (data-free criteria that run the network, e.g. synflow), or nothing at all.
DATA_KINDS = ("batches", "shape", "none")


@dataclass(frozen=True)
class Context:
    """What every criterion may use besides the model, its scored weights and the batches.

    ``prunable`` holds every prunable weight of the model, including those the caller excluded
    from scoring: criteria whose scores depend on the other weights' gradients (GraSP's ḡ)
    compute over all of them and score only the included ones.
    """

    loss_fn: LossFn
    seed: int
    prunable: dict[str, nn.Parameter] = dataclasses.field(default_factory=dict)

    def generator(self) -> torch.Generator:
        """A fresh CPU generator seeded with ``seed`` (CPU draws give the same result anywhere)."""
        return torch.Generator().manual_seed(self.seed)


@dataclass(frozen=True)
class NoOptions:
    """A criterion without options."""


ScoreFn = Callable[[nn.Module, dict[str, nn.Parameter], Batches, Context, Any], dict[str, Tensor]]


@dataclass(frozen=True)
class OptionSpec:
    """One option of a criterion: its name, type, default and one-line help."""

    name: str
    kind: Any  # the resolved annotation (int, float, bool, tuple[int, ...], ...)
    default: Any
    help: str
    run_setting: bool  # False: set by the pipeline (e.g. synflow's input shape), not by users


@dataclass(frozen=True)
class Criterion:
    """A registered score function ``(model, params, batches, ctx, options) -> scores``."""

    name: str
    fn: ScoreFn
    options: type
    data: str
    seeded: bool
    dtype: torch.dtype | None  # a fixed score dtype (synflow: float64); None: float32/weights'
    passes: int  # how many times ``fn`` iterates the batches (for replay of one-shot iterables)
    default_rounds: int
    summary: str

    @property
    def needs_data(self) -> bool:
        """Whether scoring needs ``(inputs, targets)`` batches."""
        return self.data == "batches"

    def option_specs(self) -> dict[str, OptionSpec]:
        """The criterion's options by name, in declaration order."""
        hints = typing.get_type_hints(self.options)
        defaults = self.options()
        return {
            f.name: OptionSpec(f.name, hints[f.name], getattr(defaults, f.name),
                               f.metadata.get("help", ""), f.metadata.get("run_setting", True))
            for f in dataclasses.fields(self.options)
        }

    def parse_options(self, given: dict[str, Any]) -> Any:
        """Build the criterion's options dataclass, rejecting unknown names, wrong types and
        out-of-range values (the dataclass's ``validate()``) with a one-line ``ValueError``."""
        specs = self.option_specs()
        unknown = sorted(set(given) - set(specs))
        if unknown:
            valid = ", ".join(specs) or "none"
            raise ValueError(
                f"unknown option(s) {', '.join(unknown)} for criterion '{self.name}' "
                f"(valid options: {valid})"
            )
        values = {key: _checked_value(self.name, specs[key], value) for key, value in given.items()}
        opts = self.options(**values)
        check = getattr(opts, "validate", None)
        if check is not None:
            check()
        return opts

    def canonical_options(self, given: dict[str, Any]) -> dict[str, Any]:
        """The given options, validated, typed, with those equal to their default dropped."""
        opts = self.parse_options(given)
        specs = self.option_specs()
        return {k: getattr(opts, k) for k in given if getattr(opts, k) != specs[k].default}


def _checked_value(criterion: str, spec: OptionSpec, value: Any) -> Any:
    """``value`` converted to the option's type (int → float, list → tuple), or a ValueError."""
    kind = spec.kind
    wanted = getattr(kind, "__name__", str(kind))
    if typing.get_origin(kind) is tuple or kind is tuple:
        args = [a for a in typing.get_args(kind) if a is not Ellipsis]
        item = args[0] if args else int
        if isinstance(value, (list, tuple)) and all(
            isinstance(v, item) and not isinstance(v, bool) for v in value
        ):
            return tuple(value)
        wanted = f"a list of {item.__name__}"
    elif kind is bool:
        if isinstance(value, bool):
            return value
    elif kind is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(kind, type) and isinstance(value, kind) and not isinstance(value, bool):
        return value
    raise ValueError(f"option {spec.name} of criterion '{criterion}' must be {wanted}, "
                     f"got {value!r}")


REGISTRY: dict[str, Criterion] = {}


def register(
    name: str,
    *,
    options: type = NoOptions,
    data: str = "batches",
    seeded: bool = False,
    dtype: torch.dtype | None = None,
    passes: int = 1,
    default_rounds: int = 1,
) -> Callable[[ScoreFn], ScoreFn]:
    """Register ``fn`` under ``name`` (= file name = CLI name = value in results tables).

    The first line of the module docstring of ``fn`` is the one-line summary listed by
    ``fishprune criteria``.
    """
    if data not in DATA_KINDS:
        raise ValueError(f"criterion '{name}': data must be one of {', '.join(DATA_KINDS)}")

    def decorator(fn: ScoreFn) -> ScoreFn:
        if name in REGISTRY:
            raise ValueError(f"criterion '{name}' registered twice")
        import sys

        module = sys.modules.get(fn.__module__)
        summary = ((module.__doc__ if module else None) or fn.__doc__ or name).strip()
        REGISTRY[name] = Criterion(
            name, fn, options, data, seeded, dtype, passes, default_rounds,
            summary.splitlines()[0],
        )
        return fn

    return decorator


def register_criterion(
    name: str,
    fn: ScoreFn,
    *,
    options: type = NoOptions,
    data: str = "batches",
    seeded: bool = False,
    dtype: torch.dtype | None = None,
    passes: int = 1,
    default_rounds: int = 1,
) -> Criterion:
    """Register the score function ``fn(model, params, batches, ctx, options) -> {name: scores}``
    under ``name`` (the function form of :func:`register`; see it for the arguments).

    ``fn`` receives the scored weights ``params``, the batches as ``(inputs, targets)`` pairs
    (inputs may be a dict: compute losses with :func:`fishprune.autograd.batch_loss`, which
    calls the model and applies ``ctx.loss_fn`` with its output function), a :class:`Context`,
    and an instance of ``options`` (a frozen dataclass; its fields become ``fishprune run``
    flags). ``passes``: how many times ``fn`` iterates the batches (> 1: one-shot iterables are
    cached for replay).
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"criterion name must be an identifier, got {name!r}")
    if not callable(fn):
        raise ValueError(f"criterion '{name}': fn must be callable, got {fn!r}")
    if not (isinstance(options, type) and dataclasses.is_dataclass(options)):
        raise ValueError(f"criterion '{name}': options must be a dataclass type, got {options!r}")
    register(name, options=options, data=data, seeded=seeded, dtype=dtype, passes=passes,
             default_rounds=default_rounds)(fn)
    return REGISTRY[name]


def get_criterion(name: str) -> Criterion:
    """The registered criterion ``name``, or a ``ValueError`` listing the valid names."""
    if not isinstance(name, str) or name not in REGISTRY:
        raise ValueError(f"unknown criterion {name!r} (valid: {', '.join(REGISTRY)})")
    return REGISTRY[name]


def positive(value: float, what: str) -> None:
    """Raise unless ``value`` is a finite number > 0."""
    if not (isinstance(value, (int, float)) and value > 0 and value != float("inf")):
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}")
