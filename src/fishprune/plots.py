"""The papers' figures from a results database (matplotlib, Agg; PNG + PDF, written atomically).

* accuracy vs sparsity per criterion, mean ± std bands, the dense baseline as a band; the x
  axis is the density 1 − sparsity on a log scale, reversed and labelled by sparsity, so
  0.8 … 0.995 are evenly readable (FTS paper, Fig. 3 style);
* per-layer density per criterion at one sparsity (layer collapse at a glance);
* the weights each criterion keeps against |w| (FTS paper, Fig. 1 / A2): the histogram of |w|
  of every prunable weight at scoring time, the kept ones highlighted, and magnitude pruning's
  threshold. The weights come from the pipeline's cache ``<dir>/_cache`` (the init, or the
  warm-up), the masks from the run directories;
* accuracy vs scoring batch size (Fig. 2 / A1) when the runs vary ``score_batch_size``.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib
from matplotlib.figure import Figure  # no pyplot: Agg renders, no global backend is touched

from fishprune import config as C
from fishprune import io
from fishprune.criteria import criteria
from fishprune.report import LayerTable, Table, fmt_sparsity


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
        with io.atomic_path(path) as tmp:
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
    """The weights that were scored: the pipeline's cached warm-up or init (None: not found)."""
    import torch

    from fishprune.data import load_dataset
    from fishprune.pipeline import fresh_model, init_path, warmup_path

    raw = json.loads((root / run["run_dir"] / "config.json").read_text())
    cfg = C.from_dict(raw)
    cfg = dataclasses.replace(cfg, out=str(root))
    w = cfg.warmup
    if w.warmup_epochs or w.bn_warmup:
        device = torch.device(str(run.get("device_used") or "cpu").split(":")[0])
        path = warmup_path(cfg, device)
        return io.load_state(path) if path.exists() else None
    ds = load_dataset(cfg.data.dataset, cfg.data.data_dir)
    path = init_path(cfg, ds)
    if path.exists():
        return io.load_state(path)
    return fresh_model(cfg, ds, seed=cfg.seed).state_dict()  # the init is deterministic


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
        print(f"fishprune: kept-vs-|w| plot skipped: no cached weights for {table.title()}",
              file=sys.stderr)
        return []
    cols = min(4, len(methods))
    rows = -(-len(methods) // cols)
    fig = Figure(figsize=(3.2 * cols, 2.6 * rows), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax, m in zip(axes, methods):
        masks = io.load_masks(root / runs[m]["run_dir"] / "masks.safetensors")
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
        except (OSError, ValueError, KeyError, C.ConfigError) as err:
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
