"""Tests for the artifact formats: atomic writes, bit-packed masks, checkpoints, compact export."""

from __future__ import annotations

import errno
import json
import math
import os
import re
import struct
import tempfile
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from fishprune import atomic, exporting
from fishprune import tensorfiles as tf

SRC = Path(__file__).resolve().parents[1] / "src" / "fishprune"


def _lenet() -> nn.Module:
    """~1.07M parameters: two convs (with BatchNorm buffers) and three linears."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 5),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 5),
        nn.Flatten(),
        nn.Linear(32 * 20 * 20, 80),
        nn.ReLU(),
        nn.Linear(80, 64),
        nn.Linear(64, 10),
    )


def _random_masks(model: nn.Module, density: float, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        name: torch.rand(p.shape, generator=gen) < density
        for name, p in model.named_parameters()
        if name.endswith("weight") and p.dim() > 1
    }


def _apply(model: nn.Module, masks: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, mask in masks.items():
            params[name].mul_(mask)


def _leftovers(directory: Path) -> list[str]:
    return [p.name for p in directory.iterdir() if ".tmp" in p.name]


# ---------------------------------------------------------------------------------------------
# Atomic writes


def test_atomic_writes_round_trip(tmp_path: Path) -> None:
    atomic.write_bytes(tmp_path / "a.bin", b"\x00\x01")
    atomic.write_text(tmp_path / "a.txt", "héllo")
    atomic.write_json(tmp_path / "a.json", {"b": [1, 2.5], "a": None})
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "a.txt").read_text(encoding="utf-8") == "héllo"
    text = (tmp_path / "a.json").read_text()
    assert text == '{\n  "a": null,\n  "b": [\n    1,\n    2.5\n  ]\n}\n'
    assert _leftovers(tmp_path) == []


def test_atomic_write_json_nonfinite(tmp_path: Path) -> None:
    obj = {"loss": float("nan"), "x": [float("inf"), (1.0, -float("inf"))], "ok": 1.5}
    atomic.write_json(tmp_path / "r.json", obj)
    assert json.loads((tmp_path / "r.json").read_text()) == {
        "loss": None,
        "x": [None, [1.0, None]],
        "ok": 1.5,
    }
    with pytest.raises(ValueError, match="NaN"):
        atomic.write_json(tmp_path / "s.json", obj, nonfinite="raise")
    assert not (tmp_path / "s.json").exists()
    assert _leftovers(tmp_path) == []


def test_atomic_path_keeps_old_file_when_writer_raises(tmp_path: Path) -> None:
    target = tmp_path / "fig.png"
    target.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="midway"), atomic.replacing(target) as tmp:
        assert tmp.parent == tmp_path and tmp.suffix == ".png" and tmp.exists()
        tmp.write_bytes(b"half")
        raise RuntimeError("midway")
    assert target.read_bytes() == b"old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fig.png"]


@pytest.mark.parametrize("where", ["fsync", "library"])
def test_a_full_disk_names_the_file(where: str, tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: a full disk said only "[Errno 28] No space left on device" (or, from
    safetensors, "Error while serializing: ... (os error 28)"), naming no file."""
    target = tmp_path / "masks.safetensors"
    if where == "fsync":
        def full(fd: int) -> None:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "fsync", full)
        with pytest.raises(OSError) as caught:
            tf.save_masks(target, {"w": torch.ones(3, dtype=torch.bool)})
    else:  # the message safetensors' Rust writer gives (measured on a full tmpfs)
        with pytest.raises(OSError) as caught, atomic.replacing(target):
            raise RuntimeError("Error while serializing: I/O error: No space left on device "
                               "(os error 28)")
    assert caught.value.errno == errno.ENOSPC
    assert f"could not write {target}" in str(caught.value)
    assert _leftovers(tmp_path) == [] and not target.exists()
    with pytest.raises(RuntimeError, match="os error 2\\)"), atomic.replacing(target):
        raise RuntimeError("not a disk failure (os error 2)")  # ENOENT: passed through as is


