"""``fishprune report DIR``: paper-style tables (and plots) from the results database.

Reads only ``DIR/results.sqlite``, re-indexing the run directories first when it is missing,
out of date (finished runs added or removed) or with ``--reindex``; nothing is recomputed.

One table per group of runs that share the model, the dataset, the warm-up and every other
setting that varies in the sweep (``score_batch_size``, ``scope``...): rows are sparsities,
columns are criteria in the order of :func:`fishprune.criteria`, a cell is mean ± std over
seeds (sample std; 0 for one seed), in % for accuracies. Per row the best mean is **bold** and
every mean within the best method's std is underlined (the FTS paper's convention);
comparisons use the printed, rounded numbers, so printed ties are ties (all bold), and with
one seed only ties are marked. The dense baseline (sparsity 0) is a caption line. Per-layer
density tables show criterion × layer at one sparsity.

Markdown goes to stdout; ``report.md``, ``report.tex`` and long-format CSVs (``runs.csv``: one
row per run; ``summary.csv``: group × method × sparsity; ``layers.csv``) go to the report
directory, plots (:mod:`fishprune.plots`) to its ``plots/``.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import io as stdio
import math
import re
import statistics
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fishprune import config as C
from fishprune import io
from fishprune import resultsdb as db
from fishprune.criteria import criteria

#: Settings that are cells, rows, columns or locations, never table groups.
NOT_GROUPS = ("sparsity", "criterion", "seed", *C.LOCATION_KEYS)
#: Settings named in every table title.
TITLE_KEYS = ("model", "dataset", "warmup_epochs", "bn_warmup")
PRUNE_KEYS = tuple(f.name for f in dataclasses.fields(C.PruneConfig))
METRICS = ("test_acc", "best_val_acc", "test_loss")
PERCENT = ("test_acc", "best_val_acc", "density")
LOWER_IS_BETTER = ("test_loss",)
NAMES = {"test_acc": "test accuracy", "best_val_acc": "best validation accuracy",
         "test_loss": "test loss"}


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
        rest = [f"{k}={_show(v)}" for k, v in s.items() if k not in TITLE_KEYS]
        return " · ".join([str(s.get("model")), str(s.get("dataset")),
                           *(warm or ["no warm-up"]), *rest])

    def slug(self) -> str:
        """A file-name stem: readable (``lenet300-fashion-mnist-warmup1-score-batch-size100``)
        and unique (a hash of every setting)."""
        s = self.settings
        parts = [str(s.get("model")), str(s.get("dataset"))]
        parts += [f"warmup{s['warmup_epochs']}"] if s.get("warmup_epochs") else []
        parts += ["bnwarmup"] if s.get("bn_warmup") else []
        parts += [f"{k}{_show(v)}" for k, v in s.items() if k not in TITLE_KEYS]
        short = re.sub(r"[^A-Za-z0-9.]+", "-", "-".join(parts)).strip("-")[:60]
        text = "-".join(f"{_show(v)}" for v in s.values())
        return f"{short}-{hashlib.sha256(text.encode()).hexdigest()[:6]}"

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


def _show(value: Any) -> str:
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
    keys = [k for k in C.flat_fields() if k not in NOT_GROUPS]
    return [k for k in keys if len({_show(r.get(k)) for r in runs}) > 1]


def build_tables(runs: list[dict[str, Any]], metric: str = "test_acc") -> list[Table]:
    """Group finished runs into tables (see the module docstring)."""
    pruned = [r for r in runs if r.get("sparsity")]
    dense = [r for r in runs if not r.get("sparsity")]
    keys = list(dict.fromkeys([*TITLE_KEYS, *group_keys(pruned)]))
    groups: dict[tuple[str, ...], Table] = {}
    for r in pruned:
        key = tuple(_show(r.get(k)) for k in keys)
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
    match = [k for k in keys if k not in PRUNE_KEYS]
    found = [r for r in dense if all(_show(r.get(k)) == _show(table.settings[k]) for k in match)]
    ref = table.runs[0]
    other = [k for k in C.flat_fields() if k not in (*NOT_GROUPS, *PRUNE_KEYS, *match)]
    notes: dict[str, list[dict[str, Any]]] = {}
    for r in found:
        diff = [f"{k}={_show(r.get(k))}" for k in other if _show(r.get(k)) != _show(ref.get(k))]
        notes.setdefault(f" ({', '.join(diff)})" if diff else "", []).append(r)
    for note, rs in sorted(notes.items()):
        s = stat(r.get(metric) for r in rs)
        if s is not None:
            table.dense.append((note, s))
            table.runs.extend(rs)


# -- text formats --


def markdown(table: Table) -> str:
    lines = [f"### {table.title()}", "", table.caption(), "",
             "| sparsity | " + " | ".join(table.methods) + " |",
             "|---|" + "---|" * len(table.methods)]
    for s in table.sparsities:
        cells = []
        for m, mark in zip(table.methods, table.marks(s)):
            text = table.text(table.cells.get((s, m)))
            cells.append(f"**{text}**" if mark == "best" else f"<u>{text}</u>"
                         if mark == "within" else text)
        lines.append(f"| {fmt_sparsity(s)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def tex_escape(text: str) -> str:
    return re.sub(r"([&%$#_{}])", r"\\\1", text).replace("·", "$\\cdot$")


def latex(table: Table) -> str:
    head = " & ".join(["Sparsity", *(tex_escape(m) for m in table.methods)])
    lines = ["\\begin{table}[t]", "\\centering",
             f"\\caption{{{tex_escape(table.title())}. {tex_escape(table.caption())}}}",
             f"\\begin{{tabular}}{{l{'c' * len(table.methods)}}}", "\\toprule",
             head + " \\\\", "\\midrule"]
    for s in table.sparsities:
        cells = [fmt_sparsity(s)]
        for m, mark in zip(table.methods, table.marks(s)):
            text = table.text(table.cells.get((s, m))).replace("±", "$\\pm$")
            cells.append(f"\\textbf{{{text}}}" if mark == "best" else f"\\underline{{{text}}}"
                         if mark == "within" else text)
        lines.append(" & ".join(cells) + " \\\\")
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    return "\n".join(lines).replace("±", "$\\pm$") + "\n"


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


def layer_markdown(lt: LayerTable) -> str:
    lines = [f"#### Per-layer density (%) at sparsity {lt.sparsity:g}: {lt.table.title()}", "",
             "Mean over seeds; † the layer kept no weight in at least one seed.", "",
             "| layer | " + " | ".join(lt.methods) + " |", "|---|" + "---|" * len(lt.methods)]
    lines += [f"| {lay} | " + " | ".join(lt.cell(lay, m) for m in lt.methods) + " |"
              for lay in lt.layers]
    return "\n".join(lines) + "\n"


def layer_latex(lt: LayerTable) -> str:
    lines = ["\\begin{table}[t]", "\\centering",
             f"\\caption{{Per-layer density (\\%) at sparsity {lt.sparsity:g}: "
             f"{tex_escape(lt.table.title())}. Mean over seeds; \\dag{{}} collapsed.}}",
             f"\\begin{{tabular}}{{l{'r' * len(lt.methods)}}}", "\\toprule",
             " & ".join(["Layer", *map(tex_escape, lt.methods)]) + " \\\\", "\\midrule"]
    lines += [" & ".join([tex_escape(lay), *(lt.cell(lay, m).replace("†", "\\dag{}")
                                             for m in lt.methods)]) + " \\\\"
              for lay in lt.layers]
    return "\n".join([*lines, "\\bottomrule", "\\end{tabular}", "\\end{table}"]) + "\n"


def _csv(rows: list[dict[str, Any]], columns: list[str]) -> str:
    buf = stdio.StringIO()
    writer = csv.DictWriter(buf, columns, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _show(v) if isinstance(v, (list, tuple)) else v
                         for k, v in row.items()})
    return buf.getvalue()


def summary_rows(tables: list[Table], layer_tables: list[LayerTable]
                 ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Long-format rows: one per (table, method, sparsity) and one per (…, layer)."""
    summary, per_layer = [], []
    for t in tables:
        for (s, m), c in sorted(t.cells.items()):
            summary.append({**t.settings, "method": m, "sparsity": s, "metric": t.metric,
                            "n": c.n, "mean": c.mean, "std": c.std})
        for note, c in t.dense:
            summary.append({**t.settings, "method": "dense" + note, "sparsity": 0.0,
                            "metric": t.metric, "n": c.n, "mean": c.mean, "std": c.std})
    for lt in layer_tables:
        for (lay, m), d in lt.density.items():
            per_layer.append({**lt.table.settings, "method": m, "sparsity": lt.sparsity,
                              "layer": lay, "density": d, "collapsed": (lay, m) in lt.collapsed})
    return summary, per_layer


