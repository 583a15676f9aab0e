"""``fishprune.analyze``: exact critical sparsity, density curves, and ``fishprune analyze``.

Oracles: brute force over every kept count k with :func:`fishprune.select`, and the pipeline
itself (a run at the critical sparsity keeps every layer; one weight fewer empties one).
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import fishprune as fp
from fishprune import analyze as A
from fishprune import cli, pipeline
from fishprune import settings as S
from fishprune.collapse import collapse_report
from fishprune.selection import kept_count

FAST: dict[str, Any] = {"dataset": "synthetic", "model": "lenet300", "width": 0.25,
                        "criterion": "snip", "epochs": 0}


def tied_scores(sizes: list[int], levels: int, seed: int) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {f"l{i}": torch.randint(levels, (n,), generator=gen).float()
            for i, n in enumerate(sizes)}


score_sets = st.builds(tied_scores, st.lists(st.integers(1, 30), min_size=1, max_size=5),
                       st.integers(1, 50), st.integers(0, 2**16))


@settings(max_examples=60, deadline=None)
@given(scores=score_sets, sparsity=st.floats(0.0, 0.999))
def test_ranks_reproduce_select_exactly(scores: dict[str, Tensor], sparsity: float) -> None:
    ranks = A.global_ranks(scores)
    total = sum(s.numel() for s in scores.values())
    masks = A.masks_at(ranks, kept_count(1 - sparsity, total))
    expected = fp.select(scores, sparsity)
    assert all(torch.equal(masks[n], expected[n]) for n in scores)
    densities = A.layer_densities_at(ranks, [sparsity])
    assert {n: d[0] for n, d in densities.items()} == pytest.approx(fp.layer_densities(expected))


@settings(max_examples=60, deadline=None)
@given(scores=score_sets)
def test_critical_sparsity_matches_brute_force(scores: dict[str, Tensor]) -> None:
    total = sum(s.numel() for s in scores.values())

    def no_empty(k: int) -> bool:
        masks = fp.select(scores, 1 - k / total)  # exactly k kept (kept_count rounds k/N·N)
        assert sum(int(m.sum()) for m in masks.values()) == k
        return all(bool(m.any()) for m in masks.values())

    brute = min(k for k in range(1, total + 1) if no_empty(k))
    crit = A.critical_sparsity(scores)
    assert crit.kept == brute
    assert crit.sparsity == pytest.approx(1 - brute / total)
    assert crit.max_sparsity == pytest.approx(1 - len(scores) / total)
    assert crit.sparsity <= crit.max_sparsity + 1e-12
    if brute > 1:  # one weight fewer empties exactly the limiting layer (and maybe others)
        masks = fp.select(scores, 1 - (brute - 1) / total)
        assert not masks[crit.limiting_layer].any()


def test_critical_sparsity_connected_matches_brute_force() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 5), nn.ReLU(), nn.Linear(5, 3))
    gen = torch.Generator().manual_seed(1)
    params = fp.prunable_parameters(model)
    scores = {n: torch.rand(p.shape, generator=gen) for n, p in params.items()}
    scores["2.weight"] *= 0.2  # the middle layer ranks low: it is the first to go
    crit = A.critical_sparsity(scores, model=model, input_shape=(6,))
    total = crit.total
    ranks = A.global_ranks(scores)

    def connected(k: int) -> bool:
        report = collapse_report(model, A.masks_at(ranks, k), (6,))
        return not report.collapsed and not report.disconnected

    brute = min(k for k in range(1, total + 1) if connected(k))
    assert crit.connected_kept == brute >= crit.kept
    assert crit.connected_sparsity == pytest.approx(1 - brute / total)
    assert crit.limiting_layer == "2.weight"


def test_critical_sparsity_rejects_bad_scores() -> None:
    with pytest.raises(ValueError, match="empty"):
        A.critical_sparsity({})
    with pytest.raises(ValueError, match="NaN"):
        A.critical_sparsity({"a": torch.tensor([1.0, float("nan")])})
    crit = A.critical_sparsity({"a": torch.tensor([1.0, float("-inf")]), "b": torch.zeros(3)})
    assert crit.kept == 2 and crit.limiting_layer == "b"  # -inf is a valid (lowest) score


def test_curve_sparsities_span() -> None:
    xs = A.curve_sparsities(0.5, 0.999, points=50)
    assert xs[0] == pytest.approx(0.5) and xs[-1] == pytest.approx(0.999)
    assert all(a < b for a, b in itertools.pairwise(xs))


# --------------------------------------------------------------------------- the command


@pytest.fixture(scope="module")
def analyzed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    out = tmp_path_factory.mktemp("analyze")
    argv = ["analyze", "--out", str(out), "--sparsities", "0.5", "0.99", "--quiet"]
    for key, value in FAST.items():
        argv += [f"--{key}", str(value)]
    assert cli.main(argv) == 0
    (report,) = (out / "analyze").iterdir()
    return out, json.loads((report / "analysis.json").read_text())


def test_analyze_writes_table_json_and_plots(analyzed: tuple[Path, dict[str, Any]]) -> None:
    out, result = analyzed
    (report,) = (out / "analyze").iterdir()
    assert (report / "density.png").stat().st_size > 1000
    assert (report / "density.pdf").read_bytes().startswith(b"%PDF")
    assert not [p for p in report.iterdir() if p.name.startswith(".")]
    assert result["sparsities"] == [0.5, 0.99]
    assert set(result["densities"]) == {"fc1.weight", "fc2.weight", "fc3.weight"}
    assert 0 < result["critical_connected"] <= result["critical"] <= result["max_sparsity"] < 1
    assert result["resolution"] is None and not result["iterative"]


def test_analyze_agrees_with_the_pipeline(analyzed: tuple[Path, dict[str, Any]],
                                          tmp_path: Path) -> None:
    """A run at the critical sparsity keeps every layer; with one weight fewer one is empty."""
    _, result = analyzed
    total = result["total"]
    k = round((1 - result["critical"]) * total)
    at = pipeline.run(S.build({**FAST, "sparsity": result["critical"], "out": str(tmp_path)}),
                      show_progress=False)
    assert at["kept"] == k and at["collapsed_layers"] == []
    beyond = pipeline.run(S.build({**FAST, "sparsity": 1 - (k - 1) / total,
                                   "out": str(tmp_path)}), show_progress=False)
    assert beyond["kept"] == k - 1
    assert beyond["collapsed_layers"] == [result["limiting_layer"]]


def test_analyze_table_text(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    argv = ["analyze", "--out", str(tmp_path), "--sparsities", "0.9", "--sparsity", "0.9999",
            "--no-plot", "--quiet", *[f"--{k}={v}" for k, v in FAST.items()]]
    assert cli.main(argv) == 0
    text = capsys.readouterr().out
    assert "critical sparsity, no layer empty:" in text and "(exact;" in text
    assert "maximum sparsity (one weight per layer):" in text
    assert "0!" in text  # 0.9999 from --sparsity joins the table and empties a layer
    assert not list(tmp_path.rglob("*.png"))


def test_analyze_iterative_criterion_reprunes(tmp_path: Path) -> None:
    cfg = S.build({**FAST, "criterion": "synflow", "rounds": 3, "out": str(tmp_path)})
    result = A.analyze(cfg, [0.5, 0.9], resolution=0.05)
    assert result.iterative and result.resolution == 0.05
    assert result.notes and "3 rounds" in result.notes[0]
    assert 0 < result.critical <= result.max_sparsity
    assert result.numel == {"fc1.weight": 784 * 75, "fc2.weight": 75 * 25, "fc3.weight": 250}
    assert result.densities["fc1.weight"][0] < 1  # pruned at 0.5
    one_shot = A.analyze(S.build({**FAST, "criterion": "synflow", "rounds": 1,
                                  "out": str(tmp_path)}), [0.5])
    assert not one_shot.iterative and one_shot.resolution is None


@pytest.mark.slow
def test_warmup_cures_snip_collapse_on_vgg19_synthetic(tmp_path: Path) -> None:
    """The FTS paper's observation in miniature: deep VGG + BN collapses sooner without warm-up."""
    base = {"dataset": "synthetic", "model": "vgg19", "width": 0.25, "criterion": "snip",
            "lr": 0.05, "out": str(tmp_path)}
    cold = A.analyze(S.build(base), [0.9])
    warm = A.analyze(S.build({**base, "warmup_epochs": 1}), [0.9])
    assert warm.critical > cold.critical
