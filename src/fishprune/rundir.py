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
``manifest.json``        the SHA-256 of every artifact above it in this table
=======================  ==========================================================

Verification. Every artifact is recorded in ``manifest.json`` right after it is written, and
:meth:`RunDir.verify` checks, before a run is resumed or skipped, indexed, reported or exported,
that every recorded file exists with its recorded hash, that no artifact is unrecorded (a kill
between a write and its record), that ``config.json`` still hashes to the directory's run id,
and that the masks keep exactly the count the settings ask for and agree with ``layers.json``
and ``result.json``. A run that fails is moved aside whole (:meth:`RunDir.quarantine`, into
``<out>/_corrupt/``) and recomputed; every stage is deterministic, so the numbers are the same.
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
MANIFEST = "manifest.json"
#: The artifacts recorded in the manifest (the stages' outputs).
TRACKED = (CONFIG, PROVENANCE, MASKS_INFO, MASKS, LAYERS, CHECKPOINT, METRICS, BEST, RESULT)
#: Artifacts an unfinished run may hold unrecorded after a kill (between write and record).
RESUMABLE = (MASKS, CHECKPOINT, BEST, METRICS)
#: Where run directories that fail verification are moved, under ``out``.
QUARANTINE = "_corrupt"


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
    manifest = property(lambda self: self.path / MANIFEST)

    def is_run(self) -> bool:
        """Whether this is a run directory at all (it has a ``config.json``)."""
        return self.config.is_file()

    def is_finished(self) -> bool:
        """Whether the run has finished (its ``result.json`` exists)."""
        return self.result.is_file()

    def write_config(self, cfg: RunConfig) -> None:
        """Store ``cfg`` (every setting, plus the derived id and label) as ``config.json``."""
        self.path.mkdir(parents=True, exist_ok=True)
        self.write_json(CONFIG, {"run_id": cfg.run_id(), "label": cfg.label(), **cfg.to_dict()})

    def write_json(self, name: str, obj: Any) -> None:
        """Write the JSON artifact ``name`` atomically and record it in the manifest."""
        atomic.write_json(self.path / name, obj)
        self.record(name)

    def recorded(self) -> dict[str, str]:
        """The manifest: artifact name → SHA-256 (empty when there is none)."""
        if not self.manifest.exists():
            return {}
        data = self.read_json(MANIFEST)
        if not isinstance(data, dict):
            raise RunDirError(f"{self.manifest} does not hold a manifest object")
        return data

    def record(self, *names: str) -> None:
        """Record the current hash of artifacts ``names`` (a missing one is unrecorded)."""
        manifest = self.recorded()
        for name in names:
            path = self.path / name
            if path.exists():
                manifest[name] = atomic.sha256_file(path)
            else:
                manifest.pop(name, None)
        atomic.write_json(self.manifest, manifest)

    def discard(self, name: str) -> None:
        """Delete artifact ``name`` and its record."""
        (self.path / name).unlink(missing_ok=True)
        self.record(name)

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

    def verify(self, cfg: RunConfig | None = None, *, repair: bool = False) -> list[str]:
        """Every problem found (empty: the run directory is intact); see the module docstring.

        ``cfg`` is the configuration the caller expects (default: the one in ``config.json``).
        In an unfinished run, a resumable artifact (masks, checkpoint, best weights, metrics)
        that differs from its record but is itself intact (its own checksum verifies, or the
        JSON parses) is a write that a kill cut off from its record, not corruption: it is no
        problem, and ``repair=True`` records it (the resume then goes on from it).
        """
        if not self.path.is_dir() or not any(self.path.iterdir()):
            return []
        try:
            manifest = self.recorded()
        except RunDirError as err:
            return [str(err)]
        present = [n for n in TRACKED if (self.path / n).exists()]
        if present and not manifest:
            return [f"{self.manifest} is missing: the artifacts cannot be verified"]
        problems = []
        pending = []
        for name in sorted(set(present) | set(manifest)):
            path = self.path / name
            if (name in RESUMABLE and RESULT not in present and path.is_file()
                    and manifest.get(name) != atomic.sha256_file(path) and self._intact(name)):
                pending.append(name)
                continue
            if name not in manifest:
                problems.append(f"{path} is not recorded in {MANIFEST}")
            elif not path.exists():
                problems.append(f"{path} is recorded in {MANIFEST} but missing")
            elif not path.is_file():
                problems.append(f"{path} is not a regular file")
            elif atomic.sha256_file(path) != manifest[name]:
                problems.append(f"{path} does not match its checksum in {MANIFEST}")
        if problems or CONFIG not in present:
            return problems
        if pending and repair:
            self.record(*pending)
        try:
            stored = self.read_config()
        except RunDirError as err:
            return [str(err)]
        if stored.run_id() != self.path.name:
            return [f"{self.config} holds the settings of run {stored.run_id()}, not of "
                    f"{self.path.name}"]
        if cfg is not None and cfg.run_id() != stored.run_id():
            return [f"{self.config} is not the configuration of run {cfg.run_id()}"]
        return self._consistency(stored)

    def _intact(self, name: str) -> bool:
        """Whether artifact ``name`` is intact on its own (tensor files carry a checksum)."""
        from fishprune import tensorfiles as tf

        try:
            if name.endswith(".safetensors"):
                tf.read_file(self.path / name)
            else:
                self.read_json(name)
        except (ValueError, RunDirError):
            return False
        return True

    def _consistency(self, cfg: RunConfig) -> list[str]:
        """Masks with the exact kept count, agreeing with ``layers.json`` and ``result.json``."""
        from fishprune import tensorfiles as tf
        from fishprune.selection import expected_kept

        if not self.masks.exists():
            return []
        try:
            masks = tf.load_masks(self.masks)
        except ValueError as err:
            return [str(err)]
        kept = {n: int(m.sum()) for n, m in masks.items()}
        problem = expected_kept(masks, cfg.prune.sparsity, cfg.prune.scope)
        if problem:
            return [f"{self.masks}: {problem}"]
        checks = []
        try:
            if self.layers.exists():
                layers = self.read_json(LAYERS)
                layers = layers.get("layers") if isinstance(layers, dict) else None
                if not isinstance(layers, list) or [
                    (lay.get("name"), lay.get("kept")) if isinstance(lay, dict) else None
                    for lay in layers
                ] != list(kept.items()) or not all(
                    lay.get("numel") == masks[lay["name"]].numel()
                    and isinstance(lay.get("effective"), int)
                    and 0 <= lay["effective"] <= lay["kept"] for lay in layers
                ):
                    checks.append(f"{self.layers} does not agree with {self.masks.name}")
            if self.result.exists():
                result = self.read_json(RESULT)
                if not isinstance(result, dict) or result.get("kept") != sum(kept.values()):
                    checks.append(f"{self.result} does not agree with {self.masks.name}")
                elif self.metrics.exists() and not _best_epoch_agrees(result,
                                                                      self.read_json(METRICS)):
                    checks.append(f"{self.result} does not agree with {self.metrics.name} "
                                  "(best epoch and its validation accuracy)")
        except RunDirError as err:
            checks.append(str(err))
        return checks

    def quarantine(self) -> Path:
        """Move this run directory whole to ``<out>/_corrupt/<name>-<UTC time>``; return it."""
        import datetime as dt

        stamp = dt.datetime.now(dt.timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
        target = self.path.parent / QUARANTINE / f"{self.path.name}-{stamp}"
        target.parent.mkdir(parents=True, exist_ok=True)
        self.path.rename(target)
        return target

    def record_error(self, cfg: RunConfig, error: str, traceback: str | None = None) -> None:
        """Leave ``error.json`` (and ``config.json`` if the run died before writing one), so the
        failure survives a rebuild of the results database; best effort (a full disk)."""
        import contextlib
        import datetime as dt

        with contextlib.suppress(OSError):
            if not self.is_run():
                self.write_config(cfg)
            atomic.write_json(self.error, {
                "error": error, "traceback": traceback,
                "time": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")})

    def remove_stale_temps(self) -> None:
        """Delete what killed atomic writes left here (see :mod:`fishprune.atomic`)."""
        atomic.remove_stale_temps(self.path)


def _best_epoch_agrees(result: dict[str, Any], metrics: Any) -> bool:
    """``result.json``'s best epoch is the first epoch of ``metrics.json`` with the highest
    validation accuracy, and its accuracy is that epoch's."""
    epoch, best = result.get("best_epoch"), result.get("best_val_acc")
    if not isinstance(metrics, list) or not all(isinstance(m, dict) for m in metrics) \
            or isinstance(epoch, bool) or not isinstance(epoch, int):
        return False
    accs = [m.get("val_acc") for m in metrics]
    if best is None:  # no training, or no validation split: the last epoch's weights
        return epoch == len(accs) and all(a is None for a in accs)
    if not 1 <= epoch <= len(accs) or None in accs:
        return False
    top = max(accs)
    return metrics[epoch - 1].get("epoch") == epoch and accs[epoch - 1] == best == top \
        and accs.index(top) == epoch - 1
