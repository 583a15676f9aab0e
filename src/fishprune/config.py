"""Typed, frozen run configuration: the single source of truth for the CLI, TOML files,
``config.json`` and run identities.

A run's id is a hash of its *non-default* settings (open_lth): adding an option whose default
changes nothing keeps every old id. Settings that say where things are rather than what is
computed (``data_dir``, ``out``, ``device``) are not part of the id.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomllib

from fishprune.criteria import criteria
from fishprune.selection import SCOPES

SANITY_CHECKS = ("none", "shuffle", "reinit", "invert", "random-labels")
ON_COLLAPSE = ("warn", "error", "ignore")
OPTIMIZERS = ("sgd", "adam")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A configuration value or file that cannot be used (a usage error: exit status 2)."""


def _fail(message: str) -> None:
    raise ConfigError(message)


def _check_choice(name: str, value: str, choices: typing.Iterable[str]) -> None:
    choices = list(choices)
    if value not in choices:
        _fail(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_range(name: str, value: float, lo: float, hi: float, *, hi_open: bool = False) -> None:
    bad = math.isnan(value) or value < lo or (value >= hi if hi_open else value > hi)
    if bad:
        _fail(f"{name} must be in [{lo}, {hi}{')' if hi_open else ']'}; got {value!r}")


@dataclass(frozen=True)
class DataConfig:
    """Dataset, split and batches."""

    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    val_fraction: float = 0.2  # stratified train/validation split, 80:20 as the papers
    split_seed: int = 0  # a fixed split for every run (the papers use one constant seed)
    batch_size: int = 128
    augment: bool | None = None  # None: random crop + flip for CIFAR, nothing for (F-)MNIST

    def validate(self) -> None:
        from fishprune.data import datasets

        _check_choice("dataset", self.dataset, datasets())
        _check_range("val_fraction", self.val_fraction, 0.0, 1.0, hi_open=True)
        if self.batch_size < 1:
            _fail(f"batch_size must be >= 1; got {self.batch_size}")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture, width multiplier and initialization."""

    model: str = "lenet5"
    width: float = 1.0
    init: str = "default"

    def validate(self) -> None:
        from fishprune.models import INITS, models

        _check_choice("model", self.model, models())
        _check_choice("init", self.init, INITS)
        if not self.width > 0 or math.isinf(self.width):
            _fail(f"width must be a finite number > 0; got {self.width}")


@dataclass(frozen=True)
class WarmupConfig:
    """Cures for layer collapse, applied before scoring."""

    warmup_epochs: int = 0  # dense training epochs before pruning (FTS paper)
    bn_warmup: bool = False  # one train-mode pass without gradients to refresh BN statistics

    def validate(self) -> None:
        if self.warmup_epochs < 0:
            _fail(f"warmup_epochs must be >= 0; got {self.warmup_epochs}")


@dataclass(frozen=True)
class PruneConfig:
    """Criterion, sparsity and the scoring data."""

    criterion: str = "fts"
    sparsity: float = 0.98  # pruned fraction; 0 trains the dense network
    scope: str = "global"
    rounds: int | None = None  # None: the criterion's default (100 for synflow, else 1)
    score_samples: int | None = None  # samples per class for scoring; None: the whole split
    score_batch_size: int = 128
    per_sample: bool = False
    score_mode: str = "eval"  # "train": score with batch statistics in BatchNorm
    probes: int | None = None  # Hutchinson probes (hd, hp, hts); None: criterion default
    temperature: float | None = None  # logit temperature (grasp, hd, hp, hts)
    damping: float | None = None  # FBSS damping, relative to max F̂
    exclude: tuple[str, ...] = ()  # glob patterns of weights never pruned
    sanity: str = "none"  # a sanity-check transformation of the mask (Frankle et al. 2021)
    on_collapse: str = "warn"  # what to do when a layer keeps no weight

    def validate(self) -> None:
        _check_choice("criterion", self.criterion, criteria())
        _check_range("sparsity", self.sparsity, 0.0, 1.0, hi_open=True)
        _check_choice("scope", self.scope, SCOPES)
        _check_choice("score_mode", self.score_mode, ("eval", "train"))
        _check_choice("sanity", self.sanity, SANITY_CHECKS)
        _check_choice("on_collapse", self.on_collapse, ON_COLLAPSE)
        if self.rounds is not None and self.rounds < 1:
            _fail(f"rounds must be >= 1; got {self.rounds}")
        if self.score_samples is not None and self.score_samples < 1:
            _fail(f"score_samples must be >= 1 per class; got {self.score_samples}")
        if self.score_batch_size < 1:
            _fail(f"score_batch_size must be >= 1; got {self.score_batch_size}")

    def criterion_options(self) -> dict[str, Any]:
        """The options handed to the criterion (only those set)."""
        opts: dict[str, Any] = {}
        for key in ("probes", "temperature", "damping"):
            if getattr(self, key) is not None:
                opts[key] = getattr(self, key)
        if self.per_sample:
            opts["per_sample"] = True
        return opts


@dataclass(frozen=True)
class TrainConfig:
    """Optimizer and schedule of the sparse (and warm-up) training."""

    epochs: int = 10
    optimizer: str = "sgd"
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 5e-4
    nesterov: bool = False
    lr_milestones: tuple[int, ...] = ()
    lr_gamma: float = 0.1

    def validate(self) -> None:
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        if self.epochs < 0:
            _fail(f"epochs must be >= 0; got {self.epochs}")
        if not self.lr > 0 or math.isinf(self.lr):
            _fail(f"lr must be a finite number > 0; got {self.lr}")
        _check_range("momentum", self.momentum, 0.0, 1.0, hi_open=True)
        if self.weight_decay < 0 or math.isnan(self.weight_decay):
            _fail(f"weight_decay must be >= 0; got {self.weight_decay}")
        if list(self.lr_milestones) != sorted(self.lr_milestones) or any(
            m < 1 for m in self.lr_milestones
        ):
            _fail(f"lr_milestones must be increasing epochs >= 1; got {list(self.lr_milestones)}")


@dataclass(frozen=True)
class RunConfig:
    """One experiment: data → model → warm-up → scores → mask → sparse training → evaluation."""

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    warmup: WarmupConfig = field(default_factory=WarmupConfig)
    prune: PruneConfig = field(default_factory=PruneConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    seed: int = 0  # initialization, data order, scoring subset, random criteria
    device: str = "auto"
    out: str = "runs"

    def validate(self) -> RunConfig:
        """Check every value; raise :class:`ConfigError` with a one-line message."""
        for section in SECTIONS:
            getattr(self, section).validate()
        _check_choice("device", self.device, DEVICES)
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def run_id(self) -> str:
        """Hash of the non-default settings that change what is computed."""
        diff = non_default(self)
        for key in LOCATION_KEYS:
            diff.pop(key, None)
        blob = json.dumps(diff, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    def directory(self) -> Path:
        """Where this run's artifacts go: ``<out>/<run_id>``."""
        return Path(self.out) / self.run_id()

    def label(self) -> str:
        """A short human-readable name: model-dataset-criterion-sparsity-seed."""
        p = self.prune
        crit = "dense" if p.sparsity == 0 else p.criterion
        return f"{self.model.model}-{self.data.dataset}-{crit}-s{p.sparsity:g}-seed{self.seed}"


SECTIONS = ("data", "model", "warmup", "prune", "train")
#: Settings that say where or how to react, not what is computed: excluded from run ids.
LOCATION_KEYS = ("data_dir", "out", "device", "on_collapse")


def flat_fields() -> dict[str, tuple[str | None, dataclasses.Field]]:
    """Every setting by its (unique) flat name → (section or None, field)."""
    out: dict[str, tuple[str | None, dataclasses.Field]] = {}
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        if f.name in SECTIONS:
            for sub in dataclasses.fields(hints[f.name]):
                out[sub.name] = (f.name, sub)
        else:
            out[f.name] = (None, f)
    return out


def field_type(section: str | None, name: str) -> Any:
    """The resolved type annotation of a flat setting."""
    owner = RunConfig if section is None else typing.get_type_hints(RunConfig)[section]
    return typing.get_type_hints(owner)[name]


def non_default(config: RunConfig) -> dict[str, Any]:
    """Flat ``{name: value}`` of the settings that differ from the defaults."""
    default = flat_values(RunConfig())
    return {k: v for k, v in flat_values(config).items() if default[k] != v}


def flat_values(config: RunConfig) -> dict[str, Any]:
    out = {}
    for name, (section, _) in flat_fields().items():
        owner = config if section is None else getattr(config, section)
        value = getattr(owner, name)
        out[name] = list(value) if isinstance(value, tuple) else value
    return out


def coerce(name: str, value: Any) -> Any:
    """Check ``value`` against the type of setting ``name``; convert lists to tuples."""
    fields = flat_fields()
    if name not in fields:
        _fail(f"unknown setting {name!r} (valid: {', '.join(sorted(fields))})")
    section, _ = fields[name]
    kind = field_type(section, name)
    optional = False
    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        optional = len(args) < len(typing.get_args(kind))
        kind = args[0]
    if value is None and optional:
        return None
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        if not isinstance(value, (list, tuple)):
            _fail(f"{name} must be a list of {item.__name__}; got {value!r}")
        return tuple(_scalar(name, v, item) for v in value)
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
    """A validated :class:`RunConfig` from flat ``{name: value}`` over ``base`` (or defaults)."""
    base = base or RunConfig()
    fields = flat_fields()
    updates: dict[str | None, dict[str, Any]] = {}
    for name, value in values.items():
        updates.setdefault(fields[name][0] if name in fields else None, {})[name] = coerce(
            name, value
        )
    top = updates.pop(None, {})
    sections = {s: dataclasses.replace(getattr(base, s), **updates.get(s, {})) for s in SECTIONS}
    return dataclasses.replace(base, **sections, **top).validate()


def from_toml(path: str | Path) -> dict[str, Any]:
    """Flat settings from a TOML file: top-level keys or ``[data]``/``[prune]``... tables."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        _fail(f"config file {path} does not exist")
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        _fail(f"config file {path} is not valid TOML: {err}")
    return flatten_table(raw, str(path))


def flatten_table(raw: dict[str, Any], where: str) -> dict[str, Any]:
    """Flatten ``[section]`` tables into flat setting names, checking names and sections."""
    fields = flat_fields()
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        key = key.replace("-", "_")
        if key in SECTIONS and isinstance(value, dict):
            for sub, v in value.items():
                sub = sub.replace("-", "_")
                if sub not in fields or fields[sub][0] != key:
                    _fail(f"{where}: unknown setting {sub!r} in [{key}]")
                flat[sub] = v
        elif key in fields:
            flat[key] = value
        else:
            _fail(f"{where}: unknown setting {key!r} (valid: {', '.join(sorted(fields))})")
    return flat


#: Keys a run's ``config.json`` holds besides the settings: derived from them, never read back.
DERIVED_KEYS = ("run_id", "label")


def from_dict(data: dict[str, Any]) -> RunConfig:
    """Rebuild a :class:`RunConfig` from :meth:`RunConfig.to_dict` output or a run's
    ``config.json`` (whose derived ``run_id`` and ``label`` are ignored)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in DERIVED_KEYS:
            continue
        if key in SECTIONS:
            flat.update(value)
        else:
            flat[key] = value
    return build(flat)


#: The papers' training schedules (FTS paper, Table A1; 160 epochs, SGD momentum 0.9).
PRESETS: dict[str, dict[str, Any]] = {
    "fts-resnet18": {"model": "resnet18", "epochs": 160, "lr": 0.01, "momentum": 0.9,
                     "weight_decay": 5e-4, "lr_milestones": [60, 120], "lr_gamma": 0.2},
    "fts-vgg19": {"model": "vgg19", "epochs": 160, "lr": 0.1, "momentum": 0.9,
                  "weight_decay": 1e-4, "lr_milestones": [60, 120], "lr_gamma": 0.1},
}
