"""Sweeps: a TOML grid of runs (:mod:`.grid`), run on a backend (:mod:`.backends`) by the
driver (:mod:`.driver`) that indexes every run into ``results.sqlite`` as it ends."""

from fishprune.sweep.driver import describe, run_sweep
from fishprune.sweep.grid import Sweep, load_sweep, sweep_from_table

__all__ = ["Sweep", "describe", "load_sweep", "run_sweep", "sweep_from_table"]