def test_atomic_write_keeps_old_file_when_replace_fails(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "m.safetensors"
    tf.save_masks(target, {"w": torch.ones(3, dtype=torch.bool)})
    old = target.read_bytes()

    def crash(src: object, dst: object) -> None:
        raise OSError("disk on fire")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError, match="disk on fire"):
        tf.save_masks(target, {"w": torch.zeros(3, dtype=torch.bool)})
    with pytest.raises(OSError, match="disk on fire"):
        atomic.write_json(target, {"a": 1})
    assert target.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]


def test_atomic_path_replaces_on_success(tmp_path: Path) -> None:
    target = tmp_path / "out.txt"
    target.write_text("old")
    with atomic.replacing(target) as tmp:
        tmp.write_text("new")
        assert target.read_text() == "old"
    assert target.read_text() == "new"
    assert _leftovers(tmp_path) == []


def test_sha256_file(tmp_path: Path) -> None:
    (tmp_path / "x").write_bytes(b"abc")
    expected = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    assert atomic.sha256_file(tmp_path / "x", chunk_size=2) == expected


# ---------------------------------------------------------------------------------------------
# Masks

shapes = st.lists(st.integers(0, 9), min_size=0, max_size=4)


@st.composite
def mask_dicts(draw: st.DrawFn) -> dict[str, torch.Tensor]:
    n = draw(st.integers(0, 4))
    masks = {}
    for i in range(n):
        shape = draw(shapes)
        density = draw(st.sampled_from([0.0, 1.0, 0.01, 0.5, 0.99]))
        seed = draw(st.integers(0, 2**31 - 1))
        gen = torch.Generator().manual_seed(seed)
        masks[f"layer{i}.sub.weight"] = torch.rand(shape, generator=gen) < density
    return masks


@settings(max_examples=60, deadline=None)
@given(masks=mask_dicts())
def test_masks_round_trip(masks: dict[str, torch.Tensor]) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "masks.safetensors"
        tf.save_masks(path, masks, metadata={"criterion": "snip"})
        loaded = tf.load_masks(path)
    assert loaded.keys() == masks.keys()
    for name, mask in masks.items():
        assert loaded[name].dtype == torch.bool
        assert loaded[name].shape == mask.shape
        assert torch.equal(loaded[name], mask)


def test_masks_edge_shapes_and_size(tmp_path: Path) -> None:
    masks = {
        "scalar": torch.tensor(True),
        "empty": torch.zeros(0, 3, dtype=torch.bool),
        "odd": torch.tensor([True, False, True]),
        "conv.weight": torch.rand(7, 3, 5, 5) < 0.3,  # 525 elements, not a multiple of 8
    }
    path = tmp_path / "m.safetensors"
    tf.save_masks(path, masks)
    loaded = tf.load_masks(path)
    assert all(torch.equal(loaded[k], v) and loaded[k].shape == v.shape for k, v in masks.items())
    header_len = struct.unpack("<Q", path.read_bytes()[:8])[0]
    assert path.stat().st_size - 8 - header_len == 1 + 0 + 1 + math.ceil(525 / 8)


def test_save_masks_rejects_bad_input(tmp_path: Path) -> None:
    with pytest.raises(TypeError):
        tf.save_masks(tmp_path / "m", {"w": torch.ones(3)})
    with pytest.raises(ValueError, match="reserved"):
        tf.save_masks(tmp_path / "m", {}, metadata={"fishprune.format": "x"})
    assert list(tmp_path.iterdir()) == []


def test_file_is_plain_safetensors_without_pickle(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    tf.save_masks(path, {"w": torch.ones(2, 2, dtype=torch.bool)}, metadata={"run": "1"})
    raw = path.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + header_len])
    assert header["__metadata__"]["fishprune.format"] == "masks"
    assert header["__metadata__"]["fishprune.version"] == tf.FORMAT_VERSION
    assert header["__metadata__"]["run"] == "1"
    assert header["mask/w"]["dtype"] == "U8"
    assert not raw.startswith((b"PK", b"\x80"))  # neither a torch.save zip nor a pickle


def test_no_unsafe_torch_load_in_package() -> None:
    offenders = []
    for file in SRC.rglob("*.py"):
        text = file.read_text(encoding="utf-8")
        for match in re.finditer(r"torch\.load\s*\(", text):
            depth, end = 1, match.end()
            while depth and end < len(text):
                depth += {"(": 1, ")": -1}.get(text[end], 0)
                end += 1
            call = text[match.start() : end]
            if not re.search(r"weights_only\s*=\s*True", call):
                offenders.append(f"{file.relative_to(SRC)}: {call}")
    assert offenders == []


