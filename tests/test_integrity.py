"""Corruption is detected, named and recomputed or refused; failures leave a clean state.

Each test reproduces a defect found by a hostile pass over fishprune (a corrupted artifact that
was silently trusted, a resume that differed from an uninterrupted run, debris after a failure)
and checks the fix: the file is named, and the run is recomputed (to the same numbers) or the
command refuses.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from _cli import one_error_line

from fishprune import atomic, cachekeys, cli, pipeline
from fishprune import config as C
from fishprune import resultsdb as db
from fishprune import settings as S
from fishprune import tensorfiles as tf
from fishprune.analyze import bisect_sparsity
from fishprune.rundir import QUARANTINE, RunDir
from fishprune.selection import kept_count
from fishprune.sweep import load_sweep, run_sweep

FAST: dict[str, Any] = {"dataset": "synthetic", "model": "lenet300", "width": 0.25, "lr": 0.1,
                        "epochs": 2, "sparsity": 0.9}
TIMINGS = ("warmup_seconds", "score_seconds", "train_seconds")


def run(cfg: C.RunConfig, said: list[str] | None = None) -> dict[str, Any]:
    return pipeline.run(cfg, show_progress=False, echo=(said if said is not None else []).append)


def numbers(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in TIMINGS}


def flip_bit(path: Path, offset: int = -1) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


@pytest.fixture
def finished(tmp_path: Path) -> tuple[C.RunConfig, dict[str, Any]]:
    cfg = S.build({**FAST, "out": str(tmp_path / "runs")})
    return cfg, run(cfg)


@pytest.mark.parametrize("artifact", ["result.json", "masks.safetensors", "best.safetensors",
                                      "layers.json", "config.json"])
def test_a_corrupted_finished_run_is_recomputed_to_the_same_numbers(
        finished: tuple[C.RunConfig, dict[str, Any]], artifact: str) -> None:
    cfg, result = finished
    rd = RunDir.of(cfg)
    if artifact == "config.json":  # an edit that relabels the run
        data = json.loads(rd.config.read_text())
        data["prune"]["criterion"] = "snip"
        rd.config.write_text(json.dumps(data))
    else:
        flip_bit(rd / artifact, -3 if artifact.endswith(".json") else -1)
    problems = rd.verify(cfg)
    assert problems and any(str(rd.path) in p for p in problems), problems
    said: list[str] = []
    again = run(cfg, said)
    assert any("moved to" in line and "recomputed" in line for line in said), said
    assert numbers(again) == numbers(result)
    assert RunDir.of(cfg).verify(cfg) == []
    assert len(list((Path(cfg.out) / QUARANTINE).iterdir())) == 1  # the evidence is kept


@pytest.mark.parametrize(("artifact", "edit", "mention"), [
    ("metrics.json", lambda m: [{**e, "val_acc": 0.99} for e in m], "metrics.json"),
    ("metrics.json", lambda m: m[:1], "metrics.json"),
    ("result.json", lambda r: {**r, "best_epoch": 1}, "metrics.json"),
    ("layers.json", lambda lay: lay["layers"], "layers.json"),
    ("layers.json", lambda lay: {"layers": [None, None, None]}, "layers.json"),
    ("layers.json", lambda lay: {"layers": [{**x, "effective": x["kept"] + 1}
                                            for x in lay["layers"]]}, "layers.json"),
    ("layers.json", lambda lay: {"layers": [{**x, "numel": 7} for x in lay["layers"]]},
     "layers.json"),
])
def test_an_edit_recorded_in_the_manifest_is_caught_by_consistency(
        finished: tuple[C.RunConfig, dict[str, Any]], artifact: str, edit: Any, mention: str,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Regression: an edited metrics.json (manifest checksum updated) reached the report, and a
    layers.json holding a list made report/export say "'list' object has no attribute 'get'"."""
    cfg, result = finished
    assert result["best_epoch"] == 2  # the edits below contradict it
    rd = RunDir.of(cfg)
    path = rd / artifact
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    rd.record(artifact)
    problems = rd.verify(cfg)
    assert len(problems) == 1 and mention in problems[0], problems
    assert cli.main(["export", str(rd.path)]) == 1
    assert mention in capsys.readouterr().err


