"""``fishprune sweep CONFIG.toml``: a grid of runs on local processes or Ray."""

from __future__ import annotations

import argparse
from typing import Any


def add(subparsers: Any, name: str, parents: list[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(name, parents=parents,
                              help="run a grid of experiments from a TOML file")
    p.add_argument("config", metavar="CONFIG.toml",
                   help="settings of `fishprune run`; a list value sweeps that setting")
    p.add_argument("--workers", type=int, help="runs at a time (default: 1 locally; "
                   "ray: the cluster's CPUs / --cpus-per-run)")
    p.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="local processes or a Ray cluster (pip install 'fishprune[ray]')")
    p.add_argument("--address", help="Ray address (auto, ray://host:10001, local); "
                   "default: start a local Ray")
    p.add_argument("--cpus-per-run", type=int,
                   help="torch threads (local) or Ray CPUs per run (default: cores / workers)")
    p.add_argument("--out", help="sweep directory (default: the file's out, else sweeps/NAME)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state only")


def main(args: argparse.Namespace) -> int:
    from fishprune.sweep import describe, load_sweep, run_sweep

    sweep = load_sweep(args.config, out=args.out)
    if args.dry_run:
        print(f"sweep {sweep.out}: {len(sweep.runs)} runs")
        print("\n".join(describe(sweep)))
        return 0
    counts = run_sweep(sweep, backend=args.backend, workers=args.workers, address=args.address,
                       cpus_per_run=args.cpus_per_run, say=lambda m: print(m, flush=True))
    return 1 if counts["failed"] else 0
