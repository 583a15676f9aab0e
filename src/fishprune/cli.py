"""The ``fishprune`` command line, generated from the typed config dataclasses.

Every setting of :class:`fishprune.config.RunConfig` is a flag (``--score-batch-size``...);
booleans are real ``--flag/--no-flag`` pairs, lists take several values. Precedence: defaults <
``--preset`` < ``--config FILE.toml`` < flags. Errors print one line (``--debug`` for the
traceback) and exit with status 2 for usage errors, 1 for failures.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any

from fishprune import config as C
from fishprune._version import __version__

HELP = {
    "dataset": "dataset name (see `fishprune datasets`)",
    "data_dir": "directory holding the dataset files (else $FISHPRUNE_DATA, system, cache)",
    "val_fraction": "stratified validation fraction of the training set",
    "split_seed": "seed of the train/validation split (fixed across runs)",
    "batch_size": "training batch size",
    "augment": "random crop + flip (default: on for 3-channel data)",
    "model": "architecture (see `fishprune models`)",
    "width": "width multiplier of every hidden layer",
    "init": "weight initialization: default, kaiming_normal, xavier_normal",
    "warmup_epochs": "dense training epochs before pruning (cures layer collapse)",
    "bn_warmup": "refresh BatchNorm statistics with one train-mode pass before scoring",
    "criterion": "pruning criterion (see `fishprune criteria`)",
    "sparsity": "pruned fraction of the prunable weights, in [0, 1); 0 = dense",
    "scope": "rank weights globally or per layer",
    "rounds": "pruning rounds (default: 100 for synflow, else 1)",
    "score_samples": "scoring samples per class (default: the whole training split)",
    "score_batch_size": "batch size of the scoring gradients (the Fisher estimate)",
    "per_sample": "per-sample empirical Fisher (every sample its own batch)",
    "score_mode": "score with the model in eval or train mode (BatchNorm batch statistics)",
    "probes": "Hutchinson probes per batch (hd, hp, hts)",
    "temperature": "logit temperature (grasp, hd, hp, hts)",
    "damping": "FBSS damping relative to max F",
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


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:  # one line, exit 2, no usage dump
        raise UsageError(message)


def add_run_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per setting, typed from the dataclass annotations; defaults suppressed."""
    parser.add_argument("--config", help="TOML file with any of these settings")
    parser.add_argument("--preset", choices=sorted(C.PRESETS),
                        help="the papers' training schedule for a model")
    for name, (section, _field) in C.flat_fields().items():
        flag = "--" + name.replace("_", "-")
        kind = C.field_type(section, name)
        extra: dict[str, Any] = {"dest": name, "default": argparse.SUPPRESS,
                                 "help": HELP.get(name, "")}
        if typing.get_origin(kind) in (typing.Union, types.UnionType):
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **extra)
        elif typing.get_origin(kind) is tuple:
            parser.add_argument(flag, nargs="*", type=typing.get_args(kind)[0], **extra)
        else:
            parser.add_argument(flag, type=kind, metavar=kind.__name__.upper(), **extra)


def settings_from(args: argparse.Namespace) -> C.RunConfig:
    """Defaults < preset < config file < flags, validated."""
    values: dict[str, Any] = {}
    if getattr(args, "preset", None):
        values.update(C.PRESETS[args.preset])
    if getattr(args, "config", None):
        values.update(C.from_toml(args.config))
    fields = C.flat_fields()
    values.update({k: v for k, v in vars(args).items() if k in fields})
    return C.build(values)


def describe(cfg: C.RunConfig) -> str:
    """The full configuration, grouped by stage, non-defaults marked with *."""
    changed = C.non_default(cfg)
    lines = [f"fishprune {__version__}  run {cfg.run_id()}  ({cfg.label()})"]
    for section in C.SECTIONS:
        items = []
        for key, value in vars(getattr(cfg, section)).items():
            shown = list(value) if isinstance(value, tuple) else value
            items.append(f"{key}={shown}{'*' if key in changed else ''}")
        lines.append(f"  {section:<7} " + "  ".join(items))
    lines.append(f"  run     seed={cfg.seed}  device={cfg.device}  out={cfg.out}")
    return "\n".join(lines)


def cmd_run(args: argparse.Namespace) -> int:
    from fishprune.pipeline import run

    cfg = settings_from(args)
    print(describe(cfg), flush=True)
    run(cfg, show_progress=(not args.quiet and sys.stderr.isatty()) or args.progress,
        echo=lambda m: print(m, flush=True))
    return 0


def cmd_list(kind: str) -> Callable[[argparse.Namespace], int]:
    def list_(args: argparse.Namespace) -> int:
        if kind == "criteria":
            from fishprune.criteria import REGISTRY

            for name, crit in REGISTRY.items():
                print(f"{name:<10} {crit.summary}")
        elif kind == "models":
            from fishprune.models import models

            print("\n".join(models()))
        else:
            from fishprune.data import datasets

            print("\n".join(datasets()))
        return 0

    return list_


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fishprune", description="Pruning at initialization, done right.")
    parser.add_argument("--version", action="version", version=f"fishprune {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks on errors")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser)
    run = sub.add_parser("run", help="prune, warm up, train and evaluate one network")
    add_run_flags(run)
    run.add_argument("--quiet", action="store_true", help="no progress bar")
    run.add_argument("--progress", action="store_true", help="progress bar even when not a tty")
    run.set_defaults(func=cmd_run)
    for kind in ("criteria", "models", "datasets"):
        sub.add_parser(kind, help=f"list the {kind}").set_defaults(func=cmd_list(kind))
    for module in EXTENSIONS:
        importlib.import_module(module).add_cli(sub)
    return parser


#: Modules that add subcommands: each has ``add_cli(subparsers)``.
EXTENSIONS: tuple[str, ...] = (
    "fishprune.analyze", "fishprune.exporting", "fishprune.sweep", "fishprune.report",
)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("FISHPRUNE_DEBUG") == "1"
    if not argv or (argv[0].startswith("-") and argv[0] not in ("-h", "--help", "--version",
                                                                 "--debug")):
        argv = ["run", *argv]  # `fishprune` alone runs the default experiment
    elif argv == ["--debug"]:
        argv = ["run", "--debug"]
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if getattr(args, "func", None) is None:
            args = parser.parse_args(["run", *argv])
        return args.func(args)
    except (UsageError, C.ConfigError) as err:
        if debug:
            raise
        print(f"fishprune: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `fishprune criteria | head`
        sys.stderr.close()
        return 0
    except KeyboardInterrupt:
        print("fishprune: interrupted (finished epochs are saved; rerun to resume)",
              file=sys.stderr)
        return 130
    except Exception as err:  # one line for the user; --debug shows the traceback
        if debug:
            raise
        print(f"fishprune: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