# ---------------------------------------------------------------------------------------------
# Corrupt files


def _mask_file(tmp_path: Path) -> Path:
    path = tmp_path / "m.safetensors"
    tf.save_masks(path, {"a": torch.rand(5, 7) < 0.5, "b": torch.tensor([True])})
    return path


def test_truncated_files_raise_value_error(tmp_path: Path) -> None:
    raw = _mask_file(tmp_path).read_bytes()
    bad = tmp_path / "bad.safetensors"
    for cut in range(len(raw)):
        bad.write_bytes(raw[:cut])
        with pytest.raises(ValueError, match=r"bad\.safetensors"):
            tf.load_masks(bad)


@settings(max_examples=50, deadline=None)
@given(data=st.binary(max_size=200))
def test_garbage_raises_value_error(data: bytes) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "garbage.safetensors"
        path.write_bytes(data)
        with pytest.raises(ValueError, match=r"garbage\.safetensors"):
            tf.load_masks(path)


@pytest.mark.parametrize("data", [b"", b"\x00" * 7, b"\xff" * 64, b"PK\x03\x04" + b"\x00" * 60])
def test_load_state_garbage(tmp_path: Path, data: bytes) -> None:
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(data)
    with pytest.raises(ValueError, match=r"garbage\.safetensors"):
        tf.load_state(path)


def test_inconsistent_mask_file_raises(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "forged.safetensors"
    base = {"fishprune.format": "masks", "fishprune.version": "1"}
    cases = [
        ({"mask/w": torch.tensor([0xFF], dtype=torch.uint8)}, {"w": [3]}, "padding"),
        ({"mask/w": torch.tensor([0xFF, 0], dtype=torch.uint8)}, {"w": [3]}, "expected"),
        ({"mask/w": torch.tensor([1], dtype=torch.uint8)}, {}, "without shape"),
        ({"mask/w": torch.tensor([1], dtype=torch.uint8)}, {"w": [-1]}, "invalid shape"),
    ]
    for tensors, shapes_, message in cases:
        save_file(tensors, path, {**base, "fishprune.mask_shapes": json.dumps(shapes_)})
        with pytest.raises(ValueError, match=message):
            tf.load_masks(path)
    save_file({}, path, {**base, "fishprune.version": "99"})
    with pytest.raises(ValueError, match="version"):
        tf.load_masks(path)
    save_file({"w": torch.ones(2)}, path)
    with pytest.raises(ValueError, match="format"):
        tf.load_masks(path)


# ---------------------------------------------------------------------------------------------
# Checkpoints


def test_state_round_trip_with_tied_and_noncontiguous(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4), nn.BatchNorm1d(4))
    model[1].weight = model[0].weight  # tied
    state = model.state_dict()
    state["extra.t"] = torch.arange(12.0).reshape(3, 4).t()  # non-contiguous
    state["extra.slice"] = torch.arange(10, dtype=torch.int16)[2:5]  # view of a bigger storage
    path = tmp_path / "ckpt.safetensors"
    tf.save_state(path, state, metadata={"step": "3"})
    loaded = tf.load_state(path)
    assert loaded.keys() == state.keys()
    assert all(torch.equal(loaded[k], v) and loaded[k].dtype == v.dtype for k, v in state.items())
    tf.save_state(path, model)
    assert tf.load_state(path).keys() == model.state_dict().keys()


def test_load_state_refuses_masks(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="load_masks"):
        tf.load_state(_mask_file(tmp_path))


# ---------------------------------------------------------------------------------------------
# Compact pruned export


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert sa[key].dtype == sb[key].dtype
        assert torch.equal(sa[key], sb[key]), key


