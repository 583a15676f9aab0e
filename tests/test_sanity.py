"""Sanity checks (Frankle et al. 2021; Su et al. 2020) as tested transformations.

Unit tests of each transformation in :mod:`fishprune.sanity`, then the pipeline end to end with
every ``--sanity`` value on the synthetic dataset (LeNet-300-100 at width 0.25, one epoch).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import fishprune as fp
from fishprune import config as C
from fishprune import pipeline
from fishprune import settings as S
from fishprune import tensorfiles as tf
from fishprune.config import SANITY_CHECKS
from fishprune.sanity import invert_scores, randomize_labels, reinitialize_, shuffle_masks
from fishprune.selection import kept_count

FAST: dict[str, Any] = {"dataset": "synthetic", "model": "lenet300", "width": 0.25, "lr": 0.1,
                        "epochs": 1, "sparsity": 0.9, "criterion": "snip"}


def random_masks(seed: int = 0) -> dict[str, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"a": torch.rand(20, 30, generator=gen) < 0.1, "b": torch.rand(7, 3, 3, generator=gen)
            < 0.5, "c": torch.rand(5, generator=gen) < 0.9}


# --------------------------------------------------------------------------- shuffle


def test_shuffle_keeps_layer_counts_and_changes_the_mask() -> None:
    masks = random_masks()
    shuffled = shuffle_masks(masks, seed=0)
    assert shuffled.keys() == masks.keys()
    for name, mask in masks.items():
        assert shuffled[name].shape == mask.shape and shuffled[name].dtype == torch.bool
        assert int(shuffled[name].sum()) == int(mask.sum()), name
    assert not torch.equal(shuffled["a"], masks["a"])  # a shuffle that changes nothing is a bug
    assert not torch.equal(shuffled["b"], masks["b"])


def test_shuffle_is_seeded() -> None:
    masks = random_masks()
    assert all(torch.equal(x, y) for x, y in zip(shuffle_masks(masks, 3).values(),
                                                 shuffle_masks(masks, 3).values()))
    assert not torch.equal(shuffle_masks(masks, 3)["a"], shuffle_masks(masks, 4)["a"])


# --------------------------------------------------------------------------- invert


def test_invert_keeps_exactly_the_lowest_scored_weights() -> None:
    gen = torch.Generator().manual_seed(0)
    n = 1000
    flat = torch.randperm(n, generator=gen).double()  # distinct: the lowest k are unambiguous
    scores = {"x": flat[:600].reshape(20, 30), "y": flat[600:].reshape(4, 100)}
    for sparsity in (0.5, 0.9, 0.99, 0.123):
        masks = fp.select(invert_scores(scores), sparsity)
        k = kept_count(1 - sparsity, n)
        kept_values = torch.cat([scores[n_][m] for n_, m in masks.items()])
        assert kept_values.numel() == k
        assert torch.equal(kept_values.sort().values, torch.arange(k).double()), sparsity


def test_invert_at_half_sparsity_is_the_complement() -> None:
    scores = {"x": torch.randn(10, 10, generator=torch.Generator().manual_seed(1))}
    assert torch.equal(fp.select(invert_scores(scores), 0.5)["x"], ~fp.select(scores, 0.5)["x"])


# --------------------------------------------------------------------------- random labels


def test_random_labels_change_labels_and_are_seeded() -> None:
    y = torch.arange(1000) % 10
    a, b = randomize_labels(y, 10, seed=0), randomize_labels(y, 10, seed=0)
    c = randomize_labels(y, 10, seed=1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == y.shape and a.dtype == torch.int64
    assert int(a.min()) >= 0 and int(a.max()) <= 9 and len(a.unique()) == 10
    assert 0.03 < float((a == y).double().mean()) < 0.2  # ~1/10 agree by chance


# --------------------------------------------------------------------------- reinit


def test_reinit_keeps_the_mask_and_changes_kept_values() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    model[1].running_mean.fill_(0.5)  # a warm-up's BN statistics must survive
    masks = fp.select(fp.score(model, "magnitude", None), 0.7)
    fp.apply_masks(model, masks)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    torch.manual_seed(1)
    fresh = nn.Sequential(nn.Linear(8, 16), nn.BatchNorm1d(16), nn.ReLU(), nn.Linear(16, 4))
    fp.apply_masks(reinitialize_(model, fresh), masks)
    for name, mask in masks.items():
        w = dict(model.named_parameters())[name]
        assert torch.count_nonzero(w[~mask]) == 0, name  # the same mask
        assert torch.count_nonzero(w[mask]) == int(mask.sum())
        assert not torch.equal(w[mask], before[name][mask])  # new values where kept
    assert torch.all(model[1].running_mean == 0.5)


# --------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def sanity_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[dict, Path]]:
    """One finished run per sanity value (``none`` included), in one output directory."""
    out = tmp_path_factory.mktemp("sanity")
    runs = {}
    for check in SANITY_CHECKS:
        cfg = S.build({**FAST, "sanity": check, "out": str(out)})
        result = pipeline.run(cfg, show_progress=False)
        runs[check] = (result, cfg.directory())
    return runs


def test_sanity_is_an_ordinary_setting() -> None:
    ids = {S.build({**FAST, "sanity": s}).run_id() for s in SANITY_CHECKS}
    assert len(ids) == len(SANITY_CHECKS)  # a sweep over it gives distinct runs
    with pytest.raises(C.ConfigError, match="sanity"):
        S.build({"sanity": "flip"})


@pytest.mark.parametrize("check", SANITY_CHECKS)
def test_pipeline_runs_each_sanity_check(sanity_runs: dict, check: str) -> None:
    result, out = sanity_runs[check]
    assert (out / "result.json").exists()
    assert json.loads((out / "config.json").read_text())["prune"]["sanity"] == check
    assert result["kept"] == kept_count(0.1, result["prunable"])
    masks = tf.load_masks(out / "masks.safetensors")
    best = tf.load_state(out / "best.safetensors")
    for name, mask in masks.items():  # the stored mask is the one that was trained
        assert torch.count_nonzero(best[name][~mask]) == 0, name


def test_pipeline_masks_differ_as_each_check_says(sanity_runs: dict) -> None:
    def masks(check: str) -> dict[str, Tensor]:
        return tf.load_masks(sanity_runs[check][1] / "masks.safetensors")

    base = masks("none")
    counts = {n: int(m.sum()) for n, m in base.items()}
    shuffled = masks("shuffle")
    assert {n: int(m.sum()) for n, m in shuffled.items()} == counts
    assert any(not torch.equal(shuffled[n], base[n]) for n in base)
    assert all(torch.equal(masks("reinit")[n], base[n]) for n in base)  # same mask ...
    inverted = masks("invert")
    overlap = sum(int((inverted[n] & base[n]).sum()) for n in base)
    assert overlap == 0  # at 90% sparsity the bottom 10% and the top 10% are disjoint
    assert any(not torch.equal(masks("random-labels")[n], base[n]) for n in base)


def test_pipeline_reinit_trains_other_values(sanity_runs: dict) -> None:
    base = tf.load_state(sanity_runs["none"][1] / "best.safetensors")
    reinit = tf.load_state(sanity_runs["reinit"][1] / "best.safetensors")
    masks = tf.load_masks(sanity_runs["none"][1] / "masks.safetensors")
    for name, mask in masks.items():  # ... but different kept values (a fresh initialization)
        assert not torch.allclose(base[name][mask], reinit[name][mask]), name
