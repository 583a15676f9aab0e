"""CIFAR-style residual networks (He et al. 2016, "Deep Residual Learning for Image Recognition").

- ``resnet18``: the CIFAR ResNet-18 used by the FTS paper and most PaI code (kuangliu's
  pytorch-cifar layout): 3×3 stem conv, no max-pool, BasicBlocks [2, 2, 2, 2] with 64-128-256-512
  channels, global average pool, linear classifier. 3×32×32, 10 classes: 11,173,962 parameters.
- ``resnet20``: He et al.'s CIFAR ResNet-20 (Sec. 4.2): 3×3 stem with 16 channels, three stages
  of three BasicBlocks with 16-32-64 channels. Deliberate deviation: shortcuts that change shape
  use a 1×1 conv + BatchNorm projection (option B) instead of option A's zero-padded identity, so
  every shortcut is a standard prunable layer. 3×32×32, 10 classes: 272,474 parameters
  (option A would have 269,722).

Both work for 28- or 32-pixel inputs thanks to the adaptive average pool.
"""

from __future__ import annotations

from torch import Tensor, nn

from fishprune.models._common import check_input, scale_width


class BasicBlock(nn.Module):
    """Two 3×3 conv-BN layers plus shortcut s: relu(bn2(conv2(relu(bn1(conv1 x)))) + s(x))."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.relu = nn.ReLU()
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """Stem conv-BN-ReLU, stages of BasicBlocks (stride 2 from the second stage), pool, ``fc``."""

    def __init__(
        self,
        stage_channels: list[int],
        blocks_per_stage: list[int],
        in_channels: int,
        num_classes: int,
    ) -> None:
        super().__init__()
        channels = stage_channels[0]
        self.conv1 = nn.Conv2d(in_channels, channels, 3, 1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()
        stages: list[nn.Module] = []
        for index, (out, blocks) in enumerate(zip(stage_channels, blocks_per_stage, strict=True)):
            stride = 1 if index == 0 else 2
            layers: list[nn.Module] = []
            for block in range(blocks):
                layers.append(BasicBlock(channels, out, stride if block == 0 else 1))
                channels = out
            stages.append(nn.Sequential(*layers))
        self.layers = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(self.pool(x).flatten(1))


def resnet18(*, in_channels: int, num_classes: int, image_size: int, width: float) -> nn.Module:
    """Build the CIFAR ResNet-18 (BasicBlocks [2, 2, 2, 2], 64-128-256-512 channels)."""
    check_input(in_channels, image_size)
    channels = [scale_width(c, width) for c in (64, 128, 256, 512)]
    return ResNet(channels, [2, 2, 2, 2], in_channels, num_classes)


def resnet20(*, in_channels: int, num_classes: int, image_size: int, width: float) -> nn.Module:
    """Build He et al.'s CIFAR ResNet-20 (3 stages × 3 BasicBlocks, 16-32-64, option B)."""
    check_input(in_channels, image_size)
    channels = [scale_width(c, width) for c in (16, 32, 64)]
    return ResNet(channels, [3, 3, 3], in_channels, num_classes)
