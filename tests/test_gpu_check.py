"""The GPU check (benchmarks/gpu_check.py): its quick CPU mode end to end, its comparison
statistics, and its runner (a raising section is recorded, the budget skips, exit status)."""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import pytest
import torch

import fishprune as fp

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is a folder of the checkout, not an installed package
    sys.path.insert(0, str(ROOT))

from benchmarks import gpu_check as gc  # noqa: E402
from benchmarks.gpu_report import Section  # noqa: E402


def test_quick_cpu_mode_writes_a_complete_passing_report(tmp_path: Path) -> None:
    status = gc.main(["--device", "cpu", "--quick", "--out", str(tmp_path)])
    report = json.loads((tmp_path / "report.json").read_text())
    assert status == 0, report["failed"]
    assert report["passed"] and report["failed"] == [] and report["quick"]

    env = report["environment"]
    for key in ("command", "torch", "cuda", "device", "device_name", "fishprune", "started"):
        assert key in env
    assert "gpu_check.py" in env["command"] and "--quick" in env["command"]
    sections = report["sections"]
    assert list(sections) == [name for name, _, _ in gc.SECTIONS]
    for sec in sections.values():
        assert sec["status"] == "pass" and sec["error"] is None
        assert sec["wall_s"] > 0 and (sec["checks"] or sec["targets"])

    # 1. every criterion on both models, masks compared at both sparsities
    corr = sections["correctness"]
    rows = corr["results"]["scores"]
    assert corr["results"]["reference"] == "cpu float64"
    labels = [*fp.criteria(), "fts (per_sample)"]
    expected = {(m, c) for m in ("lenet5", "resnet20") for c in labels}
    assert {(r["model"].split()[0], r["criterion"]) for r in rows} == expected
    for row in rows:
        assert row["finite"] and row["on_device"] and row["repeat_identical"]
        assert row["spearman"] > 0.999
        for sparsity in ("0.9", "0.98"):
            m = row["masks"][sparsity]
            assert m["kept"] == m["kept_device"] > 0
            assert m["differ"] == m["near_ties"]
    # float32 against float64: the checks met real float differences, not identical numbers
    assert max(r["max_rel_diff"] for r in rows) > 0
    assert all(c["passed"] for c in corr["checks"])
    assert len(corr["checks"]) == len(rows) + 4  # + model unchanged, masked training (× 2)
    for run in corr["results"]["training"]:
        assert run["violations"] == run["pruned_nonzero"] == run["momentum_nonzero"] == 0
        assert run["forward_dtypes"] == ["float32"] and run["kept_moved"] > 0.5

    # 2. per-sample Fisher matches the loop
    ps = sections["per_sample"]["results"]
    assert ps["speedup"] > 0 and ps["samples"] == gc.QUICK.samples
    assert all(a["fisher_max_rel_diff"] <= gc.PER_SAMPLE_RTOL for a in ps["accuracy"])

    # 3. every criterion timed; 4. both training variants timed, with a breakdown
    cost = sections["scoring_cost"]["results"]["rows"]
    assert [r["criterion"] for r in cost] == fp.criteria()
    assert all(r["time_s"] > 0 and r["base_s"] > 0 for r in cost)
    train = sections["training"]["results"]
    assert train["images_per_s"]["dense"] > 0 and train["images_per_s"]["masked"] > 0
    assert {"batch", "forward", "backward", "mask_grads", "optimizer_step"} <= set(
        train["breakdown_ms"])

    # 5. fishprune run in subprocesses, without Fashion-MNIST
    e2e = sections["end_to_end"]["results"]
    assert e2e["dataset"] == "synthetic" and len(e2e["runs"]) == 2
    for run in e2e["runs"]:
        assert run["returncode"] == 0 and run["ran_on"] == "cpu" and run["test_acc"] >= 0.2
        assert (tmp_path / run["log"]).is_file()

    md = (tmp_path / "report.md").read_text()
    for _, title, _ in gc.SECTIONS:
        assert f"## {title}" in md
    assert "all checks passed" in md and "| lenet5 (width 0.25, 1×28×28) | fts |" in md


# --- the comparison statistics -------------------------------------------------------------------


