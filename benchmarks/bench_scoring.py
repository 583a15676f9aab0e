"""Scoring cost of every criterion, as ratios to one plain forward+backward pass, within one run.

    python -m benchmarks.bench_scoring                       # full run (~10 min on 2 CPU cores)
    python -m benchmarks.bench_scoring --quick               # smoke run (seconds)
    python -m benchmarks.bench_scoring --models lenet5,resnet18:0.25 --criteria fts,hts --out r.json

The baseline is one plain pass over the same batches: for each batch, zero the gradients, then
``F.cross_entropy(model(x), y).backward()`` (model in eval mode, as scoring). Each measurement is
warmed up once, then repeated; the baseline is timed right next to every criterion measurement
(alternating which goes first) and a criterion's ratio is the median of the per-repeat ratios, so
load on the machine affects both sides of a ratio alike. Absolute times are medians too.

Sections (Markdown on stdout, progress on stderr):
1. every criterion's time / plain pass; hd/hp/hts also per probe: time / (probes × plain pass);
2. per-sample Fisher (``per_sample=True``) against a loop of one-sample backward passes that
   accumulates g² (and against ``torch.func.vmap(grad)`` for reference), over the same samples;
3. SynFlow: one scoring round, and ``fp.prune`` with its 100-round schedule.
Data is random with Fashion-MNIST's shape (1×28×28, 10 classes): timings do not depend on values.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import fishprune as fp
from fishprune.models import build_model

MOMENT_CRITERIA = ("gn", "snip", "fd", "fp", "fts", "fbss")
HUTCHINSON_CRITERIA = ("hd", "hp", "hts")
#: criterion -> (largest ratio allowed, what the ratio is); synflow is reported without a target
TARGETS: dict[str, tuple[float, str]] = {
    "random": (0.05, "time / plain"),
    "magnitude": (0.05, "time / plain"),
    **{c: (1.1, "time / plain") for c in MOMENT_CRITERIA},
    "grasp": (4.0, "time / plain"),
    **{c: (3.0, "time / (probes × plain)") for c in HUTCHINSON_CRITERIA},
}
PER_SAMPLE_TARGET = 2.5  # speed-up over the one-sample loop, LeNet-5
PER_SAMPLE_TARGET_MODEL = "lenet5"


# --- timing ----------------------------------------------------------------------------------


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    """Wall-clock seconds of ``fn()``, synchronising the GPU before and after."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start


def paired(
    base: Callable[[], Any], fn: Callable[[], Any], repeats: int, device: torch.device
) -> dict[str, float]:
    """Warm both up once, then time them side by side ``repeats`` times (alternating order)."""
    fn()
    base()
    base_times: list[float] = []
    fn_times: list[float] = []
    ratios: list[float] = []
    for r in range(repeats):
        if r % 2 == 0:
            tb, tf = timed(base, device), timed(fn, device)
        else:
            tf, tb = timed(fn, device), timed(base, device)
        base_times.append(tb)
        fn_times.append(tf)
        ratios.append(tf / tb)
    return {
        "time_s": statistics.median(fn_times),
        "base_s": statistics.median(base_times),
        "ratio": statistics.median(ratios),
        "ratio_of_minima": min(fn_times) / min(base_times),
    }


# --- workloads -------------------------------------------------------------------------------


def plain_pass(model: nn.Module, batches: list[tuple[Tensor, Tensor]]) -> None:
    """One forward+backward per batch with standard cross entropy, gradients zeroed."""
    for inputs, targets in batches:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(inputs), targets).backward()
    model.zero_grad(set_to_none=True)


def one_sample_loop(model: nn.Module, inputs: Tensor, targets: Tensor) -> list[Tensor]:
    """Σ_n g_n² with one backward pass per sample (batch of size 1), prunable weights only."""
    tensors = list(fp.prunable_parameters(model).values())
    squares = [torch.zeros_like(p) for p in tensors]
    for n in range(inputs.shape[0]):
        loss = F.cross_entropy(model(inputs[n : n + 1]), targets[n : n + 1])
        grads = torch.autograd.grad(loss, tensors)
        torch._foreach_addcmul_(squares, grads, grads)
    return squares


