"""Summarize question 2 as Markdown: results/q2-collapse/*/analysis.json (written by
results/q2-collapse.sh) and, when present, the trained runs of results/configs/q2-trained.toml
(indexed in sweeps/q2-collapse/results.sqlite).

python results/q2_table.py > results/q2-collapse/README.md
"""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

HERE = Path(__file__).resolve().parent / "q2-collapse"
TRAINED = Path(__file__).resolve().parent.parent / "sweeps" / "q2-collapse" / "results.sqlite"
CURES = ["none", "bn-warmup", "score-train", "warmup-1"]
CRITERIA = ["random", "magnitude", "gn", "snip", "grasp", "fd", "fp", "fts", "fbss", "hd", "hp",
            "hts"]


def load() -> dict[tuple[str, str], dict]:
    found = {}
    for path in sorted(HERE.glob("*/analysis.json")):
        crit, _, cure = path.parent.name.partition("-")
        found[(crit, cure)] = json.loads(path.read_text())
    return found


def main() -> None:
    found = load()
    any_run = next(iter(found.values()))
    sparsities = any_run["sparsities"]
    print("# Question 2: layer collapse on VGG-19 (width 0.25), Fashion-MNIST, before training\n")
    print(f"{any_run['total']:,} prunable weights in {len(any_run['numel'])} layers; maximum "
          f"possible sparsity with no empty layer {any_run['max_sparsity']:.6f}. Produced by "
          "`bash results/q2-collapse.sh` then `python results/q2_table.py`.\n")
    print("**Critical sparsity** = the highest sparsity at which no layer is empty (exact); "
          "**connected** = the highest at which every layer also keeps a weight on an "
          "input→output path. Cells s=…: layers empty / layers cut off from the output "
          "(keeping weights, none on an input→output path) at that sparsity.\n")
    head = " | ".join(f"s={s:g}" for s in sparsities)
    print(f"| criterion | cure | critical | connected | {head} |")
    print("|---|---|---:|---:|" + "---:|" * len(sparsities))
    for crit in CRITERIA:
        for cure in CURES:
            d = found.get((crit, cure))
            if d is None:
                continue
            cells = []
            for i, _ in enumerate(sparsities):
                empty = sum(1 for v in d["densities"].values() if v[i] == 0)
                cut = sum(1 for n, v in d["cut_off"].items() if v[i] and d["densities"][n][i] > 0)
                cells.append(f"{empty}/{cut}")
            conn = d.get("critical_connected")
            print(f"| {crit} | {cure} | {d['critical']:.4f} | "
                  f"{'n/a' if conn is None else f'{conn:.4f}'} | {' | '.join(cells)} |")


def cure_of(run: dict) -> str:
    if run["warmup_epochs"]:
        return f"warmup-{run['warmup_epochs']}"
    if run["bn_warmup"]:
        return "bn-warmup"
    return "score-train" if run["score_mode"] == "train" else "none"


def trained() -> None:
    if not TRAINED.exists():
        return
    conn = sqlite3.connect(TRAINED)
    conn.row_factory = sqlite3.Row
    runs = [dict(r) for r in conn.execute("SELECT * FROM runs WHERE status = 'finished'")]
    conn.close()
    if not runs:
        return
    print("\n## Trained: accuracy after pruning with and without each cure\n")
    print("`fishprune sweep results/configs/q2-trained.toml --workers 2` (then this script): "
          f"{runs[0]['epochs']} epochs of SGD after pruning, seed {runs[0]['seed']}. Empty / cut "
          "off: layers with no weight left / with weights but none on an input→output path, "
          "as recorded by the run itself (`layers.json`).\n")
    print("| criterion | sparsity | cure | empty | cut off | best val (%) | test (%) | "
          "train time (s) |")
    print("|---|---:|---|---:|---:|---:|---:|---:|")
    order = {c: i for i, c in enumerate(CURES)}
    for r in sorted(runs, key=lambda r: (r["criterion"], r["sparsity"],
                                          order.get(cure_of(r), 99))):
        print(f"| {r['criterion']} | {r['sparsity']:g} | {cure_of(r)} | {r['collapsed_layers']} | "
              f"{r['disconnected_layers']} | {100 * r['best_val_acc']:.2f} | "
              f"{100 * r['test_acc']:.2f} | {r['train_seconds']:.0f} |")


if __name__ == "__main__":
    main()
    trained()
