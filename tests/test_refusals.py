"""Nothing silently wrong: bad values refused up front, divergence named, pruned weights kept 0.

Every value here used to be accepted (or fail late, after data loading or a whole warm-up, with
exit 1 and "a bug: please report it"). Now a bad setting is a usage error (exit 2) before any
data is read or any file written, and a run that diverges says so.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from _cli import FAST, one_error_line
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import fishprune as fp
from fishprune import cli
from fishprune import config as C
from fishprune import settings as S
from fishprune.train import DivergedError, train_epoch


@pytest.mark.parametrize(("argv", "mention"), [
    (["--lr-gamma", "-1", "--lr-milestones", "1"], "lr_gamma must be a finite number > 0"),
    (["--lr-gamma", "0"], "lr_gamma must be a finite number > 0"),
    (["--lr-gamma", "nan"], "lr_gamma must be a finite number > 0"),
    (["--lr-gamma", "inf"], "lr_gamma must be a finite number > 0"),
    (["--weight-decay", "inf"], "weight_decay must be a finite number >= 0"),
    (["--lr", "inf"], "lr must be a finite number > 0"),
    (["--seed", "-5"], "seed must be an integer in [0, 2147483647]"),
    (["--seed", str(2**70)], "seed must be an integer in [0, 2147483647]"),
    (["--split-seed", "-1"], "split_seed must be an integer"),
    (["--width", "1e308"], "width must be a finite number > 0 and at most 64"),
    (["--val-fraction", "0.999"], "leaves no training sample"),
    (["--model", "vgg11", "--per-sample", "--score-mode", "train"], "per_sample needs"),
    (["--config", "."], "is a directory"),
    (["--epochs", "10000000"], "epochs must be an integer in [0, 10,000]"),
    (["--warmup-epochs", "20000"], "warmup_epochs must be an integer in [0, 10,000]"),
    (["--criterion", "synflow", "--rounds", "1000000"],
     "rounds must be an integer in [1, 100,000]"),
    (["--rounds", "0"], "rounds must be an integer in [1, 100,000]"),
])
def test_bad_values_exit_2_and_write_nothing(argv: list[str], mention: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "runs"
    assert cli.main(["run", *FAST, *argv, "--out", str(out)]) == 2
    assert mention in one_error_line(capsys)
    assert not [p for p in out.rglob("*") if "_cache" not in p.parts] if out.exists() else True


def test_deeply_nested_toml_is_a_usage_error(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "deep.toml"
    path.write_text("x = " + "[" * 100_000 + "]" * 100_000 + "\n")
    assert cli.main(["run", *FAST, "--config", str(path), "--out", str(tmp_path)]) == 2
    assert "deep.toml" in one_error_line(capsys)


@pytest.mark.parametrize("text", ["x = " + "[" * 5_000 + "]" * 5_000 + "\n",
                                  "x = " + "{a = " * 2_000 + "1" + "}" * 2_000 + "\n"])
def test_deeply_nested_sweep_file_is_a_usage_error(text: str, tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    """Regression: the sweep said only "maximum recursion depth exceeded", with status 1."""
    path = tmp_path / "deep.toml"
    path.write_text(text)
    assert cli.main(["sweep", str(path), "--out", str(tmp_path / "s"), "--dry-run"]) == 2
    assert "deep.toml is nested too deeply" in one_error_line(capsys)
    assert not (tmp_path / "s").exists()


def test_a_directory_as_sweep_file_is_a_usage_error(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """Regression: "[Errno 21] Is a directory", with status 1 and no file named."""
    assert cli.main(["sweep", str(tmp_path), "--dry-run"]) == 2
    assert f"sweep file {tmp_path} is a directory" in one_error_line(capsys)


@pytest.mark.parametrize("text", [
    "batch_size = 64\nbatch-size = 32\n",
    "lr = 0.1\n[train]\nlr = 0.2\n",
    "[data]\nbatch_size = 1\nbatch-size = 2\n",
])
def test_conflicting_toml_keys_are_refused(text: str, tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    """Regression: the later spelling silently won."""
    path = tmp_path / "c.toml"
    path.write_text(text)
    assert cli.main(["run", *FAST, "--config", str(path), "--out", str(tmp_path / "r")]) == 2
    assert "is given twice" in one_error_line(capsys)


def test_debug_is_accepted_after_the_command(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Regression: ``fishprune run ... --debug`` broke a valid command with a traceback."""
    assert cli.main(["run", *FAST, "--epochs", "0", "--out", str(tmp_path), "--debug"]) == 0
    with pytest.raises(C.ConfigError):  # --debug shows the traceback, wherever it stands
        cli.main(["run", *FAST, "--lr", "-1", "--debug"])
    assert cli.main(["--debug", "criteria"]) == 0


finite_or_not = st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                          st.integers(-(2**80), 2**80))


@settings(max_examples=150, deadline=None)
@given(key=st.sampled_from(["lr", "lr_gamma", "weight_decay", "momentum", "width", "sparsity",
                            "val_fraction", "seed", "split_seed", "epochs", "batch_size",
                            "probes", "temperature", "damping"]),
       value=finite_or_not)
def test_any_number_is_accepted_in_range_or_refused_as_a_usage_error(key: str, value) -> None:
    """No number reaches a run unchecked: it is valid, or a one-line ``ConfigError``."""
    criterion = {"probes": "hts", "temperature": "hts", "damping": "fbss"}.get(key, "fts")
    try:
        cfg = S.build({"criterion": criterion, key: value})
    except C.ConfigError as err:
        assert "\n" not in str(err)
        return
    flat = C.flat_values(cfg)
    number = flat[key]
    assert isinstance(number, (int, float)) and math.isfinite(number)
    if key in ("lr", "lr_gamma", "width", "temperature", "damping"):
        assert number > 0
    if key in ("seed", "split_seed", "weight_decay", "momentum", "sparsity", "val_fraction"):
        assert number >= 0


# --------------------------------------------------------------------------- divergence


def test_nan_gradients_never_reach_pruned_weights() -> None:
    """Regression: the Masker multiplied gradients by the mask, and NaN × 0 = NaN."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 2))
    masks = fp.select(fp.score(model, "magnitude", None), 0.5)
    fp.apply_masks(model, masks)
    for guard in (False, True):
        opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
        masker = fp.Masker(model, masks, guard=guard)
        for p in model.parameters():
            p.grad = torch.full_like(p, float("nan"))
        masker.mask_grads_()
        opt.step()
        masker.mask_weights_()
        assert masker.violations() == 0
        for name, p in model.named_parameters():
            if name in masks:
                assert torch.equal(p[~masks[name]], torch.zeros_like(p[~masks[name]]))


def test_a_diverged_epoch_is_named() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3))
    batches = [(torch.randn(8, 4) * 1e30, torch.randint(3, (8,)))]
    opt = torch.optim.SGD(model.parameters(), lr=1e30)
    with pytest.raises(DivergedError, match="training diverged: the loss is"):
        for _ in range(3):
            train_epoch(model, batches, opt, None, device=torch.device("cpu"))


def test_a_diverged_run_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Regression: ``--lr 1e30`` ended in "pruned weights are non-zero (a bug: please report
    it)"; the run diverged, and now it says in which epoch."""
    status = cli.main(["run", *FAST, "--lr", "1e30", "--epochs", "3", "--out", str(tmp_path)])
    line = one_error_line(capsys)
    assert status == 1 and "diverged" in line and "epoch" in line and "bug" not in line
