"""Image-folder datasets, streamed from disk: ``imagefolder`` (any ``train/<class>/`` tree) and
``tinyimagenet`` (Tiny ImageNet's own layout).

Only the file lists and the labels are held in memory (:class:`ImageFiles`, :class:`FolderData`);
images are decoded with Pillow by the workers of :class:`fishprune.data.ImageBatches` when a
batch needs them, converted to the dataset's channel count (grayscale if the first training
image is, else RGB), resized so the shorter side is ``image_size`` and centre-cropped to
``image_size``² (torchvision's ``Resize(s)`` + ``CenterCrop(s)``).

Splits. ``imagefolder`` needs ``train/<class>/*`` (any depth below the class folder; files with
an image suffix) and ``test/<class>/`` or ``val/<class>/``:

- ``train/`` + ``val/`` + ``test/``: ``val/`` validates, ``test/`` tests.
- ``train/`` + ``test/``: validation is the stratified split of ``train/`` (``val_fraction``).
- ``train/`` + ``val/``: ``val/`` is the *test* set (ImageNet practice: its labelled val split is
  what papers report) and validation is the stratified split of ``train/``; said in
  :attr:`FolderData.notes`.

``tinyimagenet`` (``wnids.txt``, ``train/<wnid>/images/*.JPEG``, ``val/images`` with
``val_annotations.txt``; ``test/`` is unlabelled) tests on its labelled ``val`` split and
validates on the stratified split of ``train``.

Per-channel ``mean`` and ``std`` are measured on up to :data:`STAT_IMAGES` training images spread
evenly over the (sorted) file list, so they depend on the data only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fishprune.data.files import DatasetFileError, DatasetNotFoundError, search_dirs

FOLDER_DATASETS = ("imagefolder", "tinyimagenet")
#: Image size when ``image_size`` is not set (Tiny ImageNet's own).
DEFAULT_IMAGE_SIZE = 64
#: Suffixes (lower case) of the files ``imagefolder`` reads.
IMAGE_SUFFIXES = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff",
                            ".ppm", ".pgm"})
#: Training images that the per-channel mean and std are measured on (at most).
STAT_IMAGES = 512
_GRAY_MODES = frozenset({"1", "L", "LA", "I", "I;16", "F"})


def _pillow():
    try:
        from PIL import Image
    except ImportError:  # a dependency of fishprune (and of matplotlib): only a broken install
        raise DatasetFileError("image folders need Pillow: pip install pillow") from None
    return Image


def decode(path: str, in_channels: int, image_size: int) -> Tensor:
    """One image file as uint8 (C, S, S): converted to L/RGB, shorter side resized to S
    (bilinear, antialiased), centre-cropped."""
    Image = _pillow()
    try:
        with Image.open(path) as img:
            img = img.convert("L" if in_channels == 1 else "RGB")
            w, h = img.size
            scale = image_size / min(w, h)
            size = (max(image_size, round(w * scale)), max(image_size, round(h * scale)))
            if size != (w, h):
                img = img.resize(size, Image.BILINEAR)
            left, top = (size[0] - image_size) // 2, (size[1] - image_size) // 2
            img = img.crop((left, top, left + image_size, top + image_size))
            array = np.asarray(img, dtype=np.uint8)
    except OSError as err:
        raise DatasetFileError(f"cannot decode image {path}: {err}") from None
    if array.ndim == 2:
        array = array[:, :, None]
    return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()


@dataclass(frozen=True)
class ImageFiles:
    """Image files decoded on demand to uint8 (C, S, S); indexable like an image tensor.

    ``files[idx]`` with an index tensor is the subset in that order, ``files.shape`` is
    ``(N, C, S, S)``, :meth:`load` decodes one image.
    """

    paths: tuple[str, ...]
    in_channels: int
    image_size: int

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.paths), self.in_channels, self.image_size, self.image_size))

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: Tensor | Sequence[int] | slice) -> ImageFiles:
        if isinstance(index, slice):
            picked = self.paths[index]
        else:
            rows = index.tolist() if isinstance(index, Tensor) else list(index)
            picked = tuple(self.paths[i] for i in rows)
        return ImageFiles(tuple(picked), self.in_channels, self.image_size)

    def load(self, i: int) -> Tensor:
        return decode(self.paths[i], self.in_channels, self.image_size)


@dataclass(frozen=True)
class FolderData:
    """A streamed image-classification dataset: the interface of
    :class:`fishprune.data.DatasetTensors` with :class:`ImageFiles` in place of image tensors.

    ``val_split``: the fixed (train_idx, val_idx) into ``train_x`` when the dataset brings its
    own validation folder (None: the stratified split). ``notes``: what was used for what.
    """

    train_x: ImageFiles
    train_y: Tensor
    test_x: ImageFiles
    test_y: Tensor
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str
    source: str = ""
    classes: tuple[str, ...] = ()
    val_split: tuple[Tensor, Tensor] | None = None
    notes: tuple[str, ...] = field(default=())

    @property
    def num_train(self) -> int:
        return len(self.train_x)

    @property
    def num_test(self) -> int:
        return len(self.test_x)


def _images_under(directory: Path) -> list[str]:
    return sorted(str(p) for p in directory.rglob("*")
                  if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())


def _class_tree(split_dir: Path, classes: Sequence[str] | None) -> tuple[list[str], list[int],
                                                                          list[str]]:
    """(paths, labels, classes) of ``split_dir/<class>/**``; ``classes`` fixes the label order
    (a folder of another name is an error), None takes the sorted non-empty folders."""
    folders = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    if classes is None:
        classes = [c for c in folders if _images_under(split_dir / c)]
    else:
        unknown = [c for c in folders if c not in classes and _images_under(split_dir / c)]
        if unknown:
            raise DatasetFileError(f"{split_dir}: class folder(s) {', '.join(unknown[:5])} are "
                                   "not classes of train/")
    index = {c: i for i, c in enumerate(classes)}
    paths: list[str] = []
    labels: list[int] = []
    for c in folders:
        if c in index:
            found = _images_under(split_dir / c)
            paths += found
            labels += [index[c]] * len(found)
    if not paths:
        raise DatasetFileError(f"{split_dir} holds no images in class folders "
                               f"(suffixes: {', '.join(sorted(IMAGE_SUFFIXES))})")
    return paths, labels, list(classes)


def _channels(first: str) -> int:
    Image = _pillow()
    try:
        with Image.open(first) as img:
            return 1 if img.mode in _GRAY_MODES else 3
    except OSError as err:
        raise DatasetFileError(f"cannot decode image {first}: {err}") from None


def _stats(files: ImageFiles, workers: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std on the [0, 1] scale of up to STAT_IMAGES evenly spread files."""
    n = len(files)
    picked = files[torch.linspace(0, n - 1, min(n, STAT_IMAGES)).round().long().unique()]
    loader = torch.utils.data.DataLoader(_Decoded(picked), batch_size=64, num_workers=workers)
    total = torch.zeros(files.in_channels, dtype=torch.float64)
    square = torch.zeros_like(total)
    count = 0
    for batch in loader:
        pixels = batch.transpose(0, 1).reshape(files.in_channels, -1).double() / 255.0
        total += pixels.sum(1)
        square += pixels.square().sum(1)
        count += pixels.shape[1]
    mean = total / count
    std = (square / count - mean.square()).clamp_min(0).sqrt().clamp_min(1e-6)
    return tuple(mean.tolist()), tuple(std.tolist())


class _Decoded(torch.utils.data.Dataset):
    def __init__(self, files: ImageFiles) -> None:
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Tensor:
        return self.files.load(i)


def default_workers() -> int:
    """Decoding processes when ``num_workers`` is not set: up to 4, one core left free."""
    return max(0, min(4, (os.cpu_count() or 1) - 1))


def _finish(name: str, root: Path, train: tuple[list[str], list[int]],
            test: tuple[list[str], list[int]], val: tuple[list[str], list[int]] | None,
            classes: Sequence[str], image_size: int, workers: int, notes: list[str]
            ) -> FolderData:
    channels = _channels(train[0][0])
    train_paths, train_labels = list(train[0]), list(train[1])
    split = None
    if val is not None:
        n = len(train_paths)
        train_paths += val[0]
        train_labels += val[1]
        split = (torch.arange(n), torch.arange(n, len(train_paths)))
    train_x = ImageFiles(tuple(train_paths), channels, image_size)
    fit_part = train_x[split[0]] if split is not None else train_x
    mean, std = _stats(fit_part, workers)
    return FolderData(
        train_x=train_x, train_y=torch.tensor(train_labels, dtype=torch.int64),
        test_x=ImageFiles(tuple(test[0]), channels, image_size),
        test_y=torch.tensor(test[1], dtype=torch.int64), num_classes=len(classes),
        in_channels=channels, image_size=image_size, mean=mean, std=std, name=name,
        source=str(root), classes=tuple(classes), val_split=split, notes=tuple(notes))


def load_imagefolder(data_dir: str | os.PathLike[str] | None, image_size: int | None = None,
                     num_workers: int | None = None) -> FolderData:
    """The ``imagefolder`` dataset at ``data_dir`` (see the module docstring for the splits)."""
    if data_dir is None:
        raise DatasetNotFoundError("dataset imagefolder needs --data-dir DIR holding "
                                   "train/<class>/ (and test/<class>/ or val/<class>/) images")
    root = Path(data_dir).expanduser()
    if not (root / "train").is_dir():
        raise DatasetNotFoundError(f"{root} has no train/ folder (imagefolder reads "
                                   "DIR/train/<class>/*.jpg|png, DIR/val/, DIR/test/)")
    size = image_size or DEFAULT_IMAGE_SIZE
    workers = default_workers() if num_workers is None else num_workers
    paths, labels, classes = _class_tree(root / "train", None)
    if len(classes) < 2:
        raise DatasetFileError(f"{root / 'train'} has {len(classes)} class folder(s); "
                               "classification needs at least 2")
    has_val, has_test = (root / "val").is_dir(), (root / "test").is_dir()
    notes: list[str] = []
    val = None
    if has_test:
        test_paths, test_labels, _ = _class_tree(root / "test", classes)
        if has_val:
            val_paths, val_labels, _ = _class_tree(root / "val", classes)
            val = (val_paths, val_labels)
            notes.append("validation: val/; test: test/")
        else:
            notes.append("validation: a stratified split of train/; test: test/")
    elif has_val:
        test_paths, test_labels, _ = _class_tree(root / "val", classes)
        notes.append("no test/ folder: val/ is the test set; validation: a stratified split of "
                     "train/")
    else:
        raise DatasetNotFoundError(f"{root} has train/ but neither test/ nor val/: add a "
                                   "labelled test/<class>/ (or val/<class>/) folder")
    return _finish("imagefolder", root, (paths, labels), (test_paths, test_labels), val,
                   classes, size, workers, notes)


def _tiny_root(data_dir: str | os.PathLike[str] | None) -> Path:
    for candidate in search_dirs("tiny-imagenet-200", data_dir):
        if (candidate / "wnids.txt").is_file():
            return candidate
    where = ", ".join(str(d) for d in search_dirs("tiny-imagenet-200", data_dir)[:4])
    raise DatasetNotFoundError(
        "tinyimagenet: no tiny-imagenet-200 folder (with wnids.txt) found in " + where +
        " ...; download http://cs231n.stanford.edu/tiny-imagenet-200.zip, unzip it and pass "
        "--data-dir")


def load_tinyimagenet(data_dir: str | os.PathLike[str] | None, image_size: int | None = None,
                      num_workers: int | None = None) -> FolderData:
    """Tiny ImageNet (200 classes, 64×64): tested on its labelled val split."""
    root = _tiny_root(data_dir)
    classes = sorted(w.strip() for w in (root / "wnids.txt").read_text().split() if w.strip())
    index = {w: i for i, w in enumerate(classes)}
    paths: list[str] = []
    labels: list[int] = []
    for wnid in classes:
        found = sorted(str(p) for p in (root / "train" / wnid / "images").glob("*")
                       if p.suffix.lower() in IMAGE_SUFFIXES)
        if not found:
            raise DatasetFileError(f"{root / 'train' / wnid / 'images'} holds no images")
        paths += found
        labels += [index[wnid]] * len(found)
    annotations = root / "val" / "val_annotations.txt"
    if not annotations.is_file():
        raise DatasetFileError(f"{annotations} is missing")
    test_paths: list[str] = []
    test_labels: list[int] = []
    for number, line in enumerate(annotations.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in index:
            raise DatasetFileError(f"{annotations}:{number}: expected 'FILE<TAB>WNID...' with a "
                                   f"wnid of wnids.txt; got {line[:60]!r}")
        image = root / "val" / "images" / parts[0]
        if not image.is_file():
            raise DatasetFileError(f"{annotations}:{number}: {image} is missing")
        test_paths.append(str(image))
        test_labels.append(index[parts[1]])
    order = sorted(range(len(test_paths)), key=test_paths.__getitem__)
    test = ([test_paths[i] for i in order], [test_labels[i] for i in order])
    workers = default_workers() if num_workers is None else num_workers
    notes = ["test: the labelled val/ split; validation: a stratified split of train/"]
    return _finish("tinyimagenet", root, (paths, labels), test, None, classes,
                   image_size or DEFAULT_IMAGE_SIZE, workers, notes)
