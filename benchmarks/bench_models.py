"""Scoring cost on the models people use, as ratios to one plain forward+backward, within one run.

    python -m benchmarks.bench_models                  # all models, all criteria (minutes, 2 cores)
    python -m benchmarks.bench_models --quick          # smoke run
    python -m benchmarks.bench_models --models hf-mobilenet-v2 --criteria snip,fts --repeats 5

Models (random init, nothing downloaded; ``pip install 'fishprune[hf]'``): a small Hugging Face
ViT (SDPA attention: GraSP and Hutchinson run under the math SDPA kernel) and ResNet on 2 batches
of 8 images of 32×32, the HF MobileNetV2 (full width) and a MobileNetV3-small-like network
(Hardswish, squeeze-excitation with Hardsigmoid: no double backward, so GraSP and Hutchinson use
finite differences) on one batch of 8 images of 64×64.

The baseline is one plain pass over the same batches: zero the gradients, then
``F.cross_entropy(model(x).logits, y).backward()`` per batch, model in eval mode as scoring. Each
measurement is warmed up once; then baseline and criterion alternate ``--repeats`` times and the
ratio is the median of the per-repeat ratios (load on a shared machine hits both sides alike).
Times are the process's CPU seconds at one torch thread (by default), which other processes on
a busy machine inflate far less than wall-clock time.
For hd/hp/hts the ratio per probe (time / (probes × plain)) is also given.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import nn
from torch.nn import functional as F

import fishprune as fp


def _transformers() -> Any:
    try:
        import transformers
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise SystemExit("bench_models needs transformers: pip install 'fishprune[hf]'") from error
    return transformers


def hf_vit() -> nn.Module:
    t = _transformers()
    return t.ViTForImageClassification(t.ViTConfig(
        image_size=32, patch_size=4, num_channels=3, hidden_size=96, num_hidden_layers=4,
        num_attention_heads=4, intermediate_size=192, num_labels=10, attn_implementation="sdpa"))


def hf_resnet() -> nn.Module:
    t = _transformers()
    return t.ResNetForImageClassification(t.ResNetConfig(
        num_channels=3, embedding_size=32, hidden_sizes=[32, 64, 128, 256], depths=[2, 2, 2, 2],
        layer_type="basic", num_labels=10))


def hf_mobilenet_v2() -> nn.Module:
    t = _transformers()
    return t.MobileNetV2ForImageClassification(t.MobileNetV2Config(
        num_channels=3, image_size=64, num_labels=10))


class SqueezeExcite(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.reduce = nn.Conv2d(channels, max(8, channels // 4), 1)
        self.expand = nn.Conv2d(max(8, channels // 4), channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = F.hardsigmoid(self.expand(F.relu(self.reduce(x.mean((2, 3), keepdim=True)))))
        return x * w


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, hidden: int, c_out: int, kernel: int, stride: int, se: bool,
                 hswish: bool) -> None:
        super().__init__()
        act = nn.Hardswish if hswish else nn.ReLU
        self.expand = nn.Sequential(nn.Conv2d(c_in, hidden, 1, bias=False),
                                    nn.BatchNorm2d(hidden), act())
        self.depthwise = nn.Sequential(
            nn.Conv2d(hidden, hidden, kernel, stride, kernel // 2, groups=hidden, bias=False),
            nn.BatchNorm2d(hidden), act())
        self.se = SqueezeExcite(hidden) if se else nn.Identity()
        self.project = nn.Sequential(nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out))
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.se(self.depthwise(self.expand(x))))
        return x + y if self.residual else y


class MobileNetV3Small(nn.Module):
    """The layer table of MobileNetV3-small (Howard et al. 2019, table 2), 10 classes."""

    BLOCKS: ClassVar = [  # c_in, hidden, c_out, kernel, stride, SE, hard-swish
        (16, 16, 16, 3, 2, True, False), (16, 72, 24, 3, 2, False, False),
        (24, 88, 24, 3, 1, False, False), (24, 96, 40, 5, 2, True, True),
        (40, 240, 40, 5, 1, True, True), (40, 240, 40, 5, 1, True, True),
        (40, 120, 48, 5, 1, True, True), (48, 144, 48, 5, 1, True, True),
        (48, 288, 96, 5, 2, True, True), (96, 576, 96, 5, 1, True, True),
        (96, 576, 96, 5, 1, True, True),
    ]

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1, bias=False), nn.BatchNorm2d(16),
                                  nn.Hardswish())
        self.blocks = nn.Sequential(*(InvertedResidual(*b) for b in self.BLOCKS))
        self.last = nn.Sequential(nn.Conv2d(96, 576, 1, bias=False), nn.BatchNorm2d(576),
                                  nn.Hardswish())
        self.head = nn.Sequential(nn.Linear(576, 1024), nn.Hardswish(), nn.Linear(1024,
                                                                                  num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.last(self.blocks(self.stem(x))).mean((2, 3)))


def images(count: int, size: int, seed: int = 0) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, size, size, generator=gen),
             torch.randint(0, 10, (8,), generator=gen)) for _ in range(count)]


MODELS: dict[str, tuple[Callable[[], nn.Module], Callable[[], list]]] = {
    "hf-vit": (hf_vit, lambda: images(2, 32)),
    "hf-resnet": (hf_resnet, lambda: images(2, 32)),
    "hf-mobilenet-v2": (hf_mobilenet_v2, lambda: images(1, 64)),
    "mobilenet-v3-small": (MobileNetV3Small, lambda: images(1, 64)),
}


def plain_pass(model: nn.Module, batches: list) -> None:
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        out = model(x)
        F.cross_entropy(out if isinstance(out, torch.Tensor) else out.logits, y).backward()
    model.zero_grad(set_to_none=True)


def seconds(fn: Callable[[], Any]) -> float:
    """CPU seconds of this process (all its threads): on a shared machine, unlike wall-clock
    time, they do not count the time other processes hold the cores."""
    start = time.process_time()
    fn()
    return time.process_time() - start


def measure(model: nn.Module, batches: list, criterion: str, repeats: int,
            options: dict) -> tuple[float, float, str | None]:
    """(median ratio criterion / plain, median criterion seconds, HVP method used)."""
    def run() -> Any:
        return fp.score(model, criterion, batches, return_info=True, **options)

    _, info = run()
    plain_pass(model, batches)
    ratios, times = [], []
    for r in range(repeats):
        if r % 2:
            t_crit, t_plain = seconds(run), seconds(lambda: plain_pass(model, batches))
        else:
            t_plain, t_crit = seconds(lambda: plain_pass(model, batches)), seconds(run)
        ratios.append(t_crit / t_plain)
        times.append(t_crit)
    return statistics.median(ratios), statistics.median(times), info.hvp


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--criteria", default=",".join(fp.criteria()))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--probes", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: CPU time is not inflated by spinning workers)")
    parser.add_argument("--hvp", default="auto", choices=["auto", "exact", "fd"],
                        help="Hessian-vector products of grasp/hd/hp/hts (fp.score's hvp=)")
    parser.add_argument("--quick", action="store_true", help="2 repeats, 2 probes")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats, args.probes = 2, 2
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")  # the HVP method is reported in the table
    print(f"torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{args.threads} threads, {args.repeats} repeats, {args.probes} probes\n")
    print("| model | weights | plain pass (s) | criterion | time (s) | ÷ plain "
          "| ÷ (probes × plain) | HVP |")
    print("|---|---|---|---|---|---|---|---|")
    for name in args.models.split(","):
        build, data = MODELS[name]
        torch.manual_seed(0)
        model = build().eval()
        batches = data()
        plain_pass(model, batches)
        plain = statistics.median(
            seconds(lambda m=model, b=batches: plain_pass(m, b)) for _ in range(3))
        weights = sum(p.numel() for p in fp.prunable_parameters(model).values())
        for criterion in args.criteria.split(","):
            hutchinson = criterion in ("hd", "hp", "hts")
            options: dict[str, Any] = {"probes": args.probes} if hutchinson else {}
            ratio, t, hvp = measure(model, batches, criterion, args.repeats,
                                    {**options, "hvp": args.hvp})
            per_probe = f"{ratio / args.probes:.2f}" if hutchinson else ""
            print(f"| {name} | {weights:,} | {plain:.3f} | {criterion} | {t:.3f} | {ratio:.2f} | "
                  f"{per_probe} | {hvp or ''} |", flush=True)
        print(f"{name} done", file=sys.stderr)


if __name__ == "__main__":
    main()
