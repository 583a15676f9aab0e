"""Where work shared by several runs is cached: one key per initialization and per warm-up.

The pipeline, the sweep's grouping of runs that share a warm-up, and the report's plots all
call these functions, so a key exists exactly once. Keys depend only on the configuration
(never on the data files or on where they live), so a report can find a run's scored weights
without loading its dataset.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from fishprune.hashing import digest

if TYPE_CHECKING:
    from fishprune.config import RunConfig

#: Sub-directory of ``out`` that holds the shared initializations and warm-ups.
CACHE = "_cache"


def cache_dir(cfg: RunConfig) -> Path:
    """``<out>/_cache``."""
    return Path(cfg.out) / CACHE


def init_key(cfg: RunConfig) -> str:
    """The seeded initialization depends on the model settings, the dataset (its input shape
    and number of classes) and the seed."""
    return digest(["init", asdict(cfg.model), cfg.data.dataset, cfg.seed])


def warmup_key(cfg: RunConfig, device_type: str) -> str | None:
    """The warm-up depends on everything the warm-up trains with (model, data, warm-up and
    training settings, seed) and on the device type (bf16 autocast on CUDA), not on the
    number of epochs trained after pruning nor on where the data lives. None: no warm-up."""
    w = cfg.warmup
    if not (w.warmup_epochs or w.bn_warmup):
        return None
    data = {k: v for k, v in asdict(cfg.data).items() if k != "data_dir"}
    train = {k: v for k, v in asdict(cfg.train).items() if k != "epochs"}
    return digest(["warmup", asdict(cfg.model), data, asdict(w), train, cfg.seed, device_type])


def init_path(cfg: RunConfig) -> Path:
    return cache_dir(cfg) / f"init-{init_key(cfg)}.safetensors"


def warmup_path(cfg: RunConfig, device_type: str) -> Path | None:
    key = warmup_key(cfg, device_type)
    return None if key is None else cache_dir(cfg) / f"warmup-{key}.safetensors"


def scored_weights_path(cfg: RunConfig, device_type: str) -> Path:
    """The cached weights a run scored: its warm-up, or its initialization without one."""
    return warmup_path(cfg, device_type) or init_path(cfg)
