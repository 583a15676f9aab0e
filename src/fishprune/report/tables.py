"""Results tables from the store's rows: groups of runs, cells by (sparsity, method).

One table per group of runs that share the model, the dataset, the warm-up and every other
setting that varies in the sweep (``score_batch_size``, ``scope``, a criterion option...): rows
are sparsities, columns are criteria in the order of :func:`fishprune.criteria`, a cell is
mean ± std over seeds (sample std; 0 for one seed), in % for accuracies. The dense baseline
(sparsity 0) is a caption line. Per-layer density tables show criterion × layer at one sparsity.
"""

from __future__ import annotations

import re
import statistics
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from fishprune import config as C
from fishprune.criteria import criteria
from fishprune.hashing import digest
from fishprune.report.stats import Stat, emphasis, stat
from fishprune.settings import setting_names

#: Settings that are cells, rows, columns or locations, never table groups.
NOT_GROUPS = ("sparsity", "criterion", "seed", *C.LOCATION_KEYS)
#: Settings named in every table title.
TITLE_KEYS = ("model", "dataset", "warmup_epochs", "bn_warmup")
PERCENT = ("test_acc", "best_val_acc", "density")
LOWER_IS_BETTER = ("test_loss",)
NAMES = {"test_acc": "test accuracy", "best_val_acc": "best validation accuracy",
         "test_loss": "test loss"}


def prune_keys() -> list[str]:
    """The pruning settings and criterion options (a dense run has no meaningful value)."""
    return [n for n, (s, _) in C.flat_fields().items() if s == "prune"] + list(C.option_specs())


@dataclass
class Table:
    """One results table: a group's cells by (sparsity, method), and its dense baseline."""

    settings: dict[str, Any]
    metric: str
    sparsities: list[float] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)
    cells: dict[tuple[float, str], Stat] = field(default_factory=dict)
    dense: list[tuple[str, Stat]] = field(default_factory=list)
    runs: list[dict[str, Any]] = field(default_factory=list)

    @property
    def scale(self) -> float:
        return 100.0 if self.metric in PERCENT else 1.0

    @property
    def decimals(self) -> int:
        return 2 if self.metric in PERCENT else 4

    def title(self) -> str:
        s = self.settings
        warm = [f"warm-up {s.get('warmup_epochs', 0)} epoch(s)"] if s.get("warmup_epochs") else []
        warm += ["BN warm-up"] if s.get("bn_warmup") else []
        rest = [f"{k}={show(v)}" for k, v in s.items() if k not in TITLE_KEYS]
        return " · ".join([str(s.get("model")), str(s.get("dataset")),
                           *(warm or ["no warm-up"]), *rest])

    def slug(self) -> str:
        """A file-name stem: readable (``lenet300-fashion-mnist-warmup1-score-batch-size100``)
        and unique (a hash of every setting)."""
        s = self.settings
        parts = [str(s.get("model")), str(s.get("dataset"))]
        parts += [f"warmup{s['warmup_epochs']}"] if s.get("warmup_epochs") else []
        parts += ["bnwarmup"] if s.get("bn_warmup") else []
        parts += [f"{k}{show(v)}" for k, v in s.items() if k not in TITLE_KEYS]
        short = re.sub(r"[^A-Za-z0-9.]+", "-", "-".join(parts)).strip("-")[:60]
        text = "-".join(f"{show(v)}" for v in s.values())
        return f"{short}-{digest(text, 6)}"

    def text(self, s: Stat | None) -> str:
        if s is None:
            return "—"
        d = self.decimals
        return f"{s.mean * self.scale:.{d}f} ± {s.std * self.scale:.{d}f}"

    def marks(self, sparsity: float) -> list[str]:
        cells = [self.cells.get((sparsity, m)) for m in self.methods]
        return emphasis([c.mean * self.scale if c else None for c in cells],
                        [c.std * self.scale if c else 0.0 for c in cells],
                        higher=self.metric not in LOWER_IS_BETTER, decimals=self.decimals)

    def caption(self) -> str:
        counts = sorted({c.n for c in self.cells.values()})
        n = str(counts[0]) if len(counts) == 1 else f"{counts[0]}–{counts[-1]}"
        unit = " (%)" if self.scale == 100 else ""
        what = "lowest" if self.metric in LOWER_IS_BETTER else "best"
        parts = [f"{NAMES.get(self.metric, self.metric)}{unit}, mean ± std over {n} seed(s); "
                 f"bold: {what} mean per sparsity; underlined: within the best's std."]
        parts += [f"Dense{note}: {self.text(s)} (n={s.n})." for note, s in self.dense]
        return " ".join(parts)


