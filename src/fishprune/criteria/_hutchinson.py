"""Options shared by the Hutchinson criteria hd, hp and hts."""

from __future__ import annotations

from dataclasses import dataclass, field

from fishprune.criteria._registry import positive


@dataclass(frozen=True)
class HutchinsonOptions:
    """``probes``: Rademacher probes per batch (10); ``temperature``: logits / T (200).

    Both defaults follow the public code of Gollini Navarrete et al. (arXiv 2502.11450).
    """

    probes: int = field(default=10, metadata={"help": "Hutchinson probes per batch"})
    temperature: float = field(default=200.0, metadata={"help": "logits are divided by T"})

    def validate(self) -> None:
        if self.probes < 1:
            raise ValueError(f"probes must be an integer >= 1, got {self.probes!r}")
        positive(self.temperature, "temperature")
