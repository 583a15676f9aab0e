"""Typed, frozen run configuration: the single source of truth for the CLI, TOML files,
``config.json`` and run identities.

One frozen dataclass per stage (data, model, warm-up, prune, train). A criterion's own options
(``probes``, ``temperature``, ``damping``, ``per_sample``...) are not listed here: they live in
the criterion's options dataclass (:mod:`fishprune.criteria`) and travel in
``PruneConfig.options``, validated against that dataclass. :mod:`fishprune.settings` turns flat
names, TOML files and flags into a :class:`RunConfig`.

A run's id is a hash of its *non-default* settings (open_lth): adding an option whose default
changes nothing keeps every old id. Settings that say where things are or how to react rather
than what is computed (:data:`LOCATION_KEYS`) are not part of the id. Criterion options count
under their own names, as if they were settings, and only when they differ from the
criterion's default.
"""

from __future__ import annotations

import dataclasses
import math
import os
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fishprune.criteria import REGISTRY, OptionSpec, criteria, get_criterion
from fishprune.hashing import digest
from fishprune.selection import SCOPES

SANITY_CHECKS = ("none", "shuffle", "reinit", "invert", "random-labels")
ON_COLLAPSE = ("warn", "error", "ignore")
OPTIMIZERS = ("sgd", "adam")
DEVICES = ("auto", "cpu", "cuda")


class ConfigError(ValueError):
    """A configuration value or file that cannot be used (a usage error: exit status 2)."""


def _fail(message: str) -> typing.NoReturn:
    raise ConfigError(message)


def _check_choice(name: str, value: str, choices: typing.Iterable[str]) -> None:
    choices = list(choices)
    if value not in choices:
        _fail(f"{name} must be one of {', '.join(choices)}; got {value!r}")


def _check_range(name: str, value: float, lo: float, hi: float, *, hi_open: bool = False) -> None:
    bad = math.isnan(value) or value < lo or (value >= hi if hi_open else value > hi)
    if bad:
        _fail(f"{name} must be in [{lo}, {hi}{')' if hi_open else ']'}; got {value!r}")


#: Seeds are 31-bit: every generator and offset fishprune derives from them stays in range.
MAX_SEED = 2**31 - 1


def _check_seed(name: str, value: int) -> None:
    if not 0 <= value <= MAX_SEED:
        _fail(f"{name} must be an integer in [0, {MAX_SEED}]; got {value!r}")


def _check_positive(name: str, value: float, *, upper: float = math.inf) -> None:
    if not (math.isfinite(value) and 0 < value <= upper):
        bound = f" and at most {upper:g}" if math.isfinite(upper) else ""
        _fail(f"{name} must be a finite number > 0{bound}; got {value!r}")


@dataclass(frozen=True)
class DataConfig:
    """Dataset, split and batches."""

    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    val_fraction: float = 0.2  # stratified train/validation split, 80:20 as the papers
    split_seed: int = 0  # a fixed split for every run (the papers use one constant seed)
    batch_size: int = 128
    augment: bool | None = None  # None: random crop + flip for CIFAR, nothing for (F-)MNIST
    image_size: int | None = None  # image folders: resize to this square size (None: 64)
    num_workers: int | None = None  # image folders: decoding processes (None: up to 4; 0: none)

    def __post_init__(self) -> None:
        # An image folder *is* the data: its directory counts in the run id, made absolute so
        # that the same folder named from elsewhere is the same run.
        if self.dataset in DATA_DIR_IS_DATA and isinstance(self.data_dir, str) and self.data_dir:
            object.__setattr__(self, "data_dir", os.path.abspath(self.data_dir))

    def validate(self) -> None:
        from fishprune.data import FOLDER_DATASETS, datasets

        _check_choice("dataset", self.dataset, datasets())
        _check_range("val_fraction", self.val_fraction, 0.0, 1.0, hi_open=True)
        _check_seed("split_seed", self.split_seed)
        if self.batch_size < 1:
            _fail(f"batch_size must be >= 1; got {self.batch_size}")
        if self.dataset in DATA_DIR_IS_DATA and not self.data_dir:
            _fail(f"dataset {self.dataset} needs --data-dir (a folder with train/<class>/ images)")
        if self.image_size is not None:
            if self.dataset not in FOLDER_DATASETS:
                _fail(f"image_size applies to image folders ({', '.join(FOLDER_DATASETS)}); "
                      f"{self.dataset} has a fixed size")
            if self.image_size < 1:
                _fail(f"image_size must be >= 1; got {self.image_size}")
        if self.num_workers is not None and self.num_workers < 0:
            _fail(f"num_workers must be >= 0; got {self.num_workers}")