def make_report(root: str | Path, *, metric: str = "test_acc", out: str | Path | None = None,
                formats: Sequence[str] = ("md", "tex", "csv"), layer_sparsity: float | None = None,
                plots: bool = True, reindex: bool = False) -> tuple[str, list[Path]]:
    """Write the report files of ``root``; return the Markdown and the paths written."""
    root = Path(root)
    if not root.is_dir():
        raise C.ConfigError(f"{root} is not a directory")
    conn = db.open_index(root, refresh=reindex)
    try:
        runs, everything, layers = db.fetch(conn), db.fetch(conn, None), db.fetch_layers(conn)
    finally:
        conn.close()
    if not runs:
        raise C.ConfigError(f"{root} holds no finished run (run `fishprune sweep` first)")
    tables = build_tables(runs, metric)
    lts = [lt for t in tables if (lt := layer_table(t, layers, layer_sparsity)) is not None]
    md = "\n".join([f"# fishprune report: {root}", "",
                    *[markdown(t) for t in tables], *[layer_markdown(lt) for lt in lts]])
    target = Path(out) if out else root / "report"
    target.mkdir(parents=True, exist_ok=True)
    written = []
    if "md" in formats:
        io.atomic_write_text(target / "report.md", md)
        written.append(target / "report.md")
    if "tex" in formats:
        io.atomic_write_text(target / "report.tex", "\n".join(
            [latex(t) for t in tables] + [layer_latex(lt) for lt in lts]))
        written.append(target / "report.tex")
    if "csv" in formats:
        summary, per_layer = summary_rows(tables, lts)
        group = list(dict.fromkeys(k for t in tables for k in t.settings))
        files = {"runs.csv": (everything, list(db.columns())),
                 "summary.csv": (summary, [*group, "method", "sparsity", "metric", "n", "mean",
                                           "std"]),
                 "layers.csv": (per_layer, [*group, "method", "sparsity", "layer", "density",
                                            "collapsed"])}
        for name, (rows, cols) in files.items():
            io.atomic_write_text(target / name, _csv(rows, cols))
            written.append(target / name)
    if plots:
        try:
            from fishprune import plots as P
        except ImportError:
            print("fishprune: plots skipped (pip install 'fishprune[report]' for matplotlib)",
                  file=sys.stderr)
        else:
            written += P.make_plots(root, tables, runs, lts, target / "plots",
                                    sparsity=layer_sparsity)
    return md, written


