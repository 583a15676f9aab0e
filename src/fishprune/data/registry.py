"""The dataset registry: name -> loader, with mirrors and published checksums.

Checksums
---------
``CHECKSUMS`` holds the publishers' MD5s of the files as downloaded (the ``.gz`` files for
(Fashion-)MNIST, torchvision's values; the ``*-binary.tar.gz`` archives for CIFAR, from the
CIFAR page). Downloads are checked against them.

Local IDX files are checked by the MD5 of their *uncompressed* content (``CONTENT_MD5``,
the published raw-file values), because repackagers re-wrap the gzip stream: Debian's
``dataset-fashion-mnist`` ships ``.gz`` files whose header lacks the original file name (each is
23-24 bytes shorter, MD5s ``cf8536b0...``, ``10bea18f...``, ``f78720b4...``, ``0d30e22e...``),
yet their content is byte-identical to the official release. This also accepts un-gzipped
files. Extracted CIFAR ``.bin`` files have no published checksums; they are checked by exact
record count only (read from the verified archive where possible).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch

from fishprune.data.files import (
    DatasetFileError,
    DatasetNotFoundError,
    Layout,
    cache_dir,
    download_any,
    locate,
    not_found_message,
    verify_bytes,
    verify_file,
)
from fishprune.data.folders import FolderData, load_imagefolder, load_tinyimagenet
from fishprune.data.parsers import parse_cifar, parse_idx, read_maybe_gzip, read_tar_members
from fishprune.data.synthetic import make_synthetic
from fishprune.data.tensors import DatasetTensors

DataDir = str | os.PathLike[str] | None
Loader = Callable[[DataDir, bool], DatasetTensors]

DEFAULT_DATASET = "fashion-mnist"

MIRRORS: dict[str, tuple[str, ...]] = {
    "fashion-mnist": (
        "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",
        "https://raw.githubusercontent.com/zalandoresearch/fashion-mnist/master/data/fashion/",
    ),
    "mnist": ("https://ossci-datasets.s3.amazonaws.com/mnist/",),
    "cifar10": ("https://www.cs.toronto.edu/~kriz/",),
    "cifar100": ("https://www.cs.toronto.edu/~kriz/",),
}

CHECKSUMS: dict[str, dict[str, str]] = {
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "cifar10": {"cifar-10-binary.tar.gz": "c32a1d4ab5d03f1284b67883e8d87530"},
    "cifar100": {"cifar-100-binary.tar.gz": "03b5dce01913d631647c71ecec9e9cb8"},
}

CONTENT_MD5: dict[str, dict[str, str]] = {
    "fashion-mnist": {
        "train-images-idx3-ubyte": "f4a8712d7a061bf5bd6d2ca38dc4d50a",
        "train-labels-idx1-ubyte": "9018921c3c673c538a1fc5bad174d6f9",
        "t10k-images-idx3-ubyte": "8181f5470baa50b63fa0f6fddb340f0a",
        "t10k-labels-idx1-ubyte": "15d484375f8d13e6eb1aabb0c3f46965",
    },
    "mnist": {
        "train-images-idx3-ubyte": "6bbc9ace898e44ae57da46a324031adb",
        "train-labels-idx1-ubyte": "a25bea736e30d166cdddb491f175f624",
        "t10k-images-idx3-ubyte": "2646ac647ad5339dbf082846283269ea",
        "t10k-labels-idx1-ubyte": "27ae3e4e09519cfbb04c329615203637",
    },
}

#: The published sizes in bytes of the files as downloaded: a download is stopped as soon as it
#: exceeds them (the MD5 decides the rest). Fashion-MNIST's match Debian's repackaged files plus
#: their 23-24-byte gzip file names.
SIZES: dict[str, dict[str, int]] = {
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": 26_421_880,
        "train-labels-idx1-ubyte.gz": 29_515,
        "t10k-images-idx3-ubyte.gz": 4_422_102,
        "t10k-labels-idx1-ubyte.gz": 5_148,
    },
    "mnist": {
        "train-images-idx3-ubyte.gz": 9_912_422,
        "train-labels-idx1-ubyte.gz": 28_881,
        "t10k-images-idx3-ubyte.gz": 1_648_877,
        "t10k-labels-idx1-ubyte.gz": 4_542,
    },
    "cifar10": {"cifar-10-binary.tar.gz": 170_052_171},
    "cifar100": {"cifar-100-binary.tar.gz": 168_513_733},
}

APT_PACKAGES: dict[str, str] = {"fashion-mnist": "dataset-fashion-mnist"}

IDX_FILES = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


@dataclass(frozen=True)
class CifarSpec:
    """Where a CIFAR variant's records live and what they must contain."""

    archive: str
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_bytes: int
    num_classes: int
    num_train: int
    num_test: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


