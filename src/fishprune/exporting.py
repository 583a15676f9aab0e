"""The compact pruned model: kept values plus 1-bit masks, and ``fishprune export RUN_DIR``.

File format (version 1, see :mod:`fishprune.tensorfiles` for the common fields)
-------------------------------------------------------------------------------
A ``"pruned"`` file holds, besides the ``mask/{name}`` entries of each masked parameter:

``kept/{name}``
    1-D tensor in the parameter's dtype holding the kept values in row-major order, i.e.
    ``param[mask]``; its length equals the mask's popcount.
``dense/{name}``
    every other state-dict entry (unmasked parameters, buffers), unchanged.
``fishprune.aliases`` (metadata)
    JSON object ``{name: canonical_name}`` for state-dict entries that are the very same tensor
    as another entry (tied weights); they are stored once, under the canonical name.

At 99 % sparsity a pruned export costs ``1/8`` byte per weight for the mask plus the kept
values: about 24x smaller than the dense float32 checkpoint.

:func:`export_run` exports a finished run: the model is rebuilt from the run's ``config.json``
(architecture, width; the input shape and class count from the dataset), loaded with the
best-validation weights and written with the run's masks; the file is checked by loading it
back (:func:`load_pruned`) into a fresh model before the sizes are reported.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fishprune import config as C
from fishprune import tensorfiles as tf
from fishprune.rundir import RunDir, RunDirError
from fishprune.tensorfiles import PathLike


def _alias_key(t: Tensor) -> tuple[Any, ...] | None:
    if t.numel() == 0:
        return None
    return (
        t.device,
        t.untyped_storage().data_ptr(),
        t.storage_offset(),
        t.shape,
        t.stride(),
        t.dtype,
    )


def export(
    model: nn.Module,
    masks: Mapping[str, Tensor],
    path: PathLike,
    *,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Write ``model``'s state dict with masked parameters stored sparsely (see module doc).

    For each masked parameter only ``param[mask]`` and the bit-packed mask are stored; all other
    entries are stored dense. Loading gives the masked model: pruned entries exactly zero, so the
    round trip is bit-identical when they already were.
    """
    tf.check_masks(masks)
    state = model.state_dict()
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, mask in masks.items():
        if name not in params:
            raise ValueError(f"mask {name!r} is not a parameter of the model")
        if mask.shape != params[name].shape:
            raise ValueError(
                f"mask {name!r} has shape {tuple(mask.shape)} but the parameter has "
                f"{tuple(params[name].shape)}"
            )

    # Tied entries (the very same tensor under several names) are stored once.
    canonical: dict[tuple[Any, ...], str] = {}
    for name in sorted(state, key=lambda n: n not in masks):  # masked names become canonical
        key = _alias_key(state[name])
        if key is not None and key not in canonical:
            canonical[key] = name
    aliases: dict[str, str] = {}
    for name, value in state.items():
        key = _alias_key(value)
        if key is not None and canonical[key] != name:
            if name in masks:
                raise ValueError(f"masks given for tied parameters {canonical[key]!r}, {name!r}")
            aliases[name] = canonical[key]

    tensors: dict[str, Tensor] = {}
    dense: dict[str, Tensor] = {}
    for name, value in state.items():
        if name in aliases:
            continue
        if name in masks:
            mask = masks[name].detach().to("cpu")
            tensors[tf.MASK_PREFIX + name] = tf.pack_mask(mask)
            tensors[tf.KEPT_PREFIX + name] = value.detach().to("cpu")[mask]
        else:
            dense[tf.DENSE_PREFIX + name] = value
    tensors |= tf.standalone(dense)

    meta = tf.check_user_metadata(metadata) | {
        tf.FORMAT_KEY: "pruned",
        tf.VERSION_KEY: tf.FORMAT_VERSION,
        tf.SHAPES_KEY: json.dumps({name: list(mask.shape) for name, mask in masks.items()}),
        tf.ALIASES_KEY: json.dumps(aliases),
    }
    tf.write_file(path, tensors, meta)


