"""Layer collapse before training: per-layer density vs sparsity and the critical sparsity.

A one-shot criterion's scores do not depend on the sparsity, so ONE scoring pass gives the masks
at every sparsity: with global selection the mask keeping k weights is "global rank < k", where
the rank orders all N prunable weights by score, ties to the earlier weight exactly as
:func:`fishprune.select` breaks them. Hence, exactly and without bisection:

- layer L keeps its first weight when k reaches r_L = 1 + (rank of L's best-ranked weight);
- no layer is empty iff k ≥ k* = max_L r_L, so the **critical sparsity** is 1 − k*/N (the
  highest sparsity whose mask keeps exactly k* weights; the layer with the largest r_L is the
  one that empties first);
- the **maximum possible** sparsity with no empty layer is 1 − L/N (one weight per layer).

A layer can keep weights yet be cut off from the output (see :mod:`fishprune.collapse`). Masks
are nested in k, so "every layer keeps a weight on an input→output path" is found by bisection
over the integer k with the path test of :func:`fishprune.collapse.connected_counts` (exact for
networks without max-pooling; with max-pooling the test follows the pooling argmax of an
all-ones input and monotonicity is a close approximation).

Iterative criteria (SynFlow's 100 rounds) re-score after every round, so their masks at two
sparsities are not nested slices of one ranking: :func:`analyze` re-prunes a copy of the model
for every probe and bisects over the sparsity itself to a given resolution, assuming that
collapse is monotone in the sparsity (true in practice, not guaranteed).
"""

from __future__ import annotations

import argparse
import copy
import functools
import hashlib
import json
import math
import sys
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import fishprune as fp
from fishprune import io
from fishprune.collapse import connected_counts
from fishprune.config import LOCATION_KEYS, ConfigError, RunConfig, non_default
from fishprune.criteria import get_criterion
from fishprune.sanity import invert_scores
from fishprune.scoring import validate_sparsity
from fishprune.selection import kept_count

#: Sparsities of the printed table when none are given.
DEFAULT_SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999)
#: Points of the plotted density curves (one-shot criteria).
CURVE_POINTS = 200


@dataclass(frozen=True)
class CriticalSparsity:
    """Where global selection from one set of scores starts to break layers.

    ``first_kept[L]`` is the number of kept weights k at which layer L keeps its first weight.
    ``kept`` (k*) is the smallest k with no empty layer and ``sparsity`` = 1 − k*/N; the
    ``connected_*`` fields are the same for "no layer empty or cut off from the output" (None
    when no model was given or the path test is not informative for this model).
    """

    total: int
    numel: dict[str, int]
    first_kept: dict[str, int]
    kept: int
    sparsity: float
    limiting_layer: str
    max_sparsity: float
    connected_kept: int | None = None
    connected_sparsity: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_scores(scores: dict[str, Tensor]) -> None:
    if not scores:
        raise ValueError("scores is empty: nothing to analyze")
    for name, s in scores.items():
        if not isinstance(s, Tensor):
            raise ValueError(f"scores[{name!r}] is a {type(s).__name__}, expected a tensor")
        if s.numel() == 0:
            raise ValueError(f"scores[{name!r}] is empty (a layer without weights)")
        if torch.isnan(s).any():
            raise ValueError(f"scores for {name} contain NaN: the criterion failed")


def global_ranks(scores: dict[str, Tensor]) -> dict[str, Tensor]:
    """0-based global rank of every weight (0 = kept first), as :func:`fishprune.select` ranks.

    Higher score first; ties go to the weight earlier in ``scores`` order and, within a tensor,
    at the lower flat index. ``select(scores, s)[n]`` equals ``ranks[n] < kept_count(1 − s, N)``.
    Returns int64 CPU tensors of the scores' shapes.
    """
    _check_scores(scores)
    dtype = torch.float64 if any(s.dtype == torch.float64 for s in scores.values()) else (
        torch.float32
    )  # the dtype select compares in: a float64→float32 cast can create ties
    flat = torch.cat([s.detach().reshape(-1).to("cpu", dtype) for s in scores.values()])
    order = torch.sort(flat, descending=True, stable=True).indices  # stable: ties by index
    ranks = torch.empty_like(order)
    ranks[order] = torch.arange(order.numel())
    out, offset = {}, 0
    for name, s in scores.items():
        out[name] = ranks[offset : offset + s.numel()].reshape(s.shape)
        offset += s.numel()
    return out


