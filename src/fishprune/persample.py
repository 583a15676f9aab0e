"""Per-sample empirical Fisher: ḡ and F̂ with every sample its own batch, exactly.

F̂ = mean_n g_n ⊙ g_n over the samples n (eq. 8 of Gollini Navarrete et al. 2025), computed
without one backward pass per sample: from layer inputs and output gradients captured with hooks
(Linear, HF ``Conv1D``, Conv1d/Conv2d), else with ``torch.func`` per-sample gradients, else (where
``vmap`` cannot batch) one backward pass per sample. See :func:`_per_sample_moments`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fishprune import distributed
from fishprune.batches import Batch, Inputs, batch_size, take
from fishprune.hvp import _setting
from fishprune.losses import (
    Loss,
    LossFn,
    Moments,
    _zeros,
    batch_loss,
    call_model,
    gradients,
    logits_of,
)
from fishprune.params import is_hf_conv1d


def _per_sample_moments(
    model: nn.Module, params: dict[str, nn.Parameter], batches: Iterable[Batch], loss_fn: LossFn
) -> Moments:
    """ḡ and F̂ with every sample its own batch, exactly, without per-sample backward passes.

    Layer inputs a and output gradients δ are captured with hooks; for a Linear layer
    Σ_n (δ_n a_nᵀ)² = (δ²)ᵀ(a²) is one matrix product; for convolutions the per-sample gradients
    δ_n · unfold(a_n)ᵀ are formed in chunks and squared. The hooks are used only where the
    layer's input has the samples on dim 0: it is called once per forward, its input's leading
    dim is N on the batch and 1 on a one-sample probe forward (sequence-first layers give T and
    T, tokens flattened to (N·T, d) give N·T and T). Every other weight (a layer called twice,
    another layout, Conv3d, non-zero padding modes, biases, embeddings, norms, tied weights)
    falls back to ``torch.func`` per-sample gradients. A batch of one sample is its own gradient.
    The loss must be a mean over the batch, as cross-entropy's default, and the forward must
    treat the samples independently (no BatchNorm in train mode).
    """
    names, tensors = list(params), list(params.values())
    owners = _owner_modules(model, params)
    hooked = {name: mod for name, mod in owners.items() if _hookable(mod)}
    sums = {n: _zeros(p) for n, p in params.items()}
    squares = {n: _zeros(p) for n, p in params.items()}
    _, info = _setting()
    samples_first: dict[str, bool] | None = None
    count = 0
    for index, (inputs, targets) in distributed.owned(batches):  # distributed: b on b mod W
        n_batch = batch_size(inputs)
        if samples_first is None:
            samples_first = _probe_layouts(model, hooked, inputs)
        with _Capture(hooked) as capture:
            loss = batch_loss(model, (inputs, targets), loss_fn, index=index) * n_batch  # Σ_n ℓ_n
            grads = gradients(loss, tensors)
        for name, g in zip(names, grads):
            sums[name].add_(g)
        if n_batch == 1:  # the batch gradient is the one per-sample gradient
            for name, g in zip(names, grads):
                squares[name].addcmul_(g, g)
            count += 1
            continue
        exact = [n for n in hooked if capture.calls[n] == 1 and samples_first[n]
                 and capture.inputs[n].shape[0] == n_batch and n in capture.grads]
        for name in exact:
            squares[name].add_(
                _squared_grad_sum(hooked[name], capture.inputs[name], capture.grads[name]))
        rest = {n: params[n] for n in names if n not in exact}
        if rest:
            for name in rest:
                if name not in info.per_sample_fallback:
                    info.per_sample_fallback.append(name)
            fb = _func_squared_grads(model, rest, inputs, targets, loss_fn)
            for name, sq in fb.items():
                squares[name].add_(sq)
        count += n_batch
    count = distributed.reduce_sums([*sums.values(), *squares.values()], count)  # distributed
    for name in names:
        sums[name].div_(count)
        squares[name].div_(count)
    return Moments(sums, squares, count)


def _probe_layouts(model: nn.Module, hooked: dict[str, nn.Module], inputs: Inputs
                   ) -> dict[str, bool]:
    """Per hooked weight: does its layer see one row per sample on dim 0 of a 1-sample forward?

    A forward of the first sample alone (no grad, the caller's RNG state restored): a layer whose
    input has the samples on dim 0 sees a leading dim of 1 there.
    """
    if not hooked:
        return {}
    devices = [t.device for t in ([inputs] if isinstance(inputs, Tensor) else
                                  [v for v in inputs.values() if isinstance(v, Tensor)])]
    cuda = sorted({d.index or 0 for d in devices if d.type == "cuda"})
    with torch.random.fork_rng(devices=cuda), torch.no_grad(), _Capture(hooked, grads=False) as c:
        call_model(model, take(inputs, slice(0, 1)))
    return {n: c.calls[n] == 1 and c.inputs[n].shape[0] == 1 for n in hooked}


def _owner_modules(model: nn.Module, params: dict[str, nn.Parameter]) -> dict[str, nn.Module]:
    owners: dict[str, nn.Module] = {}
    uses: dict[int, int] = {}
    for module in model.modules():
        for p in module.parameters(recurse=False):
            uses[id(p)] = uses.get(id(p), 0) + 1
    for name in params:
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        if attr == "weight" and uses[id(params[name])] == 1:
            owners[name] = module
        else:
            owners[name] = nn.Identity()  # not hookable: handled by torch.func
    return owners


def _hookable(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear) or is_hf_conv1d(module):
        return True
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return module.padding_mode == "zeros" and not isinstance(module.padding, str)
    return False


class _Capture:
    """Forward hooks that keep each layer's input and the gradient of its output."""

    def __init__(self, modules: dict[str, nn.Module], *, grads: bool = True) -> None:
        self.modules = modules
        self.keep_grads = grads
        self.inputs: dict[str, Tensor] = {}
        self.grads: dict[str, Tensor] = {}
        self.calls = dict.fromkeys(modules, 0)
        self._handles: list = []

    def __enter__(self) -> _Capture:
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self._handles:
            handle.remove()

    def _hook(self, name: str):
        def hook(module: nn.Module, args: tuple, output: Tensor) -> None:
            self.calls[name] += 1
            self.inputs[name] = args[0].detach() if args else torch.empty(0)
            if not self.keep_grads or not isinstance(output, Tensor) or not output.requires_grad:
                return

            def keep(grad: Tensor) -> None:
                self.grads[name] = grad.detach()

            output.register_hook(keep)

        return hook


_CHUNK_ELEMENTS = 1 << 25  # bound on the per-sample gradient tensor formed at once (128 MB fp32)


def _squared_grad_sum(module: nn.Module, a: Tensor, delta: Tensor) -> Tensor:
    """Σ_n (∂ℓ_n/∂W)² for one layer from its inputs ``a`` and output gradients ``delta``."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    a, delta = a.to(dtype), delta.to(dtype)
    if is_hf_conv1d(module):  # y = a W + b, W (in, out): the Linear result, transposed
        a, delta = a.reshape(a.shape[0], -1, a.shape[-1]), delta.reshape(delta.shape[0], -1,
                                                                          delta.shape[-1])
        return _chunked_square_sum(lambda s: torch.bmm(a[s].transpose(1, 2), delta[s]),
                                   a.shape[0], module.weight.numel())
    if isinstance(module, nn.Linear):
        if a.dim() == 2:  # (N, in), (N, out): Σ_n δ_n² a_n²ᵀ
            return delta.square().t() @ a.square()
        a = a.reshape(a.shape[0], -1, a.shape[-1])  # (N, T, in)
        delta = delta.reshape(delta.shape[0], -1, delta.shape[-1])  # (N, T, out)
        return _chunked_square_sum(lambda s: torch.bmm(delta[s].transpose(1, 2), a[s]), a.shape[0],
                                   module.weight.numel())
    conv1d = isinstance(module, nn.Conv1d)
    if conv1d:  # treat (N, C, L) as (N, C, 1, L)
        a, delta = a.unsqueeze(2), delta.unsqueeze(2)
        kernel, dilation = (1, module.kernel_size[0]), (1, module.dilation[0])
        padding, stride = (0, module.padding[0]), (1, module.stride[0])
    else:
        kernel, dilation = module.kernel_size, module.dilation
        padding, stride = module.padding, module.stride
    groups, c_out = module.groups, module.out_channels
    n = a.shape[0]

    def per_sample(s: slice) -> Tensor:
        cols = F.unfold(a[s], kernel, dilation=dilation, padding=padding, stride=stride)
        cols = cols.reshape(cols.shape[0], groups, -1, cols.shape[-1])  # (n, G, C_in/G·k, L)
        d = delta[s].reshape(cols.shape[0], groups, c_out // groups, -1)  # (n, G, C_out/G, L)
        return torch.einsum("ngol,ngil->ngoi", d, cols)  # (n, G, C_out/G, C_in/G·k)

    total = _chunked_square_sum(per_sample, n, module.weight.numel())
    return total.reshape(module.weight.shape)


def _chunked_square_sum(per_sample: Callable[[slice], Tensor], n: int, numel: int) -> Tensor:
    step = max(1, _CHUNK_ELEMENTS // max(numel, 1))
    total = None
    for start in range(0, n, step):
        block = per_sample(slice(start, min(n, start + step)))
        part = block.square().sum(0)
        total = part if total is None else total.add_(part)
    assert total is not None
    return total


def _func_squared_grads(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    inputs: Inputs,
    targets: Tensor,
    loss_fn: LossFn,
) -> dict[str, Tensor]:
    """Σ_n (∂ℓ_n/∂w)² with ``torch.func.vmap(grad)``: the general (slower) per-sample path."""
    from torch.func import functional_call, grad, vmap

    frozen = {n: t.detach() for n, t in model.named_parameters() if n not in params}
    frozen.update(dict(model.named_buffers()))
    output_fn = loss_fn.output_fn if isinstance(loss_fn, Loss) else logits_of
    if isinstance(inputs, Tensor):
        batched: dict[str, Tensor] = {"": inputs}
        static: dict[str, Any] = {}
    else:
        batched = {k: v for k, v in inputs.items() if isinstance(v, Tensor)}
        static = {k: v for k, v in inputs.items() if not isinstance(v, Tensor)}

    def sample_loss(p: dict[str, Tensor], x: dict[str, Tensor], y: Tensor) -> Tensor:
        one = {k: v.unsqueeze(0) for k, v in x.items()}
        if isinstance(inputs, Tensor):
            out = functional_call(model, {**frozen, **p}, (one[""],))
        else:
            out = functional_call(model, {**frozen, **p}, (), {**one, **static})
        return loss_fn(output_fn(out), y.unsqueeze(0))

    detached = {n: p.detach() for n, p in params.items()}
    numel = sum(p.numel() for p in params.values())
    step = max(1, _CHUNK_ELEMENTS // max(numel, 1))
    out = {n: _zeros(p) for n, p in params.items()}
    for start in range(0, targets.shape[0], step):
        s = slice(start, start + step)
        chunk = {k: v[s] for k, v in batched.items()}
        try:
            per = vmap(grad(sample_loss), in_dims=(None, 0, 0))(detached, chunk, targets[s])
        except RuntimeError as error:
            if "randomness" not in str(error):
                # An operator vmap cannot batch (recurrent layers' in-place kernels): one
                # backward pass per sample, the definition itself.
                return _loop_squared_grads(model, params, inputs, targets, loss_fn)
            raise ValueError(
                f"per_sample=True: {', '.join(params)} need torch.func per-sample gradients, "
                "which cannot replay the random draws of the batch's forward (dropout in "
                "mode='train'): use mode='eval', or per_sample=False"
            ) from error
        for name, g in per.items():
            out[name].add_(g.to(out[name].dtype).square().sum(0))
    return out


def _loop_squared_grads(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    inputs: Inputs,
    targets: Tensor,
    loss_fn: LossFn,
) -> dict[str, Tensor]:
    """Σ_n (∂ℓ_n/∂w)² with one backward pass per sample (where ``vmap`` cannot batch)."""
    names, tensors = list(params), list(params.values())
    out = {n: _zeros(p) for n, p in params.items()}
    for i in range(targets.shape[0]):
        rows = slice(i, i + 1)
        grads = gradients(batch_loss(model, (take(inputs, rows), targets[rows]), loss_fn), tensors)
        for name, g in zip(names, grads):
            out[name].addcmul_(g.to(out[name].dtype), g.to(out[name].dtype))
    return out
