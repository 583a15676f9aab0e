"""The run settings as flags, generated from the typed config dataclasses and the criterion
registry; the configuration they give; and the one-line error contract.

Every setting of :class:`fishprune.config.RunConfig` is a flag (``--score-batch-size``...) and
so is every criterion option (``--probes``, ``--per-sample``...; or ``--option NAME=VALUE``);
booleans are real ``--flag/--no-flag`` pairs, lists take several values. Precedence: defaults <
``--preset`` < ``--config FILE.toml`` < flags.
"""

from __future__ import annotations

import argparse
import typing
from typing import Any

import tomllib

from fishprune import config as C
from fishprune import settings as S
from fishprune._version import __version__

HELP = {
    "dataset": "dataset name (see `fishprune datasets`); imagefolder reads --data-dir",
    "data_dir": "directory holding the dataset files (else $FISHPRUNE_DATA, system, cache)",
    "val_fraction": "stratified validation fraction of the training set",
    "split_seed": "seed of the train/validation split (fixed across runs)",
    "batch_size": "training batch size",
    "augment": "random crop + flip (default: on for 3-channel data)",
    "model": "architecture: a zoo model, timm:NAME, torchvision:NAME, hf:MODEL_TYPE or "
             "package.module:factory (see `fishprune models`)",
    "width": "width multiplier of every hidden layer",
    "init": "weight initialization: default, kaiming_normal, xavier_normal",
    "model_kwargs": "arguments of an external model, as KEY=VALUE (TOML values), e.g. "
                    "hidden_size=64 (TOML: a [model.model_kwargs] table; default: none)",
    "image_size": "image folders: resize images to this square size (default: 64)",
    "num_workers": "image folders: decoding worker processes (default: up to 4; 0: none)",
    "warmup_epochs": "dense training epochs before pruning (cures layer collapse)",
    "bn_warmup": "refresh BatchNorm statistics with one train-mode pass before scoring",
    "bn_momentum": "BN pass as an exponential moving average with this momentum (the second "
                   "paper's code: 0.1); default: the cumulative average",
    "criterion": "pruning criterion (see `fishprune criteria`), or imp (iterative magnitude "
                 "pruning with rewinding to --warmup-epochs)",
    "imp_fraction": "imp: fraction of the remaining weights pruned in each round",
    "sparsity": "pruned fraction of the prunable weights, in [0, 1); 0 = dense",
    "scope": "rank weights globally or per layer",
    "rounds": "pruning rounds (default: the criterion's, 100 for synflow, else 1)",
    "schedule": "kept fraction over the rounds: exponential d^(r/R) or linear",
    "score_samples": "scoring samples per class (default: the whole training split)",
    "score_batch_size": "batch size of the scoring gradients (the Fisher estimate)",
    "score_mode": "score with the model in eval or train mode (BatchNorm batch statistics)",
    "score_augment": "score on augmented training data (random crop + flip, seeded), as every "
                     "reference implementation does; default: the images as they are",
    "exclude": "glob patterns of weights never pruned, e.g. 'classifier.*'",
    "sanity": "sanity check: none, shuffle, reinit, invert, random-labels",
    "on_collapse": "when a layer is empty or cut off: warn, error, ignore",
    "epochs": "training epochs after pruning",
    "optimizer": "sgd or adam",
    "lr": "learning rate",
    "momentum": "SGD momentum",
    "weight_decay": "weight decay",
    "nesterov": "Nesterov momentum",
    "lr_milestones": "epochs at which the learning rate is multiplied by --lr-gamma",
    "lr_gamma": "learning-rate decay factor",
    "seed": "seed of initialization, data order and scoring subset",
    "device": "auto, cpu or cuda",
    "out": "directory of run directories",
}