def masks_at(ranks: dict[str, Tensor], kept: int) -> dict[str, Tensor]:
    """The global mask keeping the ``kept`` best-ranked weights."""
    return {n: r < kept for n, r in ranks.items()}


def _sparsity(kept: int, total: int) -> float:
    return 1.0 - kept / total


def critical_sparsity(scores: dict[str, Tensor], *, model: nn.Module | None = None,
                      input_shape: Sequence[int] | None = None) -> CriticalSparsity:
    """Exact critical sparsity of global selection from ``scores`` (see the module docstring).

    With ``model`` and ``input_shape`` (one input without the batch dimension) also the
    smallest kept count at which every layer keeps a weight on an input→output path.
    """
    ranks = global_ranks(scores)
    total = sum(r.numel() for r in ranks.values())
    first = {n: int(r.min()) + 1 for n, r in ranks.items()}
    limiting = max(first, key=lambda n: first[n])
    kept = first[limiting]
    connected = None
    if model is not None and input_shape is not None:
        connected = _connected_kept(model, ranks, tuple(input_shape), lo=kept, hi=total)
    return CriticalSparsity(
        total=total,
        numel={n: r.numel() for n, r in ranks.items()},
        first_kept=first,
        kept=kept,
        sparsity=_sparsity(kept, total),
        limiting_layer=limiting,
        max_sparsity=_sparsity(len(ranks), total),
        connected_kept=connected,
        connected_sparsity=None if connected is None else _sparsity(connected, total),
    )


def _all_connected(model: nn.Module, masks: dict[str, Tensor], input_shape: tuple[int, ...]
                   ) -> bool | None:
    counts = connected_counts(model, masks, input_shape)
    return None if counts is None else all(c > 0 for c in counts.values())


def _connected_kept(model: nn.Module, ranks: dict[str, Tensor], input_shape: tuple[int, ...],
                    *, lo: int, hi: int) -> int | None:
    """Smallest k in [lo, hi] whose mask leaves no layer cut off (bisection; masks are nested)."""
    if not _all_connected(model, masks_at(ranks, hi), input_shape):
        return None  # uninformative path test, or cut off even when dense
    while lo < hi:
        mid = (lo + hi) // 2
        if _all_connected(model, masks_at(ranks, mid), input_shape):
            hi = mid
        else:
            lo = mid + 1
    return lo


def layer_densities_at(ranks: dict[str, Tensor], sparsities: Sequence[float]
                       ) -> dict[str, list[float]]:
    """Per-layer kept fraction at each sparsity, for global selection from ``ranks``."""
    total = sum(r.numel() for r in ranks.values())
    ks = torch.tensor([kept_count(1.0 - s, total) for s in sparsities])
    out = {}
    for name, r in ranks.items():
        counts = torch.searchsorted(r.reshape(-1).sort().values, ks)  # #ranks < k
        out[name] = (counts.double() / r.numel()).tolist()
    return out


# ---------------------------------------------------------------------------------------------
# The analysis of a run configuration


@dataclass
class Analysis:
    """Everything ``fishprune analyze`` reports; ``densities[layer][i]`` is at ``sparsities[i]``."""

    label: str
    title: str
    scope: str
    criterion: str
    iterative: bool
    total: int
    numel: dict[str, int]
    sparsities: list[float]
    densities: dict[str, list[float]]
    cut_off: dict[str, list[bool]]  # kept weights but none on a path, at each sparsity
    critical: float  # highest sparsity with no empty layer
    critical_connected: float | None  # ... and none cut off
    max_sparsity: float
    limiting_layer: str | None
    curve_sparsities: list[float] = field(default_factory=list)
    curve_densities: dict[str, list[float]] = field(default_factory=dict)
    resolution: float | None = None  # bisection resolution (iterative criteria); None = exact
    score_seconds: float = 0.0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def table(self) -> str:
        """Per-layer density at each sparsity; ``0!`` = empty, ``cut`` = cut off."""
        width = max(12, *(len(n) for n in self.numel))
        head = f"{'layer':<{width}} {'weights':>10} " + " ".join(
            f"{s:>7.4g}" for s in self.sparsities
        )
        lines = [self.title, f"density per layer at {self.scope} sparsity:", head]
        for name, n in self.numel.items():
            cells = []
            for d, cut in zip(self.densities[name], self.cut_off[name]):
                cells.append(f"{'0!':>7}" if d == 0 else f"{'cut':>7}" if cut else f"{d:>7.2%}")
            lines.append(f"{name:<{width}} {n:>10,} " + " ".join(cells))
        lines.append("(0! = layer empty, cut = kept weights but none on an input→output path)")
        how = "exact" if self.resolution is None else f"bisection, resolution {self.resolution:g}"
        lines.append(f"critical sparsity, no layer empty:        {self.critical:.6f}  ({how}"
                     + (f"; {self.limiting_layer} empties first)" if self.limiting_layer else ")"))
        conn = "n/a" if self.critical_connected is None else f"{self.critical_connected:.6f}"
        lines.append(f"critical sparsity, no layer cut off:      {conn}")
        lines.append(f"maximum sparsity (one weight per layer):  {self.max_sparsity:.6f}  "
                     f"({len(self.numel)} layers, {self.total:,} prunable weights)")
        lines.extend(f"note: {n}" for n in self.notes)
        return "\n".join(lines)


