"""Data-parallel fishprune on ``torch.distributed``: the same masks and results on W processes.

Launched by ``torchrun --nproc-per-node W -m fishprune run ...``, every rank runs the whole
protocol; this module holds the few collective steps that make the ranks agree:

* **Scoring** (:func:`owned`, :func:`reduce_sums`): scoring batch ``b`` is computed by rank
  ``b mod W`` only, so the set of batches is the same whatever W. Every moment a criterion
  needs is an accumulated *sum* over batches (or samples) plus a *count*; before the division
  each rank's sums are all-gathered and added **in rank order on every rank**, so all ranks hold
  bit-identical moments (never a ring all-reduce, whose summation order may differ by rank),
  then divided by the summed count. Against one process the scores differ only by the float
  summation order of the batch sums: ``|Δs| <= SCORE_RTOL · |s| + SCORE_ATOL · max|s|``, tested.
* **Hutchinson probes** reproduce the single-process stream: a rank draws (and discards) the
  probes of the batches it does not own, so batch ``b`` sees the same Rademacher vectors as in
  a one-process run (and the one-process run is unchanged, bit for bit).
* **Data-free criteria** (random, magnitude, synflow) are deterministic on the CPU and are
  computed identically on every rank; nothing is communicated.
* **Agreement** (:func:`check_identical`): digests of the scoring data, the initial weights and
  the masks are all-gathered; a mismatch raises :class:`RankDivergenceError` naming the ranks.

A plain process (no ``WORLD_SIZE`` in the environment) is world size 1: no collective is made
and every code path is the one-process one.
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime as dt
import hashlib
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from torch import Tensor
from torch import distributed as dist

from fishprune.lifetime import exit_with_parent

T = TypeVar("T")

#: The documented (and tested) bound on scores computed on W ranks against one process:
#: float32 sums of the same batch terms in another order.
SCORE_RTOL = 1e-5
SCORE_ATOL = 1e-6


class RankDivergenceError(RuntimeError):
    """Ranks that must hold identical state (data, weights, masks) do not."""


@dataclass(frozen=True)
class World:
    """Where this process stands: its rank, the world size, the backend (None: no group)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        """Rank 0: the only rank that writes artifacts."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when torchrun's (or a compatible launcher's) variables are set."""
    return "WORLD_SIZE" in os.environ and "RANK" in os.environ


def init_from_env(device_type: str = "cpu") -> World:
    """Join the process group that torchrun describes in ``RANK``, ``WORLD_SIZE``,
    ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT``; gloo on the CPU, nccl on CUDA.

    Without those variables, return world size 1 and initialize nothing. Idempotent.
    """
    if dist.is_available() and dist.is_initialized():
        return current_world()
    if not launched_by_torchrun():
        return World()
    size = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["RANK"])
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE is set but this torch build has no torch.distributed")
    backend = "nccl" if device_type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend, rank=rank, world_size=size,
                            timeout=dt.timedelta(minutes=30))
    # torchrun starts the ranks in sessions of their own: a SIGKILLed torchrun would leave them
    # training and writing, racing with a rerun. They stop when their launcher dies.
    exit_with_parent()
    return World(rank, size, local_rank, backend)


def current_world(group: Any = None) -> World:
    """The rank and size in ``group`` (default: the world), or world size 1 without one."""
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(group), dist.get_world_size(group),
                 int(os.environ.get("LOCAL_RANK", "0")), str(dist.get_backend(group)))


def per_rank_batch_size(batch_size: int, world_size: int) -> int:
    """``batch_size / world_size``: the global batch is the configured one whatever W; a batch
    size that W does not divide is refused (a one-line ``ValueError``)."""
    if batch_size % world_size:
        raise ValueError(f"batch_size {batch_size} is not divisible by the world size "
                         f"{world_size}: each rank trains on batch_size / world_size samples, "
                         "so that the global batch (and the result) is the same for every W")
    return batch_size // world_size


