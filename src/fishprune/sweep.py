"""``fishprune sweep``: a grid of runs on local processes or Ray, indexed in SQLite.

``fishprune sweep CONFIG.toml [--workers N] [--backend local|ray] [--address ADDR] [--out DIR]
[--dry-run]`` expands the grid (:mod:`fishprune.grid`), skips runs whose ``result.json``
exists, runs the rest and writes one row per run into ``<out>/results.sqlite``
(:mod:`fishprune.resultsdb`) as each one ends. Every finished run directory found under
``<out>`` is (re)indexed first, so the database can always be rebuilt from the run directories.

Shared work. Runs with the same model, data, warm-up and training settings and seed share one
warm-up (cached by the pipeline in ``<out>/_cache``). Started together, each would compute it
(atomic writes make that safe, but wasteful). So a group of two or more unfinished runs first
gets a *prepare* task that computes the init and warm-up once; its runs are released when it
ends, while other groups go on in parallel. Prepare tasks are scheduled before runs.

Interruption. Every artifact is written atomically by the pipeline, so killing the driver or a
worker (Ctrl-C, SIGKILL, out of memory) loses nothing finished: a rerun skips finished runs and
resumes partial ones from their last epoch. Workers ignore SIGINT (the driver stops them) and
exit when the driver dies. A worker that dies takes its runs with it: they are tried once more
on a fresh pool, then recorded as failed. Failed runs leave ``error.json``, are recorded in the
database and do not stop the sweep; the exit status is 1 when any failed.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import gc
import itertools
import json
import multiprocessing as mp
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent import futures
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from fishprune import config as C
from fishprune import resultsdb as db
from fishprune.grid import Sweep, load_sweep

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
Say = Callable[[str], None]


@dataclass
class Task:
    kind: str  # "prepare" (init + warm-up into _cache) or "run"
    cfg: C.RunConfig
    attempts: int = 0


def is_finished(cfg: C.RunConfig) -> bool:
    return (cfg.directory() / "result.json").exists()


def warmup_group(cfg: C.RunConfig) -> str | None:
    """Runs with the same key share one warm-up (the pipeline's cache key has these parts)."""
    w = cfg.warmup
    if not (w.warmup_epochs or w.bn_warmup):
        return None
    return json.dumps([asdict(cfg.model), asdict(cfg.data), asdict(w), asdict(cfg.train),
                       cfg.seed, cfg.device], sort_keys=True, default=str)


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


def prepare(cfg: C.RunConfig) -> None:
    """Compute the seeded init and the warm-up of ``cfg`` into ``<out>/_cache`` (no training)."""
    from fishprune.pipeline import prepare as prepare_stages

    prepare_stages(cfg)


def execute(kind: str, cfg: C.RunConfig, threads: int | None = None) -> dict[str, Any]:
    """One task, in whatever process runs it; never raises an ``Exception`` (reports it)."""
    import torch

    from fishprune.pipeline import run

    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        if kind == "prepare":
            prepare(cfg)
        else:
            out = cfg.directory()
            out.mkdir(parents=True, exist_ok=True)
            with open(out / "run.log", "a", buffering=1) as log:
                run(cfg, show_progress=False, echo=lambda m: print(m, file=log))
    except Exception as err:
        return {"ok": False, "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc(), "seconds": time.perf_counter() - start}
    return {"ok": True, "seconds": time.perf_counter() - start}


# -- backends: submit(task) → handle; wait(handles) → done handles; outcome(handle) → dict --


class SerialBackend:
    """Runs tasks one at a time in the driver process (``--workers 1``)."""

    slots = 1
    broken = False

    def __init__(self) -> None:
        self._tasks: dict[int, Task] = {}
        self._ids = itertools.count()

    def submit(self, task: Task) -> int:
        handle = next(self._ids)
        self._tasks[handle] = task
        return handle

    def wait(self, handles: list[int]) -> list[int]:
        return handles[:1]

    def outcome(self, handle: int) -> dict[str, Any]:
        task = self._tasks.pop(handle)
        return execute(task.kind, task.cfg)

    def close(self, cancel: bool = False) -> None:
        self._tasks.clear()


def _watch_parent(pid: int) -> None:
    while os.getppid() == pid:
        time.sleep(1.0)
    os._exit(1)  # the driver died: stop now (the run resumes from its checkpoint later)


def _init_worker(threads: int, parent: int) -> None:
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    torch.set_num_threads(threads)
    threading.Thread(target=_watch_parent, args=(parent,), daemon=True).start()


class LocalBackend:
    """``workers`` spawned processes (``ProcessPoolExecutor``), ``threads`` torch threads each."""

    def __init__(self, workers: int, threads: int) -> None:
        self.slots, self.threads, self.broken = workers, threads, False
        self._saved = {k: os.environ.get(k) for k in THREAD_VARS}
        os.environ.update({k: str(threads) for k in THREAD_VARS})  # inherited by the workers
        self._pool = self._new_pool()
        self._owner: dict[futures.Future, futures.ProcessPoolExecutor] = {}

    def _new_pool(self) -> futures.ProcessPoolExecutor:
        return futures.ProcessPoolExecutor(self.slots, mp_context=mp.get_context("spawn"),
                                           initializer=_init_worker,
                                           initargs=(self.threads, os.getpid()))

    def submit(self, task: Task) -> futures.Future:
        future = self._pool.submit(execute, task.kind, task.cfg, self.threads)
        self._owner[future] = self._pool
        return future

    def wait(self, handles: list[futures.Future]) -> list[futures.Future]:
        done, _ = futures.wait(handles, return_when=futures.FIRST_COMPLETED)
        return list(done)

    def outcome(self, future: futures.Future) -> dict[str, Any]:
        pool = self._owner.pop(future)
        try:
            return future.result()
        except BrokenProcessPool:
            self.broken = self.broken or pool is self._pool
            return {"ok": False, "died": True,
                    "error": "the worker process died (killed, or out of memory?)"}
        except Exception as err:  # e.g. a result that cannot be unpickled
            return {"ok": False, "error": f"{type(err).__name__}: {err}"}

    def restart(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._pool, self.broken = self._new_pool(), False

    def close(self, cancel: bool = False) -> None:
        if cancel:  # the workers ignore SIGINT: stop them; partial runs resume later
            procs = list((getattr(self._pool, "_processes", None) or {}).values())
            for proc in procs:
                with contextlib.suppress(OSError):
                    proc.terminate()
            for proc in procs:
                proc.join(timeout=10)
        self._pool.shutdown(wait=True, cancel_futures=cancel)
        self._pool = None  # type: ignore[assignment]
        gc.collect()  # finalize the pool's queues now: no "leaked semaphore" warning at exit
        for key, value in self._saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


class RayBackend:
    """Each task a ``ray.remote(num_cpus=cpus)`` task on a local or remote Ray cluster.

    Run directories must be on a file system every Ray node sees (the driver indexes them).
    """

    broken = False

    def __init__(self, address: str | None, workers: int | None, cpus: int) -> None:
        try:
            import ray
        except ImportError:
            raise RuntimeError("the ray backend needs Ray: pip install 'fishprune[ray]'") from None
        self.ray = ray
        self._owned = not ray.is_initialized()
        if self._owned:
            new = address == "local" or (address is None and "RAY_ADDRESS" not in os.environ)
            extra = {"num_cpus": cores()} if new else {}  # a new local Ray: this machine's cores
            ray.init(address=address, include_dashboard=False, log_to_driver=False, **extra)
        total = int(ray.cluster_resources().get("CPU", 1))
        self.slots = workers or max(1, total // cpus)
        self.cpus = cpus
        self._remote = ray.remote(num_cpus=cpus, max_retries=1)(execute)

    def submit(self, task: Task) -> Any:
        return self._remote.remote(task.kind, task.cfg, self.cpus)

    def wait(self, handles: list[Any]) -> list[Any]:
        done, _ = self.ray.wait(handles, num_returns=1)
        return done

    def outcome(self, ref: Any) -> dict[str, Any]:
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayError as err:
            return {"ok": False, "error": f"{type(err).__name__}: {str(err).splitlines()[0]}"}

    def close(self, cancel: bool = False, pending: list[Any] | None = None) -> None:
        for ref in pending or []:
            with contextlib.suppress(Exception):
                self.ray.cancel(ref, force=True)
        if self._owned:
            self.ray.shutdown()


# -- the driver --


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


def drive(todo: list[C.RunConfig], backend: Any, conn: Any, say: Say) -> dict[str, int]:
    """Run ``todo`` on ``backend``, indexing each run into ``conn`` as it ends."""
    prepares, blocked, free = plan(todo)
    queues = {"prepare": collections.deque(prepares), "run": collections.deque(free)}
    in_flight: dict[Any, Task] = {}
    counts = {"finished": 0, "failed": 0}
    width = len(str(len(todo)))
    try:
        while queues["prepare"] or queues["run"] or in_flight:
            while len(in_flight) < backend.slots and (queues["prepare"] or queues["run"]):
                task = (queues["prepare"] or queues["run"]).popleft()
                if task.kind == "run":
                    db.clear_failure(task.cfg.directory())
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
                    queues["run"].extend(blocked.pop(warmup_group(task.cfg) or "", []))
                    if not result["ok"]:
                        say(f"shared warm-up for {task.cfg.label()} failed: {result['error']}")
                    continue
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
        if isinstance(backend, RayBackend):
            backend.close(cancel=True, pending=list(in_flight))
        else:
            backend.close(cancel=True)
        raise
    backend.close()
    return counts


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def make_backend(name: str, workers: int | None, address: str | None,
                 cpus_per_run: int | None) -> Any:
    if name == "ray":
        return RayBackend(address, workers, cpus_per_run or 1)
    if address:
        raise C.ConfigError("--address needs --backend ray")
    workers = workers or 1
    if workers == 1:
        return SerialBackend()
    return LocalBackend(workers, cpus_per_run or max(1, cores() // workers))


def describe(sweep: Sweep) -> list[str]:
    """The dry-run listing: axes, then one line per run with its state."""
    lines = [f"axes: {k} = {', '.join(map(str, v))}" for k, v in sweep.axes.items()]
    for cfg in sweep.runs:
        d = cfg.directory()
        state = ("finished" if is_finished(cfg) else "partial" if (d / "config.json").exists()
                 else "new")
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
    sweep.out.mkdir(parents=True, exist_ok=True)
    with driver_lock(sweep.out):
        conn = db.connect(sweep.out / db.DB_NAME)
        try:
            db.index_dir(conn, sweep.out)
            todo = [cfg for cfg in sweep.runs if not is_finished(cfg)]
            say(f"sweep {sweep.out}: {len(sweep.runs)} runs, {len(sweep.runs) - len(todo)} "
                f"finished, {len(todo)} to run")
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


def cmd_sweep(args: argparse.Namespace) -> int:
    sweep = load_sweep(args.config, out=args.out)
    if args.dry_run:
        print(f"sweep {sweep.out}: {len(sweep.runs)} runs")
        print("\n".join(describe(sweep)))
        return 0
    counts = run_sweep(sweep, backend=args.backend, workers=args.workers, address=args.address,
                       cpus_per_run=args.cpus_per_run, say=lambda m: print(m, flush=True))
    return 1 if counts["failed"] else 0


def add_cli(subparsers: Any) -> None:
    """``fishprune sweep``."""
    p = subparsers.add_parser("sweep", help="run a grid of experiments from a TOML file")
    p.add_argument("config", metavar="CONFIG.toml",
                   help="settings of `fishprune run`; a list value sweeps that setting")
    p.add_argument("--workers", type=int, help="runs at a time (default: 1 locally; "
                   "ray: the cluster's CPUs / --cpus-per-run)")
    p.add_argument("--backend", choices=("local", "ray"), default="local",
                   help="local processes or a Ray cluster (pip install 'fishprune[ray]')")
    p.add_argument("--address", help="Ray address (auto, ray://host:10001, local); "
                   "default: start a local Ray")
    p.add_argument("--cpus-per-run", type=int,
                   help="torch threads (local) or Ray CPUs per run (default: cores / workers)")
    p.add_argument("--out", help="sweep directory (default: the file's out, else sweeps/NAME)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their state only")
    p.set_defaults(func=cmd_sweep)
