"""The iterative schedule's speed: ``fp.prune`` with SynFlow's 100 rounds against the public code.

    python -m benchmarks.bench_schedule --synflow-repo /tmp/Synaptic-Flow \\
        --fts-repo /tmp/Scalable_Second_Order_PaI --repeats 5 --threads 1 --out r.json
    python -m benchmarks.bench_schedule --quick ...        # smoke run (seconds)

Implementations of the same job are timed side by side on the same initial weights:

- fishprune: ``fp.prune(model, "synflow", sparsity, None, input_shape=..., rounds=R)``;
- Synaptic-Flow (Tanaka et al. 2020, ``--synflow-repo``, github ganguli-lab/Synaptic-Flow): its
  ``Pruners.pruners.SynFlow`` and ``prune.prune_loop`` on a copy of the model whose Linear and
  Conv2d layers are swapped for its masked ``Layers.layers`` classes;
- the FTS authors' code (Gollini Navarrete et al., arXiv 2502.11450, ``--fts-repo``, github
  Gollini/Scalable_Second_Order_PaI): ``prune_loop`` with ``synflow_sensitivity`` from
  ``batch_exp/experiments/utils/compressors.py``, skipping exactly the non-prunable parameters.

A reference whose path is not given (or does not hold the expected files) is skipped with a note.
Their code is imported from the given checkout, never copied here. To compare like with like:

- each reference runs twice: on a float64 copy of the model (fishprune's SynFlow computes in
  float64; Synaptic-Flow left ``model.double()`` commented out), fed through a wrapper that casts
  their float32 all-ones input to float64, and on the float32 model as their code ships;
- the all-ones input, the eval mode and the |w| of every parameter and buffer are the same on
  all sides (it is one algorithm); the references' ``tqdm`` progress bars are replaced by a
  pass-through, so their loops cost what their maths costs;
- every round keeps the same number of weights on all sides: fishprune keeps
  round(d · N) (halves up), the references int(·); a shim on the references' selection call
  (``Pruner.mask`` resp. ``mask2binary``) translates the round's kept fraction into the argument
  for which their own rule keeps fishprune's count. It costs one float computation per round.
  The second paper's ``prune_loop`` receives the kept fraction d as ``sparsity`` (its
  exponential schedule is otherwise driven by the pruned fraction; see REFERENCE.md);
- the final masks are compared with fishprune's and must be equal (reported per reference).

Also timed, as fishprune's floor: the SynFlow score function alone, called R times on the dense
model with its set-up done once (what is left when the schedule costs nothing).

Each repeat runs the implementations in a rotating order on fresh copies (copying is not
timed); a ratio is fishprune's time over a reference's time in the same repeat, and the table
reports medians of the per-repeat ratios (after one untimed warm-up run of each), so that slow
drifts of the machine's load affect both sides of a ratio alike.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import datetime as dt
import importlib
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

import fishprune as fp
from fishprune.criteria import Context, get_criterion
from fishprune.models import build_model
from fishprune.scoring import preserved
from fishprune.selection import kept_count

INPUT_SHAPE = (1, 28, 28)  # Fashion-MNIST-shaped inputs, as the other benchmarks


class CastInput(nn.Module):
    """``net`` in ``dtype``, run on its input cast to ``dtype`` (the references feed float32)."""

    def __init__(self, net: nn.Module, dtype: torch.dtype) -> None:
        super().__init__()
        self.net = net.to(dtype)
        self.dtype = dtype

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x.to(self.dtype))


# --- reference adapters ----------------------------------------------------------------------


@contextlib.contextmanager
def on_path(path: Path) -> Iterator[None]:
    sys.path.insert(0, str(path))
    try:
        yield
    finally:
        sys.path.remove(str(path))


def _no_progress_bar(iterable: Any, *args: Any, **kwargs: Any) -> Any:
    """Stands in for the references' ``tqdm`` (their loops then cost what their maths costs)."""
    return iterable


def git_commit(path: Path) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(path), "rev-parse", "HEAD"], capture_output=True,
                             text=True, check=True)
        return out.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


