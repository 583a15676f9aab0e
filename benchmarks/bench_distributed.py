"""Data-parallel scaling on this machine: scoring and one training epoch on 1 and W processes.

    python -m benchmarks.bench_distributed                   # W = 2, LeNet-5 and ResNet-20
    python -m benchmarks.bench_distributed --quick           # smoke run (seconds)
    python -m benchmarks.bench_distributed --world 2 --models lenet5 --repeats 5 --out r.json

Every process runs one torch thread, so W processes use W cores: the efficiency
T(1) / (W · T(W)) is 1 for perfect scaling (T: median wall-clock seconds of the same work, the
one-process run timed in this process, the W-process runs in W gloo processes spawned on
127.0.0.1). On a shared machine the wall-clock ratio measures the load as much as fishprune, so
the CPU seconds of the timed work are reported too (rank 0's; ``time.process_time``, which also
counts gloo's threads): CPU efficiency = CPU(1) / (W · CPU per rank(W)) is the fraction of the
work that was split rather than duplicated or added by communication.
Work: FTS scoring over ``--batches`` batches of 128 (Fashion-MNIST-shaped random
data: timings do not depend on values), and one training epoch (SGD, the same global batches of
128, DDP with synchronized BatchNorm). Also the communication volume of a scoring pass: the
bytes each rank contributes to the all-gathers of the moment sums (each rank then receives W-1
times that) divided by the size of the prunable weights in float32, per criterion.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import socket
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
import torch.multiprocessing as mp
from torch import distributed as dist

import fishprune as fp
from fishprune import distributed as fpd
from fishprune.models import build_model
from fishprune.train import train_epoch

TRAFFIC_CRITERIA = ("snip", "fts", "grasp", "hts", "synflow")


def make_model(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    model_name, _, width = name.partition(":")
    return build_model(model_name, in_channels=1, num_classes=10, image_size=28,
                       width=float(width or 1.0))


def data(n_batches: int, batch: int = 128) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(batch, 1, 28, 28, generator=g),
             torch.randint(0, 10, (batch,), generator=g)) for _ in range(n_batches)]


def measure(model_name: str, args: argparse.Namespace, group: Any) -> dict[str, Any]:
    """Median seconds of one FTS scoring pass and of one training epoch, and bytes per pass."""
    model, batches = make_model(model_name), data(args.batches)
    cpu = torch.device("cpu")
    out: dict[str, Any] = {"score": [], "epoch": [], "score_cpu": [], "epoch_cpu": [],
                           "traffic": {}}
    with fpd.data_parallel(group):
        for crit in TRAFFIC_CRITERIA:
            fpd.traffic.bytes = 0
            opts = {"probes": 1} if crit == "hts" else {}
            fp.score(model, crit, batches, **opts)
            out["traffic"][crit] = fpd.traffic.bytes
        for _ in range(args.repeats + 1):  # the first is a warm-up
            if group is not None:
                dist.barrier()
            start, cpu_start = time.perf_counter(), time.process_time()
            fp.score(model, "fts", batches)
            out["score"].append(time.perf_counter() - start)
            out["score_cpu"].append(time.process_time() - cpu_start)
        for _ in range(args.repeats + 1):
            net = make_model(model_name)
            optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
            with fpd.wrapped(net) as wrapped:
                if group is not None:
                    dist.barrier()
                start, cpu_start = time.perf_counter(), time.process_time()
                train_epoch(wrapped, batches, optimizer, None, device=cpu)
                out["epoch"].append(time.perf_counter() - start)
                out["epoch_cpu"].append(time.process_time() - cpu_start)
    for key in ("score", "epoch", "score_cpu", "epoch_cpu"):
        out[key] = statistics.median(out[key][1:])
    params = fp.prunable_parameters(model)
    out["prunable_bytes"] = sum(p.numel() for p in params.values()) * 4
    return out


def _worker(rank: int, world: int, port: int, args: argparse.Namespace, path: str) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        results = {m: measure(m, args, dist.group.WORLD) for m in args.models.split(",")}
        if rank == 0:
            with open(path, "w") as f:
                json.dump(results, f)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--world", type=int, default=2)
    p.add_argument("--models", default="lenet5,resnet20:0.5")
    p.add_argument("--batches", type=int, default=8)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="lenet5, 2 batches, 1 repeat")
    p.add_argument("--out", help="write the numbers as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        args.models, args.batches, args.repeats = "lenet5", 2, 1
    torch.set_num_threads(1)
    single = {m: measure(m, args, None) for m in args.models.split(",")}
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "r.json")
        mp.spawn(_worker, args=(args.world, free_port(), args, path), nprocs=args.world,
                 join=True)
        with open(path) as f:
            many = json.load(f)
    w = args.world
    print(f"# bench_distributed: {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} CPUs, torch {torch.__version__}, 1 thread per process, "
          f"{dt.date.today()}\n")
    print(f"| model | work | 1 process (s) | {w} processes (s) | speed-up | efficiency "
          f"| CPU s, 1 process | CPU s per rank, {w} | CPU efficiency |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for m in single:
        for work, label in (("score", f"FTS scoring, {args.batches}×128"),
                            ("epoch", f"training epoch, {args.batches}×128")):
            t1, tw = single[m][work], many[m][work]
            c1, cw = single[m][f"{work}_cpu"], many[m][f"{work}_cpu"]
            print(f"| {m} | {label} | {t1:.3f} | {tw:.3f} | {t1 / tw:.2f} | "
                  f"{t1 / (w * tw):.2f} | {c1:.3f} | {cw:.3f} | {c1 / (w * cw):.2f} |")
    print("\n| model | criterion | bytes each rank all-gathers per pass ÷ prunable weights "
          "(float32) |")
    print("|---|---|---:|")
    for m in single:
        for crit, b in many[m]["traffic"].items():
            print(f"| {m} | {crit} | {b / many[m]['prunable_bytes']:.2f} |")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"world": w, "single": single, "many": many}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
