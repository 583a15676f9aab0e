"""Provenance: what produced a result (package, commit, torch, device), in one call."""

from __future__ import annotations

import datetime as dt
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from fishprune._version import __version__


def git_commit(path: Path | None = None) -> str | None:
    """The commit of the fishprune source tree (``+dirty`` if modified), or None if not git."""
    where = path or Path(__file__).resolve().parent
    try:
        head = subprocess.run(
            ["git", "-C", str(where), "rev-parse", "HEAD"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(where), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=5, check=True,
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return head + ("+dirty" if dirty else "")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return platform.processor() or platform.machine()


def provenance(device: torch.device, world_size: int = 1, backend: str | None = None, *,
               data_source: str | None = None) -> dict[str, Any]:
    """Package version, git commit, torch/python versions, device and threads, the data files
    actually read, UTC time, and the ``torch.distributed`` world size and backend (1 and None
    for a plain run)."""
    return {
        "data_source": data_source,
        "fishprune": __version__,
        "git_commit": git_commit(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": str(device),
        "device_name": device_name(device),
        "threads": torch.get_num_threads(),
        "world_size": world_size,
        "backend": backend,
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
    }
