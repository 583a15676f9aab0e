"""CIFAR-style VGG with BatchNorm (Simonyan & Zisserman 2015), as used in pruning at init.

Layout follows the CIFAR VGG of open_lth / SynFlow (``lottery_vgg``) and GraSP: the standard
configurations with 3×3 convs (pad 1) → BatchNorm → ReLU, max-pooling after the first four
stages only, then a 2×2 average pool and a single ``Linear(512, num_classes)`` classifier.

Deliberate change for 28-pixel inputs: the final average pool is ``AdaptiveAvgPool2d(1)``
instead of ``AvgPool2d(2)``. At 32 px the last stage is 2×2 and both pools are identical; at
28 px the four max-pools give 28 → 14 → 7 → 3, and the adaptive pool averages the 3×3 map.
The parameter count therefore does not depend on the image size.

Parameters (3×32×32, 10 classes, width 1): vgg11 9,231,114; vgg16 14,728,266;
vgg19 20,040,522.
"""

from __future__ import annotations

from torch import Tensor, nn

from fishprune.models._common import check_input, scale_width

POOL = "M"
CONFIGS: dict[str, list[int | str]] = {
    "vgg11": [64, POOL, 128, POOL, 256, 256, POOL, 512, 512, POOL, 512, 512],
    "vgg16": [64, 64, POOL, 128, 128, POOL, 256, 256, 256, POOL, 512, 512, 512, POOL,
              512, 512, 512],
    "vgg19": [64, 64, POOL, 128, 128, POOL, 256, 256, 256, 256, POOL, 512, 512, 512, 512, POOL,
              512, 512, 512, 512],
}  # fmt: skip


class VGG(nn.Module):
    """VGG feature extractor (``features``), global average pool and one linear ``classifier``."""

    def __init__(
        self, config: list[int | str], in_channels: int, num_classes: int, width: float = 1.0
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        channels = in_channels
        for spec in config:
            if spec == POOL:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            out = scale_width(int(spec), width)
            layers += [
                nn.Conv2d(channels, out, kernel_size=3, padding=1),
                nn.BatchNorm2d(out),
                nn.ReLU(),
            ]
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(self.features(x)).flatten(1))


def _vgg(name: str, in_channels: int, num_classes: int, image_size: int, width: float) -> VGG:
    check_input(in_channels, image_size)
    return VGG(CONFIGS[name], in_channels, num_classes, width)


def vgg11(*, in_channels: int, num_classes: int, image_size: int, width: float) -> nn.Module:
    """Build VGG-11 with BatchNorm (configuration A)."""
    return _vgg("vgg11", in_channels, num_classes, image_size, width)


def vgg16(*, in_channels: int, num_classes: int, image_size: int, width: float) -> nn.Module:
    """Build VGG-16 with BatchNorm (configuration D)."""
    return _vgg("vgg16", in_channels, num_classes, image_size, width)


def vgg19(*, in_channels: int, num_classes: int, image_size: int, width: float) -> nn.Module:
    """Build VGG-19 with BatchNorm (configuration E)."""
    return _vgg("vgg19", in_channels, num_classes, image_size, width)
