"""``fishprune export RUN_DIR``: the compact pruned model of a finished run.

The model is rebuilt from the run's ``config.json`` (architecture, width; the input shape and
class count from the dataset), loaded with the best-validation weights ``best.safetensors`` and
written with the run's ``masks.safetensors`` by :func:`fishprune.io.export`: kept values plus a
1-bit mask per pruned tensor, everything else dense. The file is checked by loading it back
(:func:`fishprune.io.load_pruned`) into a fresh model before the sizes are reported.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fishprune import config as C
from fishprune import io

BEST = "best.safetensors"
MASKS = "masks.safetensors"
EXPORTED = "pruned.safetensors"


class RunDirError(ValueError):
    """The directory is not a finished fishprune run (one-line message, exit status 1)."""


@dataclass(frozen=True)
class ExportSummary:
    """What was written: sizes in bytes of the dense checkpoint and of the compact export."""

    path: Path
    dense_bytes: int
    compact_bytes: int
    prunable: int
    kept: int

    @property
    def ratio(self) -> float:
        return self.dense_bytes / max(self.compact_bytes, 1)

    def describe(self) -> str:
        return (f"wrote {self.path}\n"
                f"dense {_size(self.dense_bytes)}  →  compact {_size(self.compact_bytes)}  "
                f"({self.ratio:.1f}x smaller; {self.kept:,} of {self.prunable:,} prunable weights "
                f"kept, {self.kept / max(self.prunable, 1):.2%})")


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    return f"{n / 1024:.1f} KiB" if n < 1024**2 else f"{n / 1024**2:.2f} MiB"


def run_config(run_dir: Path) -> C.RunConfig:
    """The :class:`RunConfig` stored in ``run_dir/config.json``."""
    path = run_dir / "config.json"
    if not path.is_file():
        raise RunDirError(f"{run_dir} is not a fishprune run directory (no config.json)")
    try:
        data = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunDirError(f"{path} is not valid JSON ({err})") from None
    if not isinstance(data, dict):
        raise RunDirError(f"{path} does not hold a configuration object")
    try:
        return C.from_dict(data)
    except (C.ConfigError, TypeError) as err:
        raise RunDirError(f"{path}: {err}") from None


def rebuild_model(cfg: C.RunConfig) -> nn.Module:
    """The run's architecture for its dataset's input shape (weights: a fresh initialization)."""
    from fishprune.data import load_dataset
    from fishprune.models import build_model

    ds = load_dataset(cfg.data.dataset, cfg.data.data_dir, download=False)
    torch.manual_seed(cfg.seed)
    return build_model(cfg.model.model, in_channels=ds.in_channels, num_classes=ds.num_classes,
                       image_size=ds.image_size, width=cfg.model.width, init=cfg.model.init)


def export_run(run_dir: str | Path, out: str | Path | None = None) -> ExportSummary:
    """Export the finished run in ``run_dir`` to ``out`` (default: ``run_dir/pruned.safetensors``).

    Raises :class:`RunDirError` for a missing, unfinished or inconsistent run directory.
    """
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise RunDirError(f"run directory {run_dir} does not exist")
    cfg = run_config(run_dir)
    if not (run_dir / "result.json").is_file():
        raise RunDirError(f"{run_dir} has not finished (no result.json); rerun the same "
                          "`fishprune run` command to complete it")
    if not (run_dir / BEST).is_file():
        raise RunDirError(f"{run_dir} has no trained weights ({BEST}); runs with --epochs 0 "
                          "cannot be exported")
    if not (run_dir / MASKS).is_file():
        raise RunDirError(f"{run_dir} has no {MASKS}")
    model = rebuild_model(cfg)
    masks = io.load_masks(run_dir / MASKS)
    try:
        model.load_state_dict(io.load_state(run_dir / BEST))
    except RuntimeError as err:  # load_state_dict's multi-line report: keep its first line
        raise RunDirError(f"{run_dir / BEST} does not match the model of config.json: "
                          f"{str(err).splitlines()[0]}") from None
    target = Path(out) if out is not None else run_dir / EXPORTED
    target.parent.mkdir(parents=True, exist_ok=True)
    io.export(model, masks, target, metadata={"run_id": cfg.run_id(), "label": cfg.label()})
    io.load_pruned(rebuild_model(cfg), target)  # refuses a file that does not round-trip
    return ExportSummary(
        path=target,
        dense_bytes=(run_dir / BEST).stat().st_size,
        compact_bytes=target.stat().st_size,
        prunable=sum(m.numel() for m in masks.values()),
        kept=sum(int(m.sum()) for m in masks.values()),
    )


def cmd_export(args: argparse.Namespace) -> int:
    print(export_run(args.run_dir, args.out).describe())
    return 0


def add_cli(subparsers: Any) -> None:
    """The ``fishprune export`` subcommand (listed in :data:`fishprune.cli.EXTENSIONS`)."""
    parser = subparsers.add_parser(
        "export", help="write the compact pruned model of a finished run",
        description="Write the best-validation weights of a finished run with its masks as a "
                    "compact safetensors file (kept values + 1-bit masks); load it with "
                    "fishprune.load_pruned(model, path).")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a finished run directory")
    parser.add_argument("--out", help=f"output file (default: RUN_DIR/{EXPORTED})")
    parser.set_defaults(func=cmd_export)
