"""``fishprune sweep``: grid rule, scheduling, the results database, interruption, Ray."""

from __future__ import annotations

import contextlib
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from fishprune import cli
from fishprune import resultsdb as db
from fishprune.config import ConfigError
from fishprune.rundir import ERROR
from fishprune.sweep import load_sweep, run_sweep, sweep_from_table
from fishprune.sweep.backends import Task
from fishprune.sweep.driver import drive, imp_chain, plan

#: A tiny learnable setting: ~0.1 s per epoch on one CPU thread.
TINY = {"dataset": "synthetic", "model": "lenet300", "width": 0.1, "lr": 0.2, "epochs": 1}
#: Columns that must agree between two sweeps of the same grid (not timings, times, threads).
SAME = ["run_id", "label", "method", "status", *db.setting_columns(), "test_acc", "test_loss",
        "best_val_acc", "best_epoch", "epochs_trained", "density", "kept", "prunable",
        "parameters", "collapsed_layers", "collapsed_names"]
SAME.remove("out")


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


TOML = """
dataset = "synthetic"
model = "lenet300"
width = 0.1
lr = 0.2
epochs = {epochs}
criterion = ["magnitude", "snip"]
sparsity = [0.9, 0.98]
seed = [0, 1]

[[include]]
sparsity = 0.0
criterion = "fts"
"""


def db_rows(root: Path) -> dict[str, dict[str, Any]]:
    conn = db.connect(root / db.DB_NAME)
    try:
        return {r["run_id"]: {k: r[k] for k in SAME} for r in db.fetch(conn, None)}
    finally:
        conn.close()


# -- the grid rule --


def test_grid_axes_fixed_lists_and_includes(tmp_path):
    s = sweep_from_table({
        **TINY, "criterion": ["snip", "fts"], "sparsity": [0.9, 0.95], "seed": [0, 1],
        "exclude": ["fc3.*"],  # a flat list: one fixed value
        "train": {"lr_milestones": [[], [2]]},  # a list of lists: an axis
        "include": [{"sparsity": 0.0, "criterion": "fts"}],
    }, "t.toml", out=tmp_path)
    assert len(s.runs) == 2 * 2 * 2 * 2 + 2 * 2  # dense: once per seed × milestones
    assert len({c.run_id() for c in s.runs}) == len(s.runs)
    assert {c.prune.exclude for c in s.runs} == {("fc3.*",)}
    assert {c.train.lr_milestones for c in s.runs} == {(), (2,)}
    assert set(s.axes) == {"criterion", "sparsity", "seed", "lr_milestones"}
    assert all(Path(c.out) == tmp_path.resolve() for c in s.runs)
    assert [c.label() for c in s.runs][:2] == ["lenet300-synthetic-snip-s0.9-seed0"] * 2
    dense = [c for c in s.runs if c.prune.sparsity == 0]
    assert sorted(c.seed for c in dense) == [0, 0, 1, 1]


def test_grid_duplicates_run_once(tmp_path):
    s = sweep_from_table({**TINY, "sparsity": [0.9, 0.9], "include": [{"sparsity": 0.9}]},
                         "t.toml", out=tmp_path)
    assert len(s.runs) == 1


@pytest.mark.parametrize("table, message", [
    ({"sparsty": [0.9]}, "unknown setting 'sparsty'"),
    ({"prune": {"model": "x"}}, "unknown setting 'model' in [prune]"),
    ({"sparsity": [0.9, "x"]}, "sparsity[1]: sparsity must be float"),
    ({"sparsity": []}, "sparsity = [] sweeps no value"),
    ({"sparsity": [0.9, 1.5]}, "sparsity must be in [0.0, 1.0)"),
    ({"exclude": [["a"], "b"]}, "exclude mixes lists and scalars"),
    ({"lr_milestones": [[2], ["x"]]}, "lr_milestones[1]: lr_milestones must be"),
    ({"bn_warmup": ["yes"]}, "bn_warmup must be true or false"),
    ({"out": ["a", "b"]}, "out cannot be swept"),
    ({"include": {"sparsity": 0}}, "include must be an array of tables"),
    ({"include": [{"seed": ["x"]}]}, "include[0]: seed must be int"),
])
def test_grid_errors_are_one_line(table, message):
    with pytest.raises(ConfigError) as err:
        sweep_from_table(table, "grid.toml")
    assert message in str(err.value) and str(err.value).startswith("grid.toml")
    assert "\n" not in str(err.value)


