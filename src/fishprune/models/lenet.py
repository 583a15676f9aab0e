"""LeNet-300-100 and LeNet-5-Caffe, the MNIST networks of SNIP (Lee et al. 2019, Table 1).

Both follow LeCun et al. (1998) as used in the pruning literature (Han et al. 2015; SNIP):
LeNet-300-100 is the fully connected 784-300-100-10 network; LeNet-5-Caffe is the Caffe variant
with 20 and 50 5×5 filters (no padding), 2×2 max-pooling and a 500-unit hidden layer.
"""

from __future__ import annotations

from torch import Tensor, nn

from fishprune.models._common import check_input, scale_width


class LeNet300(nn.Module):
    """LeNet-300-100: flatten → fc 300 → ReLU → fc 100 → ReLU → fc ``num_classes``.

    1×28×28 input, 10 classes: 266,610 parameters.
    """

    def __init__(self, in_features: int, num_classes: int, width: float = 1.0) -> None:
        super().__init__()
        hidden1, hidden2 = scale_width(300, width), scale_width(100, width)
        self.fc1 = nn.Linear(in_features, hidden1)
        self.fc2 = nn.Linear(hidden1, hidden2)
        self.fc3 = nn.Linear(hidden2, num_classes)
        self.relu = nn.ReLU()

    def forward(self, x: Tensor) -> Tensor:
        x = x.flatten(1)  # (B, C, H, W) -> (B, C·H·W); reshape also copes with channels_last
        return self.fc3(self.relu(self.fc2(self.relu(self.fc1(x)))))


class LeNet5(nn.Module):
    """LeNet-5-Caffe: conv 20@5×5 → pool → conv 50@5×5 → pool → fc 500 → fc ``num_classes``.

    The flatten size follows the image: 28 px → 50·4·4 = 800, 32 px → 50·5·5 = 1250.
    1×28×28 input, 10 classes: 431,080 parameters.
    """

    def __init__(
        self, in_channels: int, num_classes: int, image_size: int, width: float = 1.0
    ) -> None:
        super().__init__()
        c1, c2, hidden = scale_width(20, width), scale_width(50, width), scale_width(500, width)
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, c1, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(c1, c2, kernel_size=5),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        side = ((image_size - 4) // 2 - 4) // 2  # two valid 5×5 convs, each followed by pool 2
        self.classifier = nn.Sequential(
            nn.Linear(c2 * side * side, hidden),
            nn.ReLU(),
            nn.Linear(hidden, num_classes),
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(self.features(x).flatten(1))


def lenet300(*, in_channels: int, num_classes: int, image_size: int, width: float) -> nn.Module:
    """Build LeNet-300-100 for ``in_channels``×``image_size``² inputs."""
    check_input(in_channels, image_size)
    return LeNet300(in_channels * image_size * image_size, num_classes, width)


def lenet5(*, in_channels: int, num_classes: int, image_size: int, width: float) -> nn.Module:
    """Build LeNet-5-Caffe for ``in_channels``×``image_size``² inputs."""
    check_input(in_channels, image_size)
    return LeNet5(in_channels, num_classes, image_size, width)
