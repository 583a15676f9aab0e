"""A run directory: the name of every artifact a run leaves, and the questions asked of it.

``<out>/<run_id>/`` holds, as the stages produce them (all written atomically):

=======================  ==========================================================
``config.json``          every setting, plus the derived ``run_id`` and ``label``
``provenance.json``      fishprune version, git commit, torch, device, start time
``masks.json``           scoring time (written just before the masks)
``masks.safetensors``    the bit-packed masks that are trained (marks scoring as done)
``layers.json``          per-layer kept weights, densities and path connectivity
``checkpoint.safetensors``  weights, optimizer and RNG after the last finished epoch
``metrics.json``         per-epoch metrics (a readable copy of the checkpoint's history)
``best.safetensors``     the best-validation weights
``result.json``          the final metrics: its presence means "finished"
``error.json``           why the last attempt failed (cleared when the run is tried again)
``run.log``              what a sweep worker printed
``pruned.safetensors``   the compact export (``fishprune export``)
=======================  ==========================================================
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fishprune import atomic

if TYPE_CHECKING:
    from fishprune.config import RunConfig

CONFIG = "config.json"
PROVENANCE = "provenance.json"
MASKS_INFO = "masks.json"
MASKS = "masks.safetensors"
LAYERS = "layers.json"
CHECKPOINT = "checkpoint.safetensors"
METRICS = "metrics.json"
BEST = "best.safetensors"
RESULT = "result.json"
ERROR = "error.json"
LOG = "run.log"
EXPORTED = "pruned.safetensors"


class RunDirError(ValueError):
    """A directory that is not a (finished, consistent) fishprune run: one-line message."""


@dataclass(frozen=True)
class RunDir:
    """The artifacts of one run, by name (``RunDir(path).result`` is ``path / "result.json"``)."""

    path: Path

    @classmethod
    def of(cls, cfg: RunConfig) -> RunDir:
        """The directory of the run ``cfg``: ``<out>/<run_id>``."""
        return cls(cfg.directory())

    def __truediv__(self, name: str) -> Path:
        return self.path / name

    config = property(lambda self: self.path / CONFIG)
    provenance = property(lambda self: self.path / PROVENANCE)
    masks_info = property(lambda self: self.path / MASKS_INFO)
    masks = property(lambda self: self.path / MASKS)
    layers = property(lambda self: self.path / LAYERS)
    checkpoint = property(lambda self: self.path / CHECKPOINT)
    metrics = property(lambda self: self.path / METRICS)
    best = property(lambda self: self.path / BEST)
    result = property(lambda self: self.path / RESULT)
    error = property(lambda self: self.path / ERROR)
    log = property(lambda self: self.path / LOG)
    exported = property(lambda self: self.path / EXPORTED)

    def is_run(self) -> bool:
        """Whether this is a run directory at all (it has a ``config.json``)."""
        return self.config.is_file()

    def is_finished(self) -> bool:
        """Whether the run has finished (its ``result.json`` exists)."""
        return self.result.is_file()

    def write_config(self, cfg: RunConfig) -> None:
        """Store ``cfg`` (every setting, plus the derived id and label) as ``config.json``."""
        self.path.mkdir(parents=True, exist_ok=True)
        atomic.write_json(self.config, {"run_id": cfg.run_id(), "label": cfg.label(),
                                        **cfg.to_dict()})

    def read_json(self, name: str) -> Any:
        """The parsed JSON artifact ``name``; :class:`RunDirError` naming the file otherwise."""
        path = self.path / name
        try:
            return json.loads(path.read_text())
        except FileNotFoundError:
            raise RunDirError(f"{path} does not exist") from None
        except (OSError, ValueError, RecursionError) as err:
            raise RunDirError(f"{path} is not valid JSON ({err})") from None

    def read_config(self) -> RunConfig:
        """The :class:`RunConfig` stored in ``config.json``."""
        from fishprune.config import ConfigError
        from fishprune.settings import from_dict

        if not self.is_run():
            raise RunDirError(f"{self.path} is not a fishprune run directory (no {CONFIG})")
        data = self.read_json(CONFIG)
        if not isinstance(data, dict):
            raise RunDirError(f"{self.config} does not hold a configuration object")
        try:
            return from_dict(data)
        except (ConfigError, TypeError) as err:
            raise RunDirError(f"{self.config}: {err}") from None

    def remove_stale_temps(self) -> None:
        """Delete what killed atomic writes left here (see :mod:`fishprune.atomic`)."""
        atomic.remove_stale_temps(self.path)
