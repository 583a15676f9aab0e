"""``fishprune run``: prune, warm up, train and evaluate one network."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from fishprune.cli.flags import add_run_flags, describe, settings_from


def add(subparsers: Any, name: str, parents: list[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(name, parents=parents,
                              help="prune, warm up, train and evaluate one network")
    add_run_flags(p)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--progress", action="store_true", help="progress bar even when not a tty")


def main(args: argparse.Namespace) -> int:
    from fishprune import distributed
    from fishprune.pipeline import run

    cfg = settings_from(args)
    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun only rank 0 prints
    if main_rank:
        print(describe(cfg), flush=True)
    run(cfg, show_progress=(not args.quiet and sys.stderr.isatty()) or args.progress,
        echo=lambda m: print(m, flush=True))
    distributed.shutdown()  # leave the process group of a torchrun job (nothing otherwise)
    return 0