class SynapticFlow:
    """Synaptic-Flow's SynFlow pruner and ``prune_loop`` (imported from ``path``)."""

    label = "Synaptic-Flow"
    files = ("Pruners/pruners.py", "prune.py", "Layers/layers.py", "Utils/generator.py")

    def __init__(self, path: Path) -> None:
        with on_path(path):
            self.layers = importlib.import_module("Layers.layers")
            self.pruners = importlib.import_module("Pruners.pruners")
            self.generator = importlib.import_module("Utils.generator")
            loop = importlib.import_module("prune")
        loop.tqdm = _no_progress_bar
        self.prune_loop = loop.prune_loop

    def prepare(self, model: nn.Module, dtype: torch.dtype) -> nn.Module:
        """A copy in ``dtype`` whose Linear/Conv2d layers are Synaptic-Flow's masked layers."""
        model = copy.deepcopy(model)
        for module in list(model.modules()):
            for name, child in list(module.named_children()):
                if type(child) is nn.Linear:
                    new = self.layers.Linear(child.in_features, child.out_features,
                                             bias=child.bias is not None)
                elif type(child) is nn.Conv2d:
                    new = self.layers.Conv2d(
                        child.in_channels, child.out_channels, child.kernel_size, child.stride,
                        child.padding, child.dilation, child.groups, child.bias is not None,
                        child.padding_mode)
                else:
                    continue
                new.load_state_dict(child.state_dict(), strict=False)  # weight_mask: ones
                setattr(module, name, new)
        return CastInput(model, dtype)

    def run(self, model: nn.Module, sparsity: float, rounds: int) -> dict[str, Tensor]:
        base = self.pruners.SynFlow

        class Aligned(base):  # their mask(s) prunes int((1 − s) · N) ≤ threshold: keep ours
            def mask(self, density: float, scope: str) -> None:
                n = sum(m.numel() for m, _ in self.masked_parameters)
                super().mask(1.0 - (n - kept_count(density, n) + 0.5) / n, scope)

        pruner = Aligned(self.generator.masked_parameters(model))
        data = [(torch.ones(1, *INPUT_SHAPE), torch.zeros(1, dtype=torch.long))]
        self.prune_loop(model, nn.CrossEntropyLoss(), pruner, data, torch.device("cpu"),
                        1.0 - sparsity, "exponential", "global", rounds)
        names = {id(p): n.removeprefix("net.") for n, p in model.named_parameters()}
        return {names[id(p)]: m.bool() for m, p in pruner.masked_parameters}


class SecondOrderPaI:
    """The FTS authors' ``prune_loop`` with ``synflow_sensitivity`` (imported from ``path``)."""

    label = "FTS authors"
    files = ("batch_exp/experiments/utils/compressors.py",)

    def __init__(self, path: Path) -> None:
        with on_path(path / "batch_exp" / "experiments" / "utils"):
            self.comp = importlib.import_module("compressors")
        self.comp.tqdm = _no_progress_bar
        if not hasattr(self.comp, "prune_loop"):
            raise ImportError(f"{path} has no prune_loop (use the 2502.11450 repository)")

    def prepare(self, model: nn.Module, dtype: torch.dtype) -> nn.Module:
        return CastInput(copy.deepcopy(model), dtype)

    def run(self, model: nn.Module, sparsity: float, rounds: int) -> dict[str, Tensor]:
        prunable = {f"net.{n}" for n in fp.prunable_parameters(model.net)}
        skip = [n for n, _ in model.named_parameters() if n not in prunable]
        assert not any(s in p for s in skip for p in prunable), "skip list is not exact"
        n = sum(p.numel() for name, p in model.named_parameters() if name in prunable)
        original = self.comp.mask2binary

        def aligned(scores: dict, sparsity: float, mask_type: str, skip_layers: list,
                    invert: bool) -> dict:
            # prune_loop passes d^(r/R) (we hand it d); theirs keeps int((1 − s) · n)
            return original(scores, 1.0 - (kept_count(sparsity, n) + 0.5) / n, mask_type,
                            skip_layers, invert)

        data = [(torch.ones(1, *INPUT_SHAPE), torch.zeros(1, dtype=torch.long))]
        self.comp.mask2binary = aligned
        try:
            masks, _ = self.comp.prune_loop(
                model, torch.device("cpu"), data, nn.CrossEntropyLoss(),
                self.comp.synflow_sensitivity, 1.0 - sparsity, schedule="exponential",
                scope="global", epochs=rounds, skip_layers=skip)
        finally:
            self.comp.mask2binary = original
        return {n.removeprefix("net."): m > 0 for n, m in masks.items() if n in prunable}