#: The most epochs (training or warm-up) and pruning rounds a run may ask for: far beyond any
#: protocol (the papers train 160-200 epochs, SynFlow takes 100 rounds), so a larger number is a
#: typo (``--epochs 10000000``) that would otherwise run for days before anyone noticed.
MAX_EPOCHS = 10_000
MAX_ROUNDS = 100_000


def _check_count(name: str, value: int, lo: int, hi: int) -> None:
    if not lo <= value <= hi:
        _fail(f"{name} must be an integer in [{lo}, {hi:,}]; got {value!r}")


#: The largest width multiplier: 64× a zoo model is already far beyond any machine.
MAX_WIDTH = 64.0


@dataclass(frozen=True)
class ModelConfig:
    """Architecture, width multiplier and initialization."""

    model: str = "lenet5"  # a zoo model, or timm:NAME, torchvision:NAME, hf:TYPE, module:factory
    width: float = 1.0
    init: str = "default"
    model_kwargs: dict[str, Any] = field(default_factory=dict)  # external models' arguments

    def validate(self) -> None:
        from fishprune.models import INITS, ExternalModelError, check_spec, is_external, models

        if is_external(self.model):
            try:
                check_spec(self.model)
            except ExternalModelError as err:
                _fail(str(err))
            if self.width != 1.0:
                _fail(f"width applies to the zoo models only; got {self.width} for {self.model}")
        else:
            _check_choice("model", self.model, models())
        _check_choice("init", self.init, INITS)
        _check_positive("width", self.width, upper=MAX_WIDTH)
        if not isinstance(self.model_kwargs, dict) or not all(
            isinstance(k, str) for k in self.model_kwargs
        ):
            _fail(f"model_kwargs must be a table of named values; got {self.model_kwargs!r}")
        if self.model_kwargs and not is_external(self.model):
            _fail(f"model_kwargs apply to external models (timm:, torchvision:, hf:, "
                  f"module:factory); {self.model} takes none")


@dataclass(frozen=True)
class WarmupConfig:
    """Cures for layer collapse, applied before scoring."""

    warmup_epochs: int = 0  # dense training epochs before pruning (FTS paper)
    bn_warmup: bool = False  # one train-mode pass without gradients to refresh BN statistics
    bn_momentum: float | None = None  # BN pass: None = cumulative average; m = the authors' EMA

    def validate(self) -> None:
        _check_count("warmup_epochs", self.warmup_epochs, 0, MAX_EPOCHS)
        if self.bn_momentum is not None:
            _check_range("bn_momentum", self.bn_momentum, 0.0, 1.0)
            if self.bn_momentum == 0:
                _fail("bn_momentum must be in (0, 1] (None: the cumulative average); got 0.0")


