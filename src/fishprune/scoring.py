"""``score``: run one criterion on a model and leave the model exactly as it was."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fishprune import distributed
from fishprune.autograd import LossFn
from fishprune.batches import Batches
from fishprune.criteria import Context, get_criterion
from fishprune.modes import restored_modes
from fishprune.params import prunable_parameters, require_prunable

MODES = ("eval", "train")


def score(
    model: nn.Module,
    criterion: str,
    batches: Iterable[Any] | None,
    *,
    loss_fn: LossFn | None = None,
    seed: int = 0,
    mode: str = "eval",
    exclude: Iterable[str] = (),
    process_group: Any = None,
    **options: Any,
) -> dict[str, Tensor]:
    """Score every prunable weight of ``model`` with ``criterion``; higher = keep.

    Args:
        model: any ``nn.Module``; its prunable weights are :func:`fishprune.prunable_parameters`.
        criterion: a name from :func:`fishprune.criteria`.
        batches: an iterable of ``(inputs, targets)`` pairs (a DataLoader, a list). The batches
            are the estimator: ḡ is the mean of the batch-mean gradients and F̂ the mean of
            their squares. Data-free criteria (random, magnitude, synflow with ``input_shape``)
            accept ``None``.
        loss_fn: ``loss_fn(outputs, targets)`` returning the batch-mean loss; cross-entropy by
            default.
        seed: seeds the random criterion and the Hutchinson probes (CPU generators), and the
            global RNG for stochastic layers (dropout with ``mode="train"``); the caller's RNG
            state is restored afterwards.
        mode: ``"eval"`` (default, as the reference code) or ``"train"`` (batch statistics in
            BatchNorm; running statistics are restored afterwards).
        exclude: glob patterns of parameter names never scored nor pruned.
        process_group: a ``torch.distributed`` process group (``torch.distributed.group.WORLD``
            for all ranks): batch b is computed by rank b mod W and the moments are summed
            across the group in rank order, so every rank returns bit-identical scores, equal to
            one process's up to float summation order (:mod:`fishprune.distributed`). Every
            rank must pass the same batches and the same (unwrapped, not DDP) model. None: the
            enclosing :func:`fishprune.distributed.reduced_scoring`, if any, else one process.
        **options: the criterion's own options (see ``fishprune criteria``), e.g. ``probes``.

    Returns:
        ``{name: scores}`` with the names and shapes of the prunable weights, detached, float32
        (float64 for synflow, and for float64 weights except with random), on the weights' device.

    The model is left as found: parameters, buffers, ``.grad``, ``requires_grad`` and the
    train/eval flag of every submodule.
    """
    crit = get_criterion(criterion)
    opts = crit.parse_options(options)
    if mode not in MODES:
        raise ValueError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    params = require_prunable(model, exclude)
    device = next(iter(params.values())).device
    if batches is None and crit.needs_data:
        raise ValueError(f"criterion '{crit.name}' needs (inputs, targets) batches, got None")
    if mode == "train" and getattr(opts, "per_sample", False) and _has_batchnorm(model):
        raise ValueError(
            "per_sample=True needs per-sample-independent forward passes: use mode='eval' "
            "(BatchNorm in train mode mixes the samples of a batch)"
        )
    data = None if batches is None else Batches(batches, device, replay=crit.passes > 1)
    ctx = Context(loss_fn=loss_fn or F.cross_entropy, seed=seed,
                  prunable=prunable_parameters(model))
    group = contextlib.nullcontext() if process_group is None else (  # distributed hook
        distributed.reduced_scoring(process_group))
    with group, preserved(model, params), seeded_rng(seed, device):
        model.train(mode == "train")
        raw = crit.fn(model, params, data, ctx, opts)
    return _checked(raw, params, crit.name)


def _has_batchnorm(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@contextlib.contextmanager
def preserved(model: nn.Module, params: dict[str, nn.Parameter]) -> Iterator[None]:
    """Restore flags, ``requires_grad``, ``.grad`` and buffers of ``model`` on exit.

    Inside, the prunable weights require grad and every other parameter does not (their
    gradients are never needed), ``.grad`` is None (so a ``backward()`` cannot accumulate into
    the caller's gradient tensors), and autograd is enabled.
    """
    all_params = list(model.parameters())
    flags = [p.requires_grad for p in all_params]
    grads = [p.grad for p in all_params]
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    wanted = {id(p) for p in params.values()}
    try:
        for p in all_params:
            p.requires_grad_(id(p) in wanted)
            p.grad = None
        with restored_modes(model), torch.enable_grad():
            yield
    finally:
        for p, flag, grad in zip(all_params, flags, grads):
            p.requires_grad_(flag)
            p.grad = grad
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed the global CPU (and the model's CUDA) RNG inside; restore the caller's state after."""
    cuda = [device.index if device.index is not None else torch.cuda.current_device()] if (
        device.type == "cuda"
    ) else []
    with torch.random.fork_rng(devices=cuda):
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.default_generators[cuda[0]].manual_seed(seed)
        yield


def _checked(
    raw: dict[str, Tensor], params: dict[str, nn.Parameter], name: str
) -> dict[str, Tensor]:
    if list(raw) != list(params):
        raise RuntimeError(f"criterion '{name}' returned keys {list(raw)}, expected {list(params)}")
    out = {}
    for key, s in raw.items():
        if s.shape != params[key].shape:
            raise RuntimeError(f"criterion '{name}' returned shape {tuple(s.shape)} for {key}")
        out[key] = s.detach()
    return out


def validate_sparsity(sparsity: Any) -> float:
    """Return ``sparsity`` as a float in [0, 1), or raise a one-line ``ValueError``."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise ValueError(f"sparsity must be a number in [0, 1), got {sparsity!r}")
    value = float(sparsity)
    if math.isnan(value) or not 0.0 <= value < 1.0:
        raise ValueError(
            f"sparsity must be in [0, 1) (the pruned fraction; 0.98 keeps 2%), got {sparsity!r}"
        )
    return value