def shutdown() -> None:
    """Leave the process group (after a barrier so no rank exits while others still talk)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


# --- reduced scoring ----------------------------------------------------------------------------

_GROUP: contextvars.ContextVar[Any] = contextvars.ContextVar("fishprune_scoring_group",
                                                              default=None)


class _Traffic:
    """Bytes each rank contributed to the scoring all-gathers (for the benchmark)."""

    bytes = 0


traffic = _Traffic()


@contextlib.contextmanager
def reduced_scoring(group: Any) -> Iterator[None]:
    """Inside, :func:`fishprune.score` splits the batches over ``group`` and reduces the
    moments across it (``group``: a process group, ``torch.distributed.group.WORLD``, or None
    for one process). ``fp.score(..., process_group=g)`` does the same for one call."""
    token = _GROUP.set(group)
    try:
        yield
    finally:
        _GROUP.reset(token)


def _active() -> tuple[Any, int, int] | None:
    """(group, rank, size) when scoring is reduced over more than one rank, else None."""
    group = _GROUP.get()
    if group is None or not (dist.is_available() and dist.is_initialized()):
        return None
    size = dist.get_world_size(group)
    if size == 1:
        return None
    return group, dist.get_rank(group), size


def owned(batches: Iterable[T]) -> Iterator[tuple[int, T]]:
    """``(b, batch)`` for the batches this rank computes: ``b mod W == rank`` (all of them in
    one process). ``b`` is the batch's index in the full sequence."""
    active = _active()
    for index, batch in enumerate(batches):
        if active is None or index % active[2] == active[1]:
            yield index, batch


def reduce_sums(sums: list[Tensor], count: int) -> int:
    """Sum ``sums`` (in place) and ``count`` over the scoring ranks; return the total count.

    Every rank all-gathers every rank's sums and adds them in rank order 0, 1, ..., W-1, so the
    result is bit-identical on all ranks. A no-op returning ``count`` in one process.
    """
    active = _active()
    if active is None:
        return count
    group, _, size = active
    for dtype in dict.fromkeys(s.dtype for s in sums):
        members = [s for s in sums if s.dtype == dtype]
        flat = torch.cat([s.reshape(-1) for s in members])
        gathered = [torch.empty_like(flat) for _ in range(size)]
        dist.all_gather(gathered, flat, group=group)
        traffic.bytes += flat.numel() * flat.element_size()
        total = gathered[0]
        for part in gathered[1:]:
            total.add_(part)
        offset = 0
        for s in members:
            s.copy_(total[offset:offset + s.numel()].view_as(s))
            offset += s.numel()
    counts = [torch.zeros(1, dtype=torch.int64, device=sums[0].device if sums else "cpu")
              for _ in range(size)]
    dist.all_gather(counts, torch.tensor([count], dtype=torch.int64, device=counts[0].device),
                    group=group)
    return int(sum(int(c) for c in counts))


# --- agreement ----------------------------------------------------------------------------------


def tensor_digest(tensors: Mapping[str, Tensor]) -> str:
    """SHA-256 over the names, dtypes, shapes and bytes of ``tensors`` (in their order)."""
    h = hashlib.sha256()
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def check_identical(what: str, value: Mapping[str, Tensor] | str, group: Any = None) -> str:
    """All-gather the digest of ``value`` (tensors, or an already computed digest string) and
    raise :class:`RankDivergenceError` naming the ranks that disagree with rank 0.

    Returns the digest. In one process it only computes the digest.
    """
    digest = value if isinstance(value, str) else tensor_digest(value)
    world = current_world(group)
    if world.size == 1:
        return digest
    digests: list[Any] = [None] * world.size
    dist.all_gather_object(digests, digest, group=group)
    bad = [r for r, d in enumerate(digests) if d != digests[0]]
    if bad:
        raise RankDivergenceError(
            f"the {what} differs between ranks: rank(s) {', '.join(map(str, bad))} disagree "
            f"with rank 0 (digests {', '.join(f'{r}:{d[:12]}' for r, d in enumerate(digests))})"
            "; every rank must see the same data, config and code"
        )
    return digest