def load_reference(kind: type, path: str | None) -> tuple[Any, str]:
    """(adapter or None, note)."""
    if not path:
        return None, f"{kind.label}: skipped (no path given)"
    root = Path(path)
    missing = [f for f in kind.files if not (root / f).is_file()]
    if missing:
        return None, f"{kind.label}: skipped ({root} lacks {', '.join(missing)})"
    try:
        adapter = kind(root)
    except ImportError as err:
        return None, f"{kind.label}: skipped ({err})"
    return adapter, f"{kind.label}: {root} at commit {git_commit(root) or 'unknown'}"


# --- measurement -----------------------------------------------------------------------------


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


def criterion_only(model: nn.Module, rounds: int) -> None:
    """``rounds`` calls of the SynFlow score function on the dense model, set up once."""
    crit = get_criterion("synflow")
    opts = crit.parse_options({"input_shape": INPUT_SHAPE})
    params = fp.prunable_parameters(model)
    ctx = Context(loss_fn=nn.functional.cross_entropy, seed=0)
    with preserved(model, params):
        for _ in range(rounds):
            crit.fn(model, params, None, ctx, opts)


def same_masks(a: dict[str, Tensor], b: dict[str, Tensor]) -> bool:
    return list(a) == list(b) and all(torch.equal(a[n], b[n].to(a[n].device)) for n in a)


def bench_model(name: str, refs: list[Any], args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    model = build_model(name, in_channels=INPUT_SHAPE[0], num_classes=10,
                        image_size=INPUT_SHAPE[1]).eval()
    templates: dict[str, nn.Module] = {"fishprune": model}
    runners: dict[str, Callable[[nn.Module], dict[str, Tensor]]] = {
        "fishprune": lambda m: fp.prune(m, "synflow", args.sparsity, None, rounds=args.rounds,
                                        input_shape=INPUT_SHAPE),
    }
    floor = "synflow criterion alone"  # R calls of the score function: fishprune's floor
    templates[floor] = model
    runners[floor] = lambda m: criterion_only(m, args.rounds)
    for r in refs:
        for dtype in args.reference_dtypes:
            label = f"{r.label} {dtype}"
            templates[label] = r.prepare(model, getattr(torch, dtype))
            runners[label] = lambda m, r=r: r.run(m, args.sparsity, args.rounds)
    labels = list(runners)
    times: dict[str, list[float]] = {label: [] for label in labels}
    labels.remove(floor)
    equal: dict[str, bool] = {label: True for label in labels[1:]}
    total = sum(p.numel() for p in fp.prunable_parameters(model).values())
    for rep in range(args.repeats + 1):  # repeat 0 is the untimed warm-up
        order = [*labels[rep % len(labels):], *labels[: rep % len(labels)], floor]
        masks = {}
        for label in order:
            victim = copy.deepcopy(templates[label])
            seconds, masks[label] = timed(lambda label=label, v=victim: runners[label](v))
            if rep:
                times[label].append(seconds)
        kept = sum(int(m.sum()) for m in masks["fishprune"].values())
        assert kept == kept_count(1 - args.sparsity, total), kept
        for label in labels[1:]:
            equal[label] &= same_masks(masks["fishprune"], masks[label])
        log(f"[{name}] repeat {rep}: " + ", ".join(
            f"{label} {times[label][-1] if rep else 0:.3f} s" for label in labels))
    row: dict[str, Any] = {
        "model": name, "weights": total, "rounds": args.rounds, "sparsity": args.sparsity,
        "fishprune_s": statistics.median(times["fishprune"]), "references": {},
        "criterion_s": statistics.median(times[floor]),
    }
    for label in labels[1:]:
        ratios = [a / b for a, b in zip(times["fishprune"], times[label])]
        row["references"][label] = {
            "time_s": statistics.median(times[label]), "ratio": statistics.median(ratios),
            "ratio_min": min(ratios), "ratio_max": max(ratios), "masks_equal": equal[label],
        }
    if len(labels) > 1:  # against the fastest reference of each repeat
        ratios = [times["fishprune"][i] / min(times[label][i] for label in labels[1:])
                  for i in range(args.repeats)]
        row["fastest_ratio"] = statistics.median(ratios)
    return row


# --- report ----------------------------------------------------------------------------------


def environment(args: argparse.Namespace, notes: list[str]) -> dict[str, Any]:
    cpu = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "command": " ".join(["python -m benchmarks.bench_schedule", *sys.argv[1:]]),
        "fishprune": fp.__version__, "fishprune_commit": git_commit(Path(__file__).parent),
        "fishprune_source": str(Path(fp.__file__).parent),
        "torch": torch.__version__, "python": platform.python_version(), "cpu": cpu,
        "cpu_cores": len(os.sched_getaffinity(0)), "threads": torch.get_num_threads(),
        "load_before": round(os.getloadavg()[0], 2), "references": notes,
        "settings": {k: v for k, v in vars(args).items() if k != "out"},
    }