def analyze(cfg: RunConfig, sparsities: Sequence[float] = DEFAULT_SPARSITIES, *,
            resolution: float = 1e-3, say: Callable[[str], None] | None = None) -> Analysis:
    """Score once (or re-prune per probe for iterative criteria) and analyze layer collapse.

    Uses exactly the run's data, model, warm-up and scoring settings (``cfg.prune.sparsity`` and
    the training settings other than warm-up are not used). Nothing is trained except a
    configured warm-up, which is cached in ``<out>/_cache`` and shared with ``fishprune run``.
    """
    from fishprune.pipeline import prepare, scoring_batches
    from fishprune.train import timed

    say = say or (lambda _msg: None)
    cfg.validate()
    sparsities = sorted(set(validate_sparsities(sparsities)))
    p = cfg.prune
    prep = prepare(cfg, say)
    ds, train_idx, model, device = prep.ds, prep.train_idx, prep.model, prep.device
    input_shape = tuple(ds.train_x.shape[1:])
    batches = scoring_batches(cfg, ds, train_idx, device)
    common = {"seed": cfg.seed, "mode": p.score_mode, "exclude": p.exclude,
              **p.criterion_options()}
    rounds = p.rounds if p.rounds is not None else get_criterion(p.criterion).default_rounds
    notes = []
    if p.sanity == "shuffle":
        notes.append("sanity=shuffle permutes positions within layers: layer densities are "
                     "those shown, path connectivity is that of the unshuffled mask")
    if p.sanity == "invert" or rounds == 1:
        with timed() as elapsed:
            scores = fp.score(model, p.criterion, batches, **common)
        if p.sanity == "invert":  # as the pipeline: keep the lowest-scored weights
            scores = invert_scores(scores)
        seconds = elapsed()
        say(f"scored with {p.criterion} in {seconds:.2f}s")
        if p.scope == "layer":
            return _analyze_masks(cfg, model, input_shape, sparsities, resolution, seconds, notes,
                                  lambda s: fp.select(scores, s, scope="layer"))
        return _analyze_one_shot(cfg, model, input_shape, scores, sparsities, seconds, notes)
    notes.append(f"{p.criterion} prunes in {rounds} rounds: every probe re-prunes the model; the "
                 "bisection assumes collapse is monotone in the sparsity")

    @functools.cache  # bisections revisit sparsities of the table
    def prune_at(s: float) -> dict[str, Tensor]:
        probe = copy.deepcopy(model)
        return fp.prune(probe, p.criterion, s, batches, rounds=rounds, scope=p.scope, **common)

    with timed() as elapsed:
        result = _analyze_masks(cfg, model, input_shape, sparsities, resolution, 0.0, notes,
                                prune_at)
    result.score_seconds = elapsed()
    return result


def validate_sparsities(sparsities: Sequence[float]) -> list[float]:
    """Every sparsity as a float in [0, 1), or a :class:`ConfigError` (a usage error)."""
    if not sparsities:
        raise ConfigError("sparsities must list at least one sparsity in [0, 1)")
    out = []
    for s in sparsities:
        try:
            out.append(validate_sparsity(s))
        except ValueError as err:
            raise ConfigError(str(err)) from None
    return out


def _cut_off(model: nn.Module, masks: dict[str, Tensor], input_shape: tuple[int, ...]
             ) -> dict[str, bool]:
    counts = connected_counts(model, masks, input_shape)
    return {n: counts is not None and bool(m.any()) and counts[n] == 0 for n, m in masks.items()}


