"""Question 3: FTS against the batch size of the Fisher estimate; Markdown to stdout.

    fishprune sweep results/configs/q3-batch-size.toml --workers 2
    python results/q3_analysis.py sweeps/q3-batch-size > results/q3-batch-size/README.md

Three parts, all from the sweep's run directories and ``results.sqlite``:

1. test accuracy (mean ± std over seeds), rows = sparsity, columns = scoring batch size;
2. how much the mask itself moves: the share of kept weights that differ from the batch-size-1
   mask of the same seed and sparsity (|M_B \\ M_1| / |M_1|);
3. why: the size of the Fisher term against the gradient term of FTS, ½w²F̂ / |w ḡ|, at the
   seed-0 initialization with the same scoring samples, for each batch size (recomputed here
   with the library; the Fisher term is the ``fp`` criterion, the gradient term ``snip``).
"""

from __future__ import annotations

import dataclasses
import json
import sqlite3
import statistics
import sys
from pathlib import Path

import torch

import fishprune as fp
from fishprune import tensorfiles as tf
from fishprune.pipeline import prepare, scoring_batches
from fishprune.settings import from_dict


def load_runs(root: Path) -> list[dict]:
    conn = sqlite3.connect(root / "results.sqlite")
    conn.row_factory = sqlite3.Row
    rows = conn.execute("SELECT * FROM runs WHERE status = 'finished' AND criterion = 'fts' "
                        "AND sparsity > 0").fetchall()
    conn.close()
    return [dict(r) for r in rows]


def mean_std(values: list[float]) -> str:
    m = statistics.fmean(values)
    s = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{100 * m:.2f} ± {100 * s:.2f}"


def accuracy_table(runs: list[dict], sizes: list[int], sparsities: list[float]) -> list[str]:
    n = sorted({len([r for r in runs if r["sparsity"] == s and r["score_batch_size"] == b])
                for s in sparsities for b in sizes})
    out = [f"Test accuracy (%), mean ± std over {'–'.join(map(str, n))} seed(s).", "",
           "| sparsity | " + " | ".join(f"B = {b:,}" for b in sizes) + " |",
           "|---|" + "---:|" * len(sizes)]
    for s in sparsities:
        cells = []
        for b in sizes:
            acc = [r["test_acc"] for r in runs if r["sparsity"] == s and r["score_batch_size"] == b]
            cells.append(mean_std(acc) if acc else "—")
        out.append(f"| {s:g} | " + " | ".join(cells) + " |")
    return out


def mask_table(root: Path, runs: list[dict], sizes: list[int], sparsities: list[float]
               ) -> list[str]:
    by_key = {(r["seed"], r["sparsity"], r["score_batch_size"]): r for r in runs}
    out = ["Share of kept weights that differ from the B = 1 mask of the same seed (%), mean over "
           "seeds (min–max).", "",
           "| sparsity | " + " | ".join(f"B = {b:,}" for b in sizes[1:]) + " |",
           "|---|" + "---:|" * (len(sizes) - 1)]
    for s in sparsities:
        cells = []
        for b in sizes[1:]:
            shares = []
            for seed in sorted({r["seed"] for r in runs}):
                ref, other = by_key.get((seed, s, sizes[0])), by_key.get((seed, s, b))
                if ref is None or other is None:
                    continue
                m1 = tf.load_masks(root / ref["run_dir"] / "masks.safetensors")
                mb = tf.load_masks(root / other["run_dir"] / "masks.safetensors")
                moved = sum(int((mb[k] & ~m1[k]).sum()) for k in m1)
                shares.append(100 * moved / sum(int(m.sum()) for m in m1.values()))
            cells.append(f"{statistics.fmean(shares):.2f} ({min(shares):.2f}–{max(shares):.2f})"
                         if shares else "—")
        out.append(f"| {s:g} | " + " | ".join(cells) + " |")
    return out


def term_table(root: Path, runs: list[dict], sizes: list[int]) -> list[str]:
    seed0 = sorted((r for r in runs if r["seed"] == 0), key=lambda r: r["run_id"])
    base = from_dict(json.loads((root / seed0[0]["run_dir"] / "config.json").read_text()))
    prep = prepare(base)
    out = ["Fisher term against gradient term of FTS at the seed-0 initialization: ½w²F̂ / |w ḡ| "
           "over all weights (median, 99th percentile) and the share of weights where the "
           "Fisher term is the larger.", "",
           "| B | median | 99th pct | Fisher term larger (%) |", "|---:|---:|---:|---:|"]
    for b in sizes:
        cfg = dataclasses.replace(base, prune=dataclasses.replace(base.prune, score_batch_size=b))
        batches = scoring_batches(cfg, prep.ds, prep.train_idx, prep.device)
        grad = fp.score(prep.model, "snip", batches, seed=cfg.seed, mode=cfg.prune.score_mode)
        fisher = fp.score(prep.model, "fp", batches, seed=cfg.seed, mode=cfg.prune.score_mode)
        ratio = torch.cat([(fisher[k] / grad[k].clamp_min(1e-30)).flatten() for k in grad])
        q = torch.quantile(ratio.double()[torch.randperm(ratio.numel())[:100_000]],
                           torch.tensor([0.5, 0.99], dtype=torch.float64))
        larger = 100 * float((ratio > 1).double().mean())
        out.append(f"| {b:,} | {q[0]:.2e} | {q[1]:.2e} | {larger:.3f} |")
    return out


def main(root: Path) -> None:
    torch.manual_seed(0)
    runs = load_runs(root)
    if not runs:
        sys.exit(f"no finished FTS runs in {root}")
    sizes = sorted({r["score_batch_size"] for r in runs})
    sparsities = sorted({r["sparsity"] for r in runs})
    samples = {r["score_samples"] for r in runs}
    print("# Question 3: FTS and the batch size of the Fisher estimate\n")
    print(f"LeNet-300-100 on Fashion-MNIST; the same {', '.join(map(str, samples))} samples per "
          "class (6,000 in all) scored in batches of B; 10 epochs of training as in question 1. "
          "Produced by `fishprune sweep results/configs/q3-batch-size.toml --workers 2` then "
          "`python results/q3_analysis.py sweeps/q3-batch-size`.\n")
    print("\n".join(accuracy_table(runs, sizes, sparsities)) + "\n")
    print("\n".join(mask_table(root, runs, sizes, sparsities)) + "\n")
    print("\n".join(term_table(root, runs, sizes)))


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "sweeps/q3-batch-size"))
