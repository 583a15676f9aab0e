"""torch.distributed: W gloo processes on the CPU score like one process, with identical masks.

The workers are real processes (``torch.multiprocessing.spawn``) joined over TCP on 127.0.0.1;
each writes what it computed to a file and the parent compares against a one-process run.
"""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import distributed as dist
from torch import nn

import fishprune as fp
from fishprune import distributed as fpd
from fishprune.train import train_epoch

OPTIONS = {"hd": {"probes": 2}, "hp": {"probes": 2}, "hts": {"probes": 2}}
CASES = [(c, {}) for c in fp.criteria()] + [
    ("fts", {"per_sample": True}), ("fd", {"per_sample": True}), ("hts", {"probes": 3}),
]
SPARSITY = 0.8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 6, 3), nn.BatchNorm2d(6), nn.ReLU(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(24, 10),
    )


def scoring_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    """7 batches (uneven over 2 and 3 ranks), the last one smaller."""
    g = torch.Generator().manual_seed(1)
    sizes = [6] * 6 + [4]
    return [(torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 10, (n,), generator=g))
            for n in sizes]


def score_all(group: object | None, mode: str = "eval") -> dict[str, dict[str, torch.Tensor]]:
    model, data = tiny_cnn(), scoring_data()
    out = {}
    for crit, extra in CASES:
        if mode == "train" and extra.get("per_sample"):
            continue  # refused with BatchNorm in train mode
        opts = {**OPTIONS.get(crit, {}), **extra}
        key = crit + "".join(f",{k}={v}" for k, v in extra.items())
        scores = fp.score(model, crit, data, seed=3, mode=mode, process_group=group, **opts)
        masks = fp.select(scores, SPARSITY)
        out[key] = {"scores": scores, "masks": masks}
    return out


def one_epoch(group: object | None) -> dict:
    """One SGD epoch of the BatchNorm CNN over the scoring batches (DDP with W ranks)."""
    model = tiny_cnn()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with fpd.data_parallel(group), fpd.wrapped(model) as net:
        loss, acc = train_epoch(net, scoring_data(), optimizer, None, device=torch.device("cpu"))
    return {"loss": loss, "acc": acc, "state": model.state_dict()}


def _init(rank: int, world: int, port: int) -> None:
    torch.set_num_threads(1)
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world)


def _worker(rank: int, world: int, port: int, out: str) -> None:
    """Every criterion in eval mode (and in train mode with 2 ranks), then a rank with
    perturbed weights (the injected fault) that the mask check must name."""
    _init(rank, world, port)
    try:
        fpd.traffic.bytes = 0
        result = {"eval": score_all(dist.group.WORLD)}
        for key, r in result["eval"].items():
            fpd.check_identical(f"{key} mask", r["masks"])
        traffic = fpd.traffic.bytes
        result["train_epoch"] = one_epoch(dist.group.WORLD)
        if world == 2:
            result["train"] = score_all(dist.group.WORLD, mode="train")
        model, data = tiny_cnn(), scoring_data()
        if rank == world - 1:  # the injected fault: this rank's first layer differs
            with torch.no_grad():
                model[0].weight.add_(0.3)
        scores = fp.score(model, "snip", data, process_group=dist.group.WORLD)
        try:
            fpd.check_identical("mask", fp.select(scores, SPARSITY))
            result["divergence"] = "no error"
        except fpd.RankDivergenceError as e:
            result["divergence"] = str(e)
        torch.save({"result": result, "bytes": traffic}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def spawn(fn, world: int, *args: object) -> None:
    mp.spawn(fn, args=(world, free_port(), *args), nprocs=world, join=True)


@pytest.mark.parametrize("world", [2, 3])
def test_scores_and_masks_match_one_process(tmp_path: Path, world: int) -> None:
    single = score_all(None)
    spawn(_worker, world, str(tmp_path / "r"))
    ranks = [torch.load(f"{tmp_path / 'r'}.{r}") for r in range(world)]
    for key, ref in single.items():
        for r, got in enumerate(ranks):
            masks = got["result"]["eval"][key]["masks"]
            scores = got["result"]["eval"][key]["scores"]
            for name in ref["masks"]:
                # bit-identical on every rank (summed in rank order everywhere) ...
                assert torch.equal(scores[name], ranks[0]["result"]["eval"][key]["scores"][name])
                # ... the same mask as one process ...
                assert torch.equal(masks[name], ref["masks"][name]), (key, r, name)
                # ... and the scores within the documented summation-order tolerance
                s, s1 = scores[name].double(), ref["scores"][name].double()
                scale = max(s1.abs().max().item(), 1e-30)
                bound = fpd.SCORE_RTOL * s1.abs() + fpd.SCORE_ATOL * scale
                assert ((s - s1).abs() <= bound).all(), (key, name)
    # the moment criteria all-gather their sums (the data-free ones nothing)
    assert ranks[0]["bytes"] > 0
    if world == 2:  # train mode (BatchNorm batch statistics): still per batch, same masks
        single = score_all(None, mode="train")
        for key, ref in single.items():
            for name in ref["masks"]:
                got = ranks[1]["result"]["train"][key]["masks"][name]
                assert torch.equal(got, ref["masks"][name]), (key, name)
    # DDP with synchronized BatchNorm (uneven last batch over the ranks): one process's epoch
    ref = one_epoch(None)
    for got in ranks:
        epoch = got["result"]["train_epoch"]
        assert epoch["acc"] == ref["acc"] and epoch["loss"] == pytest.approx(ref["loss"], rel=1e-6)
        for name, value in ref["state"].items():
            torch.testing.assert_close(epoch["state"][name], value, rtol=1e-5, atol=1e-6)
    # a rank whose weights differ is detected and named, on every rank
    for got in ranks:
        assert f"differs between ranks: rank(s) {world - 1} disagree with rank 0" in (
            got["result"]["divergence"])


def test_one_process_is_world_size_one() -> None:
    assert not dist.is_initialized()
    assert fpd.current_world() == fpd.World()
    assert list(fpd.owned("abc")) == [(0, "a"), (1, "b"), (2, "c")]
    sums = [torch.ones(3)]
    assert fpd.reduce_sums(sums, 5) == 5 and torch.equal(sums[0], torch.ones(3))
    masks = {"w": torch.tensor([True, False])}
    assert fpd.check_identical("mask", masks) == fpd.tensor_digest(masks)
    assert fpd.tensor_digest(masks) != fpd.tensor_digest({"w": torch.tensor([False, True])})


@settings(max_examples=60, deadline=None)
@given(n=st.integers(1, 60), world=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_rank_slices_rebuild_a_batch_and_its_mean_loss(n: int, world: int, seed: int) -> None:
    """The W slices of a batch concatenate to it, and DDP's average of the scaled per-rank mean
    losses is the batch's mean loss, also when the batch does not split evenly."""
    g = torch.Generator().manual_seed(seed)
    inputs, targets = torch.randn(n, 3, generator=g).double(), torch.arange(n)
    parts = []
    for rank in range(world):
        shard = fpd.ShardedBatches([(inputs, targets)], rank, world)
        parts += [(x, y, shard.loss_scale) for x, y in shard]
    assert torch.equal(torch.cat([y for _, y, _ in parts]), targets)
    assert all(len(y) in (n // world, -(-n // world)) for _, y, _ in parts)
    mean = sum(w * x.sum(1).mean() for x, _, w in parts) / world
    torch.testing.assert_close(mean, inputs.sum(1).mean())
    if n < world:
        with pytest.raises(ValueError, match="fewer than the"):
            list(fpd.ShardedBatches([(inputs, targets)], 0, world, training=True))
