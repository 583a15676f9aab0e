"""Crash-proof, pickle-free artifacts: atomic writes, bit-packed masks, checkpoints, pruned export.

Atomic writes
-------------
Every writer here goes through :func:`atomic_path`: the bytes land in a hidden temporary file
in the destination's directory (``.{name}.{random}.tmp{suffix}``, so the suffix survives for
libraries that detect the format from it), are ``fsync``-ed, and only then ``os.replace`` the
destination, after which the directory is ``fsync``-ed too. A reader therefore sees the old file
or the new one, never half of one; on any exception the temporary file is removed and the old
file is left untouched.

File format (version 1)
-----------------------
All tensor files are plain `safetensors <https://github.com/huggingface/safetensors>`_ files:
a JSON header followed by raw little-endian data. Nothing is ever unpickled on load and
``torch.load`` is never called. Files written by fishprune carry these string metadata fields
(``fishprune.`` is reserved; user metadata may use any other key):

``fishprune.format``
    ``"masks"`` (:func:`save_masks`), ``"pruned"`` (:func:`export`) or ``"state"``
    (:func:`save_state`).
``fishprune.version``
    ``"1"``. Readers refuse other versions.
``fishprune.mask_shapes``
    (masks, pruned) JSON object ``{param_name: [d0, d1, ...]}`` giving each mask's shape.
``fishprune.aliases``
    (pruned) JSON object ``{name: canonical_name}`` for state-dict entries that are the very
    same tensor as another entry (tied weights); they are stored once, under the canonical name.

Tensor keys are a fixed prefix followed by the unchanged parameter/buffer name; the prefix is
split off at the first ``/``, so any name round-trips:

``mask/{name}``
    uint8, 1-D, ``ceil(numel / 8)`` bytes: the row-major flattened boolean mask (True = keep)
    packed by ``numpy.packbits`` (big bit order: first element in the most significant bit).
    Padding bits of the last byte are zero; readers refuse anything else.
``kept/{name}``
    (pruned) 1-D tensor in the parameter's dtype holding the kept values in row-major order,
    i.e. ``param[mask]``; its length equals the mask's popcount.
``dense/{name}``
    (pruned) every other state-dict entry (unmasked parameters, buffers), unchanged.

A ``"state"`` checkpoint uses the state-dict names themselves as keys, so any safetensors tool
reads it. At 99 % sparsity a pruned export costs ``1/8`` byte per weight for the mask plus the
kept values: about 24x smaller than the dense float32 checkpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import secrets
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn

__all__ = [
    "FORMAT_VERSION",
    "atomic_path",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "export",
    "load_masks",
    "load_pruned",
    "load_state",
    "read_metadata",
    "save_masks",
    "save_state",
    "sha256_file",
]

FORMAT_VERSION = "1"
_RESERVED = "fishprune."
_FORMAT, _VERSION = "fishprune.format", "fishprune.version"
_SHAPES, _ALIASES = "fishprune.mask_shapes", "fishprune.aliases"
_MASK, _KEPT, _DENSE = "mask/", "kept/", "dense/"

PathLike = str | os.PathLike[str]


# ---------------------------------------------------------------------------------------------
# Atomic writes


def _create_temp(path: Path) -> Path:
    """Create an empty, exclusively named temporary file next to ``path`` (umask applies)."""
    for _ in range(100):
        tmp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp{path.suffix}")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        except FileExistsError:
            continue
        os.close(fd)
        return tmp
    raise FileExistsError(f"could not create a temporary file next to {path}")


def _fsync(path: Path, *, directory: bool = False) -> None:
    # Directories cannot be fsync-ed on every platform (Windows); files always can.
    flags = os.O_RDONLY if directory or os.name != "nt" else os.O_RDWR
    try:
        fd = os.open(path, flags)
    except OSError:
        if directory:
            return
        raise
    try:
        if directory:
            with contextlib.suppress(OSError):
                os.fsync(fd)
        else:
            os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: PathLike) -> Iterator[Path]:
    """Yield a temporary path that replaces ``path`` atomically when the block exits cleanly.

    The temporary file already exists (empty) in the same directory and keeps ``path``'s
    suffix, so ``savefig(tmp)`` or ``save_file(tensors, tmp)`` pick the right format. On a
    clean exit it is fsync-ed and ``os.replace``-d onto ``path``; on any exception (including
    one from ``os.replace``) it is deleted and ``path`` keeps its previous content.
    """
    path = Path(path)
    tmp = _create_temp(path)
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync(path.parent, directory=True)


def atomic_write_bytes(path: PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temp file, fsync, ``os.replace``)."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        f.write(data)


def atomic_write_text(path: PathLike, text: str, *, encoding: str = "utf-8") -> None:
    """Write ``text`` to ``path`` atomically, encoded with ``encoding``."""
    atomic_write_bytes(path, text.encode(encoding))


def _nonfinite_to_none(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, Mapping):
        return {key: _nonfinite_to_none(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [_nonfinite_to_none(value) for value in obj]
    return obj


def atomic_write_json(
    path: PathLike, obj: Any, *, nonfinite: Literal["null", "raise"] = "null"
) -> None:
    """Write ``obj`` as strict JSON (sorted keys, indent 2, trailing newline) atomically.

    JSON has no NaN/Infinity. With ``nonfinite="null"`` (default) non-finite floats are written
    as ``null``, so a diverged run still records its results (readers see "no value"); with
    ``nonfinite="raise"`` they raise ``ValueError`` and nothing is written.
    """
    if nonfinite == "null":
        obj = _nonfinite_to_none(obj)
    try:
        text = json.dumps(obj, sort_keys=True, indent=2, allow_nan=False)
    except ValueError as err:
        raise ValueError(f"{path}: {err} (NaN/Infinity cannot be written as JSON)") from err
    atomic_write_text(path, text + "\n")


def sha256_file(path: PathLike, *, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 digest of the file at ``path``, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


# ---------------------------------------------------------------------------------------------
# safetensors plumbing


def _check_user_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    metadata = dict(metadata or {})
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata must map str to str, got {key!r}: {value!r}")
        if key.startswith(_RESERVED):
            raise ValueError(f"metadata key {key!r}: the prefix {_RESERVED!r} is reserved")
    return metadata


def _write(path: PathLike, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def _read(path: PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file; corrupt files raise ``ValueError``."""
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except (SafetensorError, RuntimeError, ValueError, OverflowError) as err:
        raise ValueError(f"{path}: not a valid safetensors file ({err})") from err
    return tensors, metadata