def vmap_squares(model: nn.Module, inputs: Tensor, targets: Tensor, chunk: int) -> list[Tensor]:
    """Σ_n g_n² with ``torch.func.vmap(grad)`` over chunks of ``chunk`` samples (reference)."""
    from torch.func import functional_call, grad, vmap

    params = {n: p.detach() for n, p in fp.prunable_parameters(model).items()}
    frozen = {n: t.detach() for n, t in model.named_parameters() if n not in params}
    frozen.update(dict(model.named_buffers()))

    def sample_loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, {**frozen, **p}, (x.unsqueeze(0),))
        return F.cross_entropy(out, y.unsqueeze(0))

    squares = {n: torch.zeros_like(p) for n, p in params.items()}
    per_sample_grad = vmap(grad(sample_loss), in_dims=(None, 0, 0))
    for start in range(0, inputs.shape[0], chunk):
        s = slice(start, start + chunk)
        for name, g in per_sample_grad(params, inputs[s], targets[s]).items():
            squares[name].add_(g.square().sum(0))
    return list(squares.values())


def random_batches(
    count: int, size: int, device: torch.device, generator: torch.Generator
) -> list[tuple[Tensor, Tensor]]:
    """``count`` batches of ``size`` Fashion-MNIST-shaped random inputs and labels."""
    return [
        (
            torch.randn(size, 1, 28, 28, generator=generator).to(device),
            torch.randint(0, 10, (size,), generator=generator).to(device),
        )
        for _ in range(count)
    ]


def make_model(spec: str, device: torch.device, seed: int) -> tuple[str, nn.Module]:
    """``spec`` is ``name`` or ``name:width`` (e.g. ``resnet18:0.25``); eval mode."""
    name, _, width = spec.partition(":")
    torch.manual_seed(seed)
    model = build_model(name, in_channels=1, num_classes=10, image_size=28,
                        width=float(width or 1.0))
    return name, model.to(device).eval()


# --- sections --------------------------------------------------------------------------------


