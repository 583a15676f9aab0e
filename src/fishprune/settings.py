"""Flat settings ↔ :class:`~fishprune.config.RunConfig`: values from flags, TOML files and
stored ``config.json`` files, type-checked and validated into one config.

Every setting has one flat name (``score_batch_size``, ``lr``...), and so has every criterion
option (``probes``, ``per_sample``...), which is routed into ``PruneConfig.options``. A TOML file
holds flat keys or ``[data]``/``[model]``/``[warmup]``/``[prune]``/``[train]`` tables, and the
criterion's options either flat or in a ``[prune.options]`` table. A setting given twice (as
``batch_size`` and ``batch-size``, or flat and in its table) is refused, never silently resolved.
"""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path
from typing import Any

import tomllib

from fishprune import config as C
from fishprune.config import OPTIONS, SECTIONS, ConfigError, RunConfig


def _fail(message: str) -> typing.NoReturn:
    raise ConfigError(message)


def setting_names() -> list[str]:
    """Every flat name: the settings, then the criterion options."""
    return [*C.flat_fields(), *C.option_specs()]


def coerce(name: str, value: Any) -> Any:
    """Check ``value`` against the type of setting (or criterion option) ``name``; convert
    lists to tuples and ints to floats where the setting is a float."""
    if name not in C.flat_fields() and name not in C.option_specs():
        _fail(f"unknown setting {name!r} (valid: {', '.join(sorted(setting_names()))})")
    kind = C.setting_kind(name)
    if value is None and C.is_optional(name):
        return None
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        if not isinstance(value, (list, tuple)):
            _fail(f"{name} must be a list of {item.__name__}; got {value!r}")
        return tuple(_scalar(name, v, item) for v in value)
    if typing.get_origin(kind) is dict:  # model_kwargs: named values of any TOML type
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            _fail(f"{name} must be a table of named values; got {value!r}")
        return dict(value)
    return _scalar(name, value, kind)


def _scalar(name: str, value: Any, kind: type) -> Any:
    if kind is bool:
        if not isinstance(value, bool):
            _fail(f"{name} must be true or false; got {value!r}")
        return value
    if kind is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or isinstance(value, bool):
        _fail(f"{name} must be {kind.__name__}; got {value!r}")
    return value


def build(values: dict[str, Any], base: RunConfig | None = None) -> RunConfig:
    """A validated :class:`RunConfig` from flat ``{name: value}`` over ``base`` (or defaults).

    Criterion options may be given by their flat names or as one ``options`` mapping; they are
    added to ``base``'s options (an option set to None is removed).
    """
    base = base or C.RunConfig()  # looked up at call time: tests extend it
    fields = C.flat_fields()
    updates: dict[str | None, dict[str, Any]] = {}
    options = dict(base.prune.options)
    given = dict(values)
    table = given.pop(OPTIONS, None) or {}
    if not isinstance(table, dict):
        _fail(f"options must be a table of criterion options; got {table!r}")
    for name, value in table.items():
        if name in given:
            _fail(f"option {name!r} is given twice (flat and in the options table)")
        given[name] = value
    for name, value in given.items():
        value = coerce(name, value)
        if name in fields:
            updates.setdefault(fields[name][0], {})[name] = value
        elif value is None:
            options.pop(name, None)
        else:
            options[name] = value
    top = updates.pop(None, {})
    updates.setdefault("prune", {})[OPTIONS] = options
    sections = {s: dataclasses.replace(getattr(base, s), **updates.get(s, {})) for s in SECTIONS}
    return dataclasses.replace(base, **sections, **top).validate()


def from_toml(path: str | Path) -> dict[str, Any]:
    """Flat settings from a TOML file (see the module docstring)."""
    path = Path(path)
    if path.is_dir():
        _fail(f"config file {path} is a directory")
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        _fail(f"config file {path} does not exist")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        _fail(f"config file {path} is not valid TOML: {err}")
    except RecursionError:
        _fail(f"config file {path} is nested too deeply")
    except OSError as err:
        _fail(f"config file {path} cannot be read: {err.strerror or err}")
    return flatten_table(raw, str(path))


def flatten_table(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """Flatten ``[section]`` tables (and ``[prune.options]``) into flat names, checking names,
    sections and that no setting is given twice."""
    fields = C.flat_fields()
    options = C.option_specs()
    flat: dict[str, Any] = {}
    spelled: dict[str, str] = {}

    def put(name: str, value: Any, as_written: str) -> None:
        if name in flat:
            _fail(f"{where}: {name} is given twice ({spelled[name]!r} and {as_written!r})")
        flat[name], spelled[name] = value, as_written

    for key, value in raw.items():
        name = key.replace("-", "_")
        if name in SECTIONS and isinstance(value, dict):
            for sub, v in value.items():
                subname = sub.replace("-", "_")
                if name == "prune" and subname == OPTIONS and isinstance(v, dict):
                    for opt, ov in v.items():
                        optname = opt.replace("-", "_")
                        if optname not in options:
                            _fail(f"{where}: unknown criterion option {opt!r} in [prune.options] "
                                  f"(valid: {', '.join(sorted(options)) or 'none'})")
                        put(optname, ov, f"[prune.options] {opt}")
                elif subname in options and name == "prune":
                    put(subname, v, f"[prune] {sub}")
                elif subname in fields and fields[subname][0] == name:
                    put(subname, v, f"[{key}] {sub}")
                else:
                    _fail(f"{where}: unknown setting {sub!r} in [{key}]")
        elif name in fields or name in options:
            put(name, value, key)
        else:
            _fail(f"{where}: unknown setting {key!r} "
                  f"(valid: {', '.join(sorted(setting_names()))})")
    return flat


#: Keys a run's ``config.json`` holds besides the settings: derived from them, never read back.
DERIVED_KEYS = ("run_id", "label")
#: Criterion options that ``config.json`` files written before options moved into
#: ``PruneConfig.options`` hold flat in ``prune``, with the value that meant "not set".
LEGACY_UNSET = {"probes": None, "temperature": None, "damping": None, "per_sample": False}


def from_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild a :class:`RunConfig` from :meth:`RunConfig.to_dict` output or a run's
    ``config.json`` (whose derived ``run_id`` and ``label`` are ignored; older files with
    criterion options flat in ``prune`` are read too)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in DERIVED_KEYS:
            continue
        if key in SECTIONS:
            if not isinstance(value, dict):
                _fail(f"section {key!r} must be a table; got {value!r}")
            for sub, v in value.items():
                if sub in LEGACY_UNSET and v == LEGACY_UNSET[sub]:
                    continue
                if sub in flat:
                    _fail(f"{sub} is given twice")
                flat[sub] = v
        else:
            flat[key] = value
    return build(flat)
