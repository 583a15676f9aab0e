"""The GPU check's report: what a section records, and its Markdown rendering.

    python -m benchmarks.gpu_report gpu-check/report.json      # print report.md again

``benchmarks/gpu_check.py`` fills one :class:`Section` per section and writes ``report.json``
(``asdict`` of everything) and ``report.md`` (:func:`markdown`) after each of them.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Section:
    """One section's outcome: checks (decide the exit status), targets (reported), numbers."""

    name: str
    title: str
    status: str = "pending"  # pass | fail | error | incomplete (cut by the budget) | skipped
    wall_s: float | None = None
    checks: list[dict[str, Any]] = field(default_factory=list)
    targets: list[dict[str, Any]] = field(default_factory=list)
    results: dict[str, Any] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    traceback: str | None = None
    peak_gpu_memory_gib: float | None = None
    incomplete: bool = False  # the time budget cut the section short

    def check(self, name: str, passed: bool, detail: str = "") -> bool:
        self.checks.append({"name": name, "passed": bool(passed), "detail": detail})
        return bool(passed)

    def target(self, name: str, value: float, goal: str, met: bool) -> None:
        self.targets.append({"name": name, "value": value, "target": goal, "met": bool(met)})

    def cut(self, note: str) -> None:
        """Record that the time budget stopped this section early (not a failure)."""
        self.incomplete = True
        self.notes.append(f"time budget: {note}")


# --- Markdown -------------------------------------------------------------------------------------


def _fmt(value: Any, spec: str = ".3g") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        return format(value, spec)
    return str(value)


def _table(header: list[str], rows: list[list[Any]]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in rows]
    return [*out, ""]


def render_results(sec: Section) -> list[str]:
    r = sec.results
    if not r:
        return []
    if sec.name == "correctness":
        out = [f"Reference: {r['reference']}; differing positions are near-ties when within "
               f"{r['tie_rtol']:g} (relative) of the reference threshold; score tolerance "
               f"{r['score_rtol']:g}.", ""]
        rows = []
        for row in r["scores"]:
            m = [row["masks"][str(sp)] for sp in r["sparsities"]]
            rows.append([row["model"], row["criterion"], row["variant"], row["max_rel_diff"],
                         f"{row['spearman']:.6f}",
                         *(f"{x['overlap']:.4f}" for x in m),
                         *(f"{x['differ']} ({x['near_ties']})" for x in m),
                         max(x["max_tie_distance"] for x in m), row["repeat_identical"]])
        sps = [f"{sp:g}" for sp in r["sparsities"]]
        out += _table(["model", "criterion", "precision", "max rel diff", "Spearman",
                       *(f"overlap @{sp}" for sp in sps),
                       *(f"differ (near-ties) @{sp}" for sp in sps),
                       "max tie distance", "repeat identical"], rows)
        out += _table(["model", "steps", "loss", "violations", "pruned ≠ 0", "momentum ≠ 0",
                       "kept moved", "forward dtype"],
                      [[t["model"], t["steps"], t["loss"], t["violations"], t["pruned_nonzero"],
                        t["momentum_nonzero"], f"{t['kept_moved']:.0%}",
                        ", ".join(t["forward_dtypes"])] for t in r["training"]])
        return out
    if sec.name == "per_sample":
        out = [f"LeNet-5, {r['samples']} samples in batches of {r['batch_size']}, "
               f"median of {r['repeats']}: one-sample loop {r['loop_s']:.3f} s, "
               f"per_sample=True {r['per_sample_s']:.3f} s, **{r['speedup']:.1f}× faster**.", ""]
        return out + _table(["precision", "F̂ max rel diff", "FTS max rel diff"],
                            [[a["variant"], a["fisher_max_rel_diff"], a["fts_max_rel_diff"]]
                             for a in r["accuracy"]])
    if sec.name == "scoring_cost":
        out = [f"{r['model']}, one batch of {r['batch_size']}, hd/hp/hts {r['probes']} probes, "
               f"median of {r['repeats']} per-repeat ratios.", ""]
        return out + _table(
            ["criterion", "time (s)", "plain pass (s)", "time / plain", "normalised", "target"],
            [[x["criterion"], x["time_s"], x["base_s"], x["ratio"], x["normalised"],
              "-" if x["target"] is None else f"≤ {x['target']:g} ({x['measure']})"]
             for x in r["rows"]])
    if sec.name == "training":
        ips, b = r["images_per_s"], r["breakdown_ms"]
        out = [f"{r['model']}, {r['images']:,} images resident on the device, batch "
               f"{r['batch_size']}, crop+flip augmentation; {r['passes']} interleaved passes "
               f"(chunks of {r['chunk_batches']} batches).", ""]
        out += _table(["variant", "images/s", "one epoch (s)", "ms per step in that epoch"],
                      [[v, f"{ips[v]:,.0f}", r["epoch_s"][v], r["step_ms"][v]] for v in ips])
        out += [f"masked / dense time: **{r['masked_over_dense']:.3f}**", "",
                "Per-step breakdown (masked, each phase synchronized, median ms; the sum "
                "exceeds an unsynchronized step by the lost CPU/GPU overlap):", ""]
        return out + _table(["phase", "ms", "share"],
                            [[k, v, f"{v / b['sum']:.0%}"] for k, v in b.items() if k != "sum"]
                            + [["sum", b["sum"], "100%"]])
    if sec.name == "end_to_end":
        out = [f"Dataset: {r['dataset']}.", ""]
        out += _table(["run", "device", "exit", "test acc", "best val acc", "scoring (s)",
                       "training (s)", "wall (s)", "ran on"],
                      [[x["role"], x["device"], x.get("returncode"), x.get("test_acc"),
                        x.get("best_val_acc"), x.get("score_seconds"), x.get("train_seconds"),
                        x.get("wall_s"), f"{x.get('ran_on')} ({x.get('device_name')})"]
                       for x in r["runs"]])
        return out + ["Commands:", ""] + [f"- {x['role']}: `{x['command']}`"
                                           for x in r["runs"]] + [""]
    return []