def bench_criteria(spec: str, args: argparse.Namespace, device: torch.device) -> list[dict]:
    _, model = make_model(spec, device, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    batches = random_batches(args.batches, args.batch_size, device, gen)
    rows = []
    for crit in args.criteria:
        options: dict[str, Any] = {}
        data = batches
        if crit in HUTCHINSON_CRITERIA:  # probes × passes: fewer batches keep the run short
            options, data = {"probes": args.probes}, batches[: args.hutchinson_batches]
        log(f"[{spec}] {crit} {options or ''} on {len(data)} batch(es)")
        result = paired(
            lambda d=data: plain_pass(model, d),
            lambda c=crit, o=options, d=data: fp.score(model, c, d, seed=args.seed, **o),
            args.repeats, device,
        )
        log(f"  time/plain {result['ratio']:.3f} ({result['time_s']:.4f} s / "
            f"{result['base_s']:.4f} s)")
        per = args.probes if crit in HUTCHINSON_CRITERIA else 1
        limit, measure = TARGETS.get(crit, (None, "time / plain"))
        normalised = result["ratio"] / per
        rows.append({
            "model": spec, "criterion": crit, "options": options, "batches": len(data), **result,
            "normalised": normalised, "measure": measure, "target": limit,
            "status": None if limit is None else ("PASS" if normalised <= limit else "MISS"),
        })
    return rows


def bench_per_sample(spec: str, args: argparse.Namespace, device: torch.device) -> dict:
    name, model = make_model(spec, device, args.seed)
    gen = torch.Generator().manual_seed(args.seed + 1)
    size = args.per_sample_batch
    samples = args.samples if name == PER_SAMPLE_TARGET_MODEL else args.samples_other
    batches = random_batches(-(-samples // size), size, device, gen)
    inputs = torch.cat([x for x, _ in batches])[:samples]
    targets = torch.cat([y for _, y in batches])[:samples]
    batches = [(inputs[i : i + size], targets[i : i + size]) for i in range(0, len(inputs), size)]
    log(f"[{spec}] per-sample fts over {len(inputs)} samples")

    def scored() -> None:
        fp.score(model, "fts", batches, per_sample=True)

    loop = paired(lambda: one_sample_loop(model, inputs, targets), scored, args.repeats, device)
    log(f"  loop {loop['base_s']:.3f} s, per_sample {loop['time_s']:.3f} s")
    plain = paired(lambda: plain_pass(model, batches), scored, args.repeats, device)
    log(f"  per_sample / plain {plain['ratio']:.3f}")
    row = {
        "model": spec, "samples": len(inputs), "batch_size": size,
        "loop_s": loop["base_s"], "per_sample_s": loop["time_s"], "speedup": 1 / loop["ratio"],
        "plain_s": plain["base_s"], "vs_plain": plain["ratio"],
        "target": PER_SAMPLE_TARGET if name == PER_SAMPLE_TARGET_MODEL else None,
    }
    if args.vmap:
        log(f"[{spec}] per-sample torch.func.vmap(grad) reference")
        vm = paired(lambda: one_sample_loop(model, inputs, targets),
                    lambda: vmap_squares(model, inputs, targets, size),
                    max(1, args.repeats // 2), device)
        row["vmap_s"], row["vmap_vs_loop"] = vm["time_s"], vm["ratio"]
    if row["target"] is not None:
        row["status"] = "PASS" if row["speedup"] >= row["target"] else "MISS"
    return row


def bench_synflow_prune(spec: str, args: argparse.Namespace, device: torch.device) -> dict:
    _, model = make_model(spec, device, args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    batches = random_batches(args.batches, args.batch_size, device, gen)
    log(f"[{spec}] synflow prune, {args.synflow_rounds} rounds")
    times, bases = [], []
    prune_repeats = max(1, min(args.repeats, 3))
    for r in range(prune_repeats + 1):  # the first is the warm-up
        victim = copy.deepcopy(model)
        tb = timed(lambda: plain_pass(model, batches), device)
        tp = timed(lambda v=victim: fp.prune(v, "synflow", args.sparsity, batches,
                                             rounds=args.synflow_rounds), device)
        if r:
            times.append(tp)
            bases.append(tb)
    return {
        "model": spec, "rounds": args.synflow_rounds, "sparsity": args.sparsity,
        "prune_s": statistics.median(times), "plain_s": statistics.median(bases),
        "ratio": statistics.median(t / b for t, b in zip(times, bases)),
    }


# --- report ----------------------------------------------------------------------------------


def environment(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    env = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks.bench_scoring", *sys.argv[1:]]),
        "fishprune": fp.__version__, "torch": torch.__version__,
        "python": platform.python_version(), "cpu": cpu,
        "cpu_cores": len(os.sched_getaffinity(0)), "threads": torch.get_num_threads(),
        "device": str(device), "load_before": round(os.getloadavg()[0], 2),
        "settings": {k: v for k, v in vars(args).items() if k not in ("out", "report")},
    }
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
    return env


def markdown(env: dict, rows: list[dict], per_sample: list[dict], synflow: list[dict]) -> str:
    """The results as Markdown: a provenance header, then one table per section."""
    args = argparse.Namespace(**env["settings"])
    out = [
        f"Command: `{env['command']}`  ",
        f"Date: {env['date']}; fishprune {env['fishprune']}, torch {env['torch']}, "
        f"Python {env['python']}  ",
        f"Machine: {env['cpu']}, {env['cpu_cores']} cores, torch threads = {env['threads']}, "
        f"device {env['device']}" + (f" ({env['gpu']})" if "gpu" in env else "")
        + f"; 1-min load average {env['load_before']} before, {env['load_after']} after  ",
        f"Batches: {args.batches} × {args.batch_size} random 1×28×28 inputs, 10 classes "
        f"(hd/hp/hts: the first {min(args.hutchinson_batches, args.batches)}, "
        f"probes = {args.probes}); eval mode; repeats = {args.repeats} (median).",
        "",
    ]
    if rows:
        out += [
            "| model | criterion | time (s) | plain pass (s) | time / plain | min / min | "
            "normalised | target | status |",
            "|---|---|---:|---:|---:|---:|---:|---|---|",
        ]
        for r in rows:
            target = "report" if r["target"] is None else f"≤ {r['target']:g} ({r['measure']})"
            out.append(
                f"| {r['model']} | {r['criterion']} | {r['time_s']:.4f} | {r['base_s']:.4f} | "
                f"{r['ratio']:.3f} | {r['ratio_of_minima']:.3f} | {r['normalised']:.3f} | "
                f"{target} | {r['status'] or '-'} |"
            )
        out += [
            "",
            "time / plain: median of the per-repeat ratios (the tested number); min / min: "
            "fastest criterion time over fastest plain pass (a check against load spikes); "
            "normalised: time / plain, divided by the probes for hd/hp/hts.",
        ]
        out.append("")
    if per_sample:
        out += [
            "Per-sample Fisher: `fp.score(model, 'fts', batches, per_sample=True)` against a loop "
            "of one-sample backward passes accumulating g² (same samples).",
            "",
            "| model | samples | 1-sample loop (s) | per_sample=True (s) | speed-up | "
            "plain pass (s) | per_sample / plain | vmap(grad) (s) | vmap / loop | target | "
            "status |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
        ]
        for r in per_sample:
            vmap = (f"{r['vmap_s']:.3f} | {r['vmap_vs_loop']:.2f}" if "vmap_s" in r else "- | -")
            target = "report" if r["target"] is None else f"≥ {r['target']:g}×"
            out.append(
                f"| {r['model']} | {r['samples']} (batches of {r['batch_size']}) | "
                f"{r['loop_s']:.3f} | {r['per_sample_s']:.3f} | {r['speedup']:.2f}× | "
                f"{r['plain_s']:.3f} | {r['vs_plain']:.2f} | {vmap} | {target} | "
                f"{r.get('status', '-')} |"
            )
        out.append("")
    if synflow:
        out += [
            "SynFlow, whole schedule: `fp.prune(model, 'synflow', sparsity, batches, rounds=R)` "
            "(score, select and apply every round).",
            "",
            "| model | rounds | sparsity | prune (s) | plain pass (s) | prune / plain |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for r in synflow:
            out.append(
                f"| {r['model']} | {r['rounds']} | {r['sparsity']} | {r['prune_s']:.3f} | "
                f"{r['plain_s']:.4f} | {r['ratio']:.2f} |"
            )
        out.append("")
    return "\n".join(out)


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="lenet5,resnet20",
                   help="comma-separated model specs, name or name:width (default: %(default)s)")
    p.add_argument("--criteria", default="all",
                   help="comma-separated criteria, or 'all' (default)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats per measurement")
    p.add_argument("--batches", type=int, default=4, help="scoring batches")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--probes", type=int, default=10,
                   help="Hutchinson probes for hd/hp/hts (default: the library's 10)")
    p.add_argument("--hutchinson-batches", type=int, default=1,
                   help="hd/hp/hts (and their plain pass) use only the first N batches")
    p.add_argument("--samples", type=int, default=1000,
                   help="samples for the per-sample section on lenet5 (the target)")
    p.add_argument("--samples-other", type=int, default=250,
                   help="samples for the per-sample section on the other models")
    p.add_argument("--per-sample-batch", type=int, default=125,
                   help="batch size of the per_sample=True scoring batches")
    p.add_argument("--vmap", action=argparse.BooleanOptionalAction, default=True,
                   help="also time torch.func.vmap(grad) per-sample gradients (reference)")
    p.add_argument("--per-sample", action=argparse.BooleanOptionalAction, default=True,
                   help="run the per-sample section")
    p.add_argument("--synflow-rounds", type=int, default=100)
    p.add_argument("--sparsity", type=float, default=0.9, help="sparsity of the synflow prune")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="torch.set_num_threads (default: the cores this process may use)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true",
                   help="smoke run: 1 repeat, 1×16 batch, 2 probes, 20 samples, 3 rounds")
    p.add_argument("--out", help="also write the results as JSON to this path (after each "
                   "section, so an interrupted run keeps what it measured)")
    p.add_argument("--report", metavar="JSON", help="print the Markdown of a saved --out file")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.batches, args.batch_size, args.probes = 1, 1, 16, 2
        args.samples, args.samples_other, args.per_sample_batch = 20, 20, 10
        args.synflow_rounds = 3
    names = fp.criteria()
    args.criteria = names if args.criteria == "all" else args.criteria.split(",")
    unknown = sorted(set(args.criteria) - set(names))
    if unknown:
        p.error(f"unknown criteria {unknown}; valid: {names}")
    args.models = args.models.split(",")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.report:
        with open(args.report) as f:
            saved = json.load(f)
        print(markdown(saved["environment"], saved["criteria"], saved["per_sample"],
                       saved["synflow_prune"]))
        return
    torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch.cuda.is_available() is False")
    device = torch.device(args.device)
    env = environment(args, device)
    log(f"torch {env['torch']}, {env['cpu']}, threads {env['threads']}, device {device}")
    start = time.perf_counter()
    rows: list[dict] = []
    per_sample: list[dict] = []
    synflow: list[dict] = []

    def save() -> None:  # after every section, so that a long run killed midway keeps its results
        env["total_s"] = round(time.perf_counter() - start, 1)
        env["load_after"] = round(os.getloadavg()[0], 2)
        if args.out:
            with open(args.out, "w") as f:
                json.dump({"environment": env, "criteria": rows, "per_sample": per_sample,
                           "synflow_prune": synflow}, f, indent=2)

    for spec in args.models:
        rows += bench_criteria(spec, args, device)
        save()
        if args.per_sample:
            per_sample.append(bench_per_sample(spec, args, device))
            save()
        if "synflow" in args.criteria:
            synflow.append(bench_synflow_prune(spec, args, device))
            save()
    log(f"done in {env['total_s']} s")
    print(markdown(env, rows, per_sample, synflow))


if __name__ == "__main__":
    main()
