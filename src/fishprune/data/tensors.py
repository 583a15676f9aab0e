"""The in-memory form of every dataset: whole splits as uint8 image tensors plus int64 labels."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class DatasetTensors:
    """A small image-classification dataset, held whole in memory.

    Images stay uint8 in ``[0, 255]`` (N×C×H×W, 4x smaller than float32); conversion to
    normalized float32 happens per batch in :class:`fishprune.data.TensorBatches` as
    ``(x / 255 - mean) / std``, with ``mean`` and ``std`` per channel on the ``[0, 1]`` scale.

    Attributes:
        train_x: uint8 tensor of shape (N_train, C, H, W).
        train_y: int64 tensor of shape (N_train,), values in ``[0, num_classes)``.
        test_x: uint8 tensor of shape (N_test, C, H, W).
        test_y: int64 tensor of shape (N_test,).
        num_classes: number of classes.
        in_channels: C.
        image_size: H (= W; all datasets here are square).
        mean: per-channel mean of the training pixels on the ``[0, 1]`` scale.
        std: per-channel standard deviation of the training pixels on the ``[0, 1]`` scale.
        name: registry name (``"fashion-mnist"``, ``"cifar10"``...).
        source: where it was read from (a directory or an archive), for provenance;
            ``"generated"`` for synthetic data.
    """

    train_x: Tensor
    train_y: Tensor
    test_x: Tensor
    test_y: Tensor
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str
    source: str = ""

    def __post_init__(self) -> None:
        shape = (self.in_channels, self.image_size, self.image_size)
        splits = (("train", self.train_x, self.train_y), ("test", self.test_x, self.test_y))
        for split, x, y in splits:
            if x.dtype != torch.uint8 or x.dim() != 4 or tuple(x.shape[1:]) != shape:
                raise ValueError(
                    f"{self.name}: {split}_x must be uint8 of shape (N, C, H, W) = (N, {shape[0]}, "
                    f"{shape[1]}, {shape[2]}), got {x.dtype} {tuple(x.shape)}"
                )
            if y.dtype != torch.int64 or y.shape != x.shape[:1]:
                raise ValueError(
                    f"{self.name}: {split}_y must be int64 of shape ({x.shape[0]},), "
                    f"got {y.dtype} {tuple(y.shape)}"
                )
        if len(self.mean) != self.in_channels or len(self.std) != self.in_channels:
            raise ValueError(f"{self.name}: mean and std need one value per channel")

    @property
    def num_train(self) -> int:
        """Number of training samples."""
        return int(self.train_x.shape[0])

    @property
    def num_test(self) -> int:
        """Number of test samples."""
        return int(self.test_x.shape[0])