CIFAR_SPECS: dict[str, CifarSpec] = {
    "cifar10": CifarSpec(
        archive="cifar-10-binary.tar.gz",
        folder="cifar-10-batches-bin",
        train_files=tuple(f"data_batch_{i}.bin" for i in range(1, 6)),
        test_files=("test_batch.bin",),
        label_bytes=1,
        num_classes=10,
        num_train=50_000,
        num_test=10_000,
        mean=(0.4914, 0.4822, 0.4465),
        std=(0.2470, 0.2435, 0.2616),
    ),
    "cifar100": CifarSpec(
        archive="cifar-100-binary.tar.gz",
        folder="cifar-100-binary",
        train_files=("train.bin",),
        test_files=("test.bin",),
        label_bytes=2,
        num_classes=100,
        num_train=50_000,
        num_test=10_000,
        mean=(0.5071, 0.4865, 0.4409),
        std=(0.2673, 0.2564, 0.2762),
    ),
}

IDX_STATS: dict[str, tuple[float, float]] = {
    "fashion-mnist": (0.2860, 0.3530),
    "mnist": (0.1307, 0.3081),
}


def _how_to_get(name: str, files: Sequence[str]) -> str:
    mirror = MIRRORS[name][0]
    if len(files) == 1:
        how = f"download {mirror}{files[0]}"
    else:
        how = f"download {', '.join(files)} from {mirror}"
    if name in APT_PACKAGES:
        how = f"`apt-get install {APT_PACKAGES[name]}` (Debian/Ubuntu), or {how}"
    return how


def _fetch(
    name: str,
    layouts: Sequence[Layout],
    downloads: Sequence[str],
    data_dir: DataDir,
    download: bool,
) -> list[Path]:
    """Paths of ``name``'s files: found locally, else downloaded (into ``data_dir`` when one is
    named, else into the cache)."""
    paths, searched = locate(name, layouts, data_dir)
    if paths is not None:
        return paths
    how = _how_to_get(name, downloads)
    if not download:
        raise DatasetNotFoundError(not_found_message(name, searched, how, []))
    target = Path(data_dir).expanduser() if data_dir is not None else cache_dir(name)
    for filename in downloads:
        dest = target / filename
        if dest.is_file():  # verified when it was downloaded; re-checked when read
            continue
        failures = download_any(MIRRORS[name], filename, dest, CHECKSUMS[name][filename],
                                SIZES.get(name, {}).get(filename))
        if failures:
            raise DatasetNotFoundError(not_found_message(name, searched, how, failures))
    return [target / filename for filename in downloads]


def _check_labels(labels: np.ndarray, num_classes: int, count: int, source: object) -> torch.Tensor:
    if labels.ndim != 1 or labels.shape[0] != count:
        raise DatasetFileError(f"{source}: expected {count} labels, got shape {labels.shape}")
    if labels.size and int(labels.max()) >= num_classes:
        raise DatasetFileError(f"{source}: label {int(labels.max())} >= {num_classes} classes")
    return torch.from_numpy(labels.astype(np.int64))


def _load_idx(name: str, data_dir: DataDir, download: bool) -> DatasetTensors:
    """(Fashion-)MNIST: four IDX files, 28×28 grayscale, 10 classes."""
    layouts = [[(f"{f}.gz", f) for f in IDX_FILES]]
    paths = _fetch(name, layouts, [f"{f}.gz" for f in IDX_FILES], data_dir, download)
    arrays = []
    for path, stem in zip(paths, IDX_FILES, strict=True):
        data = read_maybe_gzip(path)
        verify_bytes(path, data, CONTENT_MD5[name][stem], "uncompressed IDX content")
        arrays.append((parse_idx(data, path), path))
    splits = []
    for (images, image_path), (labels, label_path) in (arrays[0:2], arrays[2:4]):
        if images.dtype != np.uint8 or images.ndim != 3 or images.shape[1:] != (28, 28):
            raise DatasetFileError(
                f"{image_path}: expected uint8 N×28×28 images, got {images.dtype} {images.shape}"
            )
        y = _check_labels(labels, 10, images.shape[0], label_path)
        splits.append((torch.from_numpy(images.copy()).unsqueeze(1), y))
    (train_x, train_y), (test_x, test_y) = splits
    mean, std = IDX_STATS[name]
    return DatasetTensors(
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=10,
        in_channels=1,
        image_size=28,
        mean=(mean,),
        std=(std,),
        name=name,
        source=str(paths[0].parent),
    )


