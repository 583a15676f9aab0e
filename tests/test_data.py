"""Tests for fishprune.data: parsers, file search, downloads, splits, batches."""

from __future__ import annotations

import functools
import gzip
import hashlib
import http.server
import io
import os
import re
import socket
import tarfile
import threading
import urllib.request
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from fishprune.data import (
    DATASETS,
    DEFAULT_DATASET,
    ChecksumError,
    DatasetFileError,
    DatasetNotFoundError,
    DatasetTensors,
    TensorBatches,
    crop_flip,
    datasets,
    load_dataset,
    make_synthetic,
    parse_idx,
    read_idx,
    registry,
    scoring_indices,
    search_dirs,
    stratified_split,
)
from fishprune.data import files as files_mod

DEBIAN_FMNIST = Path("/usr/share/datasets/fashion-mnist")
IDX = registry.IDX_FILES


def md5(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def idx_bytes(array: np.ndarray) -> bytes:
    """Encode a uint8 or >i4 array in the IDX format."""
    code = {np.dtype(np.uint8): 0x08, np.dtype(">i4"): 0x0C}[array.dtype]
    header = bytes([0, 0, code, array.ndim]) + np.array(array.shape, ">u4").tobytes()
    return header + array.tobytes()


def fake_idx_set(marker: int = 0, n_train: int = 20, n_test: int = 10) -> dict[str, bytes]:
    """Raw IDX contents of a tiny (Fashion-)MNIST: image pixels = ``marker + label``."""
    out = {}
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = (np.arange(n) % 10).astype(np.uint8)
        images = np.broadcast_to((marker + labels)[:, None, None], (n, 28, 28)).astype(np.uint8)
        out[f"{prefix}-images-idx3-ubyte"] = idx_bytes(images)
        out[f"{prefix}-labels-idx1-ubyte"] = idx_bytes(labels)
    return out


def write_idx_set(directory: Path, contents: dict[str, bytes], *, gz: bool = True) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    for stem, data in contents.items():
        if gz:
            (directory / f"{stem}.gz").write_bytes(gzip.compress(data, mtime=0))
        else:
            (directory / stem).write_bytes(data)


@pytest.fixture
def env(tmp_path, monkeypatch):
    """No FISHPRUNE_DATA, an empty system root and cache; no real network."""
    monkeypatch.delenv("FISHPRUNE_DATA", raising=False)
    monkeypatch.setattr(files_mod, "SYSTEM_DATA_ROOTS", (tmp_path / "system",))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setitem(registry.MIRRORS, "fashion-mnist", ("http://127.0.0.1:9/",))
    return tmp_path


@pytest.fixture
def fake_fmnist(monkeypatch):
    """Make the checksum tables accept ``fake_idx_set(marker=0)``; returns its contents."""
    contents = fake_idx_set()
    monkeypatch.setitem(
        registry.CONTENT_MD5, "fashion-mnist", {k: md5(v) for k, v in contents.items()}
    )
    monkeypatch.setitem(
        registry.CHECKSUMS,
        "fashion-mnist",
        {f"{k}.gz": md5(gzip.compress(v, mtime=0)) for k, v in contents.items()},
    )
    return contents


# ----------------------------------------------------------------------------- IDX parsing


@pytest.mark.parametrize("gz", [True, False])
@pytest.mark.parametrize("dtype", [np.uint8, ">i4"])
def test_idx_round_trip(tmp_path, gz, dtype):
    array = np.arange(5 * 4 * 3).reshape(5, 4, 3).astype(dtype)
    data = idx_bytes(array)
    path = tmp_path / "a.idx"
    path.write_bytes(gzip.compress(data) if gz else data)
    out = read_idx(path)
    np.testing.assert_array_equal(out, array)
    assert out.dtype.isnative


@pytest.mark.parametrize(
    "mangle",
    [
        pytest.param(lambda d: b"\x00\x01" + d[2:], id="bad-magic"),
        pytest.param(lambda d: d[:-7], id="truncated-data"),
        pytest.param(lambda d: d + b"\x00", id="trailing-bytes"),
        pytest.param(lambda d: d[:6], id="truncated-header"),
        pytest.param(lambda d: b"", id="empty"),
        pytest.param(lambda d: gzip.compress(d)[:-20], id="truncated-gzip"),
        pytest.param(lambda d: b"\x1f\x8b" + b"garbage" * 10, id="bad-gzip"),
    ],
)
def test_corrupt_idx_raises_clear_error(tmp_path, mangle):
    path = tmp_path / "broken-idx3-ubyte"
    path.write_bytes(mangle(idx_bytes(np.zeros((3, 28, 28), np.uint8))))
    with pytest.raises(DatasetFileError, match="broken-idx3-ubyte"):
        read_idx(path)


def test_parse_idx_is_zero_copy_for_uint8():
    data = idx_bytes(np.ones((2, 3), np.uint8))
    assert parse_idx(data).base is not None


# ----------------------------------------------------------------------------- search


def test_search_dirs_order(env, monkeypatch):
    monkeypatch.setenv("FISHPRUNE_DATA", f"{env / 'e1'}:{env / 'e2'}")
    names = [str(d.relative_to(env)) for d in search_dirs("mnist")]
    assert names == [
        "e1", "e1/mnist", "e2", "e2/mnist",
        "system", "system/mnist", "cache/fishprune", "cache/fishprune/mnist",
    ]  # fmt: skip
    # A directory the user names is the only place searched.
    explicit = [str(d.relative_to(env)) for d in search_dirs("mnist", env / "explicit")]
    assert explicit == ["explicit", "explicit/mnist"]


def test_search_order_data_dir_env_system_cache(env, fake_fmnist, monkeypatch):
    places = {
        "data_dir": env / "explicit",
        "env": env / "from-env",
        "system": env / "system" / "fashion-mnist",
        "cache": env / "cache" / "fishprune" / "fashion-mnist",
    }
    for place in places.values():
        write_idx_set(place, fake_fmnist)
    monkeypatch.setenv("FISHPRUNE_DATA", str(places["env"]))

    def source(**kw):
        return Path(load_dataset("fashion-mnist", download=False, **kw).source)

    assert source(data_dir=places["data_dir"]) == places["data_dir"]
    assert source() == places["env"]
    monkeypatch.delenv("FISHPRUNE_DATA")
    assert source() == places["system"]
    monkeypatch.setattr(files_mod, "SYSTEM_DATA_ROOTS", ())
    assert source() == places["cache"]
    # An explicit directory without the files is refused, never replaced by a later place.
    (env / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError, match="empty"):
        source(data_dir=env / "empty")


def test_subfolder_raw_files_and_contents(env, fake_fmnist):
    write_idx_set(env / "root" / "fashion-mnist", fake_fmnist, gz=False)
    ds = load_dataset("fashion-mnist", env / "root", download=False)
    assert ds.source == str(env / "root" / "fashion-mnist")
    assert ds.train_x.shape == (20, 1, 28, 28) and ds.test_x.shape == (10, 1, 28, 28)
    assert ds.train_x.dtype == torch.uint8 and ds.train_y.dtype == torch.int64
    assert torch.equal(ds.train_x[:, 0, 5, 5].long(), ds.train_y)  # pixel = label
    assert (ds.num_classes, ds.in_channels, ds.image_size) == (10, 1, 28)
    ds.train_x[0, 0, 0, 0] = 1  # writable, no numpy warning


def test_repacked_gzip_accepted(env, fake_fmnist):
    """Like Debian's files: other gzip bytes (header, level), the same verified content."""
    (env / "d").mkdir()
    for stem, data in fake_fmnist.items():
        (env / "d" / f"{stem}.gz").write_bytes(gzip.compress(data, compresslevel=1, mtime=1))
    assert (
        md5((env / "d" / f"{IDX[0]}.gz").read_bytes())
        != registry.CHECKSUMS["fashion-mnist"][f"{IDX[0]}.gz"]
    )
    assert load_dataset("fashion-mnist", env / "d", download=False).train_x.shape[0] == 20


def test_local_checksum_mismatch(env, fake_fmnist):
    write_idx_set(env / "d", fake_idx_set(marker=100))
    with pytest.raises(ChecksumError, match=re.escape("train-images-idx3-ubyte.gz")):
        load_dataset("fashion-mnist", env / "d", download=False)


def test_corrupt_local_file_names_it(env, fake_fmnist):
    write_idx_set(env / "d", fake_fmnist)
    (env / "d" / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b\x08\x00broken")
    with pytest.raises(DatasetFileError, match=re.escape("t10k-labels-idx1-ubyte.gz")):
        load_dataset("fashion-mnist", env / "d", download=False)


def test_not_found_without_download_touches_no_network(env, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("the network was touched")

    monkeypatch.setattr(urllib.request, "urlopen", no_network)
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion-mnist", env / "nowhere", download=False)
    message = str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert "\n" not in message
    needles = ["apt-get install dataset-fashion-mnist", "--data-dir", "FISHPRUNE_DATA"]
    for needle in [*needles, str(env / "nowhere"), "downloading is disabled"]:
        assert needle in message


# ----------------------------------------------------------------------------- downloads


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format, *args):
        pass


@pytest.fixture
def http_root(tmp_path):
    """A local HTTP server on 127.0.0.1 serving ``tmp_path / "www"``; yields (dir, base URL)."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(_QuietHandler, directory=str(root))
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}/"
    server.shutdown()
    server.server_close()


def _cache(env: Path) -> Path:
    return env / "cache" / "fishprune" / "fashion-mnist"


def test_download_success(env, fake_fmnist, http_root, monkeypatch):
    root, url = http_root
    write_idx_set(root, fake_fmnist)
    monkeypatch.setitem(registry.MIRRORS, "fashion-mnist", (url + "missing/", url))
    ds = load_dataset("fashion-mnist")  # the first mirror 404s, the second works
    assert ds.source == str(_cache(env))
    assert sorted(p.name for p in _cache(env).iterdir()) == sorted(f"{s}.gz" for s in IDX)
    for stem in IDX:
        assert (_cache(env) / f"{stem}.gz").read_bytes() == (root / f"{stem}.gz").read_bytes()
    again = load_dataset("fashion-mnist", download=False)  # now found in the cache
    assert torch.equal(again.train_x, ds.train_x)


def test_download_checksum_mismatch_leaves_nothing(env, fake_fmnist, http_root, monkeypatch):
    root, url = http_root
    write_idx_set(root, fake_fmnist)
    monkeypatch.setitem(registry.MIRRORS, "fashion-mnist", (url,))
    bad = dict(registry.CHECKSUMS["fashion-mnist"], **{"train-images-idx3-ubyte.gz": "0" * 32})
    monkeypatch.setitem(registry.CHECKSUMS, "fashion-mnist", bad)
    with pytest.raises(ChecksumError, match=re.escape("train-images-idx3-ubyte.gz")):
        load_dataset("fashion-mnist")
    assert list(_cache(env).iterdir()) == []  # no file, no temporary file


@pytest.mark.parametrize("failure", ["404", "unreachable"])
def test_download_failure_explains(env, fake_fmnist, http_root, monkeypatch, failure):
    _, url = http_root  # the server serves an empty directory: every file is a 404
    if failure == "unreachable":
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            url = f"http://127.0.0.1:{sock.getsockname()[1]}/"  # closed once we leave
    monkeypatch.setitem(registry.MIRRORS, "fashion-mnist", (url,))
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion-mnist")
    message = str(info.value)
    assert "\n" not in message and "apt-get install dataset-fashion-mnist" in message
    assert ("404" in message) if failure == "404" else ("refused" in message.lower())
    assert not _cache(env).exists() or list(_cache(env).iterdir()) == []


# ----------------------------------------------------------------------------- CIFAR


def _cifar_records(n: int, label_bytes: int, seed: int) -> tuple[bytes, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 10, (n, label_bytes), dtype=np.uint8)
    images = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
    data = np.concatenate([labels, images.reshape(n, -1)], axis=1).tobytes()
    return data, images, labels[:, -1]


def _tar_gz(members: dict[str, bytes], extra: list[tarfile.TarInfo] | None = None) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        for info in extra or []:
            archive.addfile(info, io.BytesIO(b"x" * info.size) if info.isfile() else None)
    return buffer.getvalue()


@pytest.fixture
def fake_cifar10(env, monkeypatch):
    """A CIFAR-10 archive of 5×2 train and 3 test records: (dir, members, images, labels)."""
    spec = replace(registry.CIFAR_SPECS["cifar10"], num_train=10, num_test=3)
    monkeypatch.setitem(registry.CIFAR_SPECS, "cifar10", spec)
    members, images, labels = {}, [], []
    for i, name in enumerate([*spec.train_files, *spec.test_files]):
        data, x, y = _cifar_records(3 if name == "test_batch.bin" else 2, 1, seed=i)
        members[f"{spec.folder}/{name}"] = data
        images.append(x)
        labels.append(y)
    evil = tarfile.TarInfo("../evil.bin")
    evil.size = 4
    link = tarfile.TarInfo(f"{spec.folder}/link")
    link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
    archive = _tar_gz(members, extra=[evil, link])
    directory = env / "cifar"
    directory.mkdir()
    (directory / spec.archive).write_bytes(archive)
    monkeypatch.setitem(registry.CHECKSUMS, "cifar10", {spec.archive: md5(archive)})
    return directory, members, np.concatenate(images), np.concatenate(labels)


def test_cifar10_from_archive(fake_cifar10):
    directory, _, images, labels = fake_cifar10
    ds = load_dataset("cifar10", directory, download=False)
    assert ds.train_x.shape == (10, 3, 32, 32) and ds.test_x.shape == (3, 3, 32, 32)
    assert np.array_equal(torch.cat([ds.train_x, ds.test_x]).numpy(), images)
    assert np.array_equal(torch.cat([ds.train_y, ds.test_y]).numpy(), labels)
    assert ds.source.endswith("cifar-10-binary.tar.gz") and ds.in_channels == 3
    assert not (directory.parent / "evil.bin").exists()


def test_cifar10_from_extracted_dir(fake_cifar10):
    directory, members, images, _ = fake_cifar10
    extracted = directory.parent / "extracted"
    for name, data in members.items():
        (extracted / name).parent.mkdir(parents=True, exist_ok=True)
        (extracted / name).write_bytes(data)
    ds = load_dataset("cifar10", extracted, download=False)
    assert np.array_equal(ds.train_x.numpy(), images[:10])


def test_cifar_corrupt_archive_and_bad_checksum(fake_cifar10, monkeypatch):
    directory, *_ = fake_cifar10
    archive = directory / "cifar-10-binary.tar.gz"
    data = archive.read_bytes()
    archive.write_bytes(data[: len(data) // 2])
    monkeypatch.setitem(registry.CHECKSUMS, "cifar10", {archive.name: md5(data[: len(data) // 2])})
    with pytest.raises(DatasetFileError, match=archive.name):
        load_dataset("cifar10", directory, download=False)
    monkeypatch.setitem(registry.CHECKSUMS, "cifar10", {archive.name: md5(data)})
    with pytest.raises(ChecksumError, match=archive.name):
        load_dataset("cifar10", directory, download=False)


def test_cifar100_uses_fine_labels(env, monkeypatch):
    spec = replace(registry.CIFAR_SPECS["cifar100"], num_train=4, num_test=2)
    monkeypatch.setitem(registry.CIFAR_SPECS, "cifar100", spec)
    train, images, fine = _cifar_records(4, 2, seed=0)
    test, _, _ = _cifar_records(2, 2, seed=1)
    directory = env / "c100" / spec.folder
    directory.mkdir(parents=True)
    (directory / "train.bin").write_bytes(train)
    (directory / "test.bin").write_bytes(test[:-1])  # truncated by one byte
    with pytest.raises(DatasetFileError, match=re.escape("test.bin")):
        load_dataset("cifar100", env / "c100", download=False)
    (directory / "test.bin").write_bytes(test)
    ds = load_dataset("cifar100", env / "c100", download=False)
    assert np.array_equal(ds.train_y.numpy(), fine) and ds.num_classes == 100
    assert np.array_equal(ds.train_x.numpy(), images)


# ----------------------------------------------------------------------------- real data


@pytest.mark.skipif(not DEBIAN_FMNIST.is_dir(), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist_debian():
    ds = load_dataset("fashion-mnist", DEBIAN_FMNIST, download=False)  # verifies checksums
    assert ds.train_x.shape == (60000, 1, 28, 28) and ds.test_x.shape == (10000, 1, 28, 28)
    assert ds.num_classes == 10
    assert ds.train_y.bincount().tolist() == [6000] * 10
    assert ds.test_y.bincount().tolist() == [1000] * 10
    histogram = ds.train_x.flatten().bincount(minlength=256).double()  # cheap exact moments
    values = torch.arange(256, dtype=torch.float64) / 255
    mean = (histogram * values).sum() / histogram.sum()
    std = ((histogram * (values - mean) ** 2).sum() / histogram.sum()).sqrt()
    assert mean.item() == pytest.approx(ds.mean[0], abs=1e-4)
    assert std.item() == pytest.approx(ds.std[0], abs=1e-4)


# ----------------------------------------------------------------------------- registry, synthetic


def test_registry():
    assert datasets() == sorted(["cifar10", "cifar100", "fashion-mnist", "mnist", "synthetic",
                                 "imagefolder", "tinyimagenet"])
    assert DEFAULT_DATASET in DATASETS
    with pytest.raises(ValueError, match="cifar10, cifar100, fashion-mnist, imagefolder, mnist"):
        load_dataset("imagenet")


def test_synthetic_deterministic_and_learnable():
    ds = load_dataset("synthetic")
    assert isinstance(ds, DatasetTensors) and ds.source == "generated"
    assert ds.train_x.shape == (1000, 1, 28, 28) and ds.test_x.shape == (200, 1, 28, 28)
    assert ds.train_y.bincount().tolist() == [100] * 10
    again = make_synthetic()
    assert torch.equal(ds.train_x, again.train_x) and torch.equal(ds.test_y, again.test_y)
    assert not torch.equal(ds.train_x, make_synthetic(seed=1).train_x)
    # Nearest class mean (from the training set) classifies the test set.
    x_train, x_test = ds.train_x.flatten(1).float(), ds.test_x.flatten(1).float()
    means = torch.stack([x_train[ds.train_y == c].mean(0) for c in range(10)])
    accuracy = (torch.cdist(x_test, means).argmin(1) == ds.test_y).float().mean()
    assert accuracy > 0.9


def test_synthetic_custom_shape():
    ds = make_synthetic(num_classes=3, image_size=32, in_channels=3, n_train=30, n_test=6)
    assert ds.train_x.shape == (30, 3, 32, 32) and len(ds.mean) == 3 and ds.num_classes == 3


# ----------------------------------------------------------------------------- splits


def _check_split(targets: torch.Tensor, fraction: float, train: torch.Tensor, val: torch.Tensor):
    n = targets.numel()
    assert train.dtype == val.dtype == torch.int64
    assert torch.equal(torch.cat([train, val]).sort().values, torch.arange(n))  # disjoint, cover
    assert torch.equal(train, train.sort().values) and torch.equal(val, val.sort().values)
    for c in targets.unique().tolist():
        n_c = int((targets == c).sum())
        assert int((targets[val] == c).sum()) == int(np.floor(n_c * fraction + 0.5))


def test_stratified_split_properties():
    targets = torch.arange(1000) % 7
    train, val = stratified_split(targets, 0.2, seed=3)
    _check_split(targets, 0.2, train, val)
    again = stratified_split(targets, 0.2, seed=3)
    assert torch.equal(train, again[0]) and torch.equal(val, again[1])
    assert not torch.equal(val, stratified_split(targets, 0.2, seed=4)[1])
    train, val = stratified_split(targets, 0.0)
    assert val.numel() == 0 and torch.equal(train, torch.arange(1000))
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="val_fraction"):
            stratified_split(targets, bad)
    with pytest.raises(ValueError, match="1-D integer"):
        stratified_split(targets.float())


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 5), max_size=120),
    fraction=st.floats(0.0, 0.95),
    seed=st.integers(0, 2**31),
)
def test_stratified_split_hypothesis(labels, fraction, seed):
    targets = torch.tensor(labels, dtype=torch.int64)
    train, val = stratified_split(targets, fraction, seed)
    _check_split(targets, fraction, train, val)


def test_scoring_indices():
    targets = torch.arange(300) % 3
    chosen = scoring_indices(targets, 10, seed=0)
    assert chosen.numel() == 30 and targets[chosen].bincount().tolist() == [10, 10, 10]
    assert torch.equal(chosen, scoring_indices(targets, 10, seed=0))
    assert not torch.equal(chosen, scoring_indices(targets, 10, seed=1))
    subset = torch.arange(0, 300, 2)
    from_subset = scoring_indices(targets, 5, seed=0, indices=subset)
    assert set(from_subset.tolist()) <= set(subset.tolist())
    assert targets[from_subset].bincount().tolist() == [5, 5, 5]
    assert torch.equal(scoring_indices(targets, None, indices=subset.flip(0)), subset)
    with pytest.raises(ValueError, match="class 2 has 4"):
        scoring_indices(torch.tensor([0] * 5 + [1] * 5 + [2] * 4), 5)
    with pytest.raises(ValueError, match=">= 1"):
        scoring_indices(targets, 0)


# ----------------------------------------------------------------------------- batches


def _batches(ds: DatasetTensors, **kw) -> TensorBatches:
    kw = {"batch_size": 64, "shuffle": True, "seed": 0, **kw}
    return TensorBatches(ds.train_x, ds.train_y, mean=ds.mean, std=ds.std, **kw)


@pytest.fixture(scope="module")
def small() -> DatasetTensors:
    return make_synthetic(n_train=300, n_test=10, image_size=12, in_channels=3)


def test_batches_cover_each_sample_once(small):
    batches = _batches(small)
    assert len(batches) == 5  # ceil(300 / 64)
    seen = [x for x, _ in batches]
    assert [x.shape[0] for x in seen] == [64, 64, 64, 64, 44]
    # Recover each sample's identity from its pixels.
    flat = torch.cat(seen).flatten(1)
    reference = _batches(small, shuffle=False, batch_size=300)
    [(ordered, _)] = list(reference)
    matches = torch.cdist(flat, ordered.flatten(1)).argmin(1)
    assert sorted(matches.tolist()) == list(range(300))
    assert len(_batches(small, drop_last=True)) == 4
    assert sum(x.shape[0] for x, _ in _batches(small, drop_last=True)) == 256


def test_batches_targets_follow_inputs(small):
    batches = _batches(small, batch_size=300, shuffle=False)
    [(_, y)] = list(batches)
    assert torch.equal(y, small.train_y) and y.dtype == torch.int64


def test_batches_normalization(small):
    [(x, _)] = list(_batches(small, shuffle=False, batch_size=1000))
    mean = torch.tensor(small.mean).view(1, 3, 1, 1)
    std = torch.tensor(small.std).view(1, 3, 1, 1)
    expected = (small.train_x.float() / 255 - mean) / std
    assert x.dtype == torch.float32
    assert (x - expected).abs().max() < 1e-5
    per_channel = x.transpose(0, 1).flatten(1)
    assert per_channel.mean(1).abs().max() < 1e-4  # the synthetic mean/std are the data's
    assert (per_channel.std(1) - 1).abs().max() < 1e-3


def _targets(batches: TensorBatches) -> list[torch.Tensor]:
    return [y for _, y in batches]


@pytest.mark.parametrize("augment", [False, True])
def test_batches_deterministic_per_epoch(small, augment):
    batches = _batches(small, augment=augment)
    first = [x for x, _ in batches]
    second = [x for x, _ in batches]  # re-iteration: the same batches
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))
    twin = [x for x, _ in _batches(small, augment=augment)]  # same seed, new object
    assert all(torch.equal(a, b) for a, b in zip(first, twin, strict=True))
    batches.set_epoch(1)
    other = [x for x, _ in batches]
    assert not torch.equal(first[0], other[0])
    batches.set_epoch(0)
    assert torch.equal(next(x for x, _ in batches), first[0])
    assert not torch.equal(_targets(_batches(small, seed=1))[0], _targets(batches)[0])


def test_augmentation_shapes_and_effect(small):
    plain = [x for x, _ in _batches(small, augment=False)]
    augmented = [x for x, _ in _batches(small, augment=True)]
    assert [a.shape for a in plain] == [b.shape for b in augmented]
    assert not torch.equal(plain[0], augmented[0])


def test_crop_flip_geometry():
    x = torch.arange(2 * 1 * 4 * 5, dtype=torch.uint8).reshape(2, 1, 4, 5) + 1
    pad = 2
    center = torch.full((2,), pad)
    no, yes = torch.zeros(2, dtype=torch.bool), torch.ones(2, dtype=torch.bool)
    assert torch.equal(crop_flip(x, center, center, no, pad), x)
    assert torch.equal(crop_flip(x, center, center, yes, pad), x.flip(3))
    shifted = crop_flip(x, torch.zeros(2, dtype=torch.long), center, no, pad)  # 2 rows down
    assert torch.equal(shifted[:, :, 2:], x[:, :, :2]) and (shifted[:, :, :2] == 0).all()
    left = crop_flip(x, center, torch.tensor([2 * pad, 0]), no, pad)
    assert torch.equal(left[0, :, :, :3], x[0, :, :, 2:]) and (left[0, :, :, 3:] == 0).all()
    assert torch.equal(left[1, :, :, 2:], x[1, :, :, :3]) and (left[1, :, :, :2] == 0).all()


def test_batches_validation(small):
    with pytest.raises(ValueError, match="uint8"):
        TensorBatches(
            small.train_x.float(), small.train_y, batch_size=4, mean=small.mean, std=small.std
        )
    with pytest.raises(ValueError, match="3 values"):
        TensorBatches(small.train_x, small.train_y, batch_size=4, mean=(0.5,), std=(0.5,))


def test_a_bogus_download_stops_at_the_published_size(env, fake_fmnist, http_root, monkeypatch):
    """Regression: a bogus download was written in full before its checksum rejected it."""
    root, url = http_root
    write_idx_set(root, fake_fmnist)
    (root / "train-images-idx3-ubyte.gz").write_bytes(b"\0" * 3_000_000)  # a bogus mirror
    monkeypatch.setitem(registry.MIRRORS, "fashion-mnist", (url,))
    sizes = dict(registry.SIZES["fashion-mnist"], **{"train-images-idx3-ubyte.gz": 100_000})
    monkeypatch.setitem(registry.SIZES, "fashion-mnist", sizes)
    with pytest.raises(ChecksumError, match="more than the published 100000 bytes"):
        load_dataset("fashion-mnist")
    assert not [p for p in _cache(env).iterdir() if "train-images" in p.name]


def test_killed_downloads_leave_no_part_file_forever(env, fake_fmnist, http_root, monkeypatch):
    """Regression: a killed download left its ``.part`` forever; a live one must survive."""
    import subprocess
    import sys

    from fishprune import atomic

    root, url = http_root
    write_idx_set(root, fake_fmnist)
    monkeypatch.setitem(registry.MIRRORS, "fashion-mnist", (url,))
    cache = _cache(env)
    cache.mkdir(parents=True)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    dest = cache / "train-images-idx3-ubyte.gz"
    live = atomic.temp_name(dest, "part")
    stale = live.with_name(live.name.replace(f"~{os.getpid()}@", f"~{dead}@"))
    for path in (live, stale):
        path.write_bytes(b"half a download")
    load_dataset("fashion-mnist")
    assert live.exists() and not stale.exists()