def data_parallel(group: Any) -> contextlib.AbstractContextManager:
    """:func:`reduced_scoring` for the whole protocol: inside, scoring, the BN-statistics pass,
    training (:func:`shard`, :func:`wrapped`) and evaluation are split over ``group``."""
    return reduced_scoring(group)


def use_data_parallel(group: Any) -> None:
    """:func:`data_parallel` for the rest of this process (a torchrun worker runs one run)."""
    _GROUP.set(group)


def is_main() -> bool:
    """Whether this process is rank 0 of the data-parallel group (always in one process)."""
    active = _active()
    return active is None or active[1] == 0


def agree(value: T) -> T:
    """Rank 0's ``value`` on every rank (a decision made from files, such as "is this stage
    done?", must be the same everywhere or the ranks would wait on different collectives)."""
    active = _active()
    if active is None:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=dist.get_global_rank(active[0], 0), group=active[0])
    return box[0]


def barrier() -> None:
    """Wait for every rank of the data-parallel group (nothing in one process)."""
    active = _active()
    if active is not None:
        dist.barrier(group=active[0])


def reduce_metrics(*values: Tensor) -> tuple[Tensor, ...]:
    """Sums of per-rank metric accumulators (loss sums, correct counts, sample counts), added
    in rank order so every rank gets the same numbers; unchanged in one process."""
    active = _active()
    if active is None:
        return values
    group, _, size = active
    device = values[0].device
    flat = torch.stack([v.detach().to(device, torch.float64) for v in values])
    gathered = [torch.empty_like(flat) for _ in range(size)]
    dist.all_gather(gathered, flat, group=group)
    total = gathered[0]
    for part in gathered[1:]:
        total = total + part
    return tuple(t.to(v.dtype) for t, v in zip(total, values))


class ShardedBatches:
    """This rank's contiguous slice of every batch of ``batches`` (a DistributedSampler-style
    split that keeps the single-process batches: global batch k = the concatenation of the W
    slices, so per-rank batch size = batch size / W).

    Each rank draws the same epoch order and augmentation (the loader is seeded by
    (seed, epoch)) and keeps its slice. :attr:`loss_scale` is ``W · n_rank / n_batch`` for the
    batch last yielded: the rank's mean loss times it, averaged over ranks by DDP, is the mean
    loss of the whole batch, also for a last batch that does not split evenly.
    """

    def __init__(self, batches: Iterable[tuple[Tensor, Tensor]], rank: int, size: int,
                 *, training: bool = False) -> None:
        self.batches, self.rank, self.size, self.training = batches, rank, size, training
        self.loss_scale = 1.0

    def __len__(self) -> int:
        return len(self.batches)  # type: ignore[arg-type]

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for index, (inputs, targets) in enumerate(self.batches):
            n = targets.shape[0]
            if self.training and n < self.size:
                raise ValueError(
                    f"training batch {index} has {n} samples, fewer than the {self.size} ranks: "
                    "choose a batch size and training split whose last batch has at least one "
                    "sample per rank"
                )
            x = torch.tensor_split(inputs, self.size)[self.rank]
            y = torch.tensor_split(targets, self.size)[self.rank]
            if y.shape[0] == 0:
                continue
            self.loss_scale = self.size * y.shape[0] / n
            yield x, y


def shard(batches: Iterable[tuple[Tensor, Tensor]], *, training: bool = False
          ) -> Iterable[tuple[Tensor, Tensor]]:
    """:class:`ShardedBatches` over the data-parallel group; ``batches`` itself in one process.
    With ``training`` every rank must get a non-empty slice of every batch (DDP steps together)."""
    active = _active()
    if active is None:
        return batches
    return ShardedBatches(batches, active[1], active[2], training=training)


def scaled_loss(loss: Tensor, batches: Iterable[Any]) -> Tensor:
    """``loss`` weighted for DDP's gradient average (see :class:`ShardedBatches`)."""
    if isinstance(batches, ShardedBatches):
        return loss * batches.loss_scale
    return loss