def cmd_report(args: argparse.Namespace) -> int:
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    unknown = set(formats) - {"md", "tex", "csv"}
    if unknown:
        raise C.ConfigError(f"--formats: unknown format(s) {', '.join(sorted(unknown))} "
                            "(choose from md, tex, csv)")
    md, written = make_report(args.dir, metric=args.metric, out=args.out, formats=formats,
                              layer_sparsity=args.layer_sparsity, plots=not args.no_plots,
                              reindex=args.reindex)
    print(md)
    target = Path(args.out) if args.out else Path(args.dir) / "report"
    print(f"wrote {len(written)} file(s) to {target}", file=sys.stderr)
    return 0


def add_cli(subparsers: Any) -> None:
    """``fishprune report``."""
    p = subparsers.add_parser("report", help="paper-style tables and plots of a sweep")
    p.add_argument("dir", metavar="DIR", help="a sweep (or runs) directory")
    p.add_argument("--metric", choices=METRICS, default="test_acc")
    p.add_argument("--out", help="report directory (default: DIR/report)")
    p.add_argument("--formats", default="md,tex,csv", help="comma-separated: md, tex, csv")
    p.add_argument("--layer-sparsity", type=float,
                   help="sparsity of the per-layer tables and plots (default: the highest)")
    p.add_argument("--no-plots", action="store_true", help="tables only")
    p.add_argument("--reindex", action="store_true",
                   help="rebuild results.sqlite from the run directories first")
    p.set_defaults(func=cmd_report)
