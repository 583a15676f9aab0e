"""Tensor files: pickle-free safetensors for masks, weights and training checkpoints.

File format (version 1)
-----------------------
All tensor files are plain `safetensors <https://github.com/huggingface/safetensors>`_ files:
a JSON header followed by raw little-endian data. Nothing is ever unpickled on load and
``torch.load`` is never called. Files written by fishprune carry these string metadata fields
(``fishprune.`` is reserved; user metadata may use any other key):

``fishprune.format``
    ``"masks"`` (:func:`save_masks`), ``"pruned"`` (:func:`fishprune.exporting.export`) or
    ``"state"`` (:func:`save_state`, :func:`save_checkpoint`).
``fishprune.version``
    ``"1"``. Readers refuse other versions.
``fishprune.mask_shapes``
    (masks, pruned) JSON object ``{param_name: [d0, d1, ...]}`` giving each mask's shape, in
    the model's order (the order masks are returned in).
``fishprune.sha256``
    SHA-256 of the content (:func:`content_digest`): every read verifies it, so a flipped bit
    anywhere in a tensor, a name or the metadata is refused with the file's name. The JSON
    header is written with sorted keys: equal content gives byte-identical files.

Tensor keys are a fixed prefix followed by the unchanged parameter/buffer name; the prefix is
split off at the first ``/``, so any name round-trips:

``mask/{name}``
    uint8, 1-D, ``ceil(numel / 8)`` bytes: the row-major flattened boolean mask (True = keep)
    packed by ``numpy.packbits`` (big bit order: first element in the most significant bit).
    Padding bits of the last byte are zero; readers refuse anything else.

A ``"state"`` file uses the state-dict names themselves as keys, so any safetensors tool reads
it. A training checkpoint (:func:`save_checkpoint`) is a ``"state"`` file whose keys are
``model/{name}``, ``optim/{param index}/{slot}`` and ``rng/cpu``, in ONE file, so that a kill
can never leave the weights of one epoch beside the optimizer state of another.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from torch import Tensor, nn

from fishprune import atomic
from fishprune.hashing import canonical_json

__all__ = [
    "FORMAT_VERSION",
    "load_checkpoint",
    "load_masks",
    "load_state",
    "read_metadata",
    "save_checkpoint",
    "save_masks",
    "save_state",
]

FORMAT_VERSION = "1"
RESERVED = "fishprune."
FORMAT_KEY, VERSION_KEY = "fishprune.format", "fishprune.version"
SHAPES_KEY, ALIASES_KEY = "fishprune.mask_shapes", "fishprune.aliases"
CHECKSUM_KEY = "fishprune.sha256"
MASK_PREFIX, KEPT_PREFIX, DENSE_PREFIX = "mask/", "kept/", "dense/"

PathLike = str | os.PathLike[str]

# ---------------------------------------------------------------------------------------------
# safetensors plumbing


def check_user_metadata(metadata: Mapping[str, str] | None) -> dict[str, str]:
    metadata = dict(metadata or {})
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"metadata must map str to str, got {key!r}: {value!r}")
        if key.startswith(RESERVED):
            raise ValueError(f"metadata key {key!r}: the prefix {RESERVED!r} is reserved")
    return metadata


def content_digest(tensors: Mapping[str, Tensor], metadata: Mapping[str, str]) -> str:
    """SHA-256 over everything a file holds: every tensor's name, dtype, shape and bytes (in
    name order) and the metadata (without the checksum itself)."""
    digest = hashlib.sha256()
    meta = {k: v for k, v in metadata.items() if k != CHECKSUM_KEY}
    layout = [(k, str(tensors[k].dtype), list(tensors[k].shape)) for k in sorted(tensors)]
    digest.update(canonical_json({"metadata": meta, "tensors": layout}).encode())
    for key in sorted(tensors):
        data = tensors[key].detach().to("cpu").contiguous().reshape(-1)
        digest.update(data.view(torch.uint8).numpy().tobytes() if data.numel() else b"")
    return digest.hexdigest()


def write_file(path: PathLike, tensors: dict[str, Tensor], metadata: dict[str, str]) -> None:
    """Write a safetensors file atomically, with its content checksum in the metadata and its
    JSON header in a canonical order, so equal content gives byte-identical files."""
    meta = {**metadata, CHECKSUM_KEY: content_digest(tensors, metadata)}
    data = save(tensors, metadata=meta)
    size = int.from_bytes(data[:8], "little")
    header = canonical_json(json.loads(data[8 : 8 + size])).encode()
    if len(header) <= size:  # the same JSON, keys sorted; padded with spaces to the same size
        data = data[:8] + header + b" " * (size - len(header)) + data[8 + size :]
    atomic.write_bytes(path, data)


def read_file(path: PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """All tensors and the metadata of a safetensors file, its checksum verified when it has one
    (every file fishprune writes does); an unreadable or corrupt file raises ``ValueError``."""
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory, not a safetensors file")
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {key: f.get_tensor(key) for key in f.keys()}  # noqa: SIM118 (safe_open is not iterable)
    except (SafetensorError, RuntimeError, ValueError, OverflowError, OSError) as err:
        raise ValueError(f"{path}: not a valid safetensors file ({err})") from err
    expected = metadata.get(CHECKSUM_KEY)
    if expected is not None and content_digest(tensors, metadata) != expected:
        raise ValueError(f"{path}: checksum mismatch: the file is corrupt (its content is not "
                         "what fishprune wrote)")
    return tensors, metadata


def read_metadata(path: PathLike) -> dict[str, str]:
    """The string metadata of a fishprune safetensors file (user keys and ``fishprune.*``),
    unverified: read the file with :func:`read_file` to verify it."""
    if os.path.isdir(path):
        raise ValueError(f"{path}: is a directory, not a safetensors file")
    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, RuntimeError, ValueError, OverflowError, OSError) as err:
        raise ValueError(f"{path}: not a valid safetensors file ({err})") from err


def check_format(path: PathLike, metadata: dict[str, str], expected: set[str]) -> str:
    fmt = metadata.get(FORMAT_KEY)
    if fmt not in expected:
        raise ValueError(f"{path}: fishprune format {fmt!r}, expected one of {sorted(expected)}")
    if metadata.get(VERSION_KEY) != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format version {metadata.get(VERSION_KEY)!r} is not supported "
            f"(this fishprune reads version {FORMAT_VERSION})"
        )
    return fmt


def json_metadata(path: PathLike, metadata: dict[str, str], key: str) -> dict[str, Any]:
    try:
        value = json.loads(metadata.get(key, "{}"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: metadata {key!r} is not valid JSON ({err})") from err
    except RecursionError:
        raise ValueError(f"{path}: metadata {key!r} is nested too deeply") from None
    if not isinstance(value, dict):
        raise ValueError(f"{path}: metadata {key!r} must be a JSON object")
    return value


def standalone(tensors: Mapping[str, Tensor]) -> dict[str, Tensor]:
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


def pack_mask(mask: Tensor) -> Tensor:
    """uint8 [ceil(numel/8)] <- bool [*shape], row-major, big bit order."""
    bits = mask.detach().to("cpu").reshape(-1).numpy()
    return torch.from_numpy(np.packbits(bits))


def unpack_mask(path: PathLike, name: str, packed: Tensor, shape: list[int]) -> Tensor:
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


def check_masks(masks: Mapping[str, Tensor]) -> None:
    for name, mask in masks.items():
        if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
            raise TypeError(f"mask {name!r} must be a torch.bool tensor")


def decode_masks(
    path: PathLike, tensors: dict[str, Tensor], metadata: dict[str, str]
) -> dict[str, Tensor]:
    shapes = json_metadata(path, metadata, SHAPES_KEY)
    names = [key[len(MASK_PREFIX) :] for key in tensors if key.startswith(MASK_PREFIX)]
    if set(names) != set(shapes):
        raise ValueError(
            f"{path}: masks without shape: {sorted(set(names) - set(shapes))}; "
            f"shapes without mask: {sorted(set(shapes) - set(names))}"
        )
    masks = {}
    for name in shapes:  # the stored order: the model's, not the file's sorted key order
        shape = shapes[name]
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) and d >= 0 for d in shape
        ):
            raise ValueError(f"{path}: mask {name!r} has an invalid shape {shape!r}")
        masks[name] = unpack_mask(path, name, tensors[MASK_PREFIX + name], shape)
    return masks


def save_masks(
    path: PathLike, masks: Mapping[str, Tensor], metadata: Mapping[str, str] | None = None
) -> None:
    """Save boolean masks bit-packed (1 bit per weight) to a safetensors file, atomically."""
    check_masks(masks)
    meta = check_user_metadata(metadata)
    meta |= {
        FORMAT_KEY: "masks",
        VERSION_KEY: FORMAT_VERSION,
        SHAPES_KEY: json.dumps({name: list(mask.shape) for name, mask in masks.items()}),
    }
    write_file(path, {MASK_PREFIX + name: pack_mask(mask) for name, mask in masks.items()}, meta)


def load_masks(path: PathLike) -> dict[str, Tensor]:
    """Load the masks of a :func:`save_masks` (or :func:`export`) file as CPU bool tensors."""
    tensors, metadata = read_file(path)
    check_format(path, metadata, {"masks", "pruned"})
    return decode_masks(path, tensors, metadata)


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
    meta = check_user_metadata(metadata) | {FORMAT_KEY: "state", VERSION_KEY: FORMAT_VERSION}
    write_file(path, standalone(state), meta)


def load_state(path: PathLike) -> dict[str, Tensor]:
    """Load a dense safetensors checkpoint (fishprune's or any other) as CPU tensors."""
    tensors, metadata = read_file(path)
    if metadata.get(FORMAT_KEY) in {"masks", "pruned"}:
        raise ValueError(
            f"{path}: a fishprune {metadata[FORMAT_KEY]!r} file, not a checkpoint; "
            "use load_masks / load_pruned"
        )
    return tensors


# ---------------------------------------------------------------------------------------------
# Training checkpoints


def save_checkpoint(path: PathLike, model: nn.Module, optimizer: torch.optim.Optimizer, *,
                    metadata: Mapping[str, str] | None = None) -> None:
    """Model, optimizer state and the CPU RNG state in one atomic file (see the module doc)."""
    state = {f"model/{k}": v for k, v in model.state_dict().items()}
    for index, slots in optimizer.state_dict()["state"].items():
        for key, value in slots.items():
            if isinstance(value, Tensor):
                state[f"optim/{index}/{key}"] = value
    state["rng/cpu"] = torch.get_rng_state()
    save_state(path, state, metadata=metadata)


def load_checkpoint(path: PathLike, model: nn.Module, optimizer: torch.optim.Optimizer
                    ) -> dict[str, str]:
    """Restore a :func:`save_checkpoint` file into ``model``, ``optimizer`` and the CPU RNG;
    return its user metadata."""
    flat = load_state(path)
    model.load_state_dict({k[6:]: v for k, v in flat.items() if k.startswith("model/")})
    torch.set_rng_state(flat["rng/cpu"])
    state: dict[int, dict[str, Tensor]] = {}
    for key, value in flat.items():
        if key.startswith("optim/"):
            _, index, name = key.split("/", 2)
            state.setdefault(int(index), {})[name] = value
    if state:
        optimizer.load_state_dict({"state": state,
                                   "param_groups": optimizer.state_dict()["param_groups"]})
    return {k: v for k, v in read_metadata(path).items() if not k.startswith(RESERVED)}
