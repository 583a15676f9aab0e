"""Options shared by the criteria built on the gradient moments ḡ and F̂."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class MomentOptions:
    """``per_sample``: every sample is its own batch (eq. 8; the authors' setting), computed
    exactly without one backward pass per sample. Default: the caller's batches (eq. 16)."""

    per_sample: bool = field(default=False, metadata={
        "help": "per-sample empirical Fisher: every sample its own batch (eq. 8)"})
