"""``fishprune criteria``, ``models`` and ``datasets``: what can be named."""

from __future__ import annotations

import argparse
from typing import Any


def add(subparsers: Any, name: str, parents: list[argparse.ArgumentParser]) -> None:
    subparsers.add_parser(name, parents=parents, help=f"list the {name}")


def main(args: argparse.Namespace) -> int:
    if args.command == "criteria":
        from fishprune.criteria import REGISTRY

        for name, crit in REGISTRY.items():
            opts = ", ".join(f"{o}={s.default!r}" for o, s in crit.option_specs().items()
                             if s.run_setting)
            print(f"{name:<10} {crit.summary}" + (f"  [options: {opts}]" if opts else ""))
        print(f"{'imp':<10} IMP: iterative magnitude pruning with rewinding to --warmup-epochs "
              "(trains every round; the upper bound)  [settings: imp_fraction=0.2]")
    elif args.command == "models":
        from fishprune.models import models
        from fishprune.models.external import spec_help

        print("\n".join(models()))
        print("\nexternal models (--model SPEC, arguments with --model-kwargs KEY=VALUE):")
        print("\n".join(spec_help()))
    else:
        from fishprune.data import datasets

        print("\n".join(datasets()))
    return 0