def test_mask_agreement_tells_near_ties_from_real_differences() -> None:
    scores = torch.arange(10, dtype=torch.float64)  # keep 3: {7, 8, 9}, threshold 7
    ref = scores >= 7
    swapped = ref.clone()
    swapped[7], swapped[6] = False, True  # 6 is 1/7 away from the threshold: not a tie
    result = gc.mask_agreement(scores, ref, swapped, tie_rtol=1e-3)
    assert result["kept"] == result["kept_device"] == 3 and result["threshold"] == 7.0
    assert result["differ"] == 2 and result["near_ties"] == 1
    assert result["max_tie_distance"] == pytest.approx(1 / 7)
    assert result["overlap"] == pytest.approx(2 / 3)

    close = scores.clone()
    close[6] = 7 - 1e-6  # now a float tie with the threshold
    result = gc.mask_agreement(close, ref, swapped, tie_rtol=1e-3)
    assert result["differ"] == result["near_ties"] == 2

    same = gc.mask_agreement(scores, ref, ref.clone(), tie_rtol=1e-3)
    assert same["differ"] == 0 and same["overlap"] == 1.0 and same["max_tie_distance"] == 0


def test_ranks_spearman_and_relative_difference() -> None:
    x = torch.tensor([3.0, 1.0, 2.0, 2.0])
    assert gc.average_ranks(x).tolist() == [4.0, 1.0, 2.5, 2.5]
    y = torch.randn(100, generator=torch.Generator().manual_seed(0))
    assert gc.spearman(y, y.exp()) == pytest.approx(1.0)  # monotone: same ranks
    assert gc.spearman(y, -y) == pytest.approx(-1.0)
    assert abs(gc.spearman(y, torch.randn(100))) < 0.5

    f64 = torch.float64
    ref = {"a": torch.tensor([1.0, -2.0], dtype=f64), "b": torch.tensor([0.5, 0.25], dtype=f64)}
    assert gc.max_rel_diff(ref, ref) == 0.0
    dev = {"a": torch.tensor([1.0, -2.002], dtype=f64),
           "b": torch.tensor([0.5, 0.25025], dtype=f64)}
    assert gc.max_rel_diff(dev, ref) == pytest.approx(1e-3)  # a: 0.002 / 2; b: 0.00025 / 0.5
    assert gc.max_rel_diff({"a": torch.ones(2)}, {"a": torch.zeros(2)}) == float("inf")


def test_strict_precision_turns_tf32_off_and_restores_it() -> None:
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    with gc.precision("strict-fp32"):
        assert not torch.backends.cudnn.allow_tf32
        assert not torch.backends.cuda.matmul.allow_tf32
    assert (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32) == before


# --- the runner ----------------------------------------------------------------------------------


def _raises(ctx: gc.Context, sec: Section) -> None:
    sec.check("before the bug", True)
    raise RuntimeError("planted bug")


def _passes(ctx: gc.Context, sec: Section) -> None:
    sec.check("fine", True)
    sec.target("fast", 2.0, "≤ 1", False)  # a missed target does not fail the run


def _fails(ctx: gc.Context, sec: Section) -> None:
    sec.check("planted failure", False, "wrong by 1")


