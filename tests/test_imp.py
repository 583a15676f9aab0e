"""IMP with rewinding: nested masks, exact counts, exact rewind, shared and resumable rounds."""

from __future__ import annotations

import itertools
import json
from pathlib import Path
from typing import Any

import pytest
import torch

import fishprune as fp
from fishprune import cli, imp, pipeline
from fishprune import config as C
from fishprune import settings as S
from fishprune import tensorfiles as tf
from fishprune.rundir import RunDir
from fishprune.selection import kept_count

FAST: dict[str, Any] = {"dataset": "synthetic", "model": "lenet300", "width": 0.25, "lr": 0.1,
                        "epochs": 1, "criterion": "imp", "imp_fraction": 0.5}


def run(cfg: C.RunConfig, said: list[str] | None = None) -> dict[str, Any]:
    return pipeline.run(cfg, show_progress=False, echo=(said if said is not None else []).append)


def rounds(cfg: C.RunConfig) -> list[dict[str, torch.Tensor]]:
    cache = imp.round_dir(cfg, "cpu")
    files = sorted(cache.glob("round-*.safetensors"), key=lambda p: int(p.name.split("-")[1]))
    return [tf.load_masks(p) for p in files]


@pytest.mark.parametrize(("target", "fraction", "expected"), [
    (0.5, 0.5, [0.5]), (0.3, 0.5, [0.5, 0.3]), (0.125, 0.5, [0.5, 0.25, 0.125]),
    (0.9, 0.2, [0.9]), (0.02, 0.2, None),
])
def test_the_schedule_keeps_1_minus_p_to_the_r_then_the_target(target, fraction, expected):
    got = imp.densities(target, fraction)
    if expected is not None:
        assert got == pytest.approx(expected)
    assert got[-1] == target and all(a > b for a, b in itertools.pairwise(got))
    assert all(d == pytest.approx((1 - fraction) ** (i + 1)) for i, d in enumerate(got[:-1]))


def test_imp_masks_are_nested_exact_and_rewound(tmp_path: Path, monkeypatch) -> None:
    cfg = S.build({**FAST, "sparsity": 0.8, "warmup_epochs": 1, "out": str(tmp_path)})
    started: list[dict[str, torch.Tensor]] = []
    real_fit = pipeline.fit

    def recording_fit(cfg_, model, masks, *args, **kwargs):
        started.append({k: v.clone() for k, v in model.state_dict().items()})
        return real_fit(cfg_, model, masks, *args, **kwargs)

    monkeypatch.setattr(pipeline, "fit", recording_fit)
    result = run(cfg)
    history = rounds(cfg)
    assert len(history) == 3  # kept 0.5, 0.25, then exactly 0.2
    for earlier, later in itertools.pairwise(history):
        for n in earlier:
            assert not (later[n] & ~earlier[n]).any(), n  # never revived
    total = sum(m.numel() for m in history[0].values())
    for masks, density in zip(history, imp.densities(0.2, 0.5)):
        assert sum(int(m.sum()) for m in masks.values()) == kept_count(density, total)
    stored = tf.load_masks(RunDir.of(cfg).masks)
    assert all(torch.equal(stored[n], history[-1][n]) for n in stored)
    assert result["kept"] == kept_count(0.2, total)
    # The sparse training starts from the rewind point (the 1-epoch warm-up), masked.
    rewind = tf.load_state(next((tmp_path / "_cache").glob("warmup-*.safetensors")))
    for name, value in started[0].items():
        expected = rewind[name] * stored[name] if name in stored else rewind[name]
        assert torch.equal(value, expected), name


def test_runs_at_several_sparsities_share_their_rounds(tmp_path: Path) -> None:
    said: list[str] = []
    run(S.build({**FAST, "sparsity": 0.75, "out": str(tmp_path)}), said)
    assert sum("IMP round" in line for line in said) == 2
    said.clear()
    run(S.build({**FAST, "sparsity": 0.875, "out": str(tmp_path)}), said)
    assert sum("IMP round" in line for line in said) == 1  # rounds 1-2 came from the cache


def test_a_killed_imp_run_resumes_bit_identically(tmp_path: Path, monkeypatch) -> None:
    reference = run(S.build({**FAST, "sparsity": 0.875, "out": str(tmp_path / "whole")}))
    cfg = S.build({**FAST, "sparsity": 0.875, "out": str(tmp_path / "killed")})
    real = imp.train_masked
    calls = []

    def dies_in_round_2(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(imp, "train_masked", dies_in_round_2)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.setattr(imp, "train_masked", real)
    assert len(rounds(cfg)) == 1
    said: list[str] = []
    resumed = run(cfg, said)
    assert sum("IMP round" in line for line in said) == 2
    drop = ("warmup_seconds", "score_seconds", "train_seconds")
    assert {k: v for k, v in resumed.items() if k not in drop} == \
        {k: v for k, v in reference.items() if k not in drop}
    a, b = (RunDir.of(S.build({**FAST, "sparsity": 0.875, "out": str(tmp_path / d)}))
            for d in ("whole", "killed"))
    assert a.masks.read_bytes() == b.masks.read_bytes()
    assert a.best.read_bytes() == b.best.read_bytes()


@pytest.mark.parametrize(("extra", "mention"), [
    (["--probes", "3"], "option"),
    (["--rounds", "3"], "rounds does not apply to imp"),
    (["--sanity", "invert"], "does not apply to imp"),
    (["--imp-fraction", "0"], "imp_fraction must be in"),
    (["--imp-fraction", "1"], "imp_fraction must be in"),
])
def test_settings_that_do_not_apply_to_imp_are_refused(extra, mention, tmp_path, capsys):
    argv = ["run", "--dataset", "synthetic", "--criterion", "imp", *extra, "--out", str(tmp_path)]
    assert cli.main(argv) == 2
    assert mention in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_imp_is_one_more_column_of_the_report(tmp_path: Path) -> None:
    from fishprune.report import make_report

    toml = tmp_path / "s.toml"
    toml.write_text('dataset = "synthetic"\nmodel = "lenet300"\nwidth = 0.25\nepochs = 1\n'
                    'lr = 0.1\nimp_fraction = 0.5\ncriterion = ["snip", "imp"]\n'
                    'sparsity = [0.5, 0.75]\n')
    from fishprune.sweep import load_sweep, run_sweep

    assert run_sweep(load_sweep(toml, out=tmp_path / "sw"), say=lambda _m: None)["failed"] == 0
    md, _ = make_report(tmp_path / "sw", formats=[], plots=False)
    assert "| sparsity | snip | imp |" in md
    assert cli.main(["analyze", "--dataset", "synthetic", "--criterion", "imp"]) == 2


def test_fp_prune_magnitude_is_what_imp_applies_to_trained_weights() -> None:
    """One round of IMP from a trained state equals global magnitude pruning of it."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.ReLU(), torch.nn.Linear(5, 3))
    scores = fp.score(model, "magnitude", None)
    masks = fp.select(scores, 0.6)
    flat = torch.cat([p.detach().abs().flatten() for p in fp.prunable_parameters(model).values()])
    kept = torch.cat([m.flatten() for m in masks.values()])
    assert flat[kept].min() >= flat[~kept].max()
    assert json.dumps(imp.densities(0.4, 0.6)) == json.dumps([0.4])
