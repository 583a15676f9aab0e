"""Bad input and faults: every entry point answers with one actionable line and leaves no debris.

CLI contract: stderr is exactly one line starting with ``fishprune: error:`` (no traceback),
the exit status is 2 for usage errors (bad flags, values, config files) and 1 for everything
else, and nothing half-written is left on disk: no run directory without its result and no
temporary file of an atomic write. The library's own contracts (bad sparsities, unknown
names, empty inputs, exact counts under ties) are tested once, in ``test_criteria_contract.py``
and ``test_selection.py``; here only what a user meets through the command line.

Most CLI cases call :func:`fishprune.cli.main` in-process (fast); a few go through a real
subprocess, including a run killed with SIGKILL and resumed.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from torch import nn

import fishprune as fp
from fishprune import cli, pipeline
from fishprune import config as C
from fishprune import settings as S
from fishprune import tensorfiles as tf
from fishprune.cli import flags
from fishprune.data import registry
from fishprune.models import MODELS
from fishprune.rundir import CHECKPOINT

FMNIST = Path("/usr/share/datasets/fashion-mnist")
FAST = ["--dataset", "synthetic", "--model", "lenet300", "--width", "0.25", "--epochs", "1",
        "--criterion", "snip", "--quiet"]
SUBCOMMANDS = ["run", "analyze"]  # the commands that take the run settings (sweep: a file)


def error_line(capsys: pytest.CaptureFixture[str], status: int, expected: int) -> str:
    """Assert the one-line error contract; return the message."""
    err = capsys.readouterr().err
    assert status == expected, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("fishprune: error: "), err
    return lines[0]


def assert_no_debris(out: Path) -> None:
    """No run directory (``_cache`` may hold a complete initialization) and no temp files."""
    if not out.exists():
        return
    assert not [p for p in out.rglob("*") if p.name.startswith(".") and ".tmp" in p.name]
    leftovers = [p.name for p in out.iterdir() if p.name != "_cache"]
    assert leftovers == [], leftovers
    for path in out.rglob("*.safetensors"):
        assert_loads(path)


def assert_loads(path: Path) -> None:
    with safe_open(str(path), framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 (safe_open is not iterable)
            f.get_tensor(key)


def main(capsys: pytest.CaptureFixture[str], *argv: str) -> int:
    capsys.readouterr()  # drop what earlier calls printed
    return cli.main(list(argv))


# --------------------------------------------------------------------------- usage errors: 2


BAD_FLAGS = [
    (["--sparsity", "1.0"], "sparsity"),
    (["--sparsity", "-0.1"], "sparsity"),
    (["--sparsity", "nan"], "sparsity"),
    (["--sparsity", "inf"], "sparsity"),
    (["--sparsity", "abc"], "sparsity"),
    (["--sparsity"], "sparsity"),
    (["--criterion", "nope"], "criterion"),
    (["--model", "nope"], "model"),
    (["--dataset", "nope"], "dataset"),
    (["--epochs", "1.5"], "epochs"),
    (["--width", "0"], "width"),
    (["--lr", "nan"], "lr"),
    (["--score-samples", "0"], "score_samples"),
    (["--no-such-flag"], "no-such-flag"),
    (["--per-sample=yes"], "per-sample"),
]


@pytest.mark.parametrize("command", SUBCOMMANDS)
@pytest.mark.parametrize(("flags", "mention"), BAD_FLAGS)
def test_bad_flags_exit_2(command: str, flags: list[str], mention: str, tmp_path: Path,
                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    status = main(capsys, command, *FAST, "--out", str(out), *flags)
    assert mention in error_line(capsys, status, 2)
    assert not out.exists()


@pytest.mark.parametrize("values", [["1.0"], ["nan"], ["-0.1"], ["abc"], []])
def test_analyze_bad_sparsity_list_exits_2(values: list[str], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    status = main(capsys, "analyze", *FAST, "--out", str(tmp_path), "--sparsities", *values)
    assert "sparsit" in error_line(capsys, status, 2)
    assert_no_debris(tmp_path)


def test_analyze_bad_resolution_exits_2(tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    status = main(capsys, "analyze", *FAST, "--out", str(tmp_path), "--resolution", "0")
    assert "resolution" in error_line(capsys, status, 2)


TOMLS = [
    ("sparsity = 0.9\nfoo = 1\n", "unknown setting 'foo'"),
    ("[prune]\nlearning_rate = 0.1\n", "unknown setting 'learning_rate'"),
    ("[train]\nsparsity = 0.9\n", "unknown setting 'sparsity' in [train]"),
    ('sparsity = "high"\n', "sparsity must be float"),
    ("sparsity = nan\n", "sparsity"),
    ("score_batch_size = 2.5\n", "score_batch_size must be int"),
    ('exclude = "fc.*"\n', "exclude must be a list"),
    ("per_sample = 1\n", "per_sample must be true or false"),
    ("sparsity = \n", "not valid TOML"),
]


@pytest.mark.parametrize("command", SUBCOMMANDS)
@pytest.mark.parametrize(("text", "mention"), TOMLS)
def test_bad_config_file_exits_2(command: str, text: str, mention: str, tmp_path: Path,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(text)
    out = tmp_path / "out"
    status = main(capsys, command, *FAST, "--out", str(out), "--config", str(path))
    assert mention in error_line(capsys, status, 2)
    assert not out.exists()


SWEEPS = [
    ("sparsity = [0.9, 1.0]\n", "sparsity"),
    ("sparsity = [0.9, nan]\n", "sparsity"),
    ('sparsity = ["abc"]\n', "sparsity"),
    ('criterion = ["snip", "nope"]\n', "criterion"),
    ('model = "nope"\n', "model"),
    ('dataset = ["synthetic", "nope"]\n', "dataset"),
    ("foo = [1, 2]\n", "foo"),
    ("sparsity = [0.9,\n", "TOML"),
]


@pytest.mark.parametrize(("text", "mention"), SWEEPS)
def test_bad_sweep_file_exits_2(text: str, mention: str, tmp_path: Path,
                                capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "grid.toml"
    path.write_text(text)
    out = tmp_path / "out"
    status = main(capsys, "sweep", str(path), "--out", str(out))
    assert mention in error_line(capsys, status, 2)
    assert not out.exists()


def test_sweep_usage_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "does not exist" in error_line(
        capsys, main(capsys, "sweep", str(tmp_path / "nope.toml")), 2)
    path = tmp_path / "grid.toml"
    path.write_text('dataset = "synthetic"\n')
    error_line(capsys, main(capsys, "sweep", str(path), "--workers", "abc"), 2)
    error_line(capsys, main(capsys, "sweep", str(path), "--workers", "0", "--out",
                            str(tmp_path / "o")), 2)


def test_missing_config_file_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = main(capsys, "run", *FAST, "--config", str(tmp_path / "nope.toml"))
    assert "does not exist" in error_line(capsys, status, 2)


def test_export_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    error_line(capsys, main(capsys, "export"), 2)
    error_line(capsys, main(capsys, "export", "a", "b"), 2)
    error_line(capsys, main(capsys, "no-such-command"), 2)


def test_subprocess_usage_error(tmp_path: Path) -> None:
    """The real entry point, as a user sees it."""
    proc = subprocess.run([sys.executable, "-m", "fishprune", "run", "--sparsity", "abc",
                           "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.startswith("fishprune: error:") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.floats(allow_nan=True, allow_infinity=True),
                 st.sampled_from(["abc", "", "1e-3", "0x1p-1", " 0.5", "-0", "nan", "-inf"])))
def test_cli_sparsity_parsing_property(value: float | str) -> None:
    """Any --sparsity string is either a valid value in [0, 1) or a usage error."""
    text = value if isinstance(value, str) else repr(value)
    parser = cli.build_parser()
    try:
        cfg = flags.settings_from(parser.parse_args(["run", f"--sparsity={text}"]))
    except (flags.UsageError, C.ConfigError) as err:
        assert "\n" not in str(err)
        return
    assert 0.0 <= cfg.prune.sparsity < 1.0


@settings(max_examples=60, deadline=None)
@given(st.floats(allow_nan=True, allow_infinity=True))
def test_config_sparsity_property(value: float) -> None:
    try:
        cfg = S.build({"sparsity": value})
    except C.ConfigError:
        assert math.isnan(value) or not 0.0 <= value < 1.0
        return
    assert cfg.prune.sparsity == value


# --------------------------------------------------------------------------- failures: 1


@pytest.fixture
def broken_fmnist(tmp_path: Path, request: pytest.FixtureRequest) -> Path:
    """A Fashion-MNIST directory whose training images are broken as ``request.param`` says."""
    if not FMNIST.is_dir():
        pytest.skip("Fashion-MNIST is not installed")
    data = tmp_path / "data"
    data.mkdir()
    for stem in registry.IDX_FILES:
        (data / f"{stem}.gz").symlink_to(FMNIST / f"{stem}.gz")
    target = data / "train-images-idx3-ubyte.gz"
    target.unlink()
    real = (FMNIST / "train-images-idx3-ubyte.gz").read_bytes()
    if request.param == "truncated":
        target.write_bytes(real[:5000])
    elif request.param == "garbage":
        target.write_bytes(b"this is not a gzip file at all" * 10)
    elif request.param == "empty":
        target.write_bytes(b"")
    else:  # a well-formed IDX file of the right shape with the wrong content: checksum
        images = np.zeros((10, 28, 28), np.uint8)
        header = bytes([0, 0, 8, 3]) + np.array(images.shape, ">u4").tobytes()
        target.write_bytes(gzip.compress(header + images.tobytes()))
    return data


@pytest.mark.parametrize("command", SUBCOMMANDS)
@pytest.mark.parametrize(("broken_fmnist", "mention"),
                         [("truncated", "truncated"), ("garbage", "corrupt"),
                          ("empty", "train-images"), ("checksum", "MD5")],
                         indirect=["broken_fmnist"])
def test_broken_dataset_file_exits_1(command: str, broken_fmnist: Path, mention: str,
                                     tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    status = main(capsys, command, "--dataset", "fashion-mnist", "--data-dir", str(broken_fmnist),
                  "--out", str(out), "--epochs", "1", "--quiet")
    line = error_line(capsys, status, 1)
    assert mention in line and "train-images-idx3-ubyte.gz" in line
    assert_no_debris(out)


@pytest.mark.parametrize("broken_fmnist", ["truncated"], indirect=True)
def test_sweep_of_broken_dataset_fails_cleanly(broken_fmnist: Path, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    """Each run fails with its one-line reason; no result, no temp file; exit status 1."""
    path = tmp_path / "grid.toml"
    path.write_text(f'dataset = "fashion-mnist"\ndata_dir = "{broken_fmnist}"\n'
                    'sparsity = [0.9, 0.95]\nepochs = 1\n')
    out = tmp_path / "out"
    status = main(capsys, "sweep", str(path), "--out", str(out))
    captured = capsys.readouterr()
    assert status == 1 and "Traceback" not in captured.out + captured.err
    assert captured.out.count("truncated") == 2
    assert not list(out.rglob("result.json"))
    assert not [p for p in out.rglob(".*") if ".tmp" in p.name]


def test_missing_dataset_exits_1_without_network(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("FISHPRUNE_DATA", raising=False)
    monkeypatch.setattr(registry, "download_any", lambda *a, **k: ["http://mirror/x: offline"])
    out = tmp_path / "out"
    (tmp_path / "empty").mkdir()
    status = main(capsys, "run", "--dataset", "mnist", "--data-dir", str(tmp_path / "empty"),
                  "--out", str(out), "--quiet")
    line = error_line(capsys, status, 1)
    assert "not found" in line and "--data-dir" in line
    assert_no_debris(out)


@pytest.mark.skipif(not FMNIST.is_dir(), reason="needs Debian's dataset-fashion-mnist")
def test_a_named_data_dir_is_never_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Regression: ``--data-dir`` naming a missing or incomplete directory silently fell back to
    the system copy and trained. Missing: exit 2 naming it; incomplete: only it is searched."""
    monkeypatch.setattr(registry, "download_any", lambda *a, **k: ["http://mirror/x: offline"])
    out = tmp_path / "out"
    nowhere = tmp_path / "nonexistent" / "place"
    status = main(capsys, "run", "--dataset", "fashion-mnist", "--data-dir", str(nowhere),
                  "--out", str(out), "--quiet")
    assert str(nowhere) in error_line(capsys, status, 2)
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "train-images-idx3-ubyte.gz").write_bytes(
        (FMNIST / "train-images-idx3-ubyte.gz").read_bytes())
    status = main(capsys, "run", "--dataset", "fashion-mnist", "--data-dir", str(partial),
                  "--out", str(out), "--quiet")
    assert "not found" in error_line(capsys, status, 1)
    assert_no_debris(out)


