"""``fishprune verify DIR [--recompute]``: check run directories; re-derive their numbers."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add(subparsers: Any, name: str, parents: list[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        name, parents=parents, help="check run directories (checksums, consistency, numbers)",
        description="Check every run directory at or under DIR: each artifact against its "
                    "checksum in manifest.json, config.json against the run id, masks against "
                    "layers.json and result.json. With --recompute, also re-evaluate each "
                    "finished run's best weights on the test set and compare with result.json "
                    "(and check that every pruned weight is zero): this catches a result that "
                    "was edited and re-recorded, which no checksum can. Exit status 1 when "
                    "anything is wrong, each problem on one line naming its file.")
    p.add_argument("dir", metavar="DIR", help="a run directory, or a sweep/runs directory")
    p.add_argument("--recompute", action="store_true",
                   help="re-evaluate every finished run (one test-set pass each)")
    p.add_argument("--device", default="cpu", help="device of the re-evaluation (default: cpu)")


def main(args: argparse.Namespace) -> int:
    from fishprune.audit import verify_tree

    audit = verify_tree(args.dir, recompute_results=args.recompute, device=args.device,
                        say=print)
    what = f"{audit.checked} run(s) checked" + (
        f", {audit.recomputed} recomputed" if args.recompute else "")
    if audit.ok:
        print(f"{what}: all intact" + (" and their numbers reproduced" if args.recompute
                                       else ""), file=sys.stderr)
        return 0
    print(f"{what}: {len(audit.problems)} with problems", file=sys.stderr)
    return 1
