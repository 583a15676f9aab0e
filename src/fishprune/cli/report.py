"""``fishprune report DIR``: paper-style tables and plots from a sweep's results database."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fishprune.config import ConfigError

METRICS = ("test_acc", "best_val_acc", "test_loss")
FORMATS = ("md", "tex", "csv")


def add(subparsers: Any, name: str, parents: list[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(name, parents=parents,
                              help="paper-style tables and plots of a sweep")
    p.add_argument("dir", metavar="DIR", help="a sweep (or runs) directory")
    p.add_argument("--metric", choices=METRICS, default="test_acc")
    p.add_argument("--out", help="report directory (default: DIR/report)")
    p.add_argument("--formats", default=",".join(FORMATS),
                   help="comma-separated: " + ", ".join(FORMATS))
    p.add_argument("--layer-sparsity", type=float,
                   help="sparsity of the per-layer tables and plots (default: the highest)")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.add_argument("--reindex", action="store_true",
                   help="rebuild results.sqlite from the run directories first (they are "
                        "always re-verified)")


def main(args: argparse.Namespace) -> int:
    from fishprune.report import make_report

    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = set(formats) - set(FORMATS)
    if unknown:
        raise ConfigError(f"--formats: unknown format(s) {', '.join(sorted(unknown))} "
                          f"(choose from {', '.join(FORMATS)})")
    md, written = make_report(args.dir, metric=args.metric, out=args.out, formats=formats,
                              layer_sparsity=args.layer_sparsity, plots=not args.no_plots,
                              reindex=args.reindex)
    print(md)
    target = Path(args.out) if args.out else Path(args.dir) / "report"
    print(f"wrote {len(written)} file(s) to {target}", file=sys.stderr)
    return 0
