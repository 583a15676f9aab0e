"""Progress of the long phases: scoring, the dense warm-up, the BN statistics pass, SynFlow's
rounds and ``fishprune analyze`` — a tqdm bar on a terminal, periodic lines otherwise."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from fishprune import pipeline, progress
from fishprune import settings as S
from fishprune.analyze import analyze
from fishprune.data import TensorBatches
from fishprune.progress import Counted, Progress

FAST = {"dataset": "synthetic", "model": "lenet300", "width": 0.25, "epochs": 0,
        "sparsity": 0.5, "score_batch_size": 200}


def has(messages: list[str], prefix: str) -> bool:
    return any(m.startswith(prefix) for m in messages)


def test_lines_without_a_bar_come_at_most_every_interval() -> None:
    lines: list[str] = []
    with Progress("scoring (fts)", 3, show=False, say=lines.append, interval=0) as bar:
        for _ in range(3):
            bar.update()
    assert lines == [f"scoring (fts): {i}/3 batches (0s)" for i in (1, 2, 3)]
    quiet: list[str] = []
    with Progress("scoring", 3, show=False, say=quiet.append, interval=3600) as bar:
        bar.update(3)
    assert quiet == []  # a short phase prints nothing


def test_counted_batches_forward_and_count_every_pass() -> None:
    x = torch.zeros(10, 1, 2, 2, dtype=torch.uint8)
    batches = TensorBatches(x, torch.zeros(10, dtype=torch.int64), batch_size=4, mean=(0.5,),
                            std=(0.5,), shuffle=True)
    bar = Progress("t", len(batches), show=False)
    counted = Counted(batches, bar)
    assert len(counted) == 3 and counted.num_samples == 10
    counted.set_epoch(2)
    assert batches.epoch == 2
    seen = [y for _, y in counted]
    assert len(seen) == 3 and bar.done == 3
    list(counted)
    assert bar.done == 6


def test_the_pipeline_reports_its_long_phases(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                              ) -> None:
    monkeypatch.setattr(progress, "INTERVAL_S", 0.0)
    messages: list[str] = []
    cfg = S.build({**FAST, "criterion": "fts", "warmup_epochs": 1, "bn_warmup": True,
                   "model": "resnet20", "width": 0.125, "out": str(tmp_path)})
    pipeline.run(cfg, show_progress=False, echo=messages.append)
    assert has(messages, "scoring (fts): 4/4 batches (")  # 800 samples in batches of 200
    assert has(messages, "warm-up epoch 1/1: 7/7 batches (")
    assert has(messages, "BN statistics: 7/7 batches (")  # resnet20 has BatchNorm
    rounds: list[str] = []
    synflow = S.build({**FAST, "criterion": "synflow", "rounds": 3, "out": str(tmp_path)})
    pipeline.run(synflow, show_progress=False, echo=rounds.append)
    assert [m.rsplit(" (", 1)[0] for m in rounds if m.startswith("pruning (synflow)")] == [
        f"pruning (synflow): {r}/3 rounds" for r in (1, 2, 3)]


def test_a_terminal_gets_a_bar(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = S.build({**FAST, "criterion": "snip", "out": str(tmp_path)})
    pipeline.run(cfg, show_progress=True, echo=lambda _m: None)
    assert "scoring (snip)" in capsys.readouterr().err


def test_analyze_reports_scoring_and_probes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                            ) -> None:
    monkeypatch.setattr(progress, "INTERVAL_S", 0.0)
    lines: list[str] = []
    analyze(S.build({**FAST, "criterion": "snip", "out": str(tmp_path)}), [0.5],
            say=lines.append)
    assert has(lines, "scoring (snip): 4/4 batches (")
    probes: list[str] = []
    analyze(S.build({**FAST, "criterion": "synflow", "rounds": 2, "out": str(tmp_path)}),
            [0.5], resolution=0.25, say=probes.append)
    counts = [m for m in probes if m.startswith("pruning probes (synflow, 2 rounds each)")]
    assert counts and counts[-1].startswith("pruning probes (synflow, 2 rounds each): ")
    assert int(counts[-1].split(": ")[1].split()[0]) % 2 == 0  # whole probes of 2 rounds
