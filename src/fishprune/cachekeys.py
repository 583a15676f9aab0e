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


def _model(cfg: RunConfig) -> dict:
    """The model settings; ``model_kwargs`` only when set, so that older keys stay valid."""
    model = asdict(cfg.model)
    if not model.get("model_kwargs"):
        model.pop("model_kwargs", None)
    return model


def _dataset(cfg: RunConfig) -> str | list:
    """The dataset's identity: its name, plus its folder and image size where they decide the
    data (image folders)."""
    from fishprune.config import DATA_DIR_IS_DATA

    d = cfg.data
    extra = [d.data_dir] if d.dataset in DATA_DIR_IS_DATA else []
    extra += [d.image_size] if d.image_size is not None else []
    return [d.dataset, *extra] if extra else d.dataset


def init_key(cfg: RunConfig) -> str:
    """The seeded initialization depends on the model settings, the dataset (its input shape
    and number of classes) and the seed."""
    return digest(["init", _model(cfg), _dataset(cfg), cfg.seed])


def warmup_key(cfg: RunConfig, device_type: str) -> str | None:
    """The warm-up depends on everything the warm-up trains with (model, data, warm-up and
    training settings, seed) and on the device type (bf16 autocast on CUDA), not on the
    number of epochs trained after pruning nor on where the data lives. None: no warm-up."""
    w = cfg.warmup
    if not (w.warmup_epochs or w.bn_warmup):
        return None
    from fishprune.config import DATA_DIR_IS_DATA

    data = {k: v for k, v in asdict(cfg.data).items() if k not in ("data_dir", "num_workers")}
    if data.get("image_size") is None:  # settings added later count only when set
        data.pop("image_size", None)
    if cfg.data.dataset in DATA_DIR_IS_DATA:  # the folder is the data
        data["data_dir"] = cfg.data.data_dir
    train = {k: v for k, v in asdict(cfg.train).items() if k != "epochs"}
    warmup = asdict(w)
    if warmup.get("bn_momentum") is None:  # settings added later count only when set
        warmup.pop("bn_momentum", None)
    return digest(["warmup", _model(cfg), data, warmup, train, cfg.seed, device_type])


def init_path(cfg: RunConfig) -> Path:
    return cache_dir(cfg) / f"init-{init_key(cfg)}.safetensors"


def warmup_path(cfg: RunConfig, device_type: str) -> Path | None:
    key = warmup_key(cfg, device_type)
    return None if key is None else cache_dir(cfg) / f"warmup-{key}.safetensors"


def scored_weights_path(cfg: RunConfig, device_type: str) -> Path:
    """The cached weights a run scored: its warm-up, or its initialization without one."""
    return warmup_path(cfg, device_type) or init_path(cfg)
