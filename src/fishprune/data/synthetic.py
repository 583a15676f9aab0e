"""A deterministic, learnable synthetic image dataset for tests and smoke runs.

Each class ``c`` has a smooth prototype image ``p_c`` in ``[0, 1]`` (uniform noise on a 7×7
grid, bilinearly upsampled). A sample of class ``c`` is ``clip(p_c + noise * ε, 0, 1)`` with
``ε ~ N(0, 1)`` per pixel, quantized to uint8. Classes are balanced (``n // num_classes`` or one
more each) and shuffled. With the default ``noise=0.3`` a nearest-class-mean classifier is
nearly perfect, so any network that trains at all learns it within an epoch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fishprune.data.tensors import DatasetTensors

_PROTOTYPE_GRID = 7


def _samples(
    prototypes: torch.Tensor, n: int, noise: float, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    num_classes = prototypes.shape[0]
    labels = (torch.arange(n) % num_classes)[torch.randperm(n, generator=generator)]
    images = prototypes[labels] + noise * torch.randn(
        (n, *prototypes.shape[1:]), generator=generator
    )
    return images.clamp_(0.0, 1.0).mul_(255.0).round_().to(torch.uint8), labels


def make_synthetic(
    *,
    num_classes: int = 10,
    image_size: int = 28,
    in_channels: int = 1,
    n_train: int = 1000,
    n_test: int = 200,
    noise: float = 0.3,
    seed: int = 0,
) -> DatasetTensors:
    """Build the synthetic dataset; the same arguments always give the same tensors.

    ``mean`` and ``std`` are computed from the training images (per channel, ``[0, 1]`` scale).
    """
    if num_classes < 2 or image_size < 1 or in_channels < 1 or n_train < 1 or n_test < 1:
        raise ValueError(
            "make_synthetic needs num_classes >= 2 and positive image_size, in_channels, "
            f"n_train, n_test; got {num_classes}, {image_size}, {in_channels}, {n_train}, {n_test}"
        )
    generator = torch.Generator().manual_seed(seed)
    grid = torch.rand(
        (num_classes, in_channels, _PROTOTYPE_GRID, _PROTOTYPE_GRID), generator=generator
    )
    prototypes = F.interpolate(grid, size=(image_size, image_size), mode="bilinear")
    train_x, train_y = _samples(prototypes, n_train, noise, generator)
    test_x, test_y = _samples(prototypes, n_test, noise, generator)
    pixels = train_x.transpose(0, 1).reshape(in_channels, -1).double() / 255.0
    return DatasetTensors(
        train_x=train_x,
        train_y=train_y,
        test_x=test_x,
        test_y=test_y,
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        mean=tuple(pixels.mean(dim=1).tolist()),
        std=tuple(pixels.std(dim=1).clamp_min(1e-6).tolist()),
        name="synthetic",
        source="generated",
    )
