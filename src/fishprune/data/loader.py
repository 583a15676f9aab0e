"""Mini-batches straight from a resident uint8 tensor: no workers, no per-sample Python.

Images stay uint8 on ``device`` (4x less memory than float32: CIFAR-10's 50k train images take
154 MB, not 614 MB) and each batch is gathered with one ``index_select``, then converted and
normalized in place as ``x * (1 / (255 std)) + (-mean / std)``. Measured on one CPU thread, a
shuffled Fashion-MNIST epoch at batch size 128 costs 0.03-0.04 s this way against 0.045 s when
gathering from a preconverted float32 copy, which itself costs 0.14 s to build (0.7 s for
CIFAR-10) for every loader made. Augmentation also runs on uint8, where the crop's zero padding
is exactly a black pixel as in torchvision's ``RandomCrop(32, padding=4)`` before ``Normalize``
(a CIFAR-10 epoch with augmentation: 0.48 s, against 0.10 s without).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

#: Zero padding (pixels per side) of the random crop.
CROP_PADDING = 4


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator for ``(seed, epoch)``: distinct, well-mixed streams for every pair."""
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative, got {seed} and {epoch}")
    state = np.random.SeedSequence([seed, epoch]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


def crop_flip(x: Tensor, top: Tensor, left: Tensor, flip: Tensor, padding: int) -> Tensor:
    """Batched random crop with zero padding, then horizontal flip.

    Sample ``i`` is zero-padded by ``padding`` on every side, cropped back to H×W at offset
    ``(top[i], left[i])`` in ``[0, 2 padding]``, and mirrored left-right where ``flip[i]``.

    Args:
        x: (N, C, H, W) images, any dtype.
        top, left: (N,) int64 offsets into the padded image.
        flip: (N,) bool.
        padding: pixels of zero padding per side.
    """
    n, c, h, w = x.shape
    wp = w + 2 * padding
    padded = F.pad(x, (padding, padding, padding, padding)).flatten(2)  # (N, C, (H+2p)(W+2p))
    rows = top[:, None] + torch.arange(h, device=x.device)  # (N, H)
    cols = torch.arange(w, device=x.device).expand(n, w)
    cols = torch.where(flip[:, None], w - 1 - cols, cols) + left[:, None]  # (N, W)
    # One gather with flat indices into the padded image: 3x faster than gathering rows
    # then columns (0.6 vs 2.1 ms for 128×3×32×32 uint8 on one CPU thread).
    flat = (rows[:, :, None] * wp + cols[:, None, :]).view(n, 1, h * w)
    return padded.gather(2, flat.expand(n, c, h * w)).view(n, c, h, w)


class BatchSource(abc.ABC):
    """What every batch source of the pipeline shares (resident tensors, streamed image files):
    its settings, the epoch whose order and augmentation it reproduces, its length, and the fused
    normalization ``x·scale + shift`` of uint8 pixels."""

    def _setup(self, n: int, y: Tensor, channels: int, *, batch_size: int,
               mean: Sequence[float], std: Sequence[float], shuffle: bool, seed: int,
               augment: bool, drop_last: bool, device: torch.device | str) -> None:
        if y.dim() != 1 or y.shape[0] != n:
            raise ValueError(f"y must have shape ({n},), got {tuple(y.shape)}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if len(mean) != channels or len(std) != channels or min(std) <= 0:
            raise ValueError(f"mean and std need {channels} values each, std > 0")
        if seed < 0:
            raise ValueError(f"seed must be non-negative, got {seed}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.augment = augment
        self.drop_last = drop_last
        self.epoch = 0
        std_t = torch.tensor(std, dtype=torch.float32).view(1, channels, 1, 1)
        mean_t = torch.tensor(mean, dtype=torch.float32).view(1, channels, 1, 1)
        self._scale = (1.0 / (255.0 * std_t)).to(self.device)
        self._shift = (-mean_t / std_t).to(self.device)

    @property
    @abc.abstractmethod
    def num_samples(self) -> int:
        """Samples per epoch, before ``drop_last``."""

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order and augmentation the next iterations reproduce."""
        if epoch < 0:
            raise ValueError(f"epoch must be non-negative, got {epoch}")
        self.epoch = epoch

    def __len__(self) -> int:
        n, b = self.num_samples, self.batch_size
        return n // b if self.drop_last else math.ceil(n / b)


class TensorBatches(BatchSource):
    """Re-iterable ``(inputs, targets)`` batches over resident uint8 images.

    ``inputs`` are float32 N×C×H×W, ``(x / 255 - mean) / std`` per channel; ``targets`` int64.
    The order (``shuffle``) and the augmentation of an epoch are drawn from a generator seeded
    by ``(seed, epoch)``, so iterating twice gives identical batches, and :meth:`set_epoch`
    gives a different but reproducible epoch. ``len()`` is the number of batches.

    Args:
        x: uint8 images (N, C, H, W); moved to ``device`` once.
        y: int64 labels (N,).
        batch_size: samples per batch (the last one may be smaller unless ``drop_last``).
        shuffle: a fresh permutation every epoch instead of the stored order.
        seed: non-negative seed for shuffling and augmentation.
        mean, std: per-channel statistics on the ``[0, 1]`` scale.
        augment: random crop with ``CROP_PADDING`` zero padding + horizontal flip, per sample.
        drop_last: drop the final incomplete batch.
        device: where the data and the batches live.
    """

    def __init__(
        self,
        x: Tensor,
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
    ) -> None:
        if x.dtype != torch.uint8 or x.dim() != 4:
            raise ValueError(f"x must be uint8 (N, C, H, W), got {x.dtype} {tuple(x.shape)}")
        self._setup(x.shape[0], y, x.shape[1], batch_size=batch_size, mean=mean, std=std,
                    shuffle=shuffle, seed=seed, augment=augment, drop_last=drop_last,
                    device=device)
        self.x = x.to(self.device)
        self.y = y.to(self.device, torch.int64)

    @property
    def num_samples(self) -> int:
        """Samples per epoch, before ``drop_last``."""
        return int(self.x.shape[0])

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n = self.num_samples
        generator = epoch_generator(self.seed, self.epoch)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        order = order.to(self.device)
        if self.augment:
            span = 2 * CROP_PADDING + 1
            top = torch.randint(span, (n,), generator=generator).to(self.device)
            left = torch.randint(span, (n,), generator=generator).to(self.device)
            flip = (torch.rand(n, generator=generator) < 0.5).to(self.device)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            stop = min(start + self.batch_size, n)
            index = order[start:stop]
            images = self.x.index_select(0, index)
            if self.augment:
                images = crop_flip(
                    images, top[start:stop], left[start:stop], flip[start:stop], CROP_PADDING
                )
            inputs = images.to(torch.float32).mul_(self._scale).add_(self._shift)
            yield inputs, self.y.index_select(0, index)
