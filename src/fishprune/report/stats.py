"""Mean ± std over seeds and the papers' emphasis rule (bold best, underline within its std)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Stat:
    """Mean and sample standard deviation (0 for a single value) of ``n`` values."""

    mean: float
    std: float
    n: int


def stat(values: Iterable[float | None]) -> Stat | None:
    xs = [float(v) for v in values if v is not None and math.isfinite(v)]
    if not xs:
        return None
    return Stat(statistics.fmean(xs), statistics.stdev(xs) if len(xs) > 1 else 0.0, len(xs))


def emphasis(means: Sequence[float | None], stds: Sequence[float], *, higher: bool = True,
             decimals: int = 2) -> list[str]:
    """``"best"`` (bold), ``"within"`` (underline) or ``""`` for each of one row's cells.

    The best is the highest (``higher``) mean after rounding to ``decimals``; every cell
    printed the same is a best too. A cell is "within" when its rounded mean lies within the
    best's rounded std of the best mean (with tied bests, the largest of their stds).
    """
    r = [None if m is None or not math.isfinite(m) else round(m, decimals) for m in means]
    valid = [i for i, m in enumerate(r) if m is not None]
    if not valid:
        return [""] * len(means)
    best = (max if higher else min)(r[i] for i in valid)
    bests = [i for i in valid if r[i] == best]
    tol = max(round(stds[i], decimals) for i in bests) + 1e-9  # float noise of rounding
    return ["" if m is None else "best" if i in bests else "within" if abs(m - best) <= tol
            else "" for i, m in enumerate(r)]
