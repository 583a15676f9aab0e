"""The criterion registry: one small file per criterion, one ``@register`` line each."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from fishprune.autograd import LossFn
from fishprune.batches import Batches


@dataclass(frozen=True)
class Context:
    """What every criterion may use besides the model, its weights and the batches."""

    loss_fn: LossFn
    seed: int

    def generator(self) -> torch.Generator:
        """A fresh CPU generator seeded with ``seed`` (CPU draws give the same result anywhere)."""
        return torch.Generator().manual_seed(self.seed)


@dataclass(frozen=True)
class NoOptions:
    """A criterion without options."""


ScoreFn = Callable[[nn.Module, dict[str, nn.Parameter], Batches, Context, Any], dict[str, Tensor]]


@dataclass(frozen=True)
class Criterion:
    """A registered score function ``(model, params, batches, ctx, options) -> scores``."""

    name: str
    fn: ScoreFn
    options: type
    needs_data: bool
    passes: int  # how many times ``fn`` iterates the batches (for replay of one-shot iterables)
    default_rounds: int
    summary: str

    def parse_options(self, given: dict[str, Any]) -> Any:
        """Build the criterion's options dataclass, rejecting unknown names and wrong types."""
        fields = {f.name: f for f in dataclasses.fields(self.options)}
        unknown = sorted(set(given) - set(fields))
        if unknown:
            valid = ", ".join(sorted(fields)) or "none"
            raise ValueError(
                f"unknown option(s) {', '.join(unknown)} for criterion '{self.name}' "
                f"(valid options: {valid})"
            )
        for key, value in given.items():
            default = getattr(self.options(), key)
            if isinstance(default, bool) != isinstance(value, bool) or not isinstance(
                value, (type(default), int) if isinstance(default, float) else type(default)
            ):
                raise ValueError(
                    f"option {key} of criterion '{self.name}' must be {type(default).__name__}, "
                    f"got {value!r}"
                )
        opts = self.options(**given)
        check = getattr(opts, "validate", None)
        if check is not None:
            check()
        return opts


REGISTRY: dict[str, Criterion] = {}


def register(
    name: str,
    *,
    options: type = NoOptions,
    needs_data: bool = True,
    passes: int = 1,
    default_rounds: int = 1,
) -> Callable[[ScoreFn], ScoreFn]:
    """Register ``fn`` under ``name`` (= file name = CLI name = value in results tables)."""

    def decorator(fn: ScoreFn) -> ScoreFn:
        if name in REGISTRY:
            raise ValueError(f"criterion '{name}' registered twice")
        summary = ((fn.__module__ and __import__(fn.__module__, fromlist=["_"]).__doc__) or "")
        REGISTRY[name] = Criterion(
            name, fn, options, needs_data, passes, default_rounds, summary.strip().splitlines()[0]
        )
        return fn

    return decorator


def get_criterion(name: str) -> Criterion:
    """The registered criterion ``name``, or a ``ValueError`` listing the valid names."""
    if not isinstance(name, str) or name not in REGISTRY:
        raise ValueError(f"unknown criterion {name!r} (valid: {', '.join(REGISTRY)})")
    return REGISTRY[name]


def positive(value: float, what: str) -> None:
    """Raise unless ``value`` is a finite number > 0."""
    if not (isinstance(value, (int, float)) and value > 0 and value != float("inf")):
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}")
