"""Helpers shared by the command-line and pipeline tests."""

from __future__ import annotations

from typing import Any

import pytest

from fishprune import pipeline

#: Flags under which a CLI run on the synthetic data takes about a second.
FAST = ["--dataset", "synthetic", "--model", "lenet300", "--width", "0.25", "--epochs", "1",
        "--quiet"]


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """Assert that stderr is exactly one ``fishprune: error:`` line; return it."""
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("fishprune: error: "), err
    return err[0]


def die_in_epoch(monkeypatch: pytest.MonkeyPatch, epoch: int) -> None:
    """Make the pipeline's training raise "simulated kill" when epoch ``epoch`` starts."""
    real, calls = pipeline.train_epoch, []

    def dying(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == epoch:
            raise RuntimeError("simulated kill")
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "train_epoch", dying)