def _analyze_one_shot(cfg: RunConfig, model: nn.Module, input_shape: tuple[int, ...],
                      scores: dict[str, Tensor], sparsities: list[float], seconds: float,
                      notes: list[str]) -> Analysis:
    ranks = global_ranks(scores)
    crit = critical_sparsity(scores, model=model, input_shape=input_shape)
    cut: dict[str, list[bool]] = {n: [] for n in ranks}
    for s in sparsities:
        for n, flag in _cut_off(model, masks_at(ranks, kept_count(1 - s, crit.total)),
                                input_shape).items():
            cut[n].append(flag)
    lo = min(0.5, *sparsities)
    curve = curve_sparsities(lo, crit.max_sparsity)
    return Analysis(
        label=cfg.label(), title=setting_title(cfg), scope=cfg.prune.scope,
        criterion=cfg.prune.criterion, iterative=False, total=crit.total,
        numel=crit.numel, sparsities=sparsities, densities=layer_densities_at(ranks, sparsities),
        cut_off=cut, critical=crit.sparsity, critical_connected=crit.connected_sparsity,
        max_sparsity=crit.max_sparsity, limiting_layer=crit.limiting_layer,
        curve_sparsities=curve, curve_densities=layer_densities_at(ranks, curve),
        score_seconds=seconds, notes=notes,
    )


def setting_title(cfg: RunConfig) -> str:
    """``vgg19 (width 0.25) on fashion-mnist, snip, warm-up: 1 epoch + BN, scoring in eval``."""
    w, p = cfg.warmup, cfg.prune
    warm = " + ".join(([f"{w.warmup_epochs} epoch(s)"] if w.warmup_epochs else [])
                      + (["BN statistics"] if w.bn_warmup else [])) or "none"
    width = f" (width {cfg.model.width:g})" if cfg.model.width != 1 else ""
    return (f"{cfg.model.model}{width} on {cfg.data.dataset}, {p.criterion}; warm-up: {warm}; "
            f"scoring in {p.score_mode} mode")


def curve_sparsities(lo: float, hi: float, points: int = CURVE_POINTS) -> list[float]:
    """``points`` sparsities from ``lo`` to ``hi``, evenly spaced in log(1 − sparsity)."""
    a, b = math.log(1 - lo), math.log(max(1 - hi, 1e-12))
    return [1 - math.exp(a + (b - a) * i / (points - 1)) for i in range(points)]


def _analyze_masks(cfg: RunConfig, model: nn.Module, input_shape: tuple[int, ...],
                   sparsities: list[float], resolution: float, seconds: float, notes: list[str],
                   masks_for: Callable[[float], dict[str, Tensor]]) -> Analysis:
    """The analysis from a mask oracle ``sparsity -> masks``, bisecting over the sparsity."""
    densities: dict[str, list[float]] = {}
    cut: dict[str, list[bool]] = {}
    shapes: dict[str, torch.Size] = {}
    for s in sparsities:
        masks = masks_for(s)
        for n, flag in _cut_off(model, masks, input_shape).items():
            shapes[n] = masks[n].shape
            densities.setdefault(n, []).append(int(masks[n].sum()) / masks[n].numel())
            cut.setdefault(n, []).append(flag)
    numel = {n: shape.numel() for n, shape in shapes.items()}
    total = sum(numel.values())

    def no_empty(s: float) -> bool:
        return all(bool(m.any()) for m in masks_for(s).values())

    def connected(s: float) -> bool:
        return bool(_all_connected(model, masks_for(s), input_shape))

    max_sparsity = 1 - len(numel) / total
    critical = bisect_sparsity(no_empty, 0.0, max_sparsity, resolution)
    dense = {n: torch.ones(shapes[n], dtype=torch.bool) for n in shapes}
    conn_ok = _all_connected(model, dense, input_shape)
    critical_connected = (bisect_sparsity(connected, 0.0, critical, resolution)
                          if conn_ok else None)
    return Analysis(
        label=cfg.label(), title=setting_title(cfg), scope=cfg.prune.scope,
        criterion=cfg.prune.criterion, iterative=True, total=total,
        numel=numel, sparsities=sparsities, densities=densities, cut_off=cut, critical=critical,
        critical_connected=critical_connected, max_sparsity=max_sparsity, limiting_layer=None,
        curve_sparsities=list(sparsities), curve_densities=densities, resolution=resolution,
        score_seconds=seconds, notes=notes,
    )


