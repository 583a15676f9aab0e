"""GPU check: one prepared command that proves (or disproves) fishprune's CUDA path.

    PYTHONPATH=src python3 benchmarks/gpu_check.py --data-dir data/fashion-mnist --out gpu-check
    python benchmarks/gpu_check.py --device cpu --quick          # the same logic on the CPU

Everything ``--device cuda`` does (data resident on the GPU, channels_last models, bf16
autocast in training, fp32/fp64 scoring) is exercised in five sections, within a global time
budget (``--budget``, 480 s: a section whose estimate no longer fits is skipped with a note; one
that the budget stops midway is "incomplete", with a note). A section that raises records its
error and the next one runs. ``--out DIR`` receives ``report.json`` (every number) and
``report.md`` (the same as tables), rewritten after every section, plus the logs of section 5.
Exit status: 0 when every check passed, 1 when a check failed or a section raised, 2 for usage
errors (``--device cuda`` without a GPU).

Checks decide the exit status; targets are speed goals reported as met/missed (speed depends on
the machine) and never change it.

1. **correctness**: every criterion of ``fishprune.criteria()`` (plus ``fts`` with
   ``per_sample=True``) scored with ``fp.score`` on the device and on the CPU reference (same
   initial weights, same batches), on LeNet-5 and ResNet-20 (BatchNorm, residual blocks). The
   device model is channels_last, as the pipeline makes it on CUDA. Reported: max relative
   difference (per layer ``max|s_dev − s_ref| / max|s_ref|``, worst layer), Spearman rank
   correlation, mask overlap at sparsity 0.9 and 0.98 (``fp.select`` on each side), the number
   of differing mask positions and how many of them are near-ties (reference score within
   ``--tie-rtol`` of the reference threshold, relative), and whether scoring twice on the
   device gives identical scores. Checks: every differing position is a near-tie, the max
   relative difference is at most ``--score-rtol``, scores are finite, both sides keep exactly
   the requested count, and the model is unchanged by scoring. On CUDA each comparison runs
   twice: with the library's precision settings (cuDNN convolutions may use TF32) and with TF32
   off ("strict-fp32"), so a difference can be attributed. Then masked training: the device
   model pruned at 0.98 trains ``train_epoch`` steps (bf16 autocast on CUDA) with SGD (momentum,
   weight decay; ``make_optimizer``) and ``fp.Masker(guard=False)`` as the pipeline does.
   Checks: pruned weights and their momentum buffers exactly zero, kept weights moved, finite
   loss, and the forward ran in bfloat16 on CUDA (float32 on the CPU).
   Reference: the CPU in float32 when the device is CUDA; the CPU in float64 when the device is
   the CPU (``--reference-dtype`` overrides), so the tie logic meets real float differences.
2. **per_sample**: ``fp.score(model, "fts", batches, per_sample=True)`` against a loop of
   one-sample backward passes over the same samples (1,000 on LeNet-5). Target: ≥ 10× faster
   on CUDA (≥ 2.5× on the CPU, as BENCHMARKS.md). Check: max relative difference of F̂ and of
   the FTS scores ≤ 1e-4 (strict fp32; on CUDA also reported with the default precision).
3. **scoring_cost**: every criterion's time ÷ one plain forward+backward pass, ResNet-18
   (3×32×32, batch 256), synchronized timers, one warm-up, median of ``repeats`` per-repeat
   ratios (``benchmarks.bench_scoring.paired``). Targets as bench_scoring: ≤ 0.05 for
   random/magnitude, ≤ 1.1 for the gradient-moment criteria, ≤ 4 for GraSP, ≤ 3 per probe for
   hd/hp/hts; SynFlow (one round) reported.
4. **training**: ResNet-18 on 50,000 synthetic CIFAR-10-shaped uint8 images resident on the
   device (``TensorBatches`` with crop+flip augmentation, batch 512), dense vs 98%-masked
   training with ``train_epoch`` + ``Masker`` (``benchmarks.bench_training.Loop``), interleaved
   every few batches. Reported: images/s, one uninterrupted epoch's wall time each, and a
   per-step breakdown with synchronized timers (batch gather+augmentation, forward, backward,
   masking, optimizer step, metrics). Target: masked ÷ dense time ≤ 1.05. Check: no pruned
   weight is non-zero afterwards.
5. **end_to_end**: ``fishprune run`` as a subprocess (LeNet-5, FTS 98%, 2 epochs, Fashion-MNIST;
   ``--data-dir`` forwarded) on the device and on the CPU: test accuracy, wall time, and the
   device the run recorded. Checks: both succeed on the requested device, both learn (test
   accuracy ≥ 2 × chance), and the accuracies agree within ``--acc-tol`` (0.02). Quick mode:
   synthetic data (no files needed), 2 epochs at sparsity 0.9.

``--quick`` shrinks every section to seconds (tiny widths, a few samples) with the same code.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if __package__ in (None, ""):  # run as a script: make `benchmarks.*` importable
    sys.path.insert(0, str(ROOT))
try:
    import fishprune  # noqa: F401
except ImportError:  # an uninstalled checkout (the GPU machine): use src/, here and in subprocesses
    sys.path.insert(0, str(ROOT / "src"))
    os.environ["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT / "src"), os.environ.get("PYTHONPATH")) if p)

import torch  # noqa: E402
from torch import Tensor, nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402

import fishprune as fp  # noqa: E402
from benchmarks.bench_scoring import (  # noqa: E402
    HUTCHINSON_CRITERIA,
    TARGETS,
    one_sample_loop,
    paired,
    plain_pass,
)
from benchmarks.bench_training import Loop, cpu_name, synchronize  # noqa: E402
from benchmarks.gpu_report import Section, markdown  # noqa: E402
from fishprune import atomic  # noqa: E402
from fishprune.config import TrainConfig  # noqa: E402
from fishprune.data import TensorBatches, load_dataset  # noqa: E402
from fishprune.data.registry import CIFAR_SPECS  # noqa: E402
from fishprune.models import build_model  # noqa: E402
from fishprune.provenance import provenance  # noqa: E402
from fishprune.train import autocast, make_optimizer, train_epoch  # noqa: E402

SPARSITIES = (0.9, 0.98)
TRAIN_SPARSITY = 0.98
PER_SAMPLE_RTOL = 1e-4
PER_SAMPLE_TARGET = {"cuda": 10.0, "cpu": 2.5}
MASKED_TARGET = 1.05
CHANCE = 0.1  # every dataset used here has 10 classes


@dataclass(frozen=True)
class Sizes:
    """How big each section is; ``FULL`` for the GPU, ``QUICK`` for a CPU smoke run."""

    # 1. correctness: (model, width, channels, image size)
    models: tuple[tuple[str, float, int, int], ...]
    batches: int
    batch_size: int
    probes: int
    train_steps: int
    # 2. per-sample Fisher on LeNet-5
    samples: int
    sample_batch: int
    per_sample_repeats: int
    # 3. scoring cost on ResNet-18
    cost_width: float
    cost_batch: int
    cost_probes: int
    cost_repeats: int
    # 4. training throughput on ResNet-18
    images: int
    train_batch: int
    train_width: float
    passes: int
    chunk: int
    breakdown_steps: int
    # 5. end to end
    dataset: str
    run_args: tuple[str, ...]
    # seconds a section is expected to need at most (the budget skips what will not fit)
    estimates: dict[str, float] = field(default_factory=dict)


FULL = Sizes(
    models=(("lenet5", 1.0, 1, 28), ("resnet20", 1.0, 3, 32)), batches=2, batch_size=64,
    probes=10, train_steps=20,
    samples=1000, sample_batch=125, per_sample_repeats=3,
    cost_width=1.0, cost_batch=256, cost_probes=10, cost_repeats=5,
    images=50_000, train_batch=512, train_width=1.0, passes=2, chunk=8, breakdown_steps=30,
    dataset="fashion-mnist", run_args=("--epochs", "2"),
    estimates={"correctness": 120, "per_sample": 30, "scoring_cost": 60, "training": 60,
               "end_to_end": 150},
)
QUICK = Sizes(
    models=(("lenet5", 0.25, 1, 28), ("resnet20", 0.25, 3, 32)), batches=1, batch_size=16,
    probes=2, train_steps=3,
    samples=64, sample_batch=32, per_sample_repeats=1,
    cost_width=0.0625, cost_batch=16, cost_probes=2, cost_repeats=1,
    images=256, train_batch=64, train_width=0.0625, passes=1, chunk=2, breakdown_steps=3,
    dataset="synthetic", run_args=("--epochs", "2", "--lr", "0.05", "--sparsity", "0.9"),
    estimates={"correctness": 20, "per_sample": 5, "scoring_cost": 10, "training": 10,
               "end_to_end": 30},
)


# --- the run ------------------------------------------------------------------------------------


@dataclass
class Context:
    """What every section needs: settings, devices and the clock."""

    args: argparse.Namespace
    sizes: Sizes
    device: torch.device
    reference_dtype: torch.dtype
    out: Path
    deadline: float  # time.monotonic() by which everything must be done

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    @property
    def variants(self) -> tuple[str, ...]:
        """Precision settings compared on the device (TF32 only exists on CUDA)."""
        return ("default", "strict-fp32") if self.device.type == "cuda" else ("default",)


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


@contextlib.contextmanager
def precision(variant: str) -> Iterator[None]:
    """``default``: the library's settings as they are; ``strict-fp32``: TF32 off for cuDNN
    convolutions and cuBLAS matrix products (restored afterwards)."""
    if variant == "default":
        yield
        return
    saved = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = False
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


# --- models, data, comparisons -------------------------------------------------------------------


def seeded_model(name: str, width: float, channels: int, size: int, seed: int) -> nn.Module:
    """``build_model`` after ``torch.manual_seed(seed)``, on the CPU, in eval mode."""
    torch.manual_seed(seed)
    return build_model(name, in_channels=channels, num_classes=10, image_size=size,
                       width=width).eval()


def to_device(model: nn.Module, device: torch.device, channels_last: bool) -> nn.Module:
    """``model`` on ``device``, channels_last when it has convolutions (as
    ``fishprune.pipeline.initial_model`` makes every CUDA model)."""
    model.to(device)
    if channels_last and any(isinstance(m, nn.Conv2d) for m in model.modules()):
        model.to(memory_format=torch.channels_last)
    return model


def cpu_batches(count: int, size: int, shape: tuple[int, ...], seed: int
                   ) -> list[tuple[Tensor, Tensor]]:
    """``count`` CPU batches of ``size`` standard-normal inputs of ``shape`` and labels 0-9."""
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(size, *shape, generator=gen), torch.randint(0, 10, (size,), generator=gen))
            for _ in range(count)]


def moved(batches: list[tuple[Tensor, Tensor]], device: torch.device,
          dtype: torch.dtype = torch.float32) -> list[tuple[Tensor, Tensor]]:
    return [(x.to(device, dtype), y.to(device)) for x, y in batches]


def cpu64(t: Tensor) -> Tensor:
    return t.detach().to("cpu", torch.float64)


def max_rel_diff(dev: dict[str, Tensor], ref: dict[str, Tensor]) -> float:
    """Worst layer's ``max|dev − ref| / max|ref|`` (0 when identical, inf when ref is 0)."""
    worst = 0.0
    for name, r in ref.items():
        r64, d64 = cpu64(r), cpu64(dev[name])
        diff = float((d64 - r64).abs().max())
        scale = float(r64.abs().max())
        worst = max(worst, diff / scale if scale > 0 else (0.0 if diff == 0 else math.inf))
    return worst


