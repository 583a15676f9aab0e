"""``fishprune export RUN_DIR``: the compact pruned model of a finished run."""

from __future__ import annotations

import argparse
from typing import Any

from fishprune.rundir import EXPORTED


def add(subparsers: Any, name: str, parents: list[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        name, parents=parents, help="write the compact pruned model of a finished run",
        description="Write the best-validation weights of a finished run with its masks as a "
                    "compact safetensors file (kept values + 1-bit masks); load it with "
                    "fishprune.load_pruned(model, path).")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a finished run directory")
    p.add_argument("--out", help=f"output file (default: RUN_DIR/{EXPORTED})")


def main(args: argparse.Namespace) -> int:
    from fishprune.exporting import export_run

    print(export_run(args.run_dir, args.out).describe())
    return 0
