"""Batches of image files decoded by ``DataLoader`` workers: :class:`ImageBatches`, the
streamed twin of :class:`fishprune.data.TensorBatches` (same arguments, same ``set_epoch``,
``num_samples`` and ``len``), and :func:`make_batches`, which picks the right one for the data.

The order and the augmentation of an epoch come from the same ``(seed, epoch)`` generator and
the same draws as in :class:`~fishprune.data.TensorBatches` (a permutation, then per-sample crop
offsets and flips), so a resumed run sees the epoch it would have seen, whatever the number of
workers. Workers only decode (no randomness there); the crop and flip run on the uint8 batch in
the main process, then the batch is normalized on ``device``. The workers start at the first
iteration and stay for the later epochs (``persistent_workers``).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import Tensor

from fishprune.data.folders import ImageFiles, default_workers
from fishprune.data.loader import (
    CROP_PADDING,
    BatchSource,
    TensorBatches,
    crop_flip,
    epoch_generator,
)


class _Labelled(torch.utils.data.Dataset):
    def __init__(self, files: ImageFiles, labels: Tensor) -> None:
        self.files = files
        self.labels = labels

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        return self.files.load(i), self.labels[i]


class _EpochOrder(torch.utils.data.Sampler[int]):
    """The sample order of the current epoch, set before each iteration (the loader and its
    persistent workers live across epochs)."""

    def __init__(self) -> None:
        self.order: list[int] = []

    def __iter__(self) -> Iterator[int]:
        return iter(self.order)

    def __len__(self) -> int:
        return len(self.order)


class ImageBatches(BatchSource):
    """Re-iterable ``(inputs, targets)`` batches over :class:`ImageFiles`, decoded by
    ``num_workers`` processes (0: in this process). See :class:`fishprune.data.TensorBatches`
    for the other arguments; the batches are the same function of ``(seed, epoch)``."""

    def __init__(
        self,
        x: ImageFiles,
        y: Tensor,
        *,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        shuffle: bool = False,
        seed: int = 0,
        augment: bool = False,
        drop_last: bool = False,
        device: torch.device | str = "cpu",
        num_workers: int | None = None,
    ) -> None:
        self._setup(len(x), y, x.in_channels, batch_size=batch_size, mean=mean, std=std,
                    shuffle=shuffle, seed=seed, augment=augment, drop_last=drop_last,
                    device=device)
        self.x = x
        self.y = y.to("cpu", torch.int64)
        self.num_workers = default_workers() if num_workers is None else num_workers
        self._order = _EpochOrder()
        self._loader: torch.utils.data.DataLoader | None = None

    @property
    def num_samples(self) -> int:
        """Samples per epoch, before ``drop_last``."""
        return len(self.x)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = self.num_samples
        generator = epoch_generator(self.seed, self.epoch)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        if self.augment:
            span = 2 * CROP_PADDING + 1
            top = torch.randint(span, (n,), generator=generator)
            left = torch.randint(span, (n,), generator=generator)
            flip = torch.rand(n, generator=generator) < 0.5
        self._order.order = order.tolist()
        if self._loader is None:  # workers start once and serve every epoch
            self._loader = torch.utils.data.DataLoader(
                _Labelled(self.x, self.y), batch_size=self.batch_size, sampler=self._order,
                num_workers=self.num_workers, drop_last=self.drop_last,
                persistent_workers=self.num_workers > 0, pin_memory=self.device.type == "cuda")
        for k, (images, targets) in enumerate(self._loader):
            start, stop = k * self.batch_size, k * self.batch_size + images.shape[0]
            if self.augment:
                images = crop_flip(images, top[start:stop], left[start:stop], flip[start:stop],
                                   CROP_PADDING)
            images = images.to(self.device, non_blocking=True)
            inputs = images.to(torch.float32).mul_(self._scale).add_(self._shift)
            yield inputs, targets.to(self.device, non_blocking=True)


def make_batches(x: Tensor | ImageFiles, y: Tensor, *, num_workers: int | None = None,
                 **kwargs) -> TensorBatches | ImageBatches:
    """:class:`TensorBatches` over a resident uint8 tensor, :class:`ImageBatches` over image
    files (``num_workers`` applies to those only); the other arguments are theirs."""
    if isinstance(x, ImageFiles):
        return ImageBatches(x, y, num_workers=num_workers, **kwargs)
    return TensorBatches(x, y, **kwargs)