def test_export_bit_identical_and_20x_smaller(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = _lenet()
    model(torch.randn(2, 1, 28, 28))  # populate BatchNorm running stats
    assert 1_000_000 < sum(p.numel() for p in model.parameters()) < 1_200_000
    masks = _random_masks(model, density=0.01)
    _apply(model, masks)

    dense, sparse = tmp_path / "dense.safetensors", tmp_path / "pruned.safetensors"
    tf.save_state(dense, model)
    exporting.export(model, masks, sparse, metadata={"criterion": "fts"})
    ratio = dense.stat().st_size / sparse.stat().st_size
    assert ratio >= 20, ratio

    torch.manual_seed(1)
    fresh = _lenet()
    loaded = exporting.load_pruned(fresh, sparse)
    _assert_same_state(model, fresh)
    assert loaded.keys() == masks.keys()
    params = dict(fresh.named_parameters())
    for name, mask in masks.items():
        assert torch.equal(loaded[name], mask)
        assert (params[name][~mask] == 0).all()
    assert tf.load_masks(sparse).keys() == masks.keys()


@settings(max_examples=25, deadline=None)
@given(
    density=st.sampled_from([0.0, 1.0, 0.3, 0.999]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16, torch.float64]),
    seed=st.integers(0, 1000),
)
def test_export_round_trip_densities_and_dtypes(
    density: float, dtype: torch.dtype, seed: int
) -> None:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.Flatten(), nn.Linear(5, 3))
    model.to(dtype)
    masks = _random_masks(model, density, seed)
    _apply(model, masks)
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "p.safetensors"
        exporting.export(model, masks, path)
        fresh = nn.Sequential(
            nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5), nn.Flatten(), nn.Linear(5, 3)
        ).to(dtype)
        loaded = exporting.load_pruned(fresh, path)
    _assert_same_state(model, fresh)
    assert all(torch.equal(loaded[k], v) for k, v in masks.items())


def test_export_zeroes_pruned_weights_and_handles_tied(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    model[1].weight = model[0].weight
    masks = {"0.weight": torch.rand(6, 6) < 0.5}  # not applied: pruned entries are non-zero
    path = tmp_path / "p.safetensors"
    exporting.export(model, masks, path)
    fresh = nn.Sequential(nn.Linear(6, 6), nn.Linear(6, 6))
    exporting.load_pruned(fresh, path)
    expected = model[0].weight.detach() * masks["0.weight"]
    assert torch.equal(fresh[0].weight, expected)
    assert torch.equal(fresh[1].weight, expected)
    assert torch.equal(fresh[0].bias, model[0].bias)


def test_export_rejects_bad_masks(tmp_path: Path) -> None:
    model = nn.Linear(4, 3)
    with pytest.raises(ValueError, match="not a parameter"):
        exporting.export(model, {"nope": torch.ones(3, 4, dtype=torch.bool)}, tmp_path / "p")
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(3, 4\)"):
        exporting.export(model, {"weight": torch.ones(4, 3, dtype=torch.bool)}, tmp_path / "p")
    assert list(tmp_path.iterdir()) == []


def _exported_linear(tmp_path: Path) -> tuple[nn.Module, Path]:
    model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2))
    path = tmp_path / "p.safetensors"
    exporting.export(model, {"0.weight": torch.rand(3, 4) < 0.5}, path)
    return model, path


def test_load_pruned_refuses_shape_mismatch(tmp_path: Path) -> None:
    model, path = _exported_linear(tmp_path)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    other = nn.Sequential(nn.Linear(5, 3), nn.Linear(3, 2))
    with pytest.raises(ValueError, match=r"'0\.weight'.*\(3, 4\).*\(3, 5\)"):
        exporting.load_pruned(other, path)
    other = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 7))
    with pytest.raises(ValueError, match=r"'1\.bias'.*\(2,\).*\(7,\)"):
        exporting.load_pruned(other, path)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_load_pruned_refuses_missing_and_unexpected_keys(tmp_path: Path) -> None:
    _, path = _exported_linear(tmp_path)
    with pytest.raises(ValueError, match=r"missing keys \['2\.bias', '2\.weight'\]"):
        model = nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2), nn.Linear(2, 2))
        exporting.load_pruned(model, path)
    with pytest.raises(ValueError, match=r"unexpected keys \['1\.bias', '1\.weight'\]"):
        exporting.load_pruned(nn.Sequential(nn.Linear(4, 3)), path)


def test_load_pruned_refuses_dtype_mismatch(tmp_path: Path) -> None:
    _, path = _exported_linear(tmp_path)
    with pytest.raises(ValueError, match="float64"):
        exporting.load_pruned(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)).double(), path)


