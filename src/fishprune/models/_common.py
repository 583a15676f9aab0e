"""Helpers shared by the model builders: width scaling and input-size checks."""

from __future__ import annotations

import math

SUPPORTED_IMAGE_SIZES = (28, 32)


def scale_width(channels: int, width: float) -> int:
    """Return ``channels`` scaled by the width multiplier, rounded, at least 1."""
    if not math.isfinite(width) or width <= 0:
        raise ValueError(f"width must be a positive finite number, got {width!r}")
    return max(1, round(channels * width))


def check_input(in_channels: int, image_size: int) -> None:
    """Raise ``ValueError`` for a channel count or image size the zoo does not support."""
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if image_size not in SUPPORTED_IMAGE_SIZES:
        raise ValueError(
            f"image_size must be one of {list(SUPPORTED_IMAGE_SIZES)}, got {image_size}"
        )
