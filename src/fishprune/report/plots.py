"""The papers' figures from a results database (matplotlib, Agg; PNG + PDF, written atomically).

* accuracy vs sparsity per criterion, mean ± std bands, the dense baseline as a band; the x
  axis is the density 1 − sparsity on a log scale, reversed and labelled by sparsity, so
  0.8 … 0.995 are evenly readable (FTS paper, Fig. 3 style);
* per-layer density per criterion at one sparsity (layer collapse at a glance);
* the weights each criterion keeps against |w| (FTS paper, Fig. 1 / A2): the histogram of |w|
  of every prunable weight at scoring time, the kept ones highlighted, and magnitude pruning's
  threshold. The weights come from the pipeline's cache ``<dir>/_cache`` (the init, or the
  warm-up; :mod:`fishprune.cachekeys`), the masks from the run directories; nothing is
  recomputed, and the figure is skipped with a note when the cached weights are gone;
* accuracy vs scoring batch size (Fig. 2 / A1) when the runs vary ``score_batch_size``;
* ``fishprune analyze``'s per-layer density against the global sparsity (layer collapse).
"""

from __future__ import annotations

import dataclasses
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib
from matplotlib.figure import Figure  # no pyplot: Agg renders, no global backend is touched

from fishprune import atomic, cachekeys
from fishprune import tensorfiles as tf
from fishprune.config import ConfigError
from fishprune.criteria import criteria
from fishprune.report.tables import LayerTable, Table, fmt_sparsity
from fishprune.rundir import RunDir, RunDirError

if TYPE_CHECKING:
    from fishprune.analyze import Analysis