@pytest.mark.parametrize("artifact", ["result.json", "masks.safetensors"])
def test_a_directory_in_place_of_an_artifact_is_recomputed(
        finished: tuple[C.RunConfig, dict[str, Any]], artifact: str) -> None:
    """Regression: run and report stopped with "[Errno 21] Is a directory", naming no remedy."""
    cfg, result = finished
    rd = RunDir.of(cfg)
    (rd / artifact).unlink()
    (rd / artifact).mkdir()
    assert rd.verify(cfg) == [f"{rd / artifact} is not a regular file"]
    assert numbers(run(cfg)) == numbers(result)
    assert RunDir.of(cfg).verify(cfg) == []


def test_export_refuses_a_corrupt_run_naming_the_file(
        finished: tuple[C.RunConfig, dict[str, Any]], capsys: pytest.CaptureFixture[str]) -> None:
    """Regression: a flipped bit in masks.safetensors made export drop a trained weight."""
    cfg, _ = finished
    rd = RunDir.of(cfg)
    flip_bit(rd.masks)
    assert cli.main(["export", str(rd.path)]) == 1
    assert "masks.safetensors" in capsys.readouterr().err
    assert not rd.exported.exists()


def test_a_partial_run_with_corrupt_masks_resumes_to_the_exact_count(tmp_path: Path,
                                                                     monkeypatch) -> None:
    """Regression: a flipped bit in a partial run resumed to a kept count one off."""
    cfg = S.build({**FAST, "out": str(tmp_path)})
    real = pipeline.fit

    def killed(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt  # killed right after scoring

    monkeypatch.setattr(pipeline, "fit", killed)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.setattr(pipeline, "fit", real)
    rd = RunDir.of(cfg)
    masks = tf.load_masks(rd.masks)
    name = next(iter(masks))
    masks[name].view(-1)[0] = ~masks[name].view(-1)[0]  # one weight more or less...
    tf.save_masks(rd.masks, masks)  # ...in a file that is itself well-formed
    assert any("exact count" in p or "checksum" in p for p in rd.verify(cfg))
    result = run(cfg)
    assert result["kept"] == kept_count(0.1, result["prunable"])
    assert numbers(result) == numbers(run(S.build({**FAST, "out": str(tmp_path / "clean")})))


def test_a_corrupt_cached_initialization_is_recomputed(tmp_path: Path) -> None:
    """Regression: corrupted bytes in ``_cache/init-*`` silently changed the results."""
    first = S.build({**FAST, "out": str(tmp_path / "a")})
    reference = run(first)
    second = S.build({**FAST, "out": str(tmp_path / "b"), "sparsity": 0.8})
    run(second)  # shares the cached init of its out dir
    flip_bit(cachekeys.init_path(second), -2)
    said: list[str] = []
    third = S.build({**FAST, "out": str(tmp_path / "b")})
    assert numbers(run(third, said)) == numbers(reference)
    assert any("checksum mismatch" in line and "init-" in line for line in said), said


def test_a_resumed_run_is_bit_identical_in_every_artifact(tmp_path: Path, monkeypatch) -> None:
    """Regression: masks reloaded in alphabetical key order, so a resumed VGG's layers.json
    listed ``features.11`` before ``features.4``."""
    base = {**FAST, "model": "vgg11", "width": 0.125, "epochs": 1}
    whole = S.build({**base, "out": str(tmp_path / "whole")})
    run(whole)
    cfg = S.build({**base, "out": str(tmp_path / "resumed")})

    def killed(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    real = pipeline.fit
    monkeypatch.setattr(pipeline, "fit", killed)
    with pytest.raises(KeyboardInterrupt):
        run(cfg)
    monkeypatch.setattr(pipeline, "fit", real)
    run(cfg)
    a, b = RunDir.of(whole), RunDir.of(cfg)
    names = [lay["name"] for lay in json.loads(a.layers.read_text())["layers"]]
    assert names.index("features.4.weight") < names.index("features.11.weight")
    for artifact in ("layers.json", "masks.safetensors", "best.safetensors"):
        assert (a / artifact).read_bytes() == (b / artifact).read_bytes(), artifact
    metrics = [json.loads(rd.metrics.read_text()) for rd in (a, b)]
    assert [{**m, "seconds": 0} for m in metrics[0]] == [{**m, "seconds": 0} for m in metrics[1]]
    assert numbers(json.loads(a.result.read_text())) == numbers(json.loads(b.result.read_text()))


def test_a_failed_run_leaves_error_json(tmp_path: Path, capsys) -> None:
    """Regression: a failure after the mask stage left a run directory without any record."""
    argv = ["run", "--dataset", "synthetic", "--model", "lenet300", "--criterion", "magnitude",
            "--sparsity", "0.9999", "--on-collapse", "error", "--quiet", "--out", str(tmp_path)]
    assert cli.main(argv) == 1
    (run_dir,) = [p for p in tmp_path.iterdir() if p.name != "_cache"]
    error = json.loads((run_dir / "error.json").read_text())
    assert error["error"].startswith("CollapseError") and "Traceback" in error["traceback"]
    row, _ = db.row_from_dir(run_dir)
    assert row["status"] == "failed"


def test_a_corrupt_sweep_result_is_recomputed_and_the_report_refuses_it_meanwhile(
        tmp_path: Path) -> None:
    """Regression: a corrupted result.json was never recomputed ("8 finished, 0 to run") and the
    report silently dropped that seed, changing the bold winner."""
    toml = tmp_path / "s.toml"
    toml.write_text('dataset = "synthetic"\nmodel = "lenet300"\nwidth = 0.25\nepochs = 1\n'
                    'lr = 0.1\nseed = [0, 1]\ncriterion = ["snip", "magnitude"]\n'
                    'sparsity = 0.9\n')
    sweep = load_sweep(toml, out=tmp_path / "sw")
    assert run_sweep(sweep, say=lambda _m: None) == {"finished": 4, "failed": 0}
    victim = RunDir.of(sweep.runs[0])
    before = victim.result.read_bytes()
    victim.result.write_text(victim.result.read_text().replace('"test_acc": 0.', '"test_acc": 1.'))
    with pytest.raises(C.ConfigError, match=r"result\.json"):
        from fishprune.report import make_report

        make_report(tmp_path / "sw", plots=False)
    lines: list[str] = []
    assert run_sweep(sweep, say=lines.append) == {"finished": 1, "failed": 0}
    assert any("corrupt" in line and "result.json" in line for line in lines), lines
    assert json.loads(victim.result.read_bytes()) | {k: 0 for k in TIMINGS} == \
        json.loads(before) | {k: 0 for k in TIMINGS}


def test_a_corrupt_results_database_is_moved_aside_and_rebuilt(
        finished: tuple[C.RunConfig, dict[str, Any]]) -> None:
    cfg, _ = finished
    root = Path(cfg.out)
    conn = db.open_index(root)
    conn.close()
    (root / db.DB_NAME).write_bytes(b"garbage, not a database" * 100)
    with pytest.warns(UserWarning, match=r"moved to .*results\.sqlite\.corrupt-"):
        conn = db.open_index(root)
    assert [r["status"] for r in db.fetch(conn, None)] == ["finished"]
    conn.close()
    assert len(list(root.glob("results.sqlite.corrupt-*"))) == 1


def test_a_database_copied_without_its_runs_is_read_as_it_is(
        finished: tuple[C.RunConfig, dict[str, Any]], tmp_path: Path) -> None:
    cfg, _ = finished
    conn = db.open_index(cfg.out)
    conn.close()
    copy = tmp_path / "copy"
    copy.mkdir()
    (copy / db.DB_NAME).write_bytes((Path(cfg.out) / db.DB_NAME).read_bytes())
    conn = db.open_index(copy)
    assert len(db.fetch(conn)) == 1  # not wiped because its run directories are elsewhere
    conn.close()


def test_stale_temporary_files_of_dead_writers_are_removed(tmp_path: Path) -> None:
    """Regression: temp files of a killed ``_cache`` write were never cleaned; a live writer's
    temp file in a shared cache must survive the cleaning."""
    target = tmp_path / "init-x.safetensors"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    stale = atomic.temp_name(target).with_name(
        atomic.temp_name(target).name.replace(f"~{__import__('os').getpid()}@", f"~{dead}@"))
    live = atomic.temp_name(target)
    old_style = tmp_path / ".init-y.safetensors.0a1b2c3d.tmp.safetensors"
    for path in (stale, live, old_style):
        path.write_bytes(b"partial")
    assert sorted(atomic.remove_stale_temps(tmp_path)) == sorted([stale, old_style])
    assert live.exists()
    assert socket.gethostname() in live.name


def test_sweep_argument_errors_create_nothing(tmp_path: Path, capsys) -> None:
    toml = tmp_path / "s.toml"
    toml.write_text('dataset = "synthetic"\nepochs = 0\n')
    out = tmp_path / "sw"
    assert cli.main(["sweep", str(toml), "--address", "auto", "--out", str(out)]) == 2
    assert not out.exists()
    assert cli.main(["sweep", str(toml), "--backend", "ray", "--address", "127.0.0.1:1",
                     "--out", str(out)]) == 1
    assert "cannot reach the Ray cluster at 127.0.0.1:1" in capsys.readouterr().err
    assert not out.exists()


def test_analyze_resolution_is_bounded(capsys) -> None:
    """Regression: ``--resolution 1e-300`` bisected below float spacing and never returned."""
    assert cli.main(["analyze", "--dataset", "synthetic", "--resolution", "1e-300"]) == 2
    assert "resolution must be in" in capsys.readouterr().err
    calls = []
    assert bisect_sparsity(lambda s: calls.append(s) or s < 0.3, 0.0, 0.99, 1e-300) < 0.3
    assert len(calls) <= 25


@pytest.mark.parametrize("value", ["nan", "0.5"])
def test_report_layer_sparsity_must_exist(finished: tuple[C.RunConfig, dict[str, Any]],
                                          value: str, capsys) -> None:
    cfg, _ = finished
    assert cli.main(["report", cfg.out, "--layer-sparsity", value, "--no-plots"]) == 2
    assert "layer-sparsity" in capsys.readouterr().err.splitlines()[-1]


def test_sqlite_quick_check_failure_counts_as_corrupt(tmp_path: Path) -> None:
    path = tmp_path / db.DB_NAME
    conn = db.connect(path)
    conn.close()
    data = bytearray(path.read_bytes())
    data[100:4096] = b"\xff" * 3996  # the whole schema page after the file header
    path.write_bytes(bytes(data))
    with pytest.warns(UserWarning, match="could not be read"):
        conn = db.connect(path)
    assert conn.execute("PRAGMA quick_check").fetchone()["quick_check"] == "ok"
    conn.close()
    assert isinstance(sqlite3.connect(":memory:"), sqlite3.Connection)


def test_the_kept_count_check_agrees_with_selection() -> None:
    """The kept-count check used by verification agrees with selection itself."""
    from fishprune.selection import expected_kept, select

    scores = {"a": torch.rand(7, 3), "b": torch.rand(5)}
    for scope in ("global", "layer"):
        masks = select(scores, 0.6, scope=scope)
        assert expected_kept(masks, 0.6, scope) is None
        masks["a"].view(-1)[0] = ~masks["a"].view(-1)[0]
        assert "exact count" in expected_kept(masks, 0.6, scope)


def test_a_kill_between_a_write_and_its_record_resumes_without_recomputing(tmp_path: Path,
                                                                            monkeypatch) -> None:
    """A SIGKILL between an epoch's files and their manifest record is no corruption: the files
    are intact (their own checksums verify), so the run resumes from them instead of being
    quarantined and retrained from scratch."""
    cfg = S.build({**FAST, "epochs": 3, "out": str(tmp_path / "a")})
    ahead = S.build({**FAST, "epochs": 3, "out": str(tmp_path / "b")})
    real_save = pipeline.save_history

    def stop_after(epochs: int):
        def save(rd, model, optimizer, history):
            real_save(rd, model, optimizer, history)
            if len(history) == epochs:
                raise KeyboardInterrupt
        return save

    monkeypatch.setattr(pipeline, "save_history", stop_after(1))
    with pytest.raises(KeyboardInterrupt):
        run(cfg)  # killed after epoch 1's files, before recording them
    monkeypatch.setattr(pipeline, "save_history", stop_after(2))
    with pytest.raises(KeyboardInterrupt):
        run(ahead)
    monkeypatch.setattr(pipeline, "save_history", real_save)
    a, b = RunDir.of(cfg), RunDir.of(ahead)
    for name in ("best.safetensors", "checkpoint.safetensors", "metrics.json"):
        (a / name).write_bytes((b / name).read_bytes())  # epoch 2 written, not yet recorded
    assert a.verify(cfg) == []  # pending records, not problems
    said: list[str] = []
    resumed = run(cfg, said)
    assert not any("moved to" in line for line in said), said
    assert not (Path(cfg.out) / QUARANTINE).exists()
    assert numbers(resumed) == numbers(run(S.build({**FAST, "epochs": 3,
                                                    "out": str(tmp_path / "c")})))


# -- fishprune verify --recompute: what no checksum can catch --


def test_verify_recompute_catches_a_result_edited_and_re_recorded(
        finished: tuple[C.RunConfig, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    """A ``result.json`` whose number was changed *and* whose manifest entry was recomputed
    passes every checksum; re-evaluating the stored best weights exposes it, naming the file."""
    cfg, result = finished
    rd = RunDir.of(cfg)
    root = str(rd.path.parent)
    assert cli.main(["verify", root, "--recompute"]) == 0
    assert "1 run(s) checked, 1 recomputed: all intact" in capsys.readouterr().err
    forged = {**result, "test_acc": result["test_acc"] + 0.05}
    atomic.write_json(rd.result, forged)
    rd.record("result.json")  # the forger's (or a buggy writer's) manifest is consistent
    assert rd.verify(cfg) == []  # invisible to checksums
    assert cli.main(["verify", root]) == 0
    capsys.readouterr()
    assert cli.main(["verify", root, "--recompute"]) == 1
    out = capsys.readouterr()
    assert f"{rd.result}: test_acc {forged['test_acc']!r}, but the stored weights give " \
           f"{result['test_acc']!r}" in out.out
    assert "1 with problems" in out.err


def test_verify_recompute_catches_pruned_weights_that_are_not_zero(
        finished: tuple[C.RunConfig, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    cfg, _ = finished
    rd = RunDir.of(cfg)
    state = tf.load_state(rd.best)
    masks = tf.load_masks(rd.masks)
    name = next(iter(masks))
    w = state[name].clone()
    w[~masks[name]] = 1e-3  # small: the accuracy barely moves, the mask is broken
    tf.save_state(rd.best, {**state, name: w})
    rd.record("best.safetensors")
    assert rd.verify(cfg) == []
    assert cli.main(["verify", str(rd.path), "--recompute"]) == 1
    assert f"{rd.best}: {int((~masks[name]).sum())} pruned weight(s) of {name} are not zero" \
        in capsys.readouterr().out


def test_verify_names_a_corrupted_file_and_refuses_a_missing_dir(
        finished: tuple[C.RunConfig, dict[str, Any]], tmp_path: Path,
        capsys: pytest.CaptureFixture[str]) -> None:
    cfg, _ = finished
    rd = RunDir.of(cfg)
    flip_bit(rd.metrics, 5)
    assert cli.main(["verify", str(rd.path.parent)]) == 1
    assert f"{rd.metrics} does not match its checksum" in capsys.readouterr().out
    assert cli.main(["verify", str(tmp_path / "nowhere")]) == 1
    assert "is not a directory" in one_error_line(capsys)


def test_a_stale_index_never_overwrites_a_newer_row(
        finished: tuple[C.RunConfig, dict[str, Any]], tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression (found in the Q5 sweep): a ``fishprune report`` started while a sweep ran
    read a run directory before the run finished, and wrote that row after the sweep had
    indexed the run as finished: the database then said the run was not finished (a table
    built from it lost a seed) until the next re-index."""
    cfg, _ = finished
    rd = RunDir.of(cfg)
    path = tmp_path / "x.sqlite"
    reader, sweep = db.connect(path), db.connect(path)
    aside = tmp_path / "result.json"
    rd.result.rename(aside)  # the run directory as a reader saw it, before result.json
    real, seen = db.row_from_dir, []

    def racing(run_dir: Path) -> Any:
        found = real(run_dir)
        if not seen:  # between this read and its write: the run ends and the sweep indexes it
            seen.append(found[0]["status"])
            aside.rename(rd.result)
            assert db.index_run(sweep, run_dir)["status"] == "finished"
        return found

    monkeypatch.setattr(db, "row_from_dir", racing)
    row = db.index_run(reader, rd.path)
    assert seen == ["corrupt"] and row["status"] == "finished"
    stored = reader.execute("SELECT status FROM runs WHERE run_id = ?", (cfg.run_id(),))
    assert stored.fetchone()["status"] == "finished"