def read_metadata(path: PathLike) -> dict[str, str]:
    """The string metadata of a fishprune safetensors file (user keys and ``fishprune.*``)."""
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, RuntimeError, ValueError, OverflowError) as err:
        raise ValueError(f"{path}: not a valid safetensors file ({err})") from err


def _check_format(path: PathLike, metadata: dict[str, str], expected: set[str]) -> str:
    fmt = metadata.get(_FORMAT)
    if fmt not in expected:
        raise ValueError(f"{path}: fishprune format {fmt!r}, expected one of {sorted(expected)}")
    if metadata.get(_VERSION) != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format version {metadata.get(_VERSION)!r} is not supported "
            f"(this fishprune reads version {FORMAT_VERSION})"
        )
    return fmt


def _json_field(path: PathLike, metadata: dict[str, str], key: str) -> dict[str, Any]:
    try:
        value = json.loads(metadata.get(key, "{}"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: metadata {key!r} is not valid JSON ({err})") from err
    if not isinstance(value, dict):
        raise ValueError(f"{path}: metadata {key!r} must be a JSON object")
    return value


def _standalone(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """CPU tensors that each own their whole, contiguous storage (what safetensors accepts).

    Tied, sliced or non-contiguous tensors are cloned; the rest are stored without a copy.
    """
    seen: set[int] = set()
    out: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        t = tensor.detach().to("cpu")
        storage = t.untyped_storage()
        if (
            storage.data_ptr() in seen
            or not t.is_contiguous()
            or storage.nbytes() != t.numel() * t.element_size()
        ):
            t = t.clone(memory_format=torch.contiguous_format)
        seen.add(t.untyped_storage().data_ptr())
        out[name] = t
    return out


# ---------------------------------------------------------------------------------------------
# Masks


def _pack(mask: Tensor) -> Tensor:
    """uint8 [ceil(numel/8)] <- bool [*shape], row-major, big bit order."""
    bits = mask.detach().to("cpu").reshape(-1).numpy()
    return torch.from_numpy(np.packbits(bits))


def _unpack(path: PathLike, name: str, packed: Tensor, shape: list[int]) -> Tensor:
    numel = math.prod(shape)
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (numel + 7) // 8:
        raise ValueError(
            f"{path}: mask {name!r} is {packed.dtype} {tuple(packed.shape)}, expected "
            f"torch.uint8 ({(numel + 7) // 8},) for shape {tuple(shape)}"
        )
    bits = np.unpackbits(packed.numpy())
    if bits[numel:].any():
        raise ValueError(f"{path}: mask {name!r} has non-zero padding bits")
    return torch.from_numpy(bits[:numel].astype(bool)).reshape(shape)


def _check_masks(masks: Mapping[str, Tensor]) -> None:
    for name, mask in masks.items():
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask {name!r} must be a torch.bool tensor")


def _decode_masks(
    path: PathLike, tensors: dict[str, Tensor], metadata: dict[str, str]
) -> dict[str, Tensor]:
    shapes = _json_field(path, metadata, _SHAPES)
    names = [key[len(_MASK) :] for key in tensors if key.startswith(_MASK)]
    if set(names) != set(shapes):
        raise ValueError(
            f"{path}: masks without shape: {sorted(set(names) - set(shapes))}; "
            f"shapes without mask: {sorted(set(shapes) - set(names))}"
        )
    masks = {}
    for name in names:
        shape = shapes[name]
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise ValueError(f"{path}: mask {name!r} has an invalid shape {shape!r}")
        masks[name] = _unpack(path, name, tensors[_MASK + name], shape)
    return masks


def save_masks(
    path: PathLike, masks: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Save boolean masks bit-packed (1 bit per weight) to a safetensors file, atomically."""
    _check_masks(masks)
    meta = _check_user_metadata(metadata)
    meta |= {
        _FORMAT: "masks",
        _VERSION: FORMAT_VERSION,
        _SHAPES: json.dumps({name: list(mask.shape) for name, mask in masks.items()}),
    }
    _write(path, {_MASK + name: _pack(mask) for name, mask in masks.items()}, meta)


def load_masks(path: PathLike) -> dict[str, Tensor]:
    """Load the masks of a :func:`save_masks` (or :func:`export`) file as CPU bool tensors."""
    tensors, metadata = _read(path)
    _check_format(path, metadata, {"masks", "pruned"})
    return _decode_masks(path, tensors, metadata)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def save_state(
    path: PathLike,
    model_or_state_dict: nn.Module | Mapping[str, Tensor],
    *,
    metadata: Mapping[str, str] | None = None,
) -> None:
    """Save a module's ``state_dict`` (or a state dict) as a dense safetensors file, atomically.

    Tied tensors are stored as independent copies; non-contiguous ones are made contiguous.
    """
    state = (
        model_or_state_dict.state_dict()
        if isinstance(model_or_state_dict, nn.Module)
        else model_or_state_dict
    )
    meta = _check_user_metadata(metadata) | {_FORMAT: "state", _VERSION: FORMAT_VERSION}
    _write(path, _standalone(state), meta)


def load_state(path: PathLike) -> dict[str, Tensor]:
    """Load a dense safetensors checkpoint (fishprune's or any other) as CPU tensors."""
    tensors, metadata = _read(path)
    if metadata.get(_FORMAT) in {"masks", "pruned"}:
        raise ValueError(
            f"{path}: a fishprune {metadata[_FORMAT]!r} file, not a checkpoint; "
            "use load_masks / load_pruned"
        )
    return tensors


# ---------------------------------------------------------------------------------------------
# Compact pruned export


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
    _check_masks(masks)
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
            tensors[_MASK + name] = _pack(mask)
            tensors[_KEPT + name] = value.detach().to("cpu")[mask]
        else:
            dense[_DENSE + name] = value
    tensors |= _standalone(dense)

    meta = _check_user_metadata(metadata) | {
        _FORMAT: "pruned",
        _VERSION: FORMAT_VERSION,
        _SHAPES: json.dumps({name: list(mask.shape) for name, mask in masks.items()}),
        _ALIASES: json.dumps(aliases),
    }
    _write(path, tensors, meta)


def load_pruned(model: nn.Module, path: PathLike) -> dict[str, Tensor]:
    """Load an :func:`export` file into ``model`` (same architecture) and return its masks.

    Pruned entries become exactly zero. Raises ``ValueError`` naming the file and the entry on a
    missing or unexpected key, a shape or dtype mismatch, or a kept-value count that differs
    from the mask's popcount; ``model`` is left unchanged in that case. Masks are on the CPU.
    """
    tensors, metadata = _read(path)
    _check_format(path, metadata, {"pruned"})
    masks = _decode_masks(path, tensors, metadata)
    aliases = _json_field(path, metadata, _ALIASES)

    loaded: dict[str, Tensor] = {}
    for key, value in tensors.items():
        prefix, _, name = key.partition("/")
        if prefix + "/" == _DENSE:
            loaded[name] = value
        elif prefix + "/" == _KEPT:
            if name not in masks:
                raise ValueError(f"{path}: kept values for {name!r} have no mask")
        elif prefix + "/" != _MASK:
            raise ValueError(f"{path}: unexpected tensor key {key!r}")
    for name, mask in masks.items():
        kept = tensors.get(_KEPT + name)
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
