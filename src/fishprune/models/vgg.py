"""CIFAR-style VGG with BatchNorm (Simonyan & Zisserman 2015), as used in pruning at init.

Layout follows the CIFAR VGG of open_lth / SynFlow (``lottery_vgg``) and GraSP: the standard
configurations with 3×3 convs (pad 1) → BatchNorm → ReLU, max-pooling after the first four
stages only, then a 2×2 average pool and a single ``Linear(512, num_classes)`` classifier.

28-pixel inputs are zero-padded to 32 × 32 (2 pixels a side) before the first conv, so the
geometry is exactly the CIFAR one: 32 → 16 → 8 → 4 → 2, the last stage on 2×2 maps. Without
it the fourth max-pool leaves 1×1 maps (28 → 14 → 7 → 3 → 1) on which 8 of the 9 taps of every
last-stage kernel see only padding, get zero gradient, and score 0 for every data-dependent
criterion. The final pool is ``AdaptiveAvgPool2d(1)`` (identical to ``AvgPool2d(2)`` here).
The parameter count therefore does not depend on the image size.

Parameters (3×32×32, 10 classes, width 1): vgg11 9,231,114; vgg16 14,728,266;
vgg19 20,040,522.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn import functional as F

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
        self,
        config: list[int | str],
        in_channels: int,
        num_classes: int,
        width: float = 1.0,
        image_size: int = 32,
    ) -> None:
        super().__init__()
        self.input_padding = (32 - image_size) // 2
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
        if self.input_padding:
            x = F.pad(x, [self.input_padding] * 4)
        return self.classifier(self.pool(self.features(x)).flatten(1))


def _vgg(name: str, in_channels: int, num_classes: int, image_size: int, width: float) -> VGG:
    check_input(in_channels, image_size)
    return VGG(CONFIGS[name], in_channels, num_classes, width, image_size)


def vgg11(*, in_channels: int, num_classes: int, image_size: int, width: float) -> nn.Module:
    """Build VGG-11 with BatchNorm (configuration A)."""
    return _vgg("vgg11", in_channels, num_classes, image_size, width)


def vgg16(*, in_channels: int, num_classes: int, image_size: int, width: float) -> nn.Module:
    """Build VGG-16 with BatchNorm (configuration D)."""
    return _vgg("vgg16", in_channels, num_classes, image_size, width)


def vgg19(*, in_channels: int, num_classes: int, image_size: int, width: float) -> nn.Module:
    """Build VGG-19 with BatchNorm (configuration E)."""
    return _vgg("vgg19", in_channels, num_classes, image_size, width)