@dataclass(frozen=True)
class PruneConfig:
    """Criterion, sparsity and the scoring data; ``options`` are the criterion's own."""

    criterion: str = "fts"
    sparsity: float = 0.98  # pruned fraction; 0 trains the dense network
    scope: str = "global"
    rounds: int | None = None  # None: the criterion's default (100 for synflow, else 1)
    schedule: str = "exponential"  # kept fraction over the rounds: d^(r/R) or linear
    score_samples: int | None = None  # samples per class for scoring; None: the whole split
    score_batch_size: int = 128
    score_mode: str = "eval"  # "train": score with batch statistics in BatchNorm
    score_augment: bool = False  # score on augmented data (random crop + flip), as the references
    options: dict[str, Any] = field(default_factory=dict)  # the criterion's options, e.g. probes
    imp_fraction: float = 0.2  # criterion "imp": fraction of the remaining weights pruned per round
    exclude: tuple[str, ...] = ()  # glob patterns of weights never pruned
    sanity: str = "none"  # a sanity-check transformation of the mask (Frankle et al. 2021)
    on_collapse: str = "warn"  # what to do when a layer keeps no weight

    def __post_init__(self) -> None:
        # Canonical options (typed, defaults dropped) whenever they are valid, so that equal
        # computations compare equal and get one id; invalid ones are reported by validate().
        try:
            canonical = get_criterion(self.criterion).canonical_options(dict(self.options))
        except (ValueError, TypeError):
            return
        object.__setattr__(self, "options", canonical)

    def validate(self) -> None:
        _check_choice("criterion", self.criterion, [*criteria(), *METHODS])
        _check_range("imp_fraction", self.imp_fraction, 0.0, 1.0, hi_open=True)
        if self.imp_fraction == 0:
            _fail("imp_fraction must be in (0, 1); got 0.0")
        _check_range("sparsity", self.sparsity, 0.0, 1.0, hi_open=True)
        _check_choice("scope", self.scope, SCOPES)
        _check_choice("schedule", self.schedule, ("exponential", "linear"))
        _check_choice("score_mode", self.score_mode, ("eval", "train"))
        _check_choice("sanity", self.sanity, SANITY_CHECKS)
        _check_choice("on_collapse", self.on_collapse, ON_COLLAPSE)
        if self.rounds is not None:
            _check_count("rounds", self.rounds, 1, MAX_ROUNDS)
        if self.score_samples is not None and self.score_samples < 1:
            _fail(f"score_samples must be >= 1 per class; got {self.score_samples}")
        if self.score_batch_size < 1:
            _fail(f"score_batch_size must be >= 1; got {self.score_batch_size}")
        if self.criterion in METHODS:
            self._validate_method()
            return
        crit = get_criterion(self.criterion)
        if not isinstance(self.options, dict):
            _fail(f"options must be a table of criterion options; got {self.options!r}")
        specs = crit.option_specs()
        for key in self.options:
            if key in specs and not specs[key].run_setting:
                _fail(f"option {key} of criterion '{crit.name}' is set by fishprune from the data")
        try:
            crit.parse_options(dict(self.options))
        except ValueError as err:
            _fail(str(err))


    def _validate_method(self) -> None:
        """IMP trains to find its mask: scoring settings and score-level sanity checks do not
        apply (shuffle and reinit transform the mask and the weights, and do)."""
        if self.options:
            _fail(f"criterion '{self.criterion}' has no options; got {sorted(self.options)}")
        if self.rounds is not None:
            _fail("rounds does not apply to imp: its rounds follow from imp_fraction")
        if self.sanity not in ("none", "shuffle", "reinit"):
            _fail(f"sanity={self.sanity} does not apply to imp (it has no scores to invert and "
                  "trains on the true labels)")


#: Pruning methods that are not score functions of the initial weights: ``imp`` (iterative
#: magnitude pruning with rewinding, :mod:`fishprune.imp`).
METHODS = ("imp",)


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
        _check_count("epochs", self.epochs, 0, MAX_EPOCHS)
        _check_positive("lr", self.lr)
        _check_range("momentum", self.momentum, 0.0, 1.0, hi_open=True)
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            _fail(f"weight_decay must be a finite number >= 0; got {self.weight_decay}")
        _check_positive("lr_gamma", self.lr_gamma)
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
        _check_seed("seed", self.seed)
        if self.prune.options.get("per_sample") and self.prune.score_mode == "train":
            from fishprune.models import has_batchnorm

            if has_batchnorm(self.model.model, width=self.model.width):
                _fail(f"per_sample needs per-sample-independent forward passes, but "
                      f"{self.model.model} has BatchNorm and score_mode=train mixes the samples "
                      "of a batch: use score_mode=eval")
        return self

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def run_id(self) -> str:
        """Hash of the non-default settings that change what is computed."""
        diff = non_default(self)
        for key in LOCATION_KEYS:
            if key == "data_dir" and self.data.dataset in DATA_DIR_IS_DATA:
                continue  # the folder is the data
            diff.pop(key, None)
        return digest(diff, 12)

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
LOCATION_KEYS = ("data_dir", "out", "device", "on_collapse", "num_workers")
#: Datasets whose ``data_dir`` is the data itself (not where a known dataset lies): it counts
#: in the run id and the cache keys.
DATA_DIR_IS_DATA = ("imagefolder",)
#: The field of :class:`PruneConfig` that holds the criterion's options (not a flat setting).
OPTIONS = "options"


