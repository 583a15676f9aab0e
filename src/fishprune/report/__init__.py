"""``make_report``: paper-style tables (and plots) from a directory's results database.

Reads only the store: ``DIR/results.sqlite``, re-indexed from the run directories first, so
every run is verified (``RunDir.verify``); a corrupt run is refused by name, never silently
dropped (rerun the sweep to recompute it). A database without its run directories (a copy) is
read as it is. Nothing is recomputed.

Per row the best mean is **bold** and every mean within the best method's std is underlined
(the FTS paper's convention); comparisons use the printed, rounded numbers, so printed ties are
ties (all bold), and with one seed only ties are marked.

Markdown is returned; ``report.md``, ``report.tex`` and long-format CSVs (``runs.csv``: one row
per run; ``summary.csv``: group × method × sparsity; ``layers.csv``) go to the report
directory, plots (:mod:`fishprune.report.plots`) to its ``plots/``. When the runs vary
``sanity``, the sanity table (:mod:`fishprune.report.sanity`: paired gaps to each transformed
mask, their significance and a verdict per method) follows the results tables, and its gaps go
to ``sanity.csv``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fishprune import atomic
from fishprune import resultsdb as db
from fishprune.config import ConfigError
from fishprune.report.render import (
    csv_text,
    latex,
    layer_latex,
    layer_markdown,
    markdown,
    summary_rows,
)
from fishprune.report.sanity import sanity_markdown, sanity_rows, sanity_tables
from fishprune.report.tables import Table, build_tables, layer_table

__all__ = ["Table", "build_tables", "make_report"]


def make_report(root: str | Path, *, metric: str = "test_acc", out: str | Path | None = None,
                formats: Sequence[str] = ("md", "tex", "csv"), layer_sparsity: float | None = None,
                plots: bool = True, reindex: bool = False) -> tuple[str, list[Path]]:
    """Write the report files of ``root``; return the Markdown and the paths written."""
    root = Path(root)
    if not root.is_dir():
        raise ConfigError(f"{root} is not a directory")
    if layer_sparsity is not None and not 0 <= layer_sparsity < 1:  # NaN fails too
        raise ConfigError(f"--layer-sparsity must be a sparsity in [0, 1); got {layer_sparsity}")
    conn = db.open_index(root, refresh=True)  # verifies every run directory (reindex: always)
    try:
        runs, everything, layers = db.fetch(conn), db.fetch(conn, None), db.fetch_layers(conn)
    finally:
        conn.close()
    corrupt = [r for r in everything if r["status"] == "corrupt"]
    if corrupt:
        raise ConfigError(f"{len(corrupt)} run(s) in {root} are corrupt, e.g. {corrupt[0]['error']}"
                          "; rerun the sweep (or the run) to recompute them")
    if not runs:
        raise ConfigError(f"{root} holds no finished run (run `fishprune sweep` first)")
    tables = build_tables(runs, metric)
    lts = [lt for t in tables if (lt := layer_table(t, layers, layer_sparsity)) is not None]
    if layer_sparsity is not None and not lts:
        found = sorted({s for t in tables for s in t.sparsities})
        raise ConfigError(f"no run at --layer-sparsity {layer_sparsity:g} (sparsities: "
                          f"{', '.join(f'{s:g}' for s in found)})")
    sts = sanity_tables(tables, metric)
    md = "\n".join([f"# fishprune report: {root}", "",
                    *[markdown(t) for t in tables], *[sanity_markdown(st) for st in sts],
                    *[layer_markdown(lt) for lt in lts]])
    target = Path(out) if out else root / "report"
    target.mkdir(parents=True, exist_ok=True)
    written = []
    if "md" in formats:
        atomic.write_text(target / "report.md", md)
        written.append(target / "report.md")
    if "tex" in formats:
        atomic.write_text(target / "report.tex", "\n".join(
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
        if sts:
            rows = sanity_rows(sts)
            files["sanity.csv"] = (rows, list(dict.fromkeys(k for r in rows for k in r)))
        for name, (rows, cols) in files.items():
            atomic.write_text(target / name, csv_text(rows, cols))
            written.append(target / name)
    if plots:
        from fishprune.report.plots import make_plots

        written += make_plots(root, tables, runs, lts, target / "plots", sparsity=layer_sparsity)
    return md, written
