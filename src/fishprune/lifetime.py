"""A worker process that must not outlive the process that started it.

Sweep workers and torchrun ranks keep writing run artifacts; if their driver is killed
(SIGKILL gives it no chance to stop them) they must stop too, or a rerun would race with them.
"""

from __future__ import annotations

import os
import threading
import time


def _watch(parent: int, interval: float) -> None:
    while os.getppid() == parent:
        time.sleep(interval)
    os._exit(1)  # the parent died: stop now (the run resumes from its checkpoint later)


def exit_with_parent(parent: int | None = None, *, interval: float = 1.0) -> None:
    """Exit this process (``os._exit(1)``) within ``interval`` seconds of its parent's death.

    A daemon thread polls ``os.getppid()``: when the parent dies the process is re-parented and
    the id changes. ``parent`` defaults to the current parent.
    """
    pid = os.getppid() if parent is None else parent
    threading.Thread(target=_watch, args=(pid, interval), daemon=True,
                     name="exit-with-parent").start()
