"""Shared test set-up.

Every test runs with one torch intra-op thread: the models here are tiny, so threads cost more
than they save, and on a busy 2-core CI machine two threads spinning against other processes make
a run 20-60x slower. Sweeps are also compared at one thread, the way the pool's workers run on
2 cores. Subprocesses (the CLI tests) are not affected.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
