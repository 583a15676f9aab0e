"""Wall-clock timing that is honest on a GPU: ``with timed() as elapsed: ...; elapsed()``."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator

import torch


@contextlib.contextmanager
def timed() -> Iterator[Callable[[], float]]:
    """``with timed() as elapsed: ...; elapsed()`` gives wall seconds (synchronizing CUDA).

    Inside the block ``elapsed()`` is the time so far; after it, the block's total.
    """
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    start = time.perf_counter()
    stop: list[float] = []

    def elapsed() -> float:
        return (stop[0] if stop else time.perf_counter()) - start

    yield elapsed
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    stop.append(time.perf_counter())