def markdown(report: dict[str, Any], sections: list[Section]) -> str:
    """The whole report: provenance, a summary table, then each section's tables."""
    env = report["environment"]
    device = f"CPU ({env['cpu']})"
    if "gpu" in env:
        device = (f"{env['gpu']} (compute capability {env['gpu_capability']}, "
                  f"{env['gpu_memory_gib']} GiB, driver {env.get('driver')}), CUDA {env['cuda']}, "
                  f"cuDNN {env['cudnn']}, TF32 allowed: cuDNN {env['tf32_cudnn']}, "
                  f"matmul {env['tf32_matmul']}")
    out = [
        "# fishprune GPU check", "",
        f"Command: `{env['command']}`  ",
        f"Date: {env['started']}; fishprune {env['fishprune']} ({env['git_commit']}), torch "
        f"{env['torch']}, Python {env['python']}  ",
        f"Device: {device}  ",
        f"Host: {env['cpu']}, {env['cpu_cores']} cores, torch threads {env['threads']}  ",
        f"Mode: {'quick' if report['quick'] else 'full'}; total {report['total_s']:.1f} s of a "
        f"{report['budget_s']:.0f} s budget. **{report['verdict']}**", "",
        "Checks decide the exit status; targets are speed goals, reported as met or not.", "",
        "| section | status | wall (s) | checks passed | targets met |",
        "|---|---|---:|---:|---:|",
    ]
    for sec in sections:
        passed = sum(c["passed"] for c in sec.checks)
        met = sum(t["met"] for t in sec.targets)
        out.append(f"| {sec.title} | {sec.status} | {_fmt(sec.wall_s, '.1f')} | "
                   f"{passed}/{len(sec.checks)} | {met}/{len(sec.targets)} |")
    out.append("")
    for sec in sections:
        out += [f"## {sec.title}", "", f"Status: **{sec.status}**"
                + (f", {sec.wall_s:.1f} s" if sec.wall_s is not None else "")
                + (f", peak GPU memory {sec.peak_gpu_memory_gib:.2f} GiB"
                   if sec.peak_gpu_memory_gib is not None else ""), ""]
        if sec.error:
            out += ["Error:", "", "```", (sec.traceback or sec.error).rstrip(), "```", ""]
        out += [f"- note: {n}" for n in sec.notes] + ([""] if sec.notes else [])
        try:
            out += render_results(sec)
        except (KeyError, TypeError, ValueError) as err:  # partial results of a failed section
            out += [f"(results incomplete: {type(err).__name__}: {err}; see report.json)", ""]
        if sec.targets:
            out += _table(["target", "value", "goal", "met"],
                          [[t["name"], t["value"], t["target"], t["met"]] for t in sec.targets])
        if sec.checks:
            out += _table(["check", "passed", "detail"],
                          [[c["name"], c["passed"], c["detail"]] for c in sec.checks])
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Print the Markdown of a saved ``report.json``."""
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m benchmarks.gpu_report REPORT_JSON", file=sys.stderr)
        return 2
    with open(args[0]) as fh:
        report = json.load(fh)
    sections = [Section(**sec) for sec in report["sections"].values()]
    print(markdown(report, sections))
    return 0


if __name__ == "__main__":
    sys.exit(main())
