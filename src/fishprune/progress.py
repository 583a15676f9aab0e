"""Progress of the long phases (scoring, warm-up, BN statistics, SynFlow's rounds, analysis)
shown the way training shows it: a tqdm bar on a terminal, otherwise a line through ``say`` at
most every :data:`INTERVAL_S` seconds (none for a phase shorter than that).

:class:`Counted` wraps a re-iterable batches object (``TensorBatches``, ``ImageBatches``, a
list) so that every batch read advances a :class:`Progress`, forwarding ``len``,
``num_samples`` and ``set_epoch``; the batches themselves are untouched.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any, TypeVar

from tqdm import tqdm

T = TypeVar("T")
#: Seconds between two progress lines when there is no bar.
INTERVAL_S = 30.0


class Progress:
    """``total`` steps of ``desc``: a transient tqdm bar when ``show``, else periodic lines
    ``"<desc>: <done>/<total> <unit> (<elapsed>s)"`` through ``say`` (if given)."""

    def __init__(self, desc: str, total: int | None, *, show: bool,
                 say: Callable[[str], None] | None = None, unit: str = "batches",
                 interval: float | None = None) -> None:
        self.desc, self.total, self.unit, self.say = desc, total, unit, say
        self.done = 0
        self.interval = INTERVAL_S if interval is None else interval
        self._start = self._last = time.monotonic()
        self._bar = (tqdm(total=total, desc=desc, unit=unit[:-1] if unit.endswith("s") else unit,
                          leave=False, file=sys.stderr, dynamic_ncols=True) if show else None)

    def update(self, n: int = 1) -> None:
        self.done += n
        if self._bar is not None:
            self._bar.update(n)
            return
        now = time.monotonic()
        if self.say is not None and now - self._last >= self.interval:
            self._last = now
            of = f"/{self.total}" if self.total else ""
            self.say(f"{self.desc}: {self.done}{of} {self.unit} ({now - self._start:.0f}s)")

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


class Counted:
    """Batches that advance ``progress`` by one per batch read; everything else (``len``,
    ``num_samples``, ``set_epoch``...) is the wrapped object's."""

    def __init__(self, batches: Iterable[T], progress: Progress) -> None:
        self.batches = batches
        self.progress = progress

    def __iter__(self) -> Iterator[Any]:
        for batch in self.batches:
            self.progress.update(1)
            yield batch

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __getattr__(self, name: str) -> Any:
        if name in ("batches", "progress"):  # not set yet (copy, unpickling)
            raise AttributeError(name)
        return getattr(self.batches, name)