def test_a_raising_section_is_recorded_and_the_next_one_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gc, "SECTIONS", (("a", "A", _raises), ("b", "B", _passes)))
    assert gc.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "report.json").read_text())
    a, b = report["sections"]["a"], report["sections"]["b"]
    assert a["status"] == "error" and a["error"] == "RuntimeError: planted bug"
    assert "planted bug" in a["traceback"] and a["wall_s"] is not None
    assert b["status"] == "pass" and not b["targets"][0]["met"]
    assert report["failed"] == ["a: RuntimeError: planted bug"]
    md = (tmp_path / "report.md").read_text()
    assert "FAILED (1)" in md and "RuntimeError: planted bug" in md

    monkeypatch.setattr(gc, "SECTIONS", (("b", "B", _passes), ("c", "C", _fails)))
    assert gc.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 1
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["sections"]["c"]["status"] == "fail"
    assert report["failed"] == ["c: planted failure"]

    assert gc.main(["--device", "cpu", "--quick", "--sections", "b",
                    "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["sections"]["c"]["status"] == "skipped"
    assert report["verdict"] == "all checks passed (skipped: c)"


def _cut(ctx: gc.Context, sec: Section) -> None:
    sec.check("what ran", True)
    sec.cut("stopped before the rest")


def test_sections_that_do_not_fit_the_budget_are_skipped_or_cut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gc, "SECTIONS", (("a", "A", _raises), ("c", "C", _fails)))
    assert gc.main(["--device", "cpu", "--quick", "--budget", "0", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    for sec in report["sections"].values():
        assert sec["status"] == "skipped" and sec["wall_s"] is None
        assert sec["notes"][0].startswith("time budget")
    assert report["skipped"] == ["a", "c"]

    monkeypatch.setattr(gc, "SECTIONS", (("d", "D", _cut),))
    assert gc.main(["--device", "cpu", "--quick", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["sections"]["d"]["status"] == "incomplete"
    assert report["verdict"] == "all checks passed (incomplete: d)"
    assert report["sections"]["d"]["notes"] == ["time budget: stopped before the rest"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is present")
def test_cuda_without_a_gpu_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        gc.main(["--out", str(tmp_path)])
    assert exc.value.code == 2
    assert not (tmp_path / "report.json").exists()


def test_a_device_side_layout_bug_fails_the_correctness_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A device model whose first convolution was scrambled in transfer (as a wrong
    memory-format copy would) must fail the score and mask checks, not pass them as ties."""
    monkeypatch.setattr(gc, "QUICK", dataclasses.replace(gc.QUICK, models=(
        ("lenet5", 0.5, 1, 28),)))
    to_device = gc.to_device

    def scrambled(model: torch.nn.Module, device: torch.device, channels_last: bool
                  ) -> torch.nn.Module:
        model = to_device(model, device, channels_last)
        with torch.no_grad():
            first = model.features[0].weight
            first.copy_(first.flatten().roll(7).view_as(first))
        return model

    monkeypatch.setattr(gc, "to_device", scrambled)
    assert gc.main(["--device", "cpu", "--quick", "--sections", "correctness",
                    "--out", str(tmp_path)]) == 1
    sec = json.loads((tmp_path / "report.json").read_text())["sections"]["correctness"]
    failed = {c["name"] for c in sec["checks"] if not c["passed"]}
    assert "lenet5 magnitude [default]" in failed and "lenet5 snip [default]" in failed
    magnitude = next(r for r in sec["results"]["scores"] if r["criterion"] == "magnitude")
    assert magnitude["masks"]["0.9"]["differ"] > magnitude["masks"]["0.9"]["near_ties"]


def test_two_precision_variants_as_on_cuda(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """On CUDA every comparison runs with the default precision and with TF32 off; the same
    code path on the CPU (where the flags change nothing) gives one row and check per variant."""
    monkeypatch.setattr(gc, "QUICK", dataclasses.replace(gc.QUICK, models=(
        ("lenet5", 0.25, 1, 28),)))
    monkeypatch.setattr(gc.Context, "variants", property(lambda self: ("default", "strict-fp32")))
    assert gc.main(["--device", "cpu", "--quick", "--sections", "correctness,per_sample",
                    "--out", str(tmp_path)]) == 0
    sections = json.loads((tmp_path / "report.json").read_text())["sections"]
    rows = sections["correctness"]["results"]["scores"]
    assert [r["variant"] for r in rows[:2]] == ["default", "strict-fp32"]
    assert len(rows) == 2 * (len(fp.criteria()) + 1)
    assert rows[1]["repeat_identical"] is None  # repeated with the default precision only
    assert {r["variant"] for r in sections["per_sample"]["results"]["accuracy"]} == {
        "default", "strict-fp32"}
    md = (tmp_path / "report.md").read_text()
    assert "| lenet5 (width 0.25, 1×28×28) | fts | strict-fp32 |" in md


def test_markdown_of_a_gpu_environment() -> None:
    from benchmarks.gpu_report import markdown

    env = {"command": "python3 benchmarks/gpu_check.py", "started": "2026-01-01T00:00:00+00:00",
           "fishprune": "0.1.0", "git_commit": None, "torch": "2.11.0+cu130", "python": "3.12.3",
           "cpu": "x86", "cpu_cores": 16, "threads": 16, "gpu": "NVIDIA H200",
           "gpu_capability": "9.0", "gpu_memory_gib": 139.8, "driver": "580.159.04",
           "cuda": "13.0", "cudnn": 91000, "tf32_cudnn": True, "tf32_matmul": False}
    sec = Section("training", "4. Training", status="error", wall_s=1.0, error="boom",
                  peak_gpu_memory_gib=2.5, results={"model": "resnet18"})  # partial results
    report = {"environment": env, "quick": False, "total_s": 1.0, "budget_s": 480.0,
              "verdict": "FAILED (1): training: boom"}
    md = markdown(report, [sec])
    assert "NVIDIA H200 (compute capability 9.0, 139.8 GiB, driver 580.159.04), CUDA 13.0" in md
    assert "TF32 allowed: cuDNN True, matmul False" in md
    assert "peak GPU memory 2.50 GiB" in md and "results incomplete" in md