def test_cli_dry_run_and_usage_errors(tmp_path, capsys):
    cfg = write(tmp_path / "s.toml", TOML.format(epochs=1))
    assert cli.main(["sweep", str(cfg), "--out", str(tmp_path / "o"), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "10 runs" in out and out.count(" new ") == 10 and "axes: criterion" in out
    assert not (tmp_path / "o").exists()
    assert cli.main(["sweep", str(write(tmp_path / "b.toml", "seed = ['x']"))]) == 2
    assert cli.main(["sweep", str(cfg), "--workers", "0", "--out", str(tmp_path / "o")]) == 2
    assert cli.main(["sweep", str(cfg), "--address", "auto", "--out", str(tmp_path / "o")]) == 2
    assert "fishprune: error:" in capsys.readouterr().err


# -- scheduling, with a fake backend --


class FakeBackend:
    """Records the order of tasks; ``die`` names run ids whose worker dies (always)."""

    slots = 2
    broken = False

    def __init__(self, die: set[str] = frozenset()) -> None:
        self.order: list[tuple[str, str]] = []
        self.die, self.restarts, self._tasks = die, 0, {}

    def submit(self, task: Task) -> int:
        self._tasks[len(self._tasks)] = task
        self.order.append((task.kind, task.cfg.run_id()))
        return len(self._tasks) - 1

    def wait(self, handles: list[int]) -> list[int]:
        return [min(handles)]

    def outcome(self, handle: int) -> dict[str, Any]:
        task = self._tasks[handle]
        if task.cfg.run_id() in self.die:
            self.broken = True
            return {"ok": False, "died": True, "error": "the worker process died"}
        return {"ok": False, "error": "fake: not run"}

    def restart(self) -> None:
        self.broken, self.restarts = False, self.restarts + 1

    def close(self, cancel: bool = False) -> None:
        pass


def test_shared_warmup_is_prepared_once_before_its_runs(tmp_path):
    s = sweep_from_table({**TINY, "warmup_epochs": 1, "sparsity": [0.9, 0.95], "seed": [0, 1],
                          "include": [{"seed": 2, "sparsity": 0.9}]}, "t.toml", out=tmp_path)
    prepares, blocked, free = plan(s.runs)
    assert len(prepares) == 2 and len(blocked) == 2 and len(free) == 1  # seed 2: one run
    backend = FakeBackend()
    with db.connect(tmp_path / "x.sqlite") as conn:
        counts = drive(s.runs, backend, conn, say=lambda _m: None)
    kinds = [k for k, _ in backend.order]
    assert kinds[:2] == ["prepare", "prepare"] and kinds.count("prepare") == 2
    assert counts == {"finished": 0, "failed": 5}


def test_a_dead_worker_is_retried_once_then_recorded(tmp_path):
    s = sweep_from_table({**TINY, "sparsity": [0.9, 0.95]}, "t.toml", out=tmp_path)
    victim = s.runs[0].run_id()
    backend = FakeBackend(die={victim})
    with db.connect(tmp_path / "x.sqlite") as conn:
        drive(s.runs, backend, conn, say=lambda _m: None)
        rows = {r["run_id"]: r for r in db.fetch(conn, None)}
    assert [rid for _, rid in backend.order].count(victim) == 2 and backend.restarts == 2
    assert rows[victim]["status"] == "failed" and "died" in rows[victim]["error"]


class EventBackend(FakeBackend):
    """Also records when each task ends: ``events`` is ("submit"|"end", run id) in order."""

    def __init__(self) -> None:
        super().__init__()
        self.events: list[tuple[str, str]] = []

    def submit(self, task: Task) -> int:
        self.events.append(("submit", task.cfg.run_id()))
        return super().submit(task)

    def outcome(self, handle: int) -> dict[str, Any]:
        self.events.append(("end", self._tasks[handle].cfg.run_id()))
        return super().outcome(handle)


@pytest.mark.parametrize("warmup", [0, 1])
def test_imp_chains_run_their_sparsest_run_first(tmp_path, warmup):
    """The IMP runs of one curve share rounds: the sparsest starts first (before the other
    criteria) and the others only after it ended, so no round is trained twice."""
    s = sweep_from_table({**TINY, "warmup_epochs": warmup, "seed": [0, 1],
                          "criterion": ["snip", "imp"], "sparsity": [0.8, 0.95, 0.9]},
                         "t.toml", out=tmp_path)
    chains: dict[str, list] = {}
    for cfg in s.runs:
        if (key := imp_chain(cfg)) is not None:
            chains.setdefault(key, []).append(cfg)
    assert len(chains) == 2 and all(len(c) == 3 for c in chains.values())
    assert imp_chain(s.runs[0]) is None  # snip
    backend = EventBackend()
    with db.connect(tmp_path / "x.sqlite") as conn:
        counts = drive(s.runs, backend, conn, say=lambda _m: None)
    assert counts["failed"] == 12
    runs = [rid for kind, rid in backend.order if kind == "run"]
    assert sorted(runs) == sorted(c.run_id() for c in s.runs)  # each once
    for members in chains.values():
        head = max(members, key=lambda c: c.prune.sparsity).run_id()
        ended = backend.events.index(("end", head))
        for cfg in members:
            if cfg.run_id() != head:
                assert backend.events.index(("submit", cfg.run_id())) > ended
    # The heads go before the other criteria's runs (of their seed, after its warm-up).
    heads = {max(m, key=lambda c: c.prune.sparsity).run_id() for m in chains.values()}
    first = runs[:2] if not warmup else [runs[0]]
    assert set(first) <= heads


# -- real sweeps on synthetic data --


def test_sweep_indexes_skips_and_rebuilds(tmp_path):
    toml = TOML.format(epochs=1) + '\n[[include]]\nsparsity = 0.9999\non_collapse = "error"\n' \
        'criterion = "magnitude"\nseed = 0\n'
    sweep = load_sweep(write(tmp_path / "s.toml", toml), out=tmp_path / "sw")
    lines: list[str] = []
    counts = run_sweep(sweep, say=lines.append)
    assert counts == {"finished": 10, "failed": 1}
    conn = db.connect(tmp_path / "sw" / db.DB_NAME)
    assert conn.execute("PRAGMA journal_mode").fetchone()["journal_mode"] == "wal"
    cols = {r["name"] for r in conn.execute("PRAGMA table_info(runs)")}
    assert set(db.columns()) <= cols
    rows = {r["run_id"]: r for r in db.fetch(conn, None)}
    failed = [r for r in rows.values() if r["status"] == "failed"]
    assert len(rows) == 11 and len(failed) == 1 and "CollapseError" in failed[0]["error"]
    assert (tmp_path / "sw" / failed[0]["run_id"] / ERROR).exists()
    done = [r for r in rows.values() if r["status"] == "finished"]
    assert {r["method"] for r in done} == {"magnitude", "snip", "dense"}
    assert len({r["test_acc"] for r in done}) > 2  # it learns: the numbers are not all chance
    for r in done:
        assert 0 <= r["test_acc"] <= 1 and r["kept"] == round(r["prunable"] * r["density"])
        assert r["git_commit"] is not None or r["fishprune_version"]
        assert r["finished_at"] and r["started_at"] and r["torch_version"] == torch.__version__
    layers = db.fetch_layers(conn)
    assert [lay["name"] for lay in layers[done[0]["run_id"]]] == [
        "fc1.weight", "fc2.weight", "fc3.weight"]
    conn.close()

    # A rerun skips the finished runs (and tries the failed one again).
    stamp = {p: p.stat().st_mtime_ns for p in (tmp_path / "sw").glob("*/result.json")}
    lines.clear()
    assert run_sweep(sweep, say=lines.append) == {"finished": 0, "failed": 1}
    assert "10 finished, 1 to run" in lines[0]
    assert stamp == {p: p.stat().st_mtime_ns for p in (tmp_path / "sw").glob("*/result.json")}

    # The database is an index: rebuilt from the run directories, it has the same rows.
    before = db_rows(tmp_path / "sw")
    (tmp_path / "sw" / db.DB_NAME).unlink()
    conn = db.open_index(tmp_path / "sw")
    conn.close()
    assert db_rows(tmp_path / "sw") == before
    assert cli.main(["sweep", str(tmp_path / "s.toml"), "--out", str(tmp_path / "sw")]) == 1


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_killed_sweep_resumes_to_the_same_database(tmp_path):
    """SIGKILL a 2-worker sweep after its first result; the resumed sweep's database equals
    that of an uninterrupted one (metrics and settings; not timings)."""
    cfg = write(tmp_path / "s.toml", TOML.format(epochs=3))
    run_sweep(load_sweep(cfg, out=tmp_path / "ref"), say=lambda _m: None)
    reference = db_rows(tmp_path / "ref")

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "fishprune", "sweep", str(cfg), "--workers",
                             "2", "--out", str(tmp_path / "run")], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while not list((tmp_path / "run").glob("*/result.json")):
            assert proc.poll() is None, proc.stderr.read().decode()
            assert time.monotonic() < deadline, "no result within 120 s"
            time.sleep(0.02)
        workers = _children(proc.pid)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    for pid in workers:  # orphaned workers notice their driver is gone and exit
        for _ in range(100):
            if not _alive(pid):
                break
            time.sleep(0.05)
        assert not _alive(pid), f"worker {pid} outlived its killed driver"
    finished = len(list((tmp_path / "run").glob("*/result.json")))
    assert 1 <= finished < len(reference)

    lines: list[str] = []
    counts = run_sweep(load_sweep(cfg, out=tmp_path / "run"), say=lines.append)
    assert counts["failed"] == 0 and counts["finished"] == len(reference) - finished
    assert db_rows(tmp_path / "run") == reference


def test_ray_backend_matches_local(tmp_path):
    ray = pytest.importorskip("ray", reason="the ray backend needs `pip install ray`")
    cfg = write(tmp_path / "s.toml", TOML.format(epochs=1).replace('seed = [0, 1]', "seed = 0"))
    run_sweep(load_sweep(cfg, out=tmp_path / "local"), say=lambda _m: None)
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        counts = run_sweep(load_sweep(cfg, out=tmp_path / "ray"), backend="ray", workers=2,
                           say=lambda _m: None)
    finally:
        if started:
            ray.shutdown()
    assert counts == {"finished": 5, "failed": 0}
    assert db_rows(tmp_path / "ray") == db_rows(tmp_path / "local")


def test_ray_missing_is_a_clear_error(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray → ImportError
    cfg = write(tmp_path / "s.toml", TOML.format(epochs=1))
    assert cli.main(["sweep", str(cfg), "--backend", "ray", "--out", str(tmp_path / "o")]) == 1
    assert "pip install 'fishprune[ray]'" in capsys.readouterr().err


def test_db_upgrades_old_schema(tmp_path):
    path = tmp_path / db.DB_NAME
    raw = sqlite3.connect(path)
    raw.execute("CREATE TABLE runs (run_id TEXT PRIMARY KEY, status TEXT NOT NULL)")
    raw.commit()
    raw.close()
    conn = db.connect(path)
    assert set(db.columns()) <= {r["name"] for r in conn.execute("PRAGMA table_info(runs)")}
    conn.close()


def _session_pids(sid: int) -> list[int]:
    """Live processes of session ``sid`` (from /proc: no extra dependency)."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":  # session id, not a zombie
            pids.append(int(stat.parent.name))
    return pids


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs /proc")
def test_workers_stop_when_the_driver_is_sigkilled(tmp_path: Path) -> None:
    """Regression: sweep workers outlived a SIGKILLed driver and kept writing."""
    import signal
    import subprocess
    import sys
    import time

    toml = write(tmp_path / "s.toml", 'dataset = "synthetic"\nmodel = "lenet300"\nepochs = 200\n'
                 'seed = [0, 1, 2, 3]\ncriterion = "magnitude"\nsparsity = 0.5\n')
    driver = subprocess.Popen([sys.executable, "-m", "fishprune", "sweep", str(toml),
                               "--workers", "2", "--out", str(tmp_path / "sw")],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "sw").glob("*/checkpoint.safetensors")):
        assert time.monotonic() < deadline and driver.poll() is None
        time.sleep(0.2)
    assert len(_session_pids(driver.pid)) >= 3  # the driver and its workers
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    deadline = time.monotonic() + 20
    while _session_pids(driver.pid):
        assert time.monotonic() < deadline, _session_pids(driver.pid)
        time.sleep(0.2)