def markdown(env: dict[str, Any], rows: list[dict[str, Any]]) -> str:
    out = [
        f"Command: `{env['command']}`  ",
        f"Date: {env['date']}; fishprune {env['fishprune']} from {env['fishprune_source']} "
        f"(this checkout: {env['fishprune_commit']}), torch {env['torch']}, "
        f"Python {env['python']}  ",
        f"Machine: {env['cpu']}, {env['cpu_cores']} cores, torch threads = {env['threads']}; "
        f"1-min load average {env['load_before']} before, {env.get('load_after')} after  ",
        *[f"{note}  " for note in env["references"]],
        "",
        "| model | weights | rounds | sparsity | fishprune (s) | reference | reference (s) | "
        "fishprune / reference (min-max) | masks equal |",
        "|---|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for r in rows:
        for label, ref in r["references"].items():
            out.append(
                f"| {r['model']} | {r['weights']:,} | {r['rounds']} | {r['sparsity']} | "
                f"{r['fishprune_s']:.3f} | {label} | {ref['time_s']:.3f} | "
                f"**{ref['ratio']:.2f}** ({ref['ratio_min']:.2f}-{ref['ratio_max']:.2f}) | "
                f"{'yes' if ref['masks_equal'] else '**NO**'} |"
            )
        out.append(f"| {r['model']} | | | | ({r['criterion_s']:.3f}) | fishprune's SynFlow score "
                   f"function alone, {r['rounds']} calls | | | |")
        if "fastest_ratio" in r:
            out.append(f"| {r['model']} | | | | | fastest reference of each repeat | | "
                       f"**{r['fastest_ratio']:.2f}** | |")
        else:
            out.append(f"| {r['model']} | {r['weights']:,} | {r['rounds']} | {r['sparsity']} | "
                       f"{r['fishprune_s']:.3f} | (none) | - | - | - |")
    return "\n".join(out) + "\n"


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--synflow-repo", help="checkout of github.com/ganguli-lab/Synaptic-Flow")
    p.add_argument("--fts-repo",
                   help="checkout of github.com/Gollini/Scalable_Second_Order_PaI (2502.11450)")
    p.add_argument("--models", default="lenet5,resnet20", help="comma-separated (%(default)s)")
    p.add_argument("--reference-dtypes", default="float64,float32",
                   help="precisions the references run in (%(default)s; float32 = as shipped)")
    p.add_argument("--rounds", type=int, default=100, help="SynFlow rounds (%(default)s)")
    p.add_argument("--sparsity", type=float, default=0.98, help="final sparsity (%(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (%(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (%(default)s)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quick", action="store_true", help="smoke run: 1 repeat, 5 rounds")
    p.add_argument("--out", help="also write the results as JSON to this path")
    args = p.parse_args(argv)
    if args.quick:
        args.repeats, args.rounds = 1, 5
    args.models = args.models.split(",")
    args.reference_dtypes = args.reference_dtypes.split(",")
    if not set(args.reference_dtypes) <= {"float64", "float32"}:
        p.error("--reference-dtypes takes float64 and/or float32")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    refs, notes = [], []
    for kind, path in ((SynapticFlow, args.synflow_repo), (SecondOrderPaI, args.fts_repo)):
        adapter, note = load_reference(kind, path)
        notes.append(note)
        log(note)
        if adapter is not None:
            refs.append(adapter)
    env = environment(args, notes)
    rows = [bench_model(name, refs, args) for name in args.models]
    env["load_after"] = round(os.getloadavg()[0], 2)
    print(markdown(env, rows))
    if args.out:
        Path(args.out).write_text(json.dumps({"environment": env, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