def flat_fields() -> dict[str, tuple[str | None, dataclasses.Field]]:
    """Every setting by its (unique) flat name → (section or None, field); ``options`` is
    not one of them: each criterion option is a flat name of its own (:func:`option_specs`)."""
    out: dict[str, tuple[str | None, dataclasses.Field]] = {}
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        if f.name in SECTIONS:
            for sub in dataclasses.fields(hints[f.name]):
                if sub.name != OPTIONS:
                    out[sub.name] = (f.name, sub)
        else:
            out[f.name] = (None, f)
    return out


def option_specs() -> dict[str, OptionSpec]:
    """Every criterion option users may set, by name, over all registered criteria.

    An option name shared by several criteria must have one type; an option may not be named
    like a run setting (both would be refused here with the criterion's name).
    """
    settings = flat_fields()
    out: dict[str, OptionSpec] = {}
    for crit in REGISTRY.values():
        for name, spec in crit.option_specs().items():
            if not spec.run_setting:
                continue
            if name in settings or name == OPTIONS:
                _fail(f"criterion '{crit.name}' has an option named {name!r}, which is a run "
                      "setting: rename the option")
            if name in out and out[name].kind != spec.kind:
                _fail(f"criterion '{crit.name}' declares option {name!r} as {spec.kind}, "
                      f"another criterion as {out[name].kind}")
            out.setdefault(name, spec)
    return out


def setting_kind(name: str) -> Any:
    """The type of a flat setting or criterion option, ``X | None`` unwrapped to ``X``."""
    fields = flat_fields()
    if name in fields:
        section, _ = fields[name]
        owner = RunConfig if section is None else typing.get_type_hints(RunConfig)[section]
        kind = typing.get_type_hints(owner)[name]
    else:
        kind = option_specs()[name].kind
    return unwrap_optional(kind)


def unwrap_optional(kind: Any) -> Any:
    """``X | None`` → ``X``; anything else unchanged."""
    import types

    if typing.get_origin(kind) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(kind) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return kind


def is_optional(name: str) -> bool:
    """Whether a flat setting accepts None (criterion options always do: None = not set)."""
    fields = flat_fields()
    if name not in fields:
        return True
    section, _ = fields[name]
    owner = RunConfig if section is None else typing.get_type_hints(RunConfig)[section]
    return unwrap_optional(typing.get_type_hints(owner)[name]) != typing.get_type_hints(owner)[name]


def flat_values(config: RunConfig) -> dict[str, Any]:
    """Flat ``{name: value}`` of every setting and criterion option (None: option not set)."""
    out = {}
    for name, (section, _) in flat_fields().items():
        owner = config if section is None else getattr(config, section)
        value = getattr(owner, name)
        out[name] = list(value) if isinstance(value, tuple) else value
    for name in option_specs():
        value = config.prune.options.get(name)
        out[name] = list(value) if isinstance(value, tuple) else value
    return out


def non_default(config: RunConfig) -> dict[str, Any]:
    """Flat ``{name: value}`` of the settings and options that differ from the defaults."""
    default = flat_values(RunConfig())
    return {k: v for k, v in flat_values(config).items() if default.get(k) != v}


#: The papers' training schedules (FTS paper, Table A1; 160 epochs, SGD momentum 0.9).
PRESETS: dict[str, dict[str, Any]] = {
    "fts-resnet18": {"model": "resnet18", "epochs": 160, "lr": 0.01, "momentum": 0.9,
                     "weight_decay": 5e-4, "lr_milestones": [60, 120], "lr_gamma": 0.2},
    "fts-vgg19": {"model": "vgg19", "epochs": 160, "lr": 0.1, "momentum": 0.9,
                  "weight_decay": 1e-4, "lr_milestones": [60, 120], "lr_gamma": 0.1},
}
