"""Sweep grids: a TOML file of ``fishprune run`` settings where values may be lists.

The rule
--------
A sweep file holds the same settings as ``fishprune run --config`` (flat keys or
``[data]``/``[model]``/``[warmup]``/``[prune]``/``[train]`` tables). Then:

* a **list** given to a scalar setting is an **axis**: ``sparsity = [0.9, 0.95, 0.98]``;
* a list-typed setting (``lr_milestones``, ``exclude``) takes a flat list as its one fixed value
  (``exclude = ["fc3.*"]``) and a **list of lists** as an axis
  (``lr_milestones = [[], [60, 120]]``); mixing lists and scalars is an error;
* the grid is the Cartesian product of the axes, in the order they appear in the file (the last
  one varies fastest);
* every ``[[include]]`` table adds runs: it takes the main grid, replaces the settings it names
  (its lists are axes too) and keeps sweeping every axis it does not name. A dense baseline
  once per seed is ``[[include]]`` with ``sparsity = 0.0`` and one fixed ``criterion``;
* runs with the same run id are run once; ``out`` cannot be swept: it is the sweep directory.

Every value is checked against the setting's type before anything runs, and every grid point
is validated as a :class:`~fishprune.config.RunConfig`; errors are one line naming the file.
"""

from __future__ import annotations

import itertools
import math
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import tomllib

from fishprune import config as C
from fishprune import settings as S

#: Refuse grids larger than this (a typo such as a list of 1000 seeds).
MAX_RUNS = 100_000

Spec = dict[str, list[Any]]  # setting → its values (one value = fixed)


@dataclass(frozen=True)
class Sweep:
    """An expanded sweep: the run configs (unique, in grid order) and the swept axes."""

    source: str
    out: Path
    runs: list[C.RunConfig]
    axes: dict[str, list[Any]]  # settings that take more than one value over all runs


def _list_typed(name: str) -> bool:
    return typing.get_origin(C.setting_kind(name)) is tuple


def axis_values(name: str, value: Any, where: str) -> list[Any]:
    """The values one setting takes in the grid, each type-checked (see the module rule)."""
    if name == "out":
        if isinstance(value, list):
            raise C.ConfigError(f"{where}: out cannot be swept (it is the sweep directory)")
        return [S.coerce(name, value)]
    if name not in S.setting_names():
        raise C.ConfigError(f"{where}: unknown setting {name!r}")
    if _list_typed(name):
        nested = [isinstance(v, list) for v in value] if isinstance(value, list) else [False]
        if any(nested) and not all(nested):
            raise C.ConfigError(f"{where}: {name} mixes lists and scalars; give a list of values "
                                f"(one fixed value) or a list of lists (an axis)")
        values = value if value and all(nested) else [value]
    else:
        values = value if isinstance(value, list) else [value]
    if not values:
        raise C.ConfigError(f"{where}: {name} = [] sweeps no value")
    out = []
    for i, v in enumerate(values):
        try:
            out.append(S.coerce(name, v))
        except C.ConfigError as err:
            at = f"{where}: {name}[{i}]" if len(values) > 1 else where
            raise C.ConfigError(f"{at}: {err}") from None
    return out


def parse_spec(table: dict[str, Any], where: str) -> Spec:
    """``{setting: [values]}`` from a TOML table (flat or with section tables)."""
    flat = S.flatten_table(table, where)
    return {name: axis_values(name, value, where) for name, value in flat.items()}


def expand(spec: Spec, out: str, where: str) -> list[C.RunConfig]:
    """Every grid point of ``spec`` as a validated :class:`RunConfig` writing into ``out``."""
    size = math.prod(len(v) for v in spec.values())
    if size > MAX_RUNS:
        raise C.ConfigError(f"{where}: the grid has {size} runs (more than {MAX_RUNS})")
    runs = []
    for combo in itertools.product(*spec.values()):
        values = dict(zip(spec, combo))
        values["out"] = out
        try:
            runs.append(S.build(values))
        except C.ConfigError as err:
            swept = ", ".join(f"{k}={v!r}" for k, v in values.items()
                              if len(spec.get(k, ())) > 1)
            raise C.ConfigError(f"{where}: {err}" + (f" (at {swept})" if swept else "")) from None
    return runs


def load_sweep(path: str | Path, out: str | Path | None = None) -> Sweep:
    """Read and expand a sweep file; ``out`` overrides its ``out`` (default ``sweeps/<stem>``)."""
    path = Path(path)
    where = str(path)
    if path.is_dir():
        raise C.ConfigError(f"sweep file {path} is a directory")
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise C.ConfigError(f"sweep file {path} does not exist") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise C.ConfigError(f"sweep file {path} is not valid TOML: {err}") from None
    except RecursionError:
        raise C.ConfigError(f"sweep file {path} is nested too deeply") from None
    except OSError as err:
        raise C.ConfigError(f"sweep file {path} cannot be read: {err.strerror or err}") from None
    return sweep_from_table(raw, where, out=out, default_out=Path("sweeps") / path.stem)


def sweep_from_table(raw: dict[str, Any], where: str, *, out: str | Path | None = None,
                     default_out: str | Path = "sweeps/sweep") -> Sweep:
    """Expand an already parsed sweep table (see :func:`load_sweep`)."""
    raw = dict(raw)
    includes = raw.pop("include", [])
    if not isinstance(includes, list) or not all(isinstance(t, dict) for t in includes):
        raise C.ConfigError(f"{where}: include must be an array of tables ([[include]])")
    main = parse_spec(raw, where)
    fixed_out = main.pop("out", [None])[0]
    target = Path(out or fixed_out or default_out).expanduser().resolve()
    specs = [main]
    for i, table in enumerate(includes):
        extra = parse_spec(table, f"{where}: include[{i}]")
        if "out" in extra:
            raise C.ConfigError(f"{where}: include[{i}]: out cannot be set per run")
        specs.append({**main, **extra})
    runs: dict[str, C.RunConfig] = {}
    for i, spec in enumerate(specs):
        at = where if i == 0 else f"{where}: include[{i - 1}]"
        for cfg in expand(spec, str(target), at):
            runs.setdefault(cfg.run_id(), cfg)
    values: dict[str, list[Any]] = {}
    for cfg in runs.values():
        for key, value in C.flat_values(cfg).items():
            if value not in values.setdefault(key, []):
                values[key].append(value)
    axes = {k: v for k, v in values.items() if len(v) > 1}
    return Sweep(source=where, out=target, runs=list(runs.values()), axes=axes)