def _load_cifar(name: str, data_dir: DataDir, download: bool) -> DatasetTensors:
    """CIFAR-10/100 binary version, from the archive or from extracted ``.bin`` files."""
    spec = CIFAR_SPECS[name]
    members = [*spec.train_files, *spec.test_files]
    layouts = [
        [(spec.archive,)],
        [(f"{spec.folder}/{m}",) for m in members],
        [(m,) for m in members],
    ]
    paths = _fetch(name, layouts, [spec.archive], data_dir, download)
    if len(paths) == 1:
        archive = paths[0]
        verify_file(archive, CHECKSUMS[name][spec.archive])
        blobs = read_tar_members(archive, [f"{spec.folder}/{m}" for m in members])
        sources: list[tuple[bytes, str]] = [
            (blobs[f"{spec.folder}/{m}"], f"{archive}:{spec.folder}/{m}") for m in members
        ]
    else:
        try:
            sources = [(p.read_bytes(), str(p)) for p in paths]
        except OSError as error:
            raise DatasetFileError(f"cannot read {name} files: {error}") from error
    n_train = len(spec.train_files)
    splits = []
    for part, count in ((sources[:n_train], spec.num_train), (sources[n_train:], spec.num_test)):
        parsed = [parse_cifar(data, spec.label_bytes, where) for data, where in part]
        images = np.concatenate([x for x, _ in parsed])  # a writable copy
        labels = np.concatenate([y for _, y in parsed])
        where = ", ".join(w for _, w in part)
        if images.shape[0] != count:
            raise DatasetFileError(f"{where}: expected {count} records, got {images.shape[0]}")
        y = _check_labels(labels, spec.num_classes, count, where)
        splits.append((torch.from_numpy(images), y))
    (train_x, train_y), (test_x, test_y) = splits
    return DatasetTensors(
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=spec.num_classes,
        in_channels=3,
        image_size=32,
        mean=spec.mean,
        std=spec.std,
        name=name,
        source=str(paths[0] if len(paths) == 1 else paths[0].parent),
    )


def _load_synthetic(data_dir: DataDir, download: bool) -> DatasetTensors:
    return make_synthetic()


DATASETS: dict[str, Loader] = {
    "fashion-mnist": partial(_load_idx, "fashion-mnist"),
    "mnist": partial(_load_idx, "mnist"),
    "cifar10": partial(_load_cifar, "cifar10"),
    "cifar100": partial(_load_cifar, "cifar100"),
    "synthetic": _load_synthetic,
}


#: Datasets streamed from image files (:mod:`fishprune.data.folders`), never downloaded.
FOLDER_LOADERS: dict[str, Callable[..., FolderData]] = {
    "imagefolder": load_imagefolder,
    "tinyimagenet": load_tinyimagenet,
}


def datasets() -> list[str]:
    """Registered dataset names, sorted."""
    return sorted([*DATASETS, *FOLDER_LOADERS])


def load_dataset(name: str, data_dir: DataDir = None, *, download: bool = True,
                 image_size: int | None = None, num_workers: int | None = None
                 ) -> DatasetTensors | FolderData:
    """Load dataset ``name`` whole into memory (see :mod:`fishprune.data.files` for the search),
    or, for an image folder, its file list (``image_size`` and ``num_workers`` apply to those
    only; see :mod:`fishprune.data.folders`).

    Raises:
        ValueError: unknown ``name``.
        DatasetNotFoundError: the files are nowhere and could not be downloaded.
        DatasetFileError: a file is corrupt or fails its checksum (ChecksumError).
    """
    if name in FOLDER_LOADERS:
        return FOLDER_LOADERS[name](data_dir, image_size, num_workers)
    if name not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of: {', '.join(datasets())}")
    return DATASETS[name](data_dir, download)