def average_ranks(x: Tensor) -> Tensor:
    """1-based ranks of a 1-D tensor, ties sharing their average rank (float64)."""
    values, order = torch.sort(x)
    _, inverse, counts = torch.unique_consecutive(values, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mean_rank = ends - (counts.double() - 1) / 2
    ranks = torch.empty(x.numel(), dtype=torch.float64)
    ranks[order] = mean_rank[inverse]
    return ranks


def spearman(a: Tensor, b: Tensor) -> float:
    """Spearman rank correlation of two 1-D tensors (ties: average ranks)."""
    ra, rb = average_ranks(a), average_ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = math.sqrt(float((ra * ra).sum()) * float((rb * rb).sum()))
    if denom == 0:
        return 1.0 if torch.equal(ra, rb) else math.nan
    return float((ra * rb).sum()) / denom


def flat(tensors: dict[str, Tensor]) -> Tensor:
    """The tensors concatenated in model order on the CPU (float64 for scores)."""
    parts = [t.detach().reshape(-1).cpu() for t in tensors.values()]
    cat = torch.cat(parts)
    return cat if cat.dtype == torch.bool else cat.double()


def mask_agreement(ref_scores: Tensor, ref_mask: Tensor, dev_mask: Tensor, tie_rtol: float
                   ) -> dict[str, Any]:
    """Compare two flat masks; a differing position is a near-tie when its reference score lies
    within ``tie_rtol`` (relative) of the reference threshold (the k-th largest score)."""
    k, n = int(ref_mask.sum()), ref_mask.numel()
    threshold = float(torch.kthvalue(ref_scores, n - k + 1).values) if k else math.inf
    differ = ref_mask ^ dev_mask
    gaps = (ref_scores[differ] - threshold).abs()
    if threshold != 0 and math.isfinite(threshold):
        distance = gaps / abs(threshold)
    else:
        distance = torch.where(gaps == 0, 0.0, math.inf)
    return {
        "kept": k, "kept_device": int(dev_mask.sum()),
        "overlap": float((ref_mask & dev_mask).sum()) / max(k, 1),
        "differ": int(differ.sum()), "near_ties": int((distance <= tie_rtol).sum()),
        "max_tie_distance": float(distance.max()) if distance.numel() else 0.0,
        "threshold": threshold,
    }


def criterion_runs(probes: int) -> list[tuple[str, str, dict[str, Any]]]:
    """(label, criterion, options): every registered criterion, plus per-sample FTS."""
    runs = []
    for crit in fp.criteria():
        options: dict[str, Any] = {"probes": probes} if crit in HUTCHINSON_CRITERIA else {}
        runs.append((crit, crit, options))
    runs.append(("fts (per_sample)", "fts", {"per_sample": True}))
    return runs


def state_equal(model: nn.Module, saved: dict[str, Tensor]) -> bool:
    return all(torch.equal(t, saved[n]) for n, t in model.state_dict().items())


# --- 1. correctness ------------------------------------------------------------------------------


def section_correctness(ctx: Context, sec: Section) -> None:
    s, args = ctx.sizes, ctx.args
    sec.results = {"reference": f"cpu {str(ctx.reference_dtype).removeprefix('torch.')}",
                   "variants": list(ctx.variants), "sparsities": list(SPARSITIES),
                   "tie_rtol": args.tie_rtol, "score_rtol": args.score_rtol,
                   "scores": [], "training": []}
    for name, width, channels, size in s.models:
        label = f"{name} (width {width:g}, {channels}×{size}×{size})"
        base = seeded_model(name, width, channels, size, args.seed)
        data = cpu_batches(s.batches, s.batch_size, (channels, size, size), args.seed)
        ref_model = copy.deepcopy(base).to(dtype=ctx.reference_dtype)
        ref_batches = moved(data, torch.device("cpu"), ctx.reference_dtype)
        dev_model = to_device(copy.deepcopy(base), ctx.device, args.channels_last)
        dev_batches = moved(data, ctx.device)
        before = {n: t.clone() for n, t in dev_model.state_dict().items()}
        train_masks = None
        for run_label, crit, options in criterion_runs(s.probes):
            if ctx.remaining() < 30:
                sec.cut(f"{label}: stopped before {run_label}")
                break
            log(f"[correctness] {name} {run_label}")
            ref = fp.score(ref_model, crit, ref_batches, seed=args.seed, **options)
            ref_flat = flat(ref)
            ref_masks = {sp: flat(fp.select(ref, sp)) for sp in SPARSITIES}
            for variant in ctx.variants:
                with precision(variant):
                    dev = fp.score(dev_model, crit, dev_batches, seed=args.seed, **options)
                    again = (fp.score(dev_model, crit, dev_batches, seed=args.seed, **options)
                             if variant == "default" else None)
                on_device = all(t.device.type == ctx.device.type for t in dev.values())
                masks = {sp: fp.select(dev, sp) for sp in SPARSITIES}  # selected on the device
                if variant == "default" and run_label == "fts":
                    train_masks = masks[TRAIN_SPARSITY]
                row: dict[str, Any] = {
                    "model": label, "criterion": run_label, "variant": variant,
                    "max_rel_diff": max_rel_diff(dev, ref),
                    "spearman": spearman(flat(dev), ref_flat),
                    "finite": all(bool(torch.isfinite(t).all()) for t in dev.values()),
                    "on_device": on_device,
                    "repeat_identical": None if again is None else all(
                        torch.equal(dev[n], again[n]) for n in dev),
                    "masks": {str(sp): mask_agreement(ref_flat, ref_masks[sp], flat(masks[sp]),
                                                      args.tie_rtol) for sp in SPARSITIES},
                }
                sec.results["scores"].append(row)
                ties_ok = all(m["differ"] == m["near_ties"] and m["kept"] == m["kept_device"]
                              for m in row["masks"].values())
                worst = max(m["max_tie_distance"] for m in row["masks"].values())
                sec.check(
                    f"{name} {run_label} [{variant}]",
                    ties_ok and row["finite"] and on_device
                    and row["max_rel_diff"] <= args.score_rtol,
                    f"max rel diff {row['max_rel_diff']:.2e}; differing mask positions "
                    + ", ".join(f"{m['differ']} ({m['near_ties']} near-ties) at {sp}"
                                for sp, m in row["masks"].items())
                    + f"; worst distance to threshold {worst:.1e}",
                )
        sec.check(f"{name}: model unchanged by scoring on {ctx.device.type}",
                  state_equal(dev_model, before))
        if train_masks is not None:
            sec.results["training"].append(
                masked_training(ctx, sec, label, dev_model, dev_batches, train_masks))


def masked_training(ctx: Context, sec: Section, label: str, model: nn.Module,
                    batches: list[tuple[Tensor, Tensor]], masks: dict[str, Tensor]
                    ) -> dict[str, Any]:
    """``train_epoch`` steps on the pruned model as the pipeline trains; pruned stays zero?"""
    model = copy.deepcopy(model)
    fp.apply_masks(model, masks)
    optimizer = make_optimizer(model, TrainConfig(lr=0.05))  # SGD, momentum 0.9, wd 5e-4
    masker = fp.Masker(model, masks, guard=False)  # as fishprune.pipeline.fit
    params = fp.prunable_parameters(model)
    start = {n: p.detach().clone() for n, p in params.items()}
    dtypes: set[str] = set()
    handle = model.register_forward_hook(
        lambda _m, _a, out: dtypes.add(str(out.dtype).removeprefix("torch.")))
    steps = [batches[i % len(batches)] for i in range(ctx.sizes.train_steps)]
    try:
        loss, _ = train_epoch(model, steps, optimizer, masker, device=ctx.device)
    finally:
        handle.remove()
    pruned_nonzero = momentum_nonzero = moved_kept = kept = 0
    for n, p in params.items():
        pruned = ~masks[n].to(p.device)
        pruned_nonzero += int((p.detach()[pruned] != 0).sum())
        buf = optimizer.state[p].get("momentum_buffer")
        momentum_nonzero += 0 if buf is None else int((buf[pruned] != 0).sum())
        moved_kept += int((p.detach() != start[n])[~pruned].sum())
        kept += int((~pruned).sum())
    expected = "bfloat16" if ctx.device.type == "cuda" else "float32"
    row = {"model": label, "steps": len(steps), "loss": loss, "violations": masker.violations(),
           "pruned_nonzero": pruned_nonzero, "momentum_nonzero": momentum_nonzero,
           "kept_moved": moved_kept / max(kept, 1), "forward_dtypes": sorted(dtypes)}
    sec.check(f"{label}: masked training on {ctx.device.type}",
              row["violations"] == 0 and pruned_nonzero == 0 and momentum_nonzero == 0
              and row["kept_moved"] > 0.5 and math.isfinite(loss) and dtypes == {expected},
              f"{pruned_nonzero} pruned weights and {momentum_nonzero} momentum entries non-zero "
              f"after {len(steps)} steps; {row['kept_moved']:.0%} of kept weights moved; "
              f"forward in {', '.join(sorted(dtypes))} (expected {expected}); loss {loss:.4f}")
    return row


# --- 2. per-sample Fisher ------------------------------------------------------------------------


def section_per_sample(ctx: Context, sec: Section) -> None:
    s, args = ctx.sizes, ctx.args
    model = to_device(seeded_model("lenet5", 1.0, 1, 28, args.seed), ctx.device,
                      args.channels_last)
    data = cpu_batches(1, s.samples, (1, 28, 28), args.seed + 1)[0]
    inputs, targets = data[0].to(ctx.device), data[1].to(ctx.device)
    batches = [(inputs[i : i + s.sample_batch], targets[i : i + s.sample_batch])
               for i in range(0, s.samples, s.sample_batch)]
    log(f"[per_sample] timing per_sample=True against {s.samples} one-sample passes")
    timing = paired(lambda: one_sample_loop(model, inputs, targets),
                    lambda: fp.score(model, "fts", batches, per_sample=True),
                    s.per_sample_repeats, ctx.device)
    speedup = 1 / timing["ratio"]
    goal = PER_SAMPLE_TARGET[ctx.device.type]
    sec.results = {"model": "lenet5", "samples": s.samples, "batch_size": s.sample_batch,
                   "repeats": s.per_sample_repeats, "loop_s": timing["base_s"],
                   "per_sample_s": timing["time_s"], "speedup": speedup, "accuracy": []}
    sec.target(f"per_sample=True vs one-sample loop ({ctx.device.type})", speedup,
               f"≥ {goal:g}×", speedup >= goal)
    params = fp.prunable_parameters(model)
    for variant in ctx.variants:
        with precision(variant):
            fisher = fp.score(model, "fd", batches, per_sample=True)
            fts = fp.score(model, "fts", batches, per_sample=True)
            squares = one_sample_loop(model, inputs, targets)  # Σ_n g_n², prunable order
            loss = F.cross_entropy(model(inputs), targets)  # ḡ: the mean over all samples
            mean = torch.autograd.grad(loss, list(params.values()))
        ref_fisher = {n: sq / s.samples for n, sq in zip(params, squares)}
        ref_fts = {n: (w.detach() * g + 0.5 * w.detach().square() * ref_fisher[n]).abs()
                   for (n, w), g in zip(params.items(), mean)}
        row = {"variant": variant, "fisher_max_rel_diff": max_rel_diff(fisher, ref_fisher),
               "fts_max_rel_diff": max_rel_diff(fts, ref_fts)}
        sec.results["accuracy"].append(row)
        worst = max(row["fisher_max_rel_diff"], row["fts_max_rel_diff"])
        if variant == "default" and ctx.device.type == "cuda":
            sec.notes.append(f"default precision (the loop's cuDNN convolutions may use TF32): "
                             f"max relative difference {worst:.2e}, not checked")
        else:
            sec.check(f"per-sample F̂ and FTS equal the one-sample loop [{variant}]",
                      worst <= PER_SAMPLE_RTOL,
                      f"max relative difference {worst:.2e} (≤ {PER_SAMPLE_RTOL:g})")


# --- 3. scoring cost -----------------------------------------------------------------------------


def section_scoring_cost(ctx: Context, sec: Section) -> None:
    s, args = ctx.sizes, ctx.args
    model = to_device(seeded_model("resnet18", s.cost_width, 3, 32, args.seed), ctx.device,
                      args.channels_last)
    batches = moved(cpu_batches(1, s.cost_batch, (3, 32, 32), args.seed), ctx.device)
    for _ in range(3):  # warm-up: cuDNN/cuBLAS handles, allocator
        plain_pass(model, batches)
    rows = []
    for crit in fp.criteria():
        if ctx.remaining() < 20:
            sec.cut(f"stopped before {crit}")
            break
        options: dict[str, Any] = {"probes": s.cost_probes} if crit in HUTCHINSON_CRITERIA else {}
        log(f"[scoring_cost] resnet18 {crit}")
        timing = paired(lambda: plain_pass(model, batches),
                        lambda c=crit, o=options: fp.score(model, c, batches, seed=args.seed, **o),
                        s.cost_repeats, ctx.device)
        per = s.cost_probes if crit in HUTCHINSON_CRITERIA else 1
        limit, measure = TARGETS.get(crit, (None, "time / plain (one round)"))
        row = {"criterion": crit, **timing, "normalised": timing["ratio"] / per,
               "measure": measure, "target": limit}
        rows.append(row)
        if limit is not None:
            sec.target(f"{crit}: {measure}", row["normalised"], f"≤ {limit:g}",
                       row["normalised"] <= limit)
    sec.results = {"model": f"resnet18 (width {s.cost_width:g}, 3×32×32)",
                   "batch_size": s.cost_batch, "probes": s.cost_probes,
                   "repeats": s.cost_repeats, "rows": rows}


# --- 4. training throughput ----------------------------------------------------------------------


def section_training(ctx: Context, sec: Section) -> None:
    s, args = ctx.sizes, ctx.args
    spec = CIFAR_SPECS["cifar10"]
    gen = torch.Generator().manual_seed(args.seed)
    x = torch.randint(0, 256, (s.images, 3, 32, 32), dtype=torch.uint8, generator=gen)
    y = torch.randint(0, 10, (s.images,), generator=gen)
    model = to_device(seeded_model("resnet18", s.train_width, 3, 32, args.seed), ctx.device,
                      args.channels_last)
    scores = {n: w.detach().abs() for n, w in fp.prunable_parameters(model).items()}
    masks = fp.select(scores, TRAIN_SPARSITY)  # the masking cost does not depend on the criterion

    def batches_factory() -> Callable[[], TensorBatches]:
        data = TensorBatches(x, y, batch_size=s.train_batch, mean=spec.mean, std=spec.std,
                             shuffle=True, seed=args.seed, augment=True, device=ctx.device)

        def next_epoch() -> TensorBatches:
            data.set_epoch(data.epoch + 1)
            return data

        return next_epoch

    loops = {"dense": Loop(model, batches_factory(), None, ctx.device),
             "masked": Loop(model, batches_factory(), masks, ctx.device)}
    n_batches = -(-s.images // s.train_batch)
    for loop in loops.values():  # warm-up: kernels, allocator, optimizer state
        loop.start_pass()
        loop.run(min(8, n_batches))
    epoch_s = {}
    for variant, loop in loops.items():  # one uninterrupted epoch each, as the pipeline runs it
        loop.start_pass()
        epoch_s[variant] = loop.run(n_batches)
    chunks: dict[str, list[float]] = {v: [] for v in loops}
    passes: dict[str, list[float]] = {v: [] for v in loops}
    for r in range(s.passes):
        if ctx.remaining() < 15:
            sec.cut(f"stopped after {r} interleaved passes")
            break
        log(f"[training] interleaved pass {r + 1}/{s.passes}")
        for loop in loops.values():
            loop.start_pass()
        total = dict.fromkeys(loops, 0.0)
        for c in range(-(-n_batches // s.chunk)):
            order = ("dense", "masked") if (r + c) % 2 == 0 else ("masked", "dense")
            for variant in order:
                seconds = loops[variant].run(s.chunk)
                chunks[variant].append(seconds)
                total[variant] += seconds
        for v in loops:
            passes[v].append(total[v])
    ratio = (statistics.median(m / d for m, d in zip(chunks["masked"], chunks["dense"]))
             if chunks["dense"] else epoch_s["masked"] / epoch_s["dense"])
    timed_passes = {v: passes[v] or [epoch_s[v]] for v in loops}
    sec.results = {
        "model": f"resnet18 (width {s.train_width:g})", "images": s.images,
        "batch_size": s.train_batch, "augment": True, "passes": len(passes["dense"]),
        "chunk_batches": s.chunk, "epoch_s": epoch_s,
        "images_per_s": {v: s.images / statistics.median(timed_passes[v]) for v in loops},
        "masked_over_dense": ratio, "pass_seconds": passes,
        "step_ms": {v: 1000 * epoch_s[v] / n_batches for v in loops},  # unsynchronized steps
        "breakdown_ms": step_breakdown(ctx, loops["masked"], min(s.breakdown_steps, n_batches)),
    }
    sec.target("masked / dense training time", ratio, f"≤ {MASKED_TARGET:g}",
               ratio <= MASKED_TARGET)
    masker = loops["masked"].masker
    assert masker is not None
    violations = masker.violations()
    sec.check("pruned weights exactly zero after the masked epochs", violations == 0,
              f"{violations} non-zero")


def step_breakdown(ctx: Context, loop: Loop, steps: int) -> dict[str, float]:
    """Median milliseconds per phase of one ``train_epoch`` step, each phase synchronized.

    The phases mirror ``fishprune.train.train_epoch``: batch (gather, augmentation,
    normalization in ``TensorBatches``), forward (autocast), backward, mask_grads, optimizer
    step, metrics (the on-device loss/accuracy sums).
    """
    model, optimizer, masker = loop.model, loop.optimizer, loop.masker
    loop.start_pass()
    batches = loop.current
    model.train()
    loss_sum = torch.zeros((), device=ctx.device)
    correct = torch.zeros((), device=ctx.device, dtype=torch.long)
    phases: dict[str, list[float]] = {}

    def mark(name: str, start: float) -> float:
        synchronize(ctx.device)
        now = time.perf_counter()
        phases.setdefault(name, []).append(1000 * (now - start))
        return now

    for _ in range(steps):
        synchronize(ctx.device)
        t = time.perf_counter()
        inputs, targets = next(batches)
        t = mark("batch", t)
        with autocast(ctx.device):
            outputs = model(inputs)
            loss = F.cross_entropy(outputs, targets)
        t = mark("forward", t)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        t = mark("backward", t)
        if masker is not None:
            masker.mask_grads_()
        t = mark("mask_grads", t)
        optimizer.step()
        if masker is not None and masker.guard:
            masker.mask_weights_()
        t = mark("optimizer_step", t)
        loss_sum += loss.detach() * targets.shape[0]
        correct += (outputs.detach().argmax(1) == targets).sum()
        mark("metrics", t)
    medians = {name: statistics.median(times) for name, times in phases.items()}
    medians["sum"] = sum(medians.values())
    return medians


# --- 5. end to end -------------------------------------------------------------------------------


def run_cli(ctx: Context, device: str, role: str, timeout: float) -> dict[str, Any]:
    """``fishprune run`` in a subprocess on ``device``; the log goes to ``e2e-<role>.log``."""
    s, args = ctx.sizes, ctx.args
    dataset = args.dataset or s.dataset
    work = Path(tempfile.mkdtemp(prefix="gpu-check-e2e-"))
    command = [sys.executable, "-m", "fishprune", "run", "--model", "lenet5",
               "--dataset", dataset, "--device", device, "--seed", str(args.seed),
               "--quiet", "--out", str(work), *s.run_args]
    if args.data_dir:
        command += ["--data-dir", args.data_dir]
    logfile = ctx.out / f"e2e-{role}.log"
    row: dict[str, Any] = {"role": role, "device": device, "command": shlex.join(command),
                           "log": logfile.name}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if args.threads and device == "cpu":
        env["OMP_NUM_THREADS"] = str(args.threads)  # torch's default intra-op thread count
    start = time.perf_counter()
    try:
        with open(logfile, "w") as fh:
            proc = subprocess.run(command, stdout=fh, stderr=subprocess.STDOUT, timeout=timeout,
                                  env=env, check=False)
        row["returncode"] = proc.returncode
        row["wall_s"] = time.perf_counter() - start
        if proc.returncode != 0:
            row["log_tail"] = logfile.read_text(errors="replace").strip().splitlines()[-5:]
        results = sorted(work.glob("*/result.json"))
        if results:
            result = json.loads(results[0].read_text())
            prov = json.loads((results[0].parent / "provenance.json").read_text())
            row.update(test_acc=result["test_acc"], best_val_acc=result["best_val_acc"],
                       score_seconds=result["score_seconds"],
                       train_seconds=result["train_seconds"], ran_on=prov["device"],
                       device_name=prov["device_name"])
    except subprocess.TimeoutExpired:
        row.update(returncode=None, wall_s=time.perf_counter() - start, timed_out=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return row


def section_end_to_end(ctx: Context, sec: Section) -> None:
    args = ctx.args
    dataset = args.dataset or ctx.sizes.dataset
    try:  # no download attempts on a machine without network: say what is missing, now
        load_dataset(dataset, args.data_dir, download=False)
    except Exception as err:
        raise RuntimeError(f"{dataset} not found (pass --data-dir; see BENCHMARKS.md): {err}"
                           ) from err
    runs = []
    for device, role in ((ctx.device.type, "device"), ("cpu", "cpu-reference")):
        log(f"[end_to_end] fishprune run --device {device} ({role})")
        row = run_cli(ctx, device, role, timeout=max(10.0, ctx.remaining() - 5))
        runs.append(row)
        if row.get("timed_out"):
            sec.cut(f"{role} run killed after {row['wall_s']:.0f} s; log {row['log']}")
            break
        ok = row.get("returncode") == 0 and row.get("ran_on", "").startswith(device)
        sec.check(f"{role}: fishprune run --device {device} succeeds on {device}", ok,
                  f"exit {row.get('returncode')}, ran on "
                  f"{row.get('ran_on')} ({row.get('device_name')}), {row['wall_s']:.1f} s; "
                  f"log {row['log']}" + "".join(f" / {line}" for line in row.get("log_tail", [])))
        if "test_acc" in row:
            sec.check(f"{role}: the run learns (test accuracy ≥ {2 * CHANCE:.0%})",
                      row["test_acc"] >= 2 * CHANCE, f"test accuracy {row['test_acc']:.2%}")
    sec.results = {"dataset": dataset, "runs": runs}
    if len(runs) == 2 and all("test_acc" in r for r in runs):
        delta = runs[0]["test_acc"] - runs[1]["test_acc"]
        sec.results["acc_delta"] = delta
        sec.check(f"test accuracy {ctx.device.type} vs cpu within {args.acc_tol:g}",
                  abs(delta) <= args.acc_tol, f"difference {delta:+.2%}")


SECTIONS: tuple[tuple[str, str, Callable[[Context, Section], None]], ...] = (
    ("correctness", "1. Correctness: device vs CPU scores, masks, masked training",
     section_correctness),
    ("per_sample", "2. Per-sample Fisher vs a one-sample loop", section_per_sample),
    ("scoring_cost", "3. Scoring cost ÷ one plain forward+backward (ResNet-18)",
     section_scoring_cost),
    ("training", "4. Training throughput, dense vs 98% masked (ResNet-18)", section_training),
    ("end_to_end", "5. fishprune run end to end, device vs CPU", section_end_to_end),
)


# --- environment ---------------------------------------------------------------------------------


def finite(obj: Any) -> Any:
    """``obj`` with non-finite floats as None: strict JSON (section order kept, unlike
    ``atomic.write_json``, which sorts keys)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [finite(v) for v in obj]
    return obj


def environment(device: torch.device, command: str) -> dict[str, Any]:
    env = provenance(device)
    env.update(command=command, cpu=cpu_name(), cpu_cores=os.cpu_count(),
               cuda=torch.version.cuda, cuda_available=torch.cuda.is_available())
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                   gpu_capability=f"{props.major}.{props.minor}",
                   cudnn=torch.backends.cudnn.version(),
                   tf32_cudnn=torch.backends.cudnn.allow_tf32,
                   tf32_matmul=torch.backends.cuda.matmul.allow_tf32, driver=gpu_driver())
    return env


def gpu_driver() -> str | None:
    """The NVIDIA driver version from ``nvidia-smi``, or None where it cannot be asked."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.strip().splitlines()[0] if out.strip() else None


# --- main ----------------------------------------------------------------------------------------


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--quick", action="store_true", help="tiny sizes: every section in seconds")
    p.add_argument("--out", default="gpu-check", help="report folder (default: %(default)s)")
    p.add_argument("--data-dir", default=None,
                   help="where Fashion-MNIST lies; forwarded to `fishprune run`")
    p.add_argument("--dataset", default=None,
                   help="dataset of section 5 (default: fashion-mnist; synthetic with --quick)")
    p.add_argument("--sections", default=",".join(name for name, _, _ in SECTIONS),
                   help="comma-separated sections to run (default: all)")
    p.add_argument("--budget", type=float, default=480.0,
                   help="seconds for everything; sections that no longer fit are skipped")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--reference-dtype", choices=("auto", "float32", "float64"), default="auto",
                   help="CPU reference of section 1 (auto: float32 for cuda, float64 for cpu)")
    p.add_argument("--tie-rtol", type=float, default=1e-3,
                   help="a differing mask position within this relative distance of the "
                        "threshold is a float tie (default: %(default)g)")
    p.add_argument("--score-rtol", type=float, default=1e-2,
                   help="largest max relative score difference allowed: a guard against gross "
                        "errors; float ties are judged on the masks (default: %(default)g)")
    p.add_argument("--acc-tol", type=float, default=0.02,
                   help="largest test-accuracy difference device vs CPU (default: %(default)g)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads, also for the CPU runs of section 5 (default: torch's; "
                        "1 with --quick, where threads cost more than they save)")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                   help="device models in channels_last, as the pipeline on CUDA (default: on)")
    args = p.parse_args(argv)
    names = [name for name, _, _ in SECTIONS]
    args.sections = [x for x in args.sections.split(",") if x]
    unknown = sorted(set(args.sections) - set(names))
    if unknown:
        p.error(f"unknown sections {unknown}; valid: {names}")
    if args.device == "cuda" and not torch.cuda.is_available():
        p.error("--device cuda, but torch sees no CUDA GPU (use --device cpu --quick on a CPU)")
    return args


def main(argv: list[str] | None = None) -> int:
    started = time.monotonic()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    sizes = QUICK if args.quick else FULL
    if args.threads is None and args.quick:
        args.threads = 1
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _main(args, sizes, argv, started)
    finally:
        torch.set_num_threads(threads)


def _main(args: argparse.Namespace, sizes: Sizes, argv: list[str], started: float) -> int:
    device = torch.device(args.device)
    if args.reference_dtype == "auto":
        reference = torch.float32 if device.type == "cuda" else torch.float64
    else:
        reference = getattr(torch, args.reference_dtype)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = shlex.join([sys.executable, str(Path(__file__).resolve().relative_to(ROOT)), *argv])
    ctx = Context(args, sizes, device, reference, out, started + args.budget)
    sections = [Section(name, title) for name, title, _ in SECTIONS]
    report: dict[str, Any] = {
        "environment": environment(device, command), "quick": args.quick, "budget_s": args.budget,
        "sizes": asdict(sizes), "settings": {k: v for k, v in vars(args).items()},
    }

    def save() -> None:
        failed = [f"{sec.name}: {c['name']}" for sec in sections for c in sec.checks
                  if not c["passed"]] + [f"{sec.name}: {sec.error}" for sec in sections
                                         if sec.error]
        skipped = [sec.name for sec in sections if sec.status == "skipped"]
        cut = [sec.name for sec in sections if sec.status == "incomplete"]
        if failed:
            verdict = f"FAILED ({len(failed)}): " + "; ".join(failed[:3])
            verdict += " …" if len(failed) > 3 else ""
        else:
            verdict = "all checks passed"
            gaps = [f"{what}: {', '.join(names)}"
                    for what, names in (("incomplete", cut), ("skipped", skipped)) if names]
            verdict += f" ({'; '.join(gaps)})" if gaps else ""
        report.update(total_s=time.monotonic() - started, failed=failed, skipped=skipped,
                      incomplete=cut,
                      passed=not failed, verdict=verdict,
                      sections={sec.name: asdict(sec) for sec in sections})
        atomic.write_text(out / "report.json", json.dumps(finite(report), indent=1) + "\n")
        atomic.write_text(out / "report.md", markdown(report, sections) + "\n")

    log(f"gpu_check on {device} ({report['environment']['device_name']}), torch "
        f"{torch.__version__}, budget {args.budget:.0f} s, report in {out}/")
    for sec, (name, _, run) in zip(sections, SECTIONS):
        estimate = sizes.estimates.get(name, 0.0)
        if name not in args.sections:
            sec.status = "skipped"
            sec.notes.append("not selected (--sections)")
        elif ctx.remaining() < estimate:
            sec.status = "skipped"
            sec.notes.append(f"time budget: {ctx.remaining():.0f} s left, the section needs "
                             f"up to {estimate:.0f} s")
        else:
            log(f"== {sec.title}")
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.monotonic()
            try:
                run(ctx, sec)
            except Exception as err:  # record it and go on: one bug must not cost the rest
                sec.error = f"{type(err).__name__}: {err}"
                sec.traceback = traceback.format_exc()
                log(f"   error: {sec.error}")
            sec.wall_s = time.monotonic() - start
            if device.type == "cuda":
                sec.peak_gpu_memory_gib = torch.cuda.max_memory_allocated(device) / 2**30
                torch.cuda.empty_cache()
            sec.status = ("error" if sec.error else
                          "fail" if any(not c["passed"] for c in sec.checks) else
                          "incomplete" if sec.incomplete else "pass")
            log(f"   {sec.status} in {sec.wall_s:.1f} s")
        save()
    for sec in sections:  # the failures again, for a reader who only sees the log's tail
        for c in sec.checks:
            if not c["passed"]:
                log(f"FAILED {sec.name}: {c['name']}: {c['detail']}")
        if sec.error:
            log(f"ERROR {sec.name}: {sec.error}")
    log(f"{report['verdict']}  ({report['total_s']:.1f} s) → {out / 'report.md'}")
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
