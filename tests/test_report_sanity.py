"""The sanity table of ``fishprune report``: paired gaps, their significance and the verdict."""

from __future__ import annotations

import csv
import itertools
import math
from pathlib import Path

from fishprune.report import make_report
from fishprune.report.sanity import T_975, paired_gap, sanity_markdown, sanity_tables, t_critical
from fishprune.report.tables import build_tables
from fishprune.sweep import run_sweep, sweep_from_table


def test_paired_gap_by_hand() -> None:
    # d = 10, 10, 9: mean 9.667, sd 0.577, t = 29 > 4.303 → significant.
    g = paired_gap({0: 90.0, 1: 91.0, 2: 92.0}, {0: 80.0, 1: 81.0, 2: 83.0})
    assert g.n == 3 and g.verdict == 1
    assert math.isclose(g.mean, 29 / 3) and math.isclose(g.sd, math.sqrt(1 / 3))
    # d = 1, −1, 3: mean 1, sd 2, t = 0.87 → not resolved.
    assert paired_gap({0: 1.0, 1: 0.0, 2: 4.0}, {0: 0.0, 1: 1.0, 2: 1.0}).verdict == 0
    # Paired, not pooled: the seeds differ by far more than the gap, which is always −0.5.
    g = paired_gap({0: 50.0, 1: 70.0, 2: 90.0}, {0: 50.5, 1: 70.4, 2: 90.6})
    assert g.verdict == -1
    # Only shared seeds count; fewer than two: no verdict.
    assert paired_gap({0: 1.0, 1: 2.0}, {1: 0.0, 2: 5.0}).n == 1
    assert paired_gap({0: 1.0}, {0: 0.0}).verdict == 0
    assert paired_gap({0: 1.0, 1: 1.0}, {0: 0.0, 1: 0.0}).verdict == 1  # exact, sd 0


def test_t_quantiles() -> None:
    assert t_critical(2) == 4.303 and t_critical(1) == 12.706 and t_critical(1000) == 1.960
    assert all(a > b for a, b in itertools.pairwise(T_975)) and T_975[-1] > 1.960


def runs_with_sanity() -> list[dict]:
    """snip and imp, as found and shuffled, two sparsities × three seeds; snip collapses at
    0.99 (an empty layer), imp's shuffle costs ~3 points, snip's nothing."""
    found = {("snip", 0.9): [0.880, 0.884, 0.879], ("snip", 0.99): [0.10, 0.10, 0.10],
             ("imp", 0.9): [0.890, 0.893, 0.888], ("imp", 0.99): [0.880, 0.884, 0.879]}
    shuffled = {("snip", 0.9): [0.881, 0.882, 0.880], ("snip", 0.99): [0.10, 0.10, 0.10],
                ("imp", 0.9): [0.861, 0.862, 0.860], ("imp", 0.99): [0.84, 0.85, 0.845]}
    runs = []
    for sanity, table in (("none", found), ("shuffle", shuffled)):
        for (method, s), values in table.items():
            for seed, acc in enumerate(values):
                runs.append({"run_id": f"{method}{s}{seed}{sanity}", "model": "lenet300",
                             "dataset": "synthetic", "warmup_epochs": 0, "bn_warmup": False,
                             "criterion": method, "method": method, "sparsity": s,
                             "seed": seed, "sanity": sanity, "test_acc": acc,
                             "collapsed_layers": int(method == "snip" and s == 0.99)})
    return runs


def test_sanity_table_pairs_the_transformed_tables_with_the_originals() -> None:
    tables = build_tables(runs_with_sanity())
    assert sorted(t.settings["sanity"] for t in tables) == ["none", "shuffle"]
    (st,) = sanity_tables(tables, "test_acc")
    assert st.checks == ["shuffle"] and st.sparsities == [0.9, 0.99]
    imp = st.gaps[("shuffle", 0.9, "imp")]
    assert imp.verdict == 1 and math.isclose(imp.mean, 2.9333333, rel_tol=1e-6)
    assert st.gaps[("shuffle", 0.9, "snip")].verdict == 0
    assert st.gaps[("shuffle", 0.99, "snip")].collapsed
    assert st.verdict("imp")[1:] == (2, 0, "yes: which weights, at every sparsity judged")
    judged, wins, losses, word = st.verdict("snip")
    assert judged == [0.9] and (wins, losses) == (0, 0) and word.startswith("no: only how many")
    md = sanity_markdown(st)
    assert "## Sanity checks: lenet300 · synthetic · no warm-up" in md and "sanity=" not in md
    assert "| imp | +2.93 ± 0.15 ✓ | +3.60 ± 0.35 ✓ |" in md
    assert "| snip | +0.00 ± 0.17 | collapsed |" in md
    # A loss: lower is better, so the gap keeps "positive = the mask as found is better".
    loss_runs = [{**r, "test_loss": 1 - r["test_acc"]} for r in runs_with_sanity()]
    (lt,) = sanity_tables(build_tables(loss_runs, "test_loss"), "test_loss")
    assert lt.gaps[("shuffle", 0.9, "imp")].verdict == 1


def test_no_sanity_table_without_transformed_runs() -> None:
    runs = [r for r in runs_with_sanity() if r["sanity"] == "none"]
    assert sanity_tables(build_tables(runs), "test_acc") == []


def test_report_of_a_sanity_sweep(tmp_path: Path) -> None:
    """End to end on synthetic data: the report has the sanity section and ``sanity.csv``."""
    sweep = sweep_from_table({"dataset": "synthetic", "model": "lenet300", "width": 0.1,
                              "lr": 0.2, "epochs": 1, "criterion": ["snip", "magnitude"],
                              "sanity": ["none", "shuffle"], "sparsity": 0.9, "seed": [0, 1]},
                             "t.toml", out=tmp_path / "sw")
    assert run_sweep(sweep, say=lambda _m: None) == {"finished": 8, "failed": 0}
    md, _written = make_report(tmp_path / "sw", out=tmp_path / "rep", plots=False)
    assert "## Sanity checks:" in md and "### shuffle" in md and "### Verdict" in md
    rows = list(csv.DictReader((tmp_path / "rep" / "sanity.csv").open()))
    assert {(r["method"], r["check"]) for r in rows} == {("snip", "shuffle"),
                                                          ("magnitude", "shuffle")}
    assert all(r["n"] == "2" for r in rows)
