"""Training throughput: masked vs dense training, and our TensorBatches vs a plain DataLoader.

    python -m benchmarks.bench_training                   # full run (a few minutes, 2 CPU cores)
    python -m benchmarks.bench_training --quick           # smoke run (seconds)
    python -m benchmarks.bench_training --device cuda --threads 2 --images 0 --json r.json

For each model (LeNet-5 and LeNet-300-100 on the Fashion-MNIST training split, real data), three
training loops run :func:`fishprune.train.train_epoch` over the same ``--images`` images with
SGD (lr 0.01, momentum 0.9, weight decay 5e-4, batch 128, shuffled):

``dense``
    our :class:`~fishprune.data.TensorBatches` (resident uint8, one gather + fused normalization
    per batch), no masking;
``masked``
    the same batches with a :class:`fishprune.Masker` at 98% sparsity (gradients masked before
    ``optimizer.step()``, weights after), exactly as the pipeline trains;
``dataloader``
    ``torch.utils.data.DataLoader(TensorDataset(x, y), batch_size=128, shuffle=True)`` over the
    same images, already converted to normalized float32, doing the same dense training.

Each loop is warmed up with a few batches; then, for ``--repeats`` passes over the images, the
three loops take turns every ``--chunk`` batches (rotating who goes first), so a burst of load on
the machine hits all three alike. A ratio is the median over all chunks of the per-chunk time
ratios; a throughput is the median over passes. Target: masked / dense time ≤ 1.05.
Markdown goes to stdout, progress to stderr.
"""

from __future__ import annotations

import argparse
import copy
import datetime as dt
import itertools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import fishprune as fp
from fishprune.data import TensorBatches, load_dataset, stratified_split
from fishprune.models import build_model
from fishprune.train import train_epoch

MODELS = ("lenet5", "lenet300")
VARIANTS = ("dense", "masked", "dataloader")
MASKED_TARGET = 1.05  # masked / dense time per epoch
SPARSITY = 0.98
BATCH_SIZE = 128
WARMUP_BATCHES = 8


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def on_device(loader: Iterable[tuple[Tensor, Tensor]], device: torch.device
              ) -> Iterator[tuple[Tensor, Tensor]]:
    """The DataLoader's CPU batches moved to ``device`` (a no-op on the CPU)."""
    for x, y in loader:
        yield x.to(device, non_blocking=True), y.to(device, non_blocking=True)


class Loop:
    """One training loop: its own model copy, optimizer, batches and optional masker."""

    def __init__(self, model: nn.Module, batches: Callable[[], Iterable[tuple[Tensor, Tensor]]],
                 masks: dict[str, Tensor] | None, device: torch.device) -> None:
        self.model = copy.deepcopy(model)
        self.batches = batches
        self.device = device
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9,
                                         weight_decay=5e-4)
        self.masker = None
        if masks is not None:
            fp.apply_masks(self.model, masks)
            self.masker = fp.Masker(self.model, masks, guard=False)  # as the pipeline
        self.current: Iterator[tuple[Tensor, Tensor]] = iter(())

    def start_pass(self) -> None:
        """Begin a new pass (epoch) over the batches."""
        self.current = iter(self.batches())

    def run(self, batches: int) -> float:
        """Wall seconds of training on the next ``batches`` batches of the current pass."""
        chunk = itertools.islice(self.current, batches)
        synchronize(self.device)
        start = time.perf_counter()
        train_epoch(self.model, chunk, self.optimizer, self.masker, device=self.device)
        synchronize(self.device)
        return time.perf_counter() - start


def make_loops(name: str, x: Tensor, y: Tensor, mean: tuple[float, ...], std: tuple[float, ...],
               device: torch.device) -> dict[str, Loop]:
    """The three loops for model ``name`` over uint8 images ``x`` and labels ``y``."""
    torch.manual_seed(0)
    model = build_model(name, in_channels=x.shape[1], image_size=x.shape[-1]).to(device)
    scores = {n: w.detach().abs() for n, w in fp.prunable_parameters(model).items()}
    masks = fp.select(scores, SPARSITY)  # the masking cost does not depend on the criterion

    def ours() -> Callable[[], TensorBatches]:
        tensor_batches = TensorBatches(x, y, batch_size=BATCH_SIZE, shuffle=True, seed=0,
                                       mean=mean, std=std, device=device)

        def next_epoch() -> TensorBatches:  # a fresh order each pass, as in training
            tensor_batches.set_epoch(tensor_batches.epoch + 1)
            return tensor_batches

        return next_epoch

    m = torch.tensor(mean).view(1, -1, 1, 1)
    s = torch.tensor(std).view(1, -1, 1, 1)
    floats = (x.float() / 255 - m) / s  # what a plain pipeline would precompute
    loader = DataLoader(TensorDataset(floats, y), batch_size=BATCH_SIZE, shuffle=True,
                        generator=torch.Generator().manual_seed(0),
                        pin_memory=device.type == "cuda")
    return {
        "dense": Loop(model, ours(), None, device),
        "masked": Loop(model, ours(), masks, device),
        "dataloader": Loop(model, lambda: on_device(loader, device), None, device),
    }