def load_pruned(model: nn.Module, path: PathLike) -> dict[str, Tensor]:
    """Load an :func:`export` file into ``model`` (same architecture) and return its masks.

    Pruned entries become exactly zero. Raises ``ValueError`` naming the file and the entry on a
    missing or unexpected key, a shape or dtype mismatch, or a kept-value count that differs
    from the mask's popcount; ``model`` is left unchanged in that case. Masks are on the CPU.
    """
    tensors, metadata = tf.read_file(path)
    tf.check_format(path, metadata, {"pruned"})
    masks = tf.decode_masks(path, tensors, metadata)
    aliases = tf.json_metadata(path, metadata, tf.ALIASES_KEY)

    loaded: dict[str, Tensor] = {}
    for key, value in tensors.items():
        prefix, _, name = key.partition("/")
        if prefix + "/" == tf.DENSE_PREFIX:
            loaded[name] = value
        elif prefix + "/" == tf.KEPT_PREFIX:
            if name not in masks:
                raise ValueError(f"{path}: kept values for {name!r} have no mask")
        elif prefix + "/" != tf.MASK_PREFIX:
            raise ValueError(f"{path}: unexpected tensor key {key!r}")
    for name, mask in masks.items():
        kept = tensors.get(tf.KEPT_PREFIX + name)
        if kept is None:
            raise ValueError(f"{path}: mask {name!r} has no kept values")
        count = int(mask.sum())
        if kept.dim() != 1 or kept.numel() != count:
            raise ValueError(
                f"{path}: {name!r} stores {tuple(kept.shape)} kept values but its mask keeps "
                f"{count}"
            )
        full = torch.zeros(mask.shape, dtype=kept.dtype)
        full[mask] = kept
        loaded[name] = full
    for name, target in aliases.items():
        if not isinstance(target, str) or target not in loaded or name in loaded:
            raise ValueError(f"{path}: invalid alias {name!r} -> {target!r}")
        loaded[name] = loaded[target]

    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(loaded)), sorted(set(loaded) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{path}: does not match the model: missing keys {missing}, unexpected keys "
            f"{unexpected}"
        )
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, value in loaded.items():
        want = expected[name]
        if value.shape != want.shape:
            raise ValueError(
                f"{path}: {name!r} has shape {tuple(value.shape)} in the file but "
                f"{tuple(want.shape)} in the model"
            )
        if value.dtype != want.dtype:
            raise ValueError(
                f"{path}: {name!r} is {value.dtype} in the file but {want.dtype} in the model"
            )
        if name in masks and name not in params:
            raise ValueError(f"{path}: mask {name!r} is not a parameter of the model")
    model.load_state_dict(loaded, strict=True)
    return masks


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


def rebuild_model(cfg: C.RunConfig) -> nn.Module:
    """The run's architecture for its dataset's input shape (weights: a fresh initialization)."""
    from fishprune.data import load_dataset
    from fishprune.pipeline import fresh_model

    ds = load_dataset(cfg.data.dataset, cfg.data.data_dir, download=False)
    return fresh_model(cfg, ds, seed=cfg.seed)


def export_run(run_dir: str | Path, out: str | Path | None = None) -> ExportSummary:
    """Export the finished run in ``run_dir`` to ``out`` (default: ``run_dir/pruned.safetensors``).

    Raises :class:`RunDirError` for a missing, unfinished or inconsistent run directory.
    """
    rd = RunDir(Path(run_dir))
    if not rd.path.is_dir():
        raise RunDirError(f"run directory {rd.path} does not exist")
    cfg = rd.read_config()
    if not rd.is_finished():
        raise RunDirError(f"{rd.path} has not finished (no {rd.result.name}); rerun the same "
                          "`fishprune run` command to complete it")
    problems = rd.verify(cfg)
    if problems:
        raise RunDirError(f"{problems[0]}: refusing to export (rerun the same `fishprune run` "
                          "command to recompute the run)")
    if not rd.best.is_file():
        raise RunDirError(f"{rd.path} has no trained weights ({rd.best.name}); runs with "
                          "--epochs 0 cannot be exported")
    if not rd.masks.is_file():
        raise RunDirError(f"{rd.path} has no {rd.masks.name}")
    model = rebuild_model(cfg)
    masks = tf.load_masks(rd.masks)
    try:
        model.load_state_dict(tf.load_state(rd.best))
    except RuntimeError as err:  # load_state_dict's multi-line report: keep its first line
        raise RunDirError(f"{rd.best} does not match the model of {rd.config.name}: "
                          f"{str(err).splitlines()[0]}") from None
    target = Path(out) if out is not None else rd.exported
    target.parent.mkdir(parents=True, exist_ok=True)
    export(model, masks, target, metadata={"run_id": cfg.run_id(), "label": cfg.label()})
    load_pruned(rebuild_model(cfg), target)  # refuses a file that does not round-trip
    return ExportSummary(
        path=target,
        dense_bytes=rd.best.stat().st_size,
        compact_bytes=target.stat().st_size,
        prunable=sum(m.numel() for m in masks.values()),
        kept=sum(int(m.sum()) for m in masks.values()),
    )
