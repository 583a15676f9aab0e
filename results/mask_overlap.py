"""How alike are the criteria's masks? Markdown to stdout.

    python results/mask_overlap.py sweeps/q1-lenet300 [REFERENCE]   # REFERENCE: fts by default

For every criterion and sparsity of a sweep: the share of the reference criterion's kept weights
that the criterion keeps too, |M_c ∩ M_ref| / |M_ref| in %, averaged over the seeds both ran
(same seed = same initialization and scoring data). 100 means the same mask.
"""

from __future__ import annotations

import sqlite3
import statistics
import sys
from pathlib import Path

from fishprune import tensorfiles as tf
from fishprune.criteria import criteria


def main(root: Path, reference: str = "fts") -> None:
    conn = sqlite3.connect(root / "results.sqlite")
    conn.row_factory = sqlite3.Row
    runs = [dict(r) for r in conn.execute(
        "SELECT run_dir, criterion, sparsity, seed FROM runs "
        "WHERE status = 'finished' AND sparsity > 0")]
    conn.close()
    by = {(r["criterion"], r["sparsity"], r["seed"]): r["run_dir"] for r in runs}
    sparsities = sorted({r["sparsity"] for r in runs})
    present = {r["criterion"] for r in runs}
    names = [c for c in criteria() if c in present and c != reference]
    cache: dict[str, dict] = {}

    def masks(run_dir: str) -> dict:
        if run_dir not in cache:
            cache[run_dir] = tf.load_masks(root / run_dir / "masks.safetensors")
        return cache[run_dir]

    print(f"Share of {reference.upper()}'s kept weights also kept by each criterion (%), mean "
          f"over seeds; `python results/mask_overlap.py {root}`.\n")
    print("| sparsity | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for s in sparsities:
        cells = []
        for c in names:
            shares = []
            for (crit, sp, seed), run_dir in by.items():
                if crit != c or sp != s or (reference, s, seed) not in by:
                    continue
                ref, other = masks(by[(reference, s, seed)]), masks(run_dir)
                both = sum(int((ref[k] & other[k]).sum()) for k in ref)
                shares.append(100 * both / sum(int(m.sum()) for m in ref.values()))
            cells.append(f"{statistics.fmean(shares):.1f}" if shares else "—")
        print(f"| {s:g} | " + " | ".join(cells) + " |")
        cache.clear()


if __name__ == "__main__":
    main(Path(sys.argv[1]), *(sys.argv[2:3] or ["fts"]))
