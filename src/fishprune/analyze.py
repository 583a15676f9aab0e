"""``analyze``: layer collapse before training, for one run configuration.

Scores once with exactly the run's data, model, warm-up and scoring settings and reports the
per-layer density at each sparsity, the critical sparsity and the maximum possible one. For
one-shot criteria everything is exact (:mod:`fishprune.ranking`). Iterative criteria (SynFlow's
100 rounds) re-score after every round, so their masks at two sparsities are not nested slices
of one ranking: :func:`analyze` re-prunes a copy of the model for every probe and bisects over
the sparsity itself to a given resolution, assuming that collapse is monotone in the sparsity
(true in practice, not guaranteed).
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import fishprune as fp
from fishprune.collapse import connected_counts
from fishprune.config import DATA_DIR_IS_DATA, LOCATION_KEYS, ConfigError, RunConfig, non_default
from fishprune.criteria import REGISTRY, get_criterion
from fishprune.hashing import digest
from fishprune.progress import Counted, Progress
from fishprune.ranking import (
    all_connected,
    critical_sparsity,
    global_ranks,
    layer_densities_at,
    masks_at,
)
from fishprune.sanity import invert_scores
from fishprune.scoring import validate_sparsity
from fishprune.selection import kept_count
from fishprune.timing import timed

#: Sparsities of the printed table when none are given.
DEFAULT_SPARSITIES = (0.5, 0.8, 0.9, 0.95, 0.98, 0.99, 0.995, 0.998, 0.999)
#: Points of the plotted density curves (one-shot criteria).
CURVE_POINTS = 200
#: The finest bisection resolution (iterative criteria): finer would only repeat probes.
MIN_RESOLUTION = 1e-6


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
            resolution: float = 1e-3, say: Callable[[str], None] | None = None,
            show_progress: bool = False) -> Analysis:
    """Score once (or re-prune per probe for iterative criteria) and analyze layer collapse.

    Uses exactly the run's data, model, warm-up and scoring settings (``cfg.prune.sparsity`` and
    the training settings other than warm-up are not used). Nothing is trained except a
    configured warm-up, which is cached in ``<out>/_cache`` and shared with ``fishprune run``.
    """
    from fishprune.pipeline import prepare, scored_parameters, scoring_batches

    say = say or (lambda _msg: None)
    cfg.validate()
    if cfg.prune.criterion not in REGISTRY:
        raise ConfigError(f"analyze scores once and {cfg.prune.criterion} has no scores (it "
                          "trains to find its masks): run it with `fishprune run`")
    sparsities = sorted(set(validate_sparsities(sparsities)))
    p = cfg.prune
    prep = prepare(cfg, say, show_progress=show_progress)
    ds, train_idx, model, device = prep.ds, prep.train_idx, prep.model, prep.device
    input_shape = tuple(ds.train_x.shape[1:])
    scored_parameters(cfg, model)  # a usage error when exclude leaves nothing to score
    batches = scoring_batches(cfg, ds, train_idx, device)
    common = {"seed": cfg.seed, "mode": p.score_mode, "exclude": p.exclude, **p.options}
    rounds = p.rounds if p.rounds is not None else get_criterion(p.criterion).default_rounds
    notes = []
    if p.sanity == "shuffle":
        notes.append("sanity=shuffle permutes positions within layers: layer densities are "
                     "those shown, path connectivity is that of the unshuffled mask")
    if p.sanity == "invert" or rounds == 1:
        with timed() as elapsed, Progress(f"scoring ({p.criterion})", len(batches),
                                          show=show_progress, say=say) as bar:
            scores = fp.score(model, p.criterion, Counted(batches, bar), **common)
        if p.sanity == "invert":  # as the pipeline: keep the lowest-scored weights
            scores = invert_scores(scores)
        seconds = elapsed()
        say(f"scored with {p.criterion} in {seconds:.2f}s")
        if p.scope == "layer":
            return _analyze_masks(cfg, model, input_shape, sparsities, resolution, seconds, notes,
                                  lambda s: fp.select(scores, s, scope="layer", on_empty="ignore"))
        return _analyze_one_shot(cfg, model, input_shape, scores, sparsities, seconds, notes)
    notes.append(f"{p.criterion} prunes in {rounds} rounds: every probe re-prunes the model; the "
                 "bisection assumes collapse is monotone in the sparsity")

    @functools.cache  # bisections revisit sparsities of the table
    def prune_at(s: float) -> dict[str, Tensor]:
        probe = copy.deepcopy(model)
        return fp.prune(probe, p.criterion, s, batches, rounds=rounds, scope=p.scope,
                        schedule=p.schedule,
                        on_round=lambda _r, _n: bar.update(1), on_empty="ignore", **common)

    # The bisection decides how many probes (of ``rounds`` rounds each) it needs: no total.
    with timed() as elapsed, Progress(f"pruning probes ({p.criterion}, {rounds} rounds each)",
                                      None, show=show_progress, say=say, unit="rounds") as bar:
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
        return bool(all_connected(model, masks_for(s), input_shape))

    max_sparsity = 1 - len(numel) / total
    critical = bisect_sparsity(no_empty, 0.0, max_sparsity, resolution)
    dense = {n: torch.ones(shapes[n], dtype=torch.bool) for n in shapes}
    conn_ok = all_connected(model, dense, input_shape)
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
    ``resolution`` is clamped to at least :data:`MIN_RESOLUTION`, so the loop ends after at most
    ~20 probes whatever the caller asks.
    """
    if not math.isfinite(resolution) or resolution <= 0:
        raise ValueError(f"resolution must be a finite number > 0; got {resolution!r}")
    resolution = max(resolution, MIN_RESOLUTION)
    if ok(hi):
        return hi
    steps = math.ceil(math.log2(max(hi - lo, resolution) / resolution)) + 1
    for _ in range(steps):
        if hi - lo <= resolution:
            break
        mid = (lo + hi) / 2
        if ok(mid):
            lo = mid
        else:
            hi = mid
    return lo


# ---------------------------------------------------------------------------------------------
# Artifacts


def analysis_dir(cfg: RunConfig) -> Path:
    """``<out>/analyze/<model>-<dataset>-<criterion>-<hash of what changes the analysis>``."""
    diff = non_default(cfg)
    for key in (*LOCATION_KEYS, "sparsity", "epochs"):
        if not (key == "data_dir" and cfg.data.dataset in DATA_DIR_IS_DATA):  # folder = data
            diff.pop(key, None)
    model = cfg.model.model.replace(":", "-")  # hf:vit, package.module:factory
    name = f"{model}-{cfg.data.dataset}-{cfg.prune.criterion}-{digest(diff, 8)}"
    return Path(cfg.out) / "analyze" / name