def bisect_sparsity(ok: Callable[[float], bool], lo: float, hi: float, resolution: float
                    ) -> float:
    """The highest sparsity in [lo, hi] where ``ok`` holds, to ``resolution`` (``ok(lo)`` assumed).

    Returns ``lo`` rounded down when ``ok`` fails everywhere above it; assumes monotonicity.
    """
    if ok(hi):
        return hi
    while hi - lo > resolution:
        mid = (lo + hi) / 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


# ---------------------------------------------------------------------------------------------
# Artifacts and the command line


def analysis_dir(cfg: RunConfig) -> Path:
    """``<out>/analyze/<model>-<dataset>-<criterion>-<hash of what changes the analysis>``."""
    diff = non_default(cfg)
    for key in (*LOCATION_KEYS, "sparsity", "epochs"):
        diff.pop(key, None)
    digest = hashlib.sha256(json.dumps(diff, sort_keys=True).encode()).hexdigest()[:8]
    name = f"{cfg.model.model}-{cfg.data.dataset}-{cfg.prune.criterion}-{digest}"
    return Path(cfg.out) / "analyze" / name


def plot(result: Analysis, path: Path) -> list[Path]:
    """Per-layer density vs global sparsity; writes ``path`` as PNG and PDF atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    colors = plt.get_cmap("viridis")
    names = list(result.numel)
    xs = torch.tensor(result.curve_sparsities)
    for i, name in enumerate(names):
        ys = torch.tensor(result.curve_densities[name])
        ys = torch.where(ys > 0, ys, torch.nan)  # an empty layer leaves the log axis
        ax.plot(xs, ys, color=colors(i / max(len(names) - 1, 1)), lw=1.2,
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
    fig.tight_layout()
    written = []
    for suffix in (".png", ".pdf"):
        target = path.with_suffix(suffix)
        with io.atomic_path(target) as tmp:
            fig.savefig(tmp, dpi=150)
        written.append(target)
    plt.close(fig)
    return written


def cmd_analyze(args: argparse.Namespace) -> int:
    from fishprune.cli import describe, settings_from

    cfg = settings_from(args)
    sparsities = validate_sparsities(args.sparsities)
    if "sparsity" in vars(args):  # an explicit --sparsity joins the table
        sparsities.append(cfg.prune.sparsity)
    if not (0 < args.resolution < 1) or math.isnan(args.resolution):
        raise ConfigError(f"resolution must be in (0, 1); got {args.resolution}")
    say = (lambda _m: None) if args.quiet else (lambda m: print(m, flush=True))
    say(describe(cfg))
    result = analyze(cfg, sparsities, resolution=args.resolution, say=say)
    out = Path(args.report_dir) if args.report_dir else analysis_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    io.atomic_write_json(out / "analysis.json", result.to_dict())
    files = [out / "analysis.json"]
    if args.plot:
        files += plot(result, out / "density.png")
    print(result.table())
    print("wrote " + ", ".join(str(f) for f in files), file=sys.stdout, flush=True)
    return 0


def add_cli(subparsers: Any) -> None:
    """The ``fishprune analyze`` subcommand (listed in :data:`fishprune.cli.EXTENSIONS`)."""
    from fishprune.cli import add_run_flags

    parser = subparsers.add_parser(
        "analyze", help="per-layer density vs sparsity and the critical sparsity, no training",
        description="Score once with the run's settings (warm-up included) and report the "
                    "per-layer density at each sparsity, the critical sparsity (highest with no "
                    "empty layer; and with no layer cut off) and the maximum possible one.")
    add_run_flags(parser)
    parser.add_argument("--sparsities", nargs="+", type=float, metavar="S",
                        default=list(DEFAULT_SPARSITIES), help="sparsities of the table")
    parser.add_argument("--resolution", type=float, default=1e-3,
                        help="bisection resolution for iterative criteria (synflow)")
    parser.add_argument("--report-dir", help="where to write analysis.json and the plot "
                        "(default: <out>/analyze/<model>-<dataset>-<criterion>-<hash>)")
    parser.add_argument("--plot", action=argparse.BooleanOptionalAction, default=True,
                        help="write density.png and density.pdf")
    parser.add_argument("--quiet", action="store_true", help="print only the table")
    parser.set_defaults(func=cmd_analyze)
