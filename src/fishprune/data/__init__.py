"""Datasets as whole in-memory tensors, their splits, and fast batch iteration.

from fishprune.data import load_dataset, stratified_split, TensorBatches

ds = load_dataset("fashion-mnist")            # DatasetTensors, uint8 images
train_idx, val_idx = stratified_split(ds.train_y, val_fraction=0.1, seed=0)
batches = TensorBatches(ds.train_x[train_idx], ds.train_y[train_idx], batch_size=128,
                        shuffle=True, seed=0, mean=ds.mean, std=ds.std)

Image folders (``imagefolder``, ``tinyimagenet``) are streamed instead: ``load_dataset`` gives a
:class:`FolderData` whose ``train_x``/``test_x`` are :class:`ImageFiles`, and
``make_batches`` gives :class:`ImageBatches` over them (``TensorBatches`` over tensors).
"""

from fishprune.data.files import (
    DATA_ENV_VAR,
    SYSTEM_DATA_ROOTS,
    ChecksumError,
    DatasetFileError,
    DatasetNotFoundError,
    cache_root,
    search_dirs,
)
from fishprune.data.folders import FOLDER_DATASETS, FolderData, ImageFiles
from fishprune.data.loader import TensorBatches, crop_flip
from fishprune.data.parsers import parse_cifar, parse_idx, read_idx
from fishprune.data.registry import (
    CHECKSUMS,
    DATASETS,
    DEFAULT_DATASET,
    MIRRORS,
    datasets,
    load_dataset,
)
from fishprune.data.split import scoring_indices, stratified_split
from fishprune.data.streamed import ImageBatches, make_batches
from fishprune.data.synthetic import make_synthetic
from fishprune.data.tensors import DatasetTensors

__all__ = [
    "CHECKSUMS",
    "DATASETS",
    "DATA_ENV_VAR",
    "DEFAULT_DATASET",
    "FOLDER_DATASETS",
    "MIRRORS",
    "SYSTEM_DATA_ROOTS",
    "ChecksumError",
    "DatasetFileError",
    "DatasetNotFoundError",
    "DatasetTensors",
    "FolderData",
    "ImageBatches",
    "ImageFiles",
    "TensorBatches",
    "cache_root",
    "crop_flip",
    "datasets",
    "load_dataset",
    "make_batches",
    "make_synthetic",
    "parse_cifar",
    "parse_idx",
    "read_idx",
    "scoring_indices",
    "search_dirs",
    "stratified_split",
]
