"""``fishprune analyze``: layer collapse before training (per-layer density vs sparsity, the
critical sparsity), with the same settings as ``fishprune run``."""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from fishprune.analyze import DEFAULT_SPARSITIES, MIN_RESOLUTION
from fishprune.cli.flags import add_run_flags, describe, settings_from
from fishprune.config import ConfigError


def add(subparsers: Any, name: str, parents: list[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        name, parents=parents,
        help="per-layer density vs sparsity and the critical sparsity, no training",
        description="Score once with the run's settings (warm-up included) and report the "
                    "per-layer density at each sparsity, the critical sparsity (highest with no "
                    "empty layer; and with no layer cut off) and the maximum possible one.")
    add_run_flags(p)
    p.add_argument("--sparsities", nargs="+", type=float, metavar="S",
                   default=list(DEFAULT_SPARSITIES), help="sparsities of the table")
    p.add_argument("--resolution", type=float, default=1e-3,
                   help="bisection resolution for iterative criteria (synflow), in [1e-6, 0.5]")
    p.add_argument("--report-dir", help="where to write analysis.json and the plot "
                   "(default: <out>/analyze/<model>-<dataset>-<criterion>-<hash>)")
    p.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True,
                   help="write density.png and density.pdf")
    p.add_argument("--quiet", action="store_true", help="print only the table")


def main(args: argparse.Namespace) -> int:
    from fishprune import atomic
    from fishprune.analyze import analysis_dir, analyze, validate_sparsities

    cfg = settings_from(args)
    sparsities = validate_sparsities(args.sparsities)
    if "sparsity" in vars(args):  # an explicit --sparsity joins the table
        sparsities.append(cfg.prune.sparsity)
    if math.isnan(args.resolution) or not MIN_RESOLUTION <= args.resolution <= 0.5:
        raise ConfigError(f"resolution must be in [{MIN_RESOLUTION:g}, 0.5]; "
                          f"got {args.resolution}")
    say = (lambda _m: None) if args.quiet else (lambda m: print(m, flush=True))
    say(describe(cfg))
    result = analyze(cfg, sparsities, resolution=args.resolution, say=say,
                     show_progress=not args.quiet and sys.stderr.isatty())
    out = Path(args.report_dir) if args.report_dir else analysis_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / "analysis.json", result.to_dict())
    files = [out / "analysis.json"]
    if args.plot:
        from fishprune.report.plots import collapse_density

        files += collapse_density(result, out / "density")
    print(result.table())
    print("wrote " + ", ".join(str(f) for f in files), flush=True)
    return 0
