"""``fishprune sweep``: a grid of runs on local processes or Ray, indexed in SQLite.

``fishprune sweep CONFIG.toml [--workers N] [--backend local|ray] [--address ADDR] [--out DIR]
[--dry-run]`` expands the grid (:mod:`fishprune.sweep.grid`), skips runs whose ``result.json``
exists, runs the rest and writes one row per run into ``<out>/results.sqlite``
(:mod:`fishprune.resultsdb`) as each one ends. Every finished run directory found under
``<out>`` is (re)indexed first, so the database can always be rebuilt from the run directories.

Shared work. Runs with the same model, data, warm-up and training settings and seed share one
warm-up (cached by the pipeline in ``<out>/_cache``). Started together, each would compute it
(atomic writes make that safe, but wasteful). So a group of two or more unfinished runs first
gets a *prepare* task that computes the init and warm-up once; its runs are released when it
ends, while other groups go on in parallel. Prepare tasks are scheduled before runs.

IMP chains. The IMP runs of one curve (same seed and settings, several target sparsities)
share their rounds through ``<out>/_cache/imp-*`` (:mod:`fishprune.imp`); started together,
each would train the same rounds. So the sparsest run of a chain (the *head*: its rounds pass
through every other's but the last) runs first, ahead of other runs since it is the longest,
and the rest of its chain is released when it ends: each then trains only its own last round
and its final network.

Interruption. Every artifact is written atomically by the pipeline, so killing the driver or a
worker (Ctrl-C, SIGKILL, out of memory) loses nothing finished: a rerun skips finished runs and
resumes partial ones from their last epoch. Workers ignore SIGINT (the driver stops them) and
exit when the driver dies. A worker that dies takes its runs with it: they are tried once more
on a fresh pool, then recorded as failed. Failed runs leave ``error.json``, are recorded in the
database and do not stop the sweep; the exit status is 1 when any failed.
"""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from fishprune import cachekeys
from fishprune import config as C
from fishprune import resultsdb as db
from fishprune.pipeline import resolve_device
from fishprune.rundir import RunDir
from fishprune.sweep.backends import Backend, Task, check_ray_address, make_backend
from fishprune.sweep.grid import Sweep

Say = Callable[[str], None]


def warmup_group(cfg: C.RunConfig) -> str | None:
    """Runs with the same key share one warm-up: the pipeline's own cache key."""
    return cachekeys.warmup_key(cfg, resolve_device(cfg.device).type)


def plan(todo: list[C.RunConfig]) -> tuple[list[Task], dict[str, list[Task]], list[Task]]:
    """Prepare tasks, runs blocked on them (by group) and runs free to start, in grid order."""
    groups: dict[str, list[Task]] = {}
    free: list[Task] = []
    for cfg in todo:
        key = warmup_group(cfg)
        (free if key is None else groups.setdefault(key, [])).append(Task("run", cfg))
    prepares, blocked = [], {}
    for key, tasks in groups.items():
        if len(tasks) == 1:
            free.append(tasks[0])
        else:
            prepares.append(Task("prepare", tasks[0].cfg))
            blocked[key] = tasks
    return prepares, blocked, free


def imp_chain(cfg: C.RunConfig) -> str | None:
    """IMP runs with the same key share their rounds: the IMP round cache directory."""
    if cfg.prune.criterion != "imp" or cfg.prune.sparsity == 0:
        return None
    from fishprune.imp import round_dir

    return str(round_dir(cfg, resolve_device(cfg.device).type))


def chain_imp(tasks: list[Task]) -> tuple[list[Task], dict[str, list[Task]]]:
    """``tasks`` with every IMP chain's head first and its other runs taken out, and those
    runs by their head's run id (released when the head ends)."""
    chains: dict[str, list[Task]] = {}
    for task in tasks:
        key = imp_chain(task.cfg)
        if key is not None:
            chains.setdefault(key, []).append(task)
    heads, waiting = [], {}
    for members in chains.values():
        members = sorted(members, key=lambda t: t.cfg.prune.sparsity, reverse=True)
        heads.append(members[0])
        if len(members) > 1:
            waiting[members[0].cfg.run_id()] = members[1:]
    held = {id(t) for ts in waiting.values() for t in ts} | {id(t) for t in heads}
    return heads + [t for t in tasks if id(t) not in held], waiting