def color(method: str) -> Any:
    """One fixed colour per criterion across every figure."""
    if method == "dense":
        return "black"
    names = criteria()
    i = names.index(method) if method in names else len(names)
    return matplotlib.colormaps["tab20"]((2 * i) % 20 + (2 * i) // 20 % 2)  # dark ones first


def save(fig: Figure, stem: Path) -> list[Path]:
    """``stem.png`` and ``stem.pdf``, each through an atomic temporary file."""
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in ("png", "pdf"):
        path = stem.with_name(f"{stem.name}.{fmt}")
        with atomic.replacing(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=150)
        paths.append(path)
    return paths


def _density_axis(ax: Any, sparsities: Sequence[float]) -> None:
    ax.set_xscale("log")
    ax.invert_xaxis()
    ticks = [1 - s for s in sparsities]
    ax.set_xticks(ticks, [fmt_sparsity(s) for s in sparsities])
    ax.minorticks_off()
    ax.set_xlabel("sparsity (log scale of the density 1 − sparsity)")


def accuracy_vs_sparsity(table: Table, stem: Path) -> list[Path]:
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.subplots()
    scale = table.scale
    for m in table.methods:
        pts = [(s, c) for s in table.sparsities if (c := table.cells.get((s, m)))]
        x = [1 - s for s, _ in pts]
        mean = [c.mean * scale for _, c in pts]
        std = [c.std * scale for _, c in pts]
        ax.plot(x, mean, "o-", color=color(m), label=m, lw=2.2 if m in ("fts", "hts") else 1.3,
                ms=3.5)
        ax.fill_between(x, [a - b for a, b in zip(mean, std)], [a + b for a, b in zip(mean, std)],
                        color=color(m), alpha=0.18, lw=0)
    for note, s in table.dense:
        ax.axhline(s.mean * scale, color="black", ls="--", lw=1, label=f"dense{note}")
        ax.axhspan((s.mean - s.std) * scale, (s.mean + s.std) * scale, color="black", alpha=0.08)
    _density_axis(ax, table.sparsities)
    ax.set_ylabel(f"{table.metric}{' (%)' if scale == 100 else ''}")
    ax.set_title(table.title(), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return save(fig, stem)


def layer_density(lt: LayerTable, stem: Path) -> list[Path]:
    fig = Figure(figsize=(max(6.4, 0.35 * len(lt.layers) + 2), 4.2), layout="constrained")
    ax = fig.subplots()
    x = range(len(lt.layers))
    for m in lt.methods:
        y = [100 * lt.density.get((lay, m), float("nan")) for lay in lt.layers]
        ax.plot(x, [v if v > 0 else float("nan") for v in y], "o-", color=color(m), label=m,
                ms=3.5, lw=1.2)
        for i, v in enumerate(y):
            if v == 0:  # a collapsed layer cannot be drawn on a log axis: mark it at the bottom
                ax.plot(i, 0, "x", color=color(m), ms=7, mew=2, transform=ax.get_xaxis_transform())
    ax.axhline(100 * (1 - lt.sparsity), color="gray", ls=":", lw=1, label="overall density")
    ax.set_yscale("log")
    ax.set_xticks(list(x), lt.layers, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("kept weights per layer (%)")
    ax.set_title(f"sparsity {lt.sparsity:g}: {lt.table.title()}  (× = collapsed)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return save(fig, stem)


def scoring_weights(root: Path, run: dict[str, Any]) -> dict[str, Any] | None:
    """The weights a run scored, from the pipeline's cache (None: not cached any more)."""
    cfg = dataclasses.replace(RunDir(root / run["run_dir"]).read_config(), out=str(root))
    device_type = str(run.get("device_used") or "cpu").split(":")[0]
    path = cachekeys.scored_weights_path(cfg, device_type)
    return tf.load_state(path) if path.exists() else None


def kept_vs_magnitude(root: Path, table: Table, sparsity: float, stem: Path) -> list[Path]:
    """Histogram of |w| (all prunable weights), the kept ones per criterion, and the
    magnitude threshold; one panel per criterion, first seed of the table."""
    import torch

    runs = [r for r in table.runs if r.get("sparsity") == sparsity and r.get("sanity") == "none"]
    if not runs:
        return []
    seed = min(r["seed"] for r in runs)
    runs = {r["method"]: r for r in sorted(runs, key=lambda r: r["run_id"]) if r["seed"] == seed}
    methods = [m for m in table.methods if m in runs]
    weights = scoring_weights(root, runs[methods[0]])
    if weights is None:
        print(f"fishprune: kept-vs-|w| plot skipped: the scored weights of {table.title()} are "
              f"no longer cached in {root / cachekeys.CACHE}", file=sys.stderr)
        return []
    cols = min(4, len(methods))
    rows = -(-len(methods) // cols)
    fig = Figure(figsize=(3.2 * cols, 2.6 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, m in zip(axes, methods):
        masks = tf.load_masks(RunDir(root / runs[m]["run_dir"]).masks)
        mag = torch.cat([weights[n].abs().flatten().double() for n in masks])
        kept = torch.cat([masks[n].flatten() for n in masks])
        k = int(kept.sum())
        threshold = float(torch.topk(mag, k).values.min()) if k else float("inf")
        bins = torch.linspace(0, float(mag.max()), 60).numpy()
        ax.hist(mag.numpy(), bins=bins, color="0.75", label="all")
        ax.hist(mag[kept].numpy(), bins=bins, color=color(m), alpha=0.85, label="kept")
        ax.axvline(threshold, color="black", ls="--", lw=1, label="magnitude threshold")
        overlap = float((mag[kept] >= threshold).double().mean()) if k else 0.0
        ax.set_yscale("log")
        ax.set_title(f"{m}: {100 * overlap:.0f}% of kept above threshold", fontsize=8)
        ax.set_xlabel("|w|", fontsize=8)
        ax.tick_params(labelsize=7)
    for ax in axes[len(methods):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=6)
    fig.suptitle(f"kept weights vs |w| at sparsity {sparsity:g}, seed {seed}: {table.title()}",
                 fontsize=9)
    return save(fig, stem)


def accuracy_vs_batch_size(tables: list[Table], stem: Path) -> list[Path]:
    """Mean ± std against ``score_batch_size``, one line per (criterion, sparsity); ``tables``
    differ only in the scoring batch size."""
    points: dict[tuple[str, float], list[tuple[int, Any]]] = {}
    for t in tables:
        for (s, m), c in t.cells.items():
            points.setdefault((m, s), []).append((t.settings["score_batch_size"], c))
    fig = Figure(figsize=(6.4, 4.2), layout="constrained")
    ax = fig.subplots()
    styles = ["-", "--", ":", "-."]
    sparsities = sorted({s for _, s in points})
    t0 = tables[0]
    for (m, s), pts in sorted(points.items(), key=lambda kv: (t0.methods.index(kv[0][0])
                                                               if kv[0][0] in t0.methods else 99,
                                                               kv[0][1])):
        pts.sort(key=lambda p: p[0])
        x = [b for b, _ in pts]
        mean = [c.mean * t0.scale for _, c in pts]
        std = [c.std * t0.scale for _, c in pts]
        ax.errorbar(x, mean, yerr=std, fmt="o", ls=styles[sparsities.index(s) % 4],
                    color=color(m), capsize=2, ms=3.5, lw=1.2, label=f"{m} @ {s:g}")
    ax.set_xscale("log")
    sizes = sorted({t.settings["score_batch_size"] for t in tables})
    ax.set_xticks(sizes, [str(b) for b in sizes])
    ax.minorticks_off()
    ax.set_xlabel("scoring batch size")
    ax.set_ylabel(f"{t0.metric}{' (%)' if t0.scale == 100 else ''}")
    ax.set_title(_without_batch_size(t0).title(), fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return save(fig, stem)


def _without_batch_size(table: Table) -> Table:
    rest = {k: v for k, v in table.settings.items() if k != "score_batch_size"}
    return Table(rest, table.metric)


def make_plots(root: str | Path, tables: list[Table], runs: list[dict[str, Any]],
               layer_tables: list[LayerTable], out: str | Path, *,
               sparsity: float | None = None) -> list[Path]:
    """Every figure that applies to the runs found; returns the files written."""
    root, out = Path(root), Path(out)
    written: list[Path] = []
    for t in tables:
        written += accuracy_vs_sparsity(t, out / f"acc-vs-sparsity-{t.slug()}")
        s = max(t.sparsities) if sparsity is None else sparsity
        try:
            written += kept_vs_magnitude(root, t, s, out / f"kept-vs-magnitude-{t.slug()}")
        except (OSError, ValueError, KeyError, ConfigError, RunDirError) as err:
            print(f"fishprune: kept-vs-|w| plot skipped for {t.title()}: {err}", file=sys.stderr)
    for lt in layer_tables:
        written += layer_density(lt, out / f"layer-density-{lt.table.slug()}")
    by_rest: dict[str, list[Table]] = {}
    for t in tables:
        if "score_batch_size" in t.settings:
            by_rest.setdefault(_without_batch_size(t).slug(), []).append(t)
    for slug, group in by_rest.items():
        if len(group) > 1:
            written += accuracy_vs_batch_size(group, out / f"acc-vs-batch-size-{slug}")
    return written


def collapse_density(result: Analysis, stem: Path) -> list[Path]:
    """``fishprune analyze``: per-layer density against the global sparsity, the critical
    sparsity (and the cut-off one) marked."""
    import torch

    fig = Figure(figsize=(7.5, 4.5), layout="constrained")
    ax = fig.subplots()
    palette = matplotlib.colormaps["viridis"]
    names = list(result.numel)
    xs = torch.tensor(result.curve_sparsities)
    for i, name in enumerate(names):
        ys = torch.tensor(result.curve_densities[name])
        ys = torch.where(ys > 0, ys, torch.nan)  # an empty layer leaves the log axis
        ax.plot(xs, ys, color=palette(i / max(len(names) - 1, 1)), lw=1.2,
                marker="o" if result.iterative else None, ms=3, label=name)
    ax.axvline(result.critical, color="crimson", ls="--", lw=1,
               label=f"critical {result.critical:.4f}")
    if result.critical_connected is not None and result.critical_connected < result.critical:
        ax.axvline(result.critical_connected, color="orange", ls=":", lw=1,
                   label=f"cut off {result.critical_connected:.4f}")
    ax.set_xscale("logit")
    ax.set_yscale("log")
    ax.set_xlabel("global sparsity (pruned fraction)")
    ax.set_ylabel("layer density (kept fraction)")
    ax.set_title(result.title, fontsize=10)
    ax.grid(True, which="major", alpha=0.3)
    ax.legend(fontsize=6, ncol=1 + len(names) // 12, loc="center left",
              bbox_to_anchor=(1.01, 0.5), frameon=False)
    return save(fig, stem)