class NaNNet(nn.Module):
    """A network whose outputs are all NaN: every data-dependent score is NaN."""

    def __init__(self, in_features: int, num_classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(in_features, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1)) * float("nan")


def nan_net(*, in_channels: int, num_classes: int, image_size: int, width: float) -> nn.Module:
    return NaNNet(in_channels * image_size**2, num_classes)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_nan_scores_exit_1(command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(MODELS, "nan-net", nan_net)
    out = tmp_path / "out"
    status = main(capsys, command, "--dataset", "synthetic", "--model", "nan-net", "--criterion",
                  "snip", "--out", str(out), "--quiet")
    assert "NaN" in error_line(capsys, status, 1)
    assert_no_debris(out)


@pytest.mark.parametrize("sparsity", ["0.5", "0"])
@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_nothing_left_to_score_exits_2(command: str, sparsity: str, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    """Regression: ``--sparsity 0 --exclude '*'`` crashed inside autograd, leaving a run dir."""
    out = tmp_path / "out"
    status = main(capsys, command, *FAST, "--out", str(out), "--exclude", "*",
                  "--sparsity", sparsity)
    assert "nothing is left to score" in error_line(capsys, status, 2)
    assert_no_debris(out)


@pytest.mark.parametrize(("out", "mention"), [("/dev/null", "is not a directory"),
                                              ("", "empty string"), ("FILE", "is not a directory")])
@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_out_that_is_not_a_directory_exits_2(command: str, out: str, mention: str,
                                             tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    """Regression: ``--out /dev/null`` said "Not a directory: '/dev/null/<id>/error.json'" with
    status 1, and ``--out ''`` wrote the run into the current directory."""
    if out == "FILE":
        out = str(tmp_path / "a-file")
        Path(out).write_text("x")
    before = sorted(Path.cwd().iterdir())
    status = main(capsys, command, *FAST, "--out", out)
    assert mention in error_line(capsys, status, 2)
    assert sorted(Path.cwd().iterdir()) == before


@pytest.mark.parametrize("patterns", [["nomatch*"], ["fc1.*", "fc9.*"], ["["]])
@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_exclude_pattern_matching_nothing_exits_2(command: str, patterns: list[str],
                                                  tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    """Regression: a mistyped pattern was ignored, so the weights it meant to keep were pruned."""
    out = tmp_path / "out"
    status = main(capsys, command, *FAST, "--out", str(out), "--exclude", *patterns)
    line = error_line(capsys, status, 2)
    assert "match no prunable weight" in line and patterns[-1] in line
    assert_no_debris(out)


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_empty_scoring_set_exits_1(command: str, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    """More scoring samples per class than the split holds: nothing sensible to score on."""
    out = tmp_path / "out"
    status = main(capsys, command, *FAST, "--out", str(out), "--score-samples", "100000")
    assert "samples per class" in error_line(capsys, status, 1)
    assert_no_debris(out)


def test_export_failures_exit_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert "does not exist" in error_line(capsys, main(capsys, "export", str(tmp_path / "x")), 1)
    assert "no config.json" in error_line(capsys, main(capsys, "export", str(tmp_path)), 1)
    (tmp_path / "config.json").write_text("{not json")
    assert "not valid JSON" in error_line(capsys, main(capsys, "export", str(tmp_path)), 1)
    cfg = S.build({"dataset": "synthetic"})
    (tmp_path / "config.json").write_text(json.dumps({"run_id": "x", **cfg.to_dict()}))
    assert "not finished" in error_line(capsys, main(capsys, "export", str(tmp_path)), 1)
    (tmp_path / "config.json").write_text(json.dumps({"prune": {"sparsity": 2.0}}))
    assert "sparsity" in error_line(capsys, main(capsys, "export", str(tmp_path)), 1)


def test_export_of_corrupt_artifacts_exits_1(tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    cfg = S.build({"dataset": "synthetic", "model": "lenet300", "width": 0.25, "epochs": 1,
                   "criterion": "snip", "out": str(tmp_path)})
    pipeline.run(cfg, show_progress=False)
    run = cfg.directory()
    exported = tmp_path / "model.safetensors"
    status = main(capsys, "export", str(run), "--out", str(exported))
    assert status == 0 and exported.exists()
    (run / "masks.safetensors").write_bytes(b"\x00" * 10)
    assert "masks.safetensors" in error_line(capsys, main(capsys, "export", str(run)), 1)
    (run / "best.safetensors").write_bytes((run / "best.safetensors").read_bytes()[:100])
    assert "safetensors" in error_line(capsys, main(capsys, "export", str(run)), 1)
    assert not (run / "pruned.safetensors").exists()
    assert not list(run.glob(".*"))


# --------------------------------------------------------------------------- library


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 6, generator=gen), torch.randint(3, (8,), generator=gen))]


@pytest.mark.parametrize("criterion", ["snip", "fts", "gn", "grasp", "fbss", "hts", "synflow"])
def test_library_nan_scores_are_refused(criterion: str) -> None:
    model = NaNNet(6, 3)
    if criterion != "synflow":  # a NaN loss is refused before it becomes scores
        with pytest.raises(ValueError, match="the loss is NaN on batch 0"):
            fp.score(model, criterion, batches())
        with pytest.raises(ValueError, match="the loss is NaN on batch 0"):
            fp.prune(model, criterion, 0.5, batches(), rounds=1)
        return
    scores = fp.score(model, criterion, batches())
    with pytest.raises(ValueError, match="NaN"):
        fp.select(scores, 0.5)
    with pytest.raises(ValueError, match="NaN"):
        fp.prune(model, criterion, 0.5, batches(), rounds=1)


# --------------------------------------------------------------------------- killed run


def results_without_timings(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if not k.endswith("_seconds")}


def test_sigkilled_run_leaves_no_corrupt_file_and_resumes(tmp_path: Path) -> None:
    """SIGKILL after the first epoch's checkpoint; the rerun finishes with the same result."""
    epochs = 6
    values = {"dataset": "synthetic", "model": "lenet300", "width": 0.25, "lr": 0.1,
              "epochs": epochs, "criterion": "snip", "sparsity": 0.9}
    killed = S.build({**values, "out": str(tmp_path / "killed")})
    run = killed.directory()
    argv = [sys.executable, "-m", "fishprune", "run", "--quiet"]
    for key, value in values.items():
        argv += [f"--{key.replace('_', '-')}", str(value)]
    # The killed process trains its first epoch with as many threads as the in-process runs
    # below (conftest: 1), so that the float reductions and hence the results are the same.
    env = {**os.environ, "OMP_NUM_THREADS": str(torch.get_num_threads())}
    proc = subprocess.Popen([*argv, "--out", killed.out], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 240
        while not (run / CHECKPOINT).exists():
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "no checkpoint appeared"
            time.sleep(0.002)
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "result.json").exists(), "the run finished before it could be killed"
    for path in [*run.iterdir(), *(tmp_path / "killed" / "_cache").iterdir()]:
        if path.name.startswith("."):
            continue  # a temp file of a write the kill interrupted: the rerun removes it
        if path.suffix == ".json":
            json.loads(path.read_text())
        elif path.suffix == ".safetensors":
            assert_loads(path)
    history = json.loads(tf.read_metadata(run / CHECKPOINT)["history"])
    assert 1 <= len(history) < epochs  # metrics.json, a copy written next, may lag one epoch

    (run / ".best.safetensors.0bad.tmp.safetensors").write_bytes(b"half")  # a stale temp file
    resumed = pipeline.run(killed, show_progress=False)
    assert resumed["epochs"] == epochs
    assert not [p for p in run.iterdir() if p.name.startswith(".")]
    clean = pipeline.run(S.build({**values, "out": str(tmp_path / "clean")}), show_progress=False)
    assert results_without_timings(resumed) == results_without_timings(clean)
    assert resumed["test_acc"] == clean["test_acc"]