def test_load_pruned_refuses_kept_count_mismatch(tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import save_file

    _, path = _exported_linear(tmp_path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata()
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118
    tensors["kept/0.weight"] = torch.cat([tensors["kept/0.weight"], torch.zeros(1)])
    save_file(tensors, path, meta)  # the old checksum no longer fits: refused as corrupt
    with pytest.raises(ValueError, match="checksum mismatch"):
        exporting.load_pruned(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), path)
    meta.pop(tf.CHECKSUM_KEY)  # a hand-made file without a checksum: the structure is checked
    save_file(tensors, path, meta)
    with pytest.raises(ValueError, match=r"'0\.weight'.*kept"):
        exporting.load_pruned(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), path)
    del tensors["kept/0.weight"]
    save_file(tensors, path, meta)
    with pytest.raises(ValueError, match="no kept values"):
        exporting.load_pruned(nn.Sequential(nn.Linear(4, 3), nn.Linear(3, 2)), path)


def test_load_pruned_refuses_other_formats(tmp_path: Path) -> None:
    model = nn.Linear(2, 2)
    path = tmp_path / "s.safetensors"
    tf.save_state(path, model)
    with pytest.raises(ValueError, match="format"):
        exporting.load_pruned(model, path)


def test_every_tensor_file_verifies_its_checksum(tmp_path: Path) -> None:
    """A flipped bit anywhere in the data is refused naming the file (regression: a flipped bit
    in masks.safetensors made export drop a trained weight and pass its own load-back check)."""
    masks = {"a.weight": torch.rand(7, 5) > 0.5, "b.weight": torch.rand(3) > 0.5}
    path = tmp_path / "m.safetensors"
    tf.save_masks(path, masks)
    data = bytearray(path.read_bytes())
    for position in range(len(data) - 1, len(data) - 6, -1):  # the packed mask bytes
        corrupt = bytearray(data)
        corrupt[position] ^= 0x01
        path.write_bytes(bytes(corrupt))
        with pytest.raises(ValueError, match=r"m\.safetensors: checksum mismatch"):
            tf.load_masks(path)
    state = tmp_path / "s.safetensors"
    tf.save_state(state, {"w": torch.arange(10.0)}, metadata={"note": "x"})
    data = bytearray(state.read_bytes())
    data[-3] ^= 0x40
    state.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"s\.safetensors: checksum mismatch"):
        tf.load_state(state)


def test_tensor_files_are_byte_reproducible_across_processes(tmp_path: Path) -> None:
    """Regression: metadata key order varied per process, so equal content gave other bytes."""
    import subprocess
    import sys

    script = (
        "import sys, torch; from fishprune import tensorfiles as tf\n"
        "m = {f'l{i}.weight': torch.arange(12).reshape(3, 4) % (i + 2) == 0 for i in range(6)}\n"
        "tf.save_masks(sys.argv[1], m, metadata={f'k{i}': str(i) for i in range(9)})\n"
    )
    paths = [tmp_path / f"{i}.safetensors" for i in range(3)]
    for path in paths:
        subprocess.run([sys.executable, "-c", script, str(path)], check=True)
    assert paths[0].read_bytes() == paths[1].read_bytes() == paths[2].read_bytes()
    assert list(tf.load_masks(paths[0])) == [f"l{i}.weight" for i in range(6)]  # stored order


@pytest.mark.parametrize("target", ["dir", "/dev/null"])
def test_unreadable_paths_are_value_errors(target: str, tmp_path: Path) -> None:
    path = tmp_path if target == "dir" else Path(target)
    for load in (tf.load_masks, tf.load_state, tf.read_metadata):
        with pytest.raises(ValueError, match=str(path)):
            load(path)


def test_deeply_nested_metadata_is_a_value_error(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    path = tmp_path / "deep.safetensors"
    save_file({"mask/a": torch.zeros(1, dtype=torch.uint8)}, path, {
        "fishprune.format": "masks", "fishprune.version": tf.FORMAT_VERSION,
        "fishprune.mask_shapes": "[" * 100_000 + "]" * 100_000})
    with pytest.raises(ValueError, match="nested too deeply"):
        tf.load_masks(path)