def show(value: Any) -> str:
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(map(str, value)) + "]"
    return f"{value:g}" if isinstance(value, float) else str(value)


def fmt_sparsity(s: float) -> str:
    """0.9 → ``0.90`` (the papers' style), 0.995 → ``0.995``."""
    return f"{s:.2f}" if round(s, 2) == s else f"{s:g}"


def method_order(methods: Iterable[str]) -> list[str]:
    """Criteria in registry order, then any others (a criterion since removed), no dense."""
    present = set(methods)
    known = [c for c in criteria() if c in present]
    return known + sorted(present - set(known) - {"dense"})


def group_keys(runs: list[dict[str, Any]]) -> list[str]:
    """Settings that vary over the pruned runs (besides cells, rows, columns, locations)."""
    keys = [k for k in setting_names() if k not in NOT_GROUPS]
    return [k for k in keys if len({show(r.get(k)) for r in runs}) > 1]


def build_tables(runs: list[dict[str, Any]], metric: str = "test_acc") -> list[Table]:
    """Group finished runs into tables (see the module docstring)."""
    pruned = [r for r in runs if r.get("sparsity")]
    dense = [r for r in runs if not r.get("sparsity")]
    keys = list(dict.fromkeys([*TITLE_KEYS, *group_keys(pruned)]))
    groups: dict[tuple[str, ...], Table] = {}
    for r in pruned:
        key = tuple(show(r.get(k)) for k in keys)
        table = groups.setdefault(key, Table({k: r.get(k) for k in keys}, metric))
        table.runs.append(r)
    for table in groups.values():
        values: dict[tuple[float, str], list[float]] = {}
        for r in table.runs:
            values.setdefault((r["sparsity"], r["method"]), []).append(r.get(metric))
        table.sparsities = sorted({s for s, _ in values})
        table.methods = method_order(m for _, m in values)
        table.cells = {k: s for k, v in values.items() if (s := stat(v)) is not None}
        _attach_dense(table, dense, keys, metric)
    return [groups[k] for k in sorted(groups)]


def _attach_dense(table: Table, dense: list[dict[str, Any]], keys: list[str], metric: str
                  ) -> None:
    """Dense runs whose non-pruning settings match the table's (warm-up settings included)."""
    match = [k for k in keys if k not in prune_keys()]
    found = [r for r in dense if all(show(r.get(k)) == show(table.settings[k]) for k in match)]
    ref = table.runs[0]
    other = [k for k in setting_names() if k not in (*NOT_GROUPS, *prune_keys(), *match)]
    notes: dict[str, list[dict[str, Any]]] = {}
    for r in found:
        diff = [f"{k}={show(r.get(k))}" for k in other if show(r.get(k)) != show(ref.get(k))]
        notes.setdefault(f" ({', '.join(diff)})" if diff else "", []).append(r)
    for note, rs in sorted(notes.items()):
        s = stat(r.get(metric) for r in rs)
        if s is not None:
            table.dense.append((note, s))
            table.runs.extend(rs)


# -- text formats --


@dataclass
class LayerTable:
    """Mean per-layer density (over seeds) by layer × method, at one sparsity."""

    table: Table
    sparsity: float
    layers: list[str]
    methods: list[str]
    density: dict[tuple[str, str], float]
    collapsed: set[tuple[str, str]]

    def cell(self, layer: str, method: str) -> str:
        d = self.density.get((layer, method))
        if d is None:
            return "—"
        return f"{100 * d:.2f}" + ("†" if (layer, method) in self.collapsed else "")


def layer_table(table: Table, layers: dict[str, list[dict[str, Any]]],
                sparsity: float | None = None) -> LayerTable | None:
    """The per-layer density table of ``table`` at ``sparsity`` (default: its highest)."""
    if not table.sparsities:
        return None
    s = max(table.sparsities) if sparsity is None else sparsity
    values: dict[tuple[str, str], list[float]] = {}
    order: dict[str, int] = {}
    collapsed = set()
    for r in table.runs:
        if r["sparsity"] != s:
            continue
        for lay in layers.get(r["run_id"], []):
            order.setdefault(lay["name"], lay["position"])
            values.setdefault((lay["name"], r["method"]), []).append(lay["density"])
            if lay["kept"] == 0:
                collapsed.add((lay["name"], r["method"]))
    if not values:
        return None
    return LayerTable(table, s, sorted(order, key=order.get),
                      method_order(m for _, m in values),
                      {k: statistics.fmean(v) for k, v in values.items()}, collapsed)