class UsageError(Exception):
    """Bad command-line usage: exit status 2."""


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line with exit status 2 (no usage dump)."""

    def error(self, message: str) -> typing.NoReturn:
        raise UsageError(message)


def _owners() -> dict[str, list[str]]:
    """Criterion option → the criteria that have it (for the flag's help)."""
    from fishprune.criteria import REGISTRY

    out: dict[str, list[str]] = {}
    for crit in REGISTRY.values():
        for name in crit.option_specs():
            out.setdefault(name, []).append(crit.name)
    return out


def _default_text(name: str) -> str:
    fields = C.flat_fields()
    if name not in fields:
        return ""
    section, _ = fields[name]
    owner = C.RunConfig() if section is None else getattr(C.RunConfig(), section)
    value = getattr(owner, name)
    shown = " ".join(map(str, value)) if isinstance(value, tuple) else value
    return f" (default: {shown})" if shown not in ("", None, {}) else ""


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting and criterion option, typed from their annotations; defaults are
    suppressed (an absent flag leaves the preset's, the file's or the default value)."""
    parser.add_argument("--config", help="TOML file with any of these settings")
    parser.add_argument("--preset", choices=sorted(C.PRESETS),
                        help="the papers' training schedule for a model")
    specs = C.option_specs()
    owners = _owners()
    for name in S.setting_names():
        kind = C.setting_kind(name)
        if name in specs:
            help_text = (f"{specs[name].help} (criterion option of "
                         f"{', '.join(owners.get(name, []))}; default: {specs[name].default})")
        else:
            help_text = HELP.get(name, "") + _default_text(name)
        extra: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS, "help": help_text}
        flag = "--" + name.replace("_", "-")
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **extra)
        elif typing.get_origin(kind) is dict:
            parser.add_argument(flag, nargs="+", type=_parse_pair, metavar="KEY=VALUE", **extra)
        elif typing.get_origin(kind) is tuple:
            parser.add_argument(flag, nargs="*", type=typing.get_args(kind)[0], **extra)
        else:
            parser.add_argument(flag, type=kind, metavar=kind.__name__.upper(), **extra)
    parser.add_argument("--option", action="append", metavar="NAME=VALUE", dest="option_pairs",
                        default=[], help="a criterion option (a TOML value), e.g. probes=20")


def _parse_option(pair: str) -> tuple[str, Any]:
    name, sep, text = pair.partition("=")
    if not sep or not name.strip():
        raise UsageError(f"--option needs NAME=VALUE; got {pair!r}")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return name.strip().replace("-", "_"), value


def _parse_pair(pair: str) -> tuple[str, Any]:
    """``KEY=VALUE`` of a table setting (``--model-kwargs``), the value read as TOML."""
    name, sep, text = pair.partition("=")
    if not sep or not name.strip():
        raise argparse.ArgumentTypeError(f"needs KEY=VALUE; got {pair!r}")
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        value = text
    return name.strip(), value


def _table(name: str, pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise UsageError(f"--{name.replace('_', '-')}: {key} is given twice")
        out[key] = value
    return out


def settings_from(args: argparse.Namespace) -> C.RunConfig:
    """Defaults < preset < config file < flags, validated."""
    values: dict[str, Any] = {}
    if getattr(args, "preset", None):
        values.update(C.PRESETS[args.preset])
    if getattr(args, "config", None):
        values.update(S.from_toml(args.config))
    names = set(S.setting_names())
    for k, v in vars(args).items():
        if k in names and typing.get_origin(C.setting_kind(k)) is dict:  # merged over the file's
            base = values.get(k) if isinstance(values.get(k), dict) else {}
            values[k] = {**base, **_table(k, v)}
        elif k in names:
            values[k] = v
    seen: set[str] = set()
    for pair in getattr(args, "option_pairs", []):
        name, value = _parse_option(pair)
        if name not in C.option_specs():
            raise UsageError(f"--option: unknown criterion option {name!r} "
                             f"(valid: {', '.join(sorted(C.option_specs())) or 'none'})")
        if name in seen or name in vars(args):
            raise UsageError(f"criterion option {name!r} is given twice")
        seen.add(name)
        values[name] = value
    return S.build(values)


def describe(cfg: C.RunConfig) -> str:
    """The full configuration, grouped by stage, non-defaults marked with *."""
    changed = C.non_default(cfg)
    lines = [f"fishprune {__version__}  run {cfg.run_id()}  ({cfg.label()})"]
    for section in C.SECTIONS:
        items = []
        for key, value in vars(getattr(cfg, section)).items():
            if key == C.OPTIONS:
                items += [f"{k}={v}*" for k, v in value.items()]
                continue
            shown = list(value) if isinstance(value, tuple) else value
            items.append(f"{key}={shown}{'*' if key in changed else ''}")
        lines.append(f"  {section:<7} " + "  ".join(items))
    lines.append(f"  run     seed={cfg.seed}  device={cfg.device}  out={cfg.out}")
    return "\n".join(lines)
