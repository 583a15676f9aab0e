"""``score``: run one criterion on a model and leave the model exactly as it was."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fishprune import distributed
from fishprune.batches import Batches
from fishprune.criteria import Context, get_criterion
from fishprune.hvp import HVP_METHODS, ScoreInfo, hvp_setting
from fishprune.losses import Loss, LossFn, OutputFn, logits_of
from fishprune.modes import restored_modes
from fishprune.params import Selector, prunable_parameters, require_prunable

MODES = ("eval", "train")
ON_EMPTY = ("warn", "error", "ignore")


class LayerCollapseWarning(UserWarning):
    """A mask keeps no weight of some layer (layer collapse, Tanaka et al. 2020)."""


def check_empty_layers(masks: dict[str, Tensor], on_empty: str, *, stacklevel: int = 3) -> None:
    """Warn (``"warn"``), raise a ``ValueError`` (``"error"``) or do nothing (``"ignore"``) when
    a mask keeps no weight of a tensor: an empty layer disconnects the network."""
    if on_empty not in ON_EMPTY:
        raise ValueError(f"on_empty must be one of {', '.join(ON_EMPTY)}, got {on_empty!r}")
    empty = [n for n, m in masks.items() if m.numel() and not bool(m.any())]
    if not empty or on_empty == "ignore":
        return
    message = (f"layer collapse: the mask keeps no weight of {len(empty)} tensor(s): "
               f"{', '.join(empty)} (lower the sparsity, use scope='layer', or a warm-up)")
    if on_empty == "error":
        raise ValueError(message)
    warnings.warn(message, LayerCollapseWarning, stacklevel=stacklevel)


def score(
    model: nn.Module,
    criterion: str,
    batches: Iterable[Any] | None,
    *,
    loss_fn: LossFn | None = None,
    seed: int = 0,
    mode: str = "eval",
    exclude: Iterable[str] = (),
    include: Iterable[Selector] = (),
    output_fn: OutputFn | None = None,
    hvp: str = "auto",
    return_info: bool = False,
    process_group: Any = None,
    **options: Any,
) -> Any:
    """Score every prunable weight of ``model`` with ``criterion``; higher = keep.

    Args:
        model: any ``nn.Module``; its prunable weights are :func:`fishprune.prunable_parameters`.
        criterion: a name from :func:`fishprune.criteria`.
        batches: an iterable of batches (a DataLoader, a list): ``(inputs, targets)`` pairs,
            ``(dict_of_inputs, targets)`` pairs (the model is called as ``model(**inputs)``), or
            dicts whose ``labels`` are the targets and whose other entries are the model's
            keyword inputs (Hugging Face style). Samples on dim 0. The batches
            are the estimator: ḡ is the mean of the batch-mean gradients and F̂ the mean of
            their squares. Data-free criteria (random, magnitude, synflow with ``input_shape``)
            accept ``None``.
        loss_fn: ``loss_fn(logits, targets)`` returning the batch-mean loss; cross-entropy by
            default.
        output_fn: ``output_fn(outputs) -> logits`` for models whose outputs are neither a
            tensor, a tuple (the first element is taken) nor a dict / ``ModelOutput`` with
            ``logits``.
        seed: seeds the random criterion and the Hutchinson probes (CPU generators), and the
            global RNG for stochastic layers (dropout with ``mode="train"``); the caller's RNG
            state is restored afterwards.
        mode: ``"eval"`` (default, as the reference code) or ``"train"`` (batch statistics in
            BatchNorm; running statistics are restored afterwards).
        exclude: glob patterns of parameter names never scored nor pruned.
        include: more weights to score beyond the default (glob patterns of parameter names or
            module types, e.g. ``nn.Embedding``, ``"*.bias"``); see
            :func:`fishprune.prunable_parameters`.
        hvp: how GraSP and the Hutchinson criteria compute Hessian-vector products: ``"auto"``
            (exact double backpropagation; where an operator lacks a second derivative, exact
            under the math SDPA kernel, else central finite differences, with a warning),
            ``"exact"`` (an error instead of a fallback) or ``"fd"``.
        return_info: also return a :class:`fishprune.ScoreInfo` saying how the scores were
            computed (the HVP method, per-sample fallbacks).
        process_group: a ``torch.distributed`` process group (``torch.distributed.group.WORLD``
            for all ranks): batch b is computed by rank b mod W and the moments are summed
            across the group in rank order, so every rank returns bit-identical scores, equal to
            one process's up to float summation order (:mod:`fishprune.distributed`). Every
            rank must pass the same batches and the same (unwrapped, not DDP) model. None: the
            enclosing :func:`fishprune.distributed.reduced_scoring`, if any, else one process.
        **options: the criterion's own options (see ``fishprune criteria``), e.g. ``probes``.

    Returns:
        ``{name: scores}`` (``(scores, info)`` with ``return_info=True``) with the names and
        shapes of the prunable weights, detached, float32
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
    if hvp not in HVP_METHODS:
        raise ValueError(f"hvp must be one of {', '.join(HVP_METHODS)}, got {hvp!r}")
    exclude = (exclude,) if isinstance(exclude, str) else tuple(exclude)
    include = (include,) if isinstance(include, (str, type)) else tuple(include)
    params = require_prunable(model, exclude, include)
    device = next(iter(params.values())).device
    if batches is None and crit.needs_data:
        raise ValueError(f"criterion '{crit.name}' needs (inputs, targets) batches, got None")
    if mode == "train" and getattr(opts, "per_sample", False) and _has_batchnorm(model):
        raise ValueError(
            "per_sample=True needs per-sample-independent forward passes: use mode='eval' "
            "(BatchNorm in train mode mixes the samples of a batch)"
        )
    data = None if batches is None else Batches(batches, device, replay=crit.passes > 1)
    loss = Loss(loss_fn or F.cross_entropy, output_fn or logits_of)
    ctx = Context(loss_fn=loss, seed=seed, prunable=prunable_parameters(model, include=include))
    info = ScoreInfo(criterion=crit.name)
    group = contextlib.nullcontext() if process_group is None else (  # distributed hook
        distributed.reduced_scoring(process_group))
    with group, preserved(model, params), seeded_rng(seed, device), hvp_setting(hvp, info):
        model.train(mode == "train")
        raw = crit.fn(model, params, data, ctx, opts)
    scores = _checked(raw, params, crit.name)
    return (scores, info) if return_info else scores


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
