"""``fishprune export RUN_DIR``: the compact model of a finished run loads back bit-identically."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import fishprune as fp
from fishprune import cli, pipeline
from fishprune import config as C
from fishprune import settings as S
from fishprune import tensorfiles as tf
from fishprune.data import TensorBatches, load_dataset
from fishprune.exporting import export_run, rebuild_model
from fishprune.rundir import EXPORTED
from fishprune.train import evaluate

FAST: dict[str, Any] = {"dataset": "synthetic", "model": "lenet300", "width": 0.25, "lr": 0.1,
                        "epochs": 2, "sparsity": 0.95, "criterion": "snip"}


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> tuple[C.RunConfig, dict, Path]:
    out = tmp_path_factory.mktemp("export")
    cfg = S.build({**FAST, "out": str(out)})
    return cfg, pipeline.run(cfg, show_progress=False), cfg.directory()


def test_cli_export_round_trips(finished: tuple[C.RunConfig, dict, Path],
                                capsys: pytest.CaptureFixture[str]) -> None:
    cfg, result, run = finished
    assert cli.main(["export", str(run)]) == 0
    text = capsys.readouterr().out
    assert f"wrote {run / EXPORTED}" in text and "x smaller" in text
    assert f"{result['kept']:,} of {result['prunable']:,}" in text

    model = rebuild_model(cfg)
    masks = fp.load_pruned(model, run / EXPORTED)
    stored = tf.load_masks(run / "masks.safetensors")
    assert all(torch.equal(masks[n], stored[n]) for n in stored)
    best = tf.load_state(run / "best.safetensors")
    state = model.state_dict()
    assert all(torch.equal(state[n], best[n]) for n in best)  # bit-identical to best weights

    ds = load_dataset("synthetic")
    test = TensorBatches(ds.test_x, ds.test_y, batch_size=1024, mean=ds.mean, std=ds.std)
    assert evaluate(model, test, device=torch.device("cpu"))[1] == result["test_acc"]


def test_export_to_chosen_file_is_smaller(finished: tuple[C.RunConfig, dict, Path],
                                          tmp_path: Path) -> None:
    _, _, run = finished
    summary = export_run(run, tmp_path / "sub" / "model.safetensors")
    assert summary.path.exists() and summary.compact_bytes == summary.path.stat().st_size
    assert summary.ratio > 4  # 95% sparsity: kept values + 1 bit per weight
    assert not [p for p in summary.path.parent.iterdir() if p.name.startswith(".")]


def test_export_of_a_shuffled_run_keeps_the_trained_mask(tmp_path: Path) -> None:
    """The stored masks are the ones trained with, so the export loses no trained weight."""
    cfg = S.build({**FAST, "epochs": 1, "sanity": "shuffle", "out": str(tmp_path)})
    pipeline.run(cfg, show_progress=False)
    run = cfg.directory()
    model = rebuild_model(cfg)
    fp.load_pruned(model, export_run(run).path)
    best = tf.load_state(run / "best.safetensors")
    assert all(torch.equal(v, best[n]) for n, v in model.state_dict().items())