def bench_model(name: str, x: Tensor, y: Tensor, mean: tuple[float, ...],
                std: tuple[float, ...], repeats: int, chunk: int, device: torch.device
                ) -> dict[str, Any]:
    """Passes over ``x`` by the three loops, interleaved every ``chunk`` batches.

    Ratios are medians over all chunks of the per-chunk time ratios (each pair timed seconds
    apart, so a burst of load on the machine hits both sides); throughputs are medians over
    the passes of images / (summed chunk times).
    """
    loops = make_loops(name, x, y, mean, std, device)
    for loop in loops.values():  # warm-up: allocator, kernels, optimizer state
        loop.start_pass()
        loop.run(WARMUP_BATCHES)
    n_chunks = -(-x.shape[0] // (BATCH_SIZE * chunk))
    chunks: dict[str, list[float]] = {v: [] for v in VARIANTS}
    passes: dict[str, list[float]] = {v: [] for v in VARIANTS}
    for r in range(repeats):
        for loop in loops.values():
            loop.start_pass()
        total = dict.fromkeys(VARIANTS, 0.0)
        for c in range(n_chunks):
            k = r + c
            for variant in VARIANTS[k % 3:] + VARIANTS[:k % 3]:  # rotate who goes first
                seconds = loops[variant].run(chunk)
                chunks[variant].append(seconds)
                total[variant] += seconds
        for v in VARIANTS:
            passes[v].append(total[v])
        log(f"  {name} pass {r + 1}/{repeats}: "
            + "  ".join(f"{v} {total[v]:.2f}s" for v in VARIANTS))
    n = x.shape[0]
    masked_ratio = [m / d for m, d in zip(chunks["masked"], chunks["dense"])]
    loader_ratio = [ld / d for ld, d in zip(chunks["dataloader"], chunks["dense"])]
    return {
        "model": name,
        "images": n,
        "chunk_batches": chunk,
        "images_per_s": {v: n / statistics.median(passes[v]) for v in VARIANTS},
        "masked_over_dense": statistics.median(masked_ratio),
        "masked_over_dense_passes": [m / d for m, d in zip(passes["masked"], passes["dense"])],
        "dataloader_over_ours": statistics.median(loader_ratio),
        "pass_seconds": passes,
    }


def cpu_name() -> str:
    """The CPU model (from /proc/cpuinfo on Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> dict[str, Any]:
    return {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "platform": platform.platform(),
        "processor": cpu_name(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "load_average": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }


def markdown(rows: list[dict[str, Any]], info: dict[str, Any], command: str) -> str:
    lines = [
        f"`{command}`",
        "",
        f"{info['processor']}, {info['cpus']} CPUs, torch {info['torch']}, "
        f"{info['threads']} threads, device {info['device']}, "
        f"load average {', '.join(f'{a:.1f}' for a in info['load_average'] or ())}, "
        f"{info['date']}",
        "",
        "| model | images / pass | dense img/s | masked img/s | masked / dense time "
        f"(target ≤ {MASKED_TARGET}) | DataLoader img/s | TensorBatches speed-up |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        ips = row["images_per_s"]
        ratio = row["masked_over_dense"]
        mark = "" if ratio <= MASKED_TARGET else " **over**"
        lines.append(
            f"| {row['model']} | {row['images']} | {ips['dense']:,.0f} | {ips['masked']:,.0f} | "
            f"{ratio:.3f}{mark} | {ips['dataloader']:,.0f} | "
            f"{row['dataloader_over_ours']:.2f}× |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="auto", choices=("auto", "cpu", "cuda"))
    parser.add_argument("--quick", action="store_true", help="smoke run: 2048 images, 1 pass")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated models")
    parser.add_argument("--images", type=int, default=16384,
                        help="training images per timed pass (0: the whole training split)")
    parser.add_argument("--repeats", type=int, default=3, help="timed passes per loop")
    parser.add_argument("--chunk", type=int, default=8,
                        help="batches each loop trains before the next loop takes over")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    parser.add_argument("--data-dir", default=None, help="where Fashion-MNIST lies")
    parser.add_argument("--json", default=None, help="also write the raw numbers here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    images, repeats = (2048, 1) if args.quick else (args.images, args.repeats)

    ds = load_dataset("fashion-mnist", args.data_dir)
    train_idx, _ = stratified_split(ds.train_y, 0.2, 0)  # the pipeline's training split
    if images:
        train_idx = train_idx[:images]
    x, y = ds.train_x[train_idx], ds.train_y[train_idx]
    info = machine(device)
    log(f"{info['processor']}, torch {info['torch']}, {info['threads']} threads, "
        f"{info['device']}; {x.shape[0]} images per pass, {repeats} repeats")
    rows = [bench_model(name, x, y, ds.mean, ds.std, repeats, args.chunk, device)
            for name in args.models.split(",")]
    info["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    command = " ".join(["python -m benchmarks.bench_training",
                        *(sys.argv[1:] if argv is None else argv)])
    print(markdown(rows, info, command))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"machine": info, "rows": rows}, fh, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
