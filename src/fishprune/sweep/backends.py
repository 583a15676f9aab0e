"""Where sweep tasks run: one protocol, three backends (serial, local processes, Ray).

A backend has ``slots`` (tasks at a time), ``submit(task) → handle``, ``wait(handles) → done
handles``, ``outcome(handle) → dict`` (``{"ok": bool, "error": str, "seconds": float, "died":
bool}``; never raises for a task's failure) and ``close(cancel)``; ``broken`` says the local pool
lost a worker and ``restart()`` replaces it. :func:`execute` is what every backend runs.
"""

from __future__ import annotations

import contextlib
import gc
import itertools
import multiprocessing as mp
import os
import signal
import time
import traceback
from concurrent import futures
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from typing import Any, Protocol

from fishprune import config as C
from fishprune.lifetime import exit_with_parent
from fishprune.rundir import RunDir

THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


@dataclass
class Task:
    kind: str  # "prepare" (init + warm-up into _cache) or "run"
    cfg: C.RunConfig
    attempts: int = 0


class Backend(Protocol):
    """What the sweep driver needs from a place that runs tasks."""

    slots: int
    broken: bool

    def submit(self, task: Task) -> Any: ...

    def wait(self, handles: list[Any]) -> list[Any]: ...

    def outcome(self, handle: Any) -> dict[str, Any]: ...

    def restart(self) -> None: ...

    def close(self, cancel: bool = False, pending: list[Any] | None = None) -> None: ...


def execute(kind: str, cfg: C.RunConfig, threads: int | None = None) -> dict[str, Any]:
    """One task, in whatever process runs it; never raises an ``Exception`` (reports it)."""
    import torch

    from fishprune.pipeline import prepare, run

    if threads:
        torch.set_num_threads(threads)
    start = time.perf_counter()
    try:
        if kind == "prepare":
            prepare(cfg)  # the seeded init and the warm-up into <out>/_cache, no training
        else:
            rd = RunDir.of(cfg)
            rd.path.mkdir(parents=True, exist_ok=True)
            with open(rd.log, "a", buffering=1) as log:
                run(cfg, show_progress=False, echo=lambda m: print(m, file=log))
    except Exception as err:
        return {"ok": False, "error": f"{type(err).__name__}: {err}",
                "traceback": traceback.format_exc(), "seconds": time.perf_counter() - start}
    return {"ok": True, "seconds": time.perf_counter() - start}


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

    def restart(self) -> None:
        """Nothing to restart: tasks run in this process."""

    def close(self, cancel: bool = False, pending: list[Any] | None = None) -> None:
        self._tasks.clear()


def _init_worker(threads: int, parent: int) -> None:
    import torch

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    torch.set_num_threads(threads)
    exit_with_parent(parent)  # the driver died: stop (a rerun resumes the run)


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

    def close(self, cancel: bool = False, pending: list[Any] | None = None) -> None:
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

    def restart(self) -> None:
        """Ray retries lost tasks itself (``max_retries=1``)."""

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


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


#: Seconds to wait for a Ray head's port before giving up (Ray itself retries for minutes).
RAY_CONNECT_TIMEOUT_S = 10.0


def check_ray_address(address: str, timeout: float = RAY_CONNECT_TIMEOUT_S) -> None:
    """Fail fast, in one line, when an explicit ``host:port`` Ray address does not answer.

    ``auto`` and ``local`` are left to Ray (they name no host); ``ray://host:port`` (Ray
    Client) and ``host:port`` (the GCS) are probed with a TCP connection.
    """
    import socket

    if address in ("auto", "local"):
        return
    rest = address.removeprefix("ray://")
    host, sep, port = rest.rpartition(":")
    if not sep or not port.isdigit():
        raise C.ConfigError(f"--address must be auto, local, host:port or ray://host:port; "
                            f"got {address!r}")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)),
                                      timeout=timeout):
            pass
    except OSError as err:
        raise RuntimeError(f"cannot reach the Ray cluster at {address} within {timeout:g} s "
                           f"({err.strerror or err})") from None


def make_backend(name: str, workers: int | None, address: str | None,
                 cpus_per_run: int | None) -> Backend:
    if name == "ray":
        return RayBackend(address, workers, cpus_per_run or 1)
    if address:
        raise C.ConfigError("--address needs --backend ray")
    workers = workers or 1
    if workers == 1:
        return SerialBackend()
    return LocalBackend(workers, cpus_per_run or max(1, cores() // workers))