def reduce_running_stats_(norms: list[torch.nn.Module]) -> None:
    """BatchNorm running statistics of a cumulative pass (momentum None) over this rank's
    batches → the average over all ranks' batches, each batch weighted equally (as one process
    computes it, up to float summation order)."""
    active = _active()
    if active is None or not norms:
        return
    seen = int(norms[0].num_batches_tracked)
    sums = []
    for m in norms:
        sums += [m.running_mean.mul_(seen), m.running_var.mul_(seen)]
    total = reduce_sums(sums, seen)
    for m in norms:
        m.running_mean.div_(total)
        m.running_var.div_(total)
        m.num_batches_tracked.fill_(total)


@contextlib.contextmanager
def wrapped(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` for data-parallel training: ``DistributedDataParallel`` with BatchNorm
    statistics synchronized across ranks (:func:`_synced_forward`); ``model`` itself in one
    process. The BatchNorm modules are restored on exit; parameters are shared, not copied."""
    active = _active()
    if active is None:
        yield model
        return
    from torch.nn.parallel import DistributedDataParallel

    group = active[0]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.forward = _synced_forward(m, group)  # type: ignore[method-assign]
    device = next(model.parameters()).device
    ids = [device.index if device.index is not None else torch.cuda.current_device()] if (
        device.type == "cuda") else None
    try:
        yield DistributedDataParallel(model, device_ids=ids, process_group=group)
    finally:
        for m in norms:
            del m.forward


class _AllReduceSum(torch.autograd.Function):
    """Differentiable all-reduce (sum): the gradient of every rank's copy is the sum of the
    gradients of all copies, an all-reduce again."""

    @staticmethod
    def forward(ctx: Any, tensor: Tensor, group: Any) -> Tensor:
        ctx.group = group
        out = tensor.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        out = grad.clone()
        dist.all_reduce(out, group=ctx.group)
        return out, None


def _synced_forward(bn: torch.nn.modules.batchnorm._BatchNorm, group: Any):
    """BatchNorm whose train-mode statistics are those of the whole global batch.

    ``torch.nn.SyncBatchNorm`` runs on GPUs only; this version runs on gloo too: the per-channel
    sum and count, then the centred sum of squares, are summed with a differentiable
    all-reduce (its backward sums the gradients across ranks, as SyncBatchNorm's does), so the
    forward and backward equal one process on the whole batch up to float rounding. The
    statistics and the normalization are computed in float64: composed from autograd ops in
    float32, the backward loses the exact cancellations of the fused kernel (measured on a
    ResNet-20 at init: 3e-3 relative gradient error against float64, native 1e-5; in float64
    it is 1e-5 again). Running statistics follow ``F.batch_norm`` (unbiased variance).
    """
    original = type(bn).forward

    def forward(x: Tensor) -> Tensor:
        if not bn.training:
            return original(bn, x)
        dims = [0, *range(2, x.dim())]
        shape = [1, x.shape[1]] + [1] * (x.dim() - 2)
        xd = x.double()  # float64 statistics: see the docstring
        local = torch.cat([xd.sum(dims), xd.new_tensor([x.numel() / x.shape[1]])])
        total = _AllReduceSum.apply(local, group)
        count = total[-1]
        mean = total[:-1] / count
        centred = xd - mean.view(shape)
        var = _AllReduceSum.apply(centred.square().sum(dims), group) / count
        if bn.track_running_stats and bn.running_mean is not None:
            with torch.no_grad():
                bn.num_batches_tracked.add_(1)
                m = (1.0 / float(bn.num_batches_tracked)) if bn.momentum is None else bn.momentum
                n = float(count)
                unbiased = var.detach() * (n / max(n - 1, 1))
                bn.running_mean.mul_(1 - m).add_(mean.detach().to(bn.running_mean.dtype), alpha=m)
                bn.running_var.mul_(1 - m).add_(unbiased.to(bn.running_var.dtype), alpha=m)
        y = (centred * torch.rsqrt(var + bn.eps).view(shape)).to(x.dtype)
        if bn.affine:
            y = y * bn.weight.view(shape) + bn.bias.view(shape)
        return y

    return forward


def active() -> bool:
    """Whether an enclosing :func:`reduced_scoring` spreads the scoring over several ranks."""
    return _active() is not None