@contextlib.contextmanager
def driver_lock(out: Path) -> Iterator[None]:
    """One driver per sweep directory (released by the kernel even after SIGKILL)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        yield
        return
    with open(out / ".sweep.lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RuntimeError(f"another sweep is running in {out}") from None
        yield


def drive(todo: list[C.RunConfig], backend: Backend, conn: Any, say: Say) -> dict[str, int]:
    """Run ``todo`` on ``backend``, indexing each run into ``conn`` as it ends."""
    prepares, blocked, free = plan(todo)
    free, waiting = chain_imp(free)
    for key, tasks in blocked.items():
        blocked[key], more = chain_imp(tasks)
        waiting.update(more)
    queues = {"prepare": collections.deque(prepares), "run": collections.deque(free)}
    in_flight: dict[Any, Task] = {}
    counts = {"finished": 0, "failed": 0}
    width = len(str(len(todo)))
    try:
        while queues["prepare"] or queues["run"] or in_flight:
            while len(in_flight) < backend.slots and (queues["prepare"] or queues["run"]):
                task = (queues["prepare"] or queues["run"]).popleft()
                in_flight[backend.submit(task)] = task
            for handle in backend.wait(list(in_flight)):
                task = in_flight.pop(handle)
                result = backend.outcome(handle)
                if result.get("died") and task.attempts == 0:
                    task.attempts += 1
                    queues[task.kind].appendleft(task)
                    say(f"worker died during {task.cfg.label()}; trying it again")
                    continue
                if task.kind == "prepare":
                    released = blocked.pop(warmup_group(task.cfg) or "", [])
                    heads = [t for t in released if t.cfg.run_id() in waiting]
                    queues["run"].extendleft(reversed(heads))  # the longest first
                    queues["run"].extend(t for t in released if t.cfg.run_id() not in waiting)
                    if not result["ok"]:
                        say(f"shared warm-up for {task.cfg.label()} failed: {result['error']}")
                    continue
                queues["run"].extend(waiting.pop(task.cfg.run_id(), []))  # its IMP chain
                if not result["ok"]:
                    db.record_failure(task.cfg.directory(), task.cfg, result["error"],
                                      result.get("traceback"))
                row = db.index_run(conn, task.cfg.directory()) or {}
                status = "finished" if row.get("status") == "finished" else "failed"
                counts[status] += 1
                n = counts["finished"] + counts["failed"]
                detail = (f"test {100 * row['test_acc']:.2f}%" if row.get("test_acc") is not None
                          else (result.get("error") or "no result"))
                say(f"[{n:>{width}}/{len(todo)}] {status:<8} {task.cfg.run_id()}  "
                    f"{task.cfg.label()}  {detail}  ({result.get('seconds', 0):.1f}s)")
            if backend.broken:
                backend.restart()
    except BaseException:
        backend.close(cancel=True, pending=list(in_flight))
        raise
    backend.close()
    return counts


def describe(sweep: Sweep) -> list[str]:
    """The dry-run listing: axes, then one line per run with its state."""
    lines = [f"axes: {k} = {', '.join(map(str, v))}" for k, v in sweep.axes.items()]
    for cfg in sweep.runs:
        rd = RunDir.of(cfg)
        state = ("corrupt" if rd.verify(cfg) else "finished" if rd.is_finished() else
                 "partial" if rd.is_run() else "new")
        lines.append(f"  {cfg.run_id()}  {state:<8}  {cfg.label()}")
    return lines


def run_sweep(sweep: Sweep, *, backend: str = "local", workers: int | None = None,
              address: str | None = None, cpus_per_run: int | None = None,
              say: Say = print) -> dict[str, int]:
    """Index what is on disk, run what is not finished, return counts by status."""
    if workers is not None and workers < 1:
        raise C.ConfigError(f"--workers must be >= 1; got {workers}")
    if cpus_per_run is not None and cpus_per_run < 1:
        raise C.ConfigError(f"--cpus-per-run must be >= 1; got {cpus_per_run}")
    if address and backend != "ray":  # checked before anything is created
        raise C.ConfigError("--address needs --backend ray")
    if backend == "ray" and address:
        check_ray_address(address)
    sweep.out.mkdir(parents=True, exist_ok=True)
    with driver_lock(sweep.out):
        conn = db.connect(sweep.out / db.DB_NAME)
        try:
            db.index_dir(conn, sweep.out)
            corrupt = {cfg.run_id(): problems for cfg in sweep.runs
                       if (problems := RunDir.of(cfg).verify(cfg))}
            for run_id, problems in corrupt.items():
                say(f"corrupt: {problems[0]}; {run_id} is recomputed")
            todo = [cfg for cfg in sweep.runs
                    if cfg.run_id() in corrupt or not RunDir.of(cfg).is_finished()]
            say(f"sweep {sweep.out}: {len(sweep.runs)} runs, {len(sweep.runs) - len(todo)} "
                f"finished, {len(todo)} to run" + (f" ({len(corrupt)} corrupt)" if corrupt else ""))
            counts = {"finished": 0, "failed": 0}
            if todo:
                engine = make_backend(backend, workers, address, cpus_per_run)
                say(f"backend {backend}: {engine.slots} run(s) at a time")
                counts = drive(todo, engine, conn, say)
        finally:
            conn.close()
    say(f"done: {counts['finished']} run(s) finished, {counts['failed']} failed this time; "
        f"results in {sweep.out / db.DB_NAME} (fishprune report {sweep.out})")
    return counts
