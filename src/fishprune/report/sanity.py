"""The sanity table: does a criterion know *which* weights matter, or only how many per layer?

When a sweep varies ``sanity`` (Frankle et al. 2021, "Pruning neural networks at
initialization: why are we missing the mark?"; Su et al. 2020, "Sanity-checking pruning methods:
random tickets can win the jackpot"), every results table of transformed masks (``shuffle``,
``reinit``, ``invert``, ``random-labels``) is paired with the table of the masks as found
(``sanity = "none"``, every other setting equal), and the report adds:

* per transformation, the gap d = metric(as found) − metric(transformed) for every method and
  sparsity (sign flipped for a loss, so d > 0 always means the mask as found is better), paired
  by seed: a transformed run and its original share the seed, hence the initialization, the
  scoring samples and the data order; mean ± sd of d over the shared seeds;
* whether the gap is beyond the noise: a two-sided paired t-test at 5%,
  |mean d| / (sd(d)/√n) > t(0.975, n − 1) (✓: the mask as found is better; ✗: worse); with 3
  seeds t = 4.303, so a gap under about one seed-to-seed sd is not resolved either way;
* the verdict per method, from the layer-wise shuffle: a criterion *finds which weights matter*
  at a sparsity when its mask beats its own shuffle there. Cells where a run of the mask as
  found has an empty layer (layer collapse: chance accuracy whatever the weights) are not
  judged.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any

from fishprune.report.tables import LOWER_IS_BETTER, Table, fmt_sparsity, method_order

#: t(0.975, df) of Student's t distribution for df = 1…30 (two-sided 5%), standard tables.
T_975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179,
         2.160, 2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064,
         2.060, 2.056, 2.052, 2.048, 2.045, 2.042)


def t_critical(df: int) -> float:
    """t(0.975, df); the normal quantile 1.960 beyond the table (df > 30)."""
    return T_975[df - 1] if df <= len(T_975) else 1.960


@dataclass(frozen=True)
class Gap:
    """A paired gap over ``n`` seeds: mean and sd, and the verdict (+1 as found better, −1
    worse, 0 not resolved); ``collapsed``: the mask as found has an empty layer."""

    mean: float
    sd: float
    n: int
    verdict: int
    collapsed: bool = False

    def text(self, decimals: int) -> str:
        if self.collapsed:
            return "collapsed"
        if self.n < 2:
            return "—"
        mark = {1: " ✓", -1: " ✗", 0: ""}[self.verdict]
        return f"{self.mean:+.{decimals}f} ± {self.sd:.{decimals}f}{mark}"


def paired_gap(found: dict[int, float], other: dict[int, float]) -> Gap:
    """The gap ``found − other`` over the seeds both have, with its paired t-test."""
    seeds = sorted(set(found) & set(other))
    d = [found[s] - other[s] for s in seeds]
    if len(d) < 2:
        return Gap(math.nan, math.nan, len(d), 0)
    mean, sd = statistics.fmean(d), statistics.stdev(d)
    if sd == 0:
        verdict = 0 if mean == 0 else (1 if mean > 0 else -1)
    else:
        t = mean / (sd / math.sqrt(len(d)))
        crit = t_critical(len(d) - 1)
        verdict = 1 if t > crit else -1 if t < -crit else 0
    return Gap(mean, sd, len(d), verdict)


@dataclass
class SanityTable:
    """The gaps of one group of tables: (transformation, sparsity, method) → :class:`Gap`."""

    base: Table
    checks: list[str]
    sparsities: list[float]
    methods: list[str]
    gaps: dict[tuple[str, float, str], Gap]

    def title(self) -> str:
        return self.base.title().replace(" · sanity=none", "")

    def verdict(self, method: str) -> tuple[list[float], int, int, str]:
        """Sparsities judged, wins and losses against the shuffle, and the verdict."""
        judged = [s for s in self.sparsities if (g := self.gaps.get(("shuffle", s, method)))
                  is not None and g.n >= 2 and not g.collapsed]
        verdicts = [self.gaps[("shuffle", s, method)].verdict for s in judged]
        wins, losses = verdicts.count(1), verdicts.count(-1)
        if not judged:
            word = "— (no sparsity to judge)"
        elif wins == len(judged):
            word = "yes: which weights, at every sparsity judged"
        elif wins:
            word = f"partly: which weights at {wins} of {len(judged)} sparsities"
        elif losses:
            word = "no: its shuffle is better (only the layer densities are right)"
        else:
            word = "no: only how many per layer (the shuffle is as good)"
        return judged, wins, losses, word


def _by_seed(table: Table, metric: str, sign: float) -> dict[tuple[float, str], dict[int, float]]:
    out: dict[tuple[float, str], dict[int, float]] = {}
    for r in table.runs:
        value = r.get(metric)
        if r.get("sparsity") and value is not None and math.isfinite(value):
            out.setdefault((r["sparsity"], r["method"]), {})[int(r["seed"])] = (
                sign * value * table.scale)
    return out


def sanity_tables(tables: list[Table], metric: str) -> list[SanityTable]:
    """One :class:`SanityTable` per group whose masks were also transformed (see the module
    docstring); empty when the runs do not vary ``sanity``."""
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    out = []
    for base in tables:
        if base.settings.get("sanity") != "none":
            continue
        rest = {k: v for k, v in base.settings.items() if k != "sanity"}
        others = {t.settings["sanity"]: t for t in tables
                  if t.settings.get("sanity") not in (None, "none")
                  and {k: v for k, v in t.settings.items() if k != "sanity"} == rest}
        if not others:
            continue
        found = _by_seed(base, metric, sign)
        collapsed = {(r["sparsity"], r["method"]) for r in base.runs
                     if r.get("sparsity") and (r.get("collapsed_layers") or 0) > 0}
        gaps = {}
        for check, table in others.items():
            for key, values in _by_seed(table, metric, sign).items():
                if key in found:
                    gap = paired_gap(found[key], values)
                    if key in collapsed:
                        gap = Gap(gap.mean, gap.sd, gap.n, 0, collapsed=True)
                    gaps[(check, *key)] = gap
        if gaps:
            checks = [c for c in ("shuffle", "reinit", "invert", "random-labels") if c in others]
            out.append(SanityTable(base, checks, sorted({k[1] for k in gaps}),
                                   method_order(k[2] for k in gaps), gaps))
    return out


def sanity_markdown(st: SanityTable) -> str:
    d = st.base.decimals
    unit = "points" if st.base.scale == 100 else "units of the metric"
    lines = [f"## Sanity checks: {st.title()}", "",
             f"Gap metric(as found) − metric(transformed) in {unit}, mean ± sd over seeds, "
             "paired by seed (same initialization, scoring samples and data order); ✓ / ✗: the "
             "mask as found is significantly better / worse (two-sided paired t-test, 5%); no "
             "mark: not resolved by the seeds; collapsed: the mask as found has an empty "
             "layer.", ""]
    header = "| method | " + " | ".join(fmt_sparsity(s) for s in st.sparsities) + " |"
    rule = "|---|" + "---:|" * len(st.sparsities)
    for check in st.checks:
        lines += [f"### {check}", "", header, rule]
        for m in st.methods:
            cells = [st.gaps.get((check, s, m)) for s in st.sparsities]
            if any(cells):
                lines.append(f"| {m} | " + " | ".join(
                    g.text(d) if g else "—" for g in cells) + " |")
        lines.append("")
    if "shuffle" in st.checks:
        lines += ["### Verdict: does the method find *which* weights matter?", "",
                  "At each sparsity it can be judged at (no empty layer), does its mask beat "
                  "its own layer-wise shuffle (✓ above)?", "",
                  "| method | sparsities judged | beats its shuffle | shuffle better | verdict |",
                  "|---|---|---:|---:|---|"]
        for m in st.methods:
            judged, wins, losses, word = st.verdict(m)
            shown = ", ".join(fmt_sparsity(s) for s in judged) or "—"
            lines.append(f"| {m} | {shown} | {wins} | {losses} | {word} |")
        lines.append("")
    return "\n".join(lines)


def sanity_rows(sts: list[SanityTable]) -> list[dict[str, Any]]:
    """Long-format rows of every gap (``sanity.csv``)."""
    rows = []
    for st in sts:
        for (check, s, m), g in st.gaps.items():
            rows.append({**{k: v for k, v in st.base.settings.items() if k != "sanity"},
                         "check": check, "method": m, "sparsity": s, "n": g.n,
                         "gap_mean": g.mean, "gap_sd": g.sd, "verdict": g.verdict,
                         "collapsed": int(g.collapsed)})
    return rows
