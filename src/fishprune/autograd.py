"""Shared autograd math for the criteria: gradient moments, per-sample Fisher, Hessian products.

Every criterion calls these helpers; none re-implements them. Notation (REFERENCE.md): for
scoring batches B_1..B_M, g_b = ∇_w ℓ(B_b) is the gradient of the batch-mean loss,
ḡ = mean_b g_b and F̂ = mean_b g_b ⊙ g_b (the batch-wise empirical Fisher diagonal, eq. 16 of
Gollini Navarrete et al. 2025). With ``per_sample=True`` every sample is its own batch (eq. 8),
computed without one backward pass per sample.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fishprune import distributed
from fishprune.batches import Batch

LossFn = Callable[[Tensor, Tensor], Tensor]


def gradients(outputs: Tensor | list[Tensor], inputs: list[Tensor], **kwargs) -> tuple[Tensor, ...]:
    """``torch.autograd.grad``, with zeros for weights the loss does not use (an unused head)."""
    return torch.autograd.grad(outputs, inputs, allow_unused=True, materialize_grads=True, **kwargs)


def _zeros(like: Tensor) -> Tensor:
    """An accumulator for ``like``: float32, or float64 for float64 weights (sums of squares
    in a lower precision than the weights would make float64 scoring no more exact than float32)."""
    return torch.zeros_like(like, dtype=torch.promote_types(like.dtype, torch.float32))


@dataclass(frozen=True)
class Moments:
    """First and second moments of the scoring gradients, keyed like the parameters."""

    mean: dict[str, Tensor]  # ḡ
    sq_mean: dict[str, Tensor]  # F̂
    count: int  # number of gradients averaged (batches, or samples when per-sample)


def batch_loss(model: nn.Module, batch: Batch, loss_fn: LossFn, temperature: float = 1.0) -> Tensor:
    """ℓ(B) with the outputs divided by ``temperature`` (GraSP and Hutchinson use T = 200)."""
    inputs, targets = batch
    outputs = model(inputs)
    if temperature != 1.0:
        outputs = outputs / temperature
    return loss_fn(outputs, targets)


def gradient_moments(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    batches: Iterable[Batch],
    loss_fn: LossFn,
    *,
    per_sample: bool = False,
) -> Moments:
    """ḡ and F̂ in one forward+backward pass per batch (Algorithm 1 of the FTS paper)."""
    if per_sample:
        return _per_sample_moments(model, params, batches, loss_fn)
    names, tensors = list(params), list(params.values())
    sums = [_zeros(p) for p in tensors]
    squares = [_zeros(p) for p in tensors]
    count = 0
    for _, batch in distributed.owned(batches):  # distributed: batch b on rank b mod W
        grads = gradients(batch_loss(model, batch, loss_fn), tensors)
        grads = [g.to(s.dtype) for g, s in zip(grads, sums)]
        torch._foreach_add_(sums, grads)
        torch._foreach_addcmul_(squares, grads, grads)
        count += 1
    count = distributed.reduce_sums(sums + squares, count)  # distributed: sums over ranks
    torch._foreach_div_(sums, count)
    torch._foreach_div_(squares, count)
    return Moments(dict(zip(names, sums)), dict(zip(names, squares)), count)


def mean_gradient(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    batches: Iterable[Batch],
    loss_fn: LossFn,
    *,
    temperature: float = 1.0,
) -> dict[str, Tensor]:
    """ḡ = mean_b ∇_w ℓ(B_b), the outputs divided by ``temperature``."""
    names, tensors = list(params), list(params.values())
    sums = [_zeros(p) for p in tensors]
    count = 0
    for _, batch in distributed.owned(batches):  # distributed: batch b on rank b mod W
        grads = gradients(batch_loss(model, batch, loss_fn, temperature), tensors)
        torch._foreach_add_(sums, [g.to(s.dtype) for g, s in zip(grads, sums)])
        count += 1
    count = distributed.reduce_sums(sums, count)  # distributed: sums over ranks
    torch._foreach_div_(sums, count)
    return dict(zip(names, sums))


def hessian_vector_mean(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    batches: Iterable[Batch],
    loss_fn: LossFn,
    vector: dict[str, Tensor],
    *,
    temperature: float = 1.0,
) -> dict[str, Tensor]:
    """mean_b H_b v: the Hessian of each batch loss times a fixed vector ``v`` (held constant)."""
    names, tensors = list(params), list(params.values())
    v = [vector[n].to(p.dtype) for n, p in zip(names, tensors)]
    sums = [_zeros(p) for p in tensors]
    count = 0
    for _, batch in distributed.owned(batches):  # distributed: batch b on rank b mod W
        grads = gradients(
            batch_loss(model, batch, loss_fn, temperature), tensors, create_graph=True
        )
        hv = gradients(grads, tensors, grad_outputs=v)
        torch._foreach_add_(sums, [h.to(s.dtype) for h, s in zip(hv, sums)])
        count += 1
    count = distributed.reduce_sums(sums, count)  # distributed: sums over ranks
    torch._foreach_div_(sums, count)
    return dict(zip(names, sums))


def hutchinson_diagonal(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    batches: Iterable[Batch],
    loss_fn: LossFn,
    *,
    probes: int,
    temperature: float,
    generator: torch.Generator,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """(ḡ, ĥ): the mean gradient and Hutchinson's Hessian-diagonal estimate, in one pass.

    ĥ = mean over batches b and Rademacher probes z of z ⊙ (H_b z) (Hutchinson 1989;
    Bekas et al. 2007), unbiased for diag(H). Probes are drawn on the CPU from ``generator``
    so that a seed gives the same estimate on every device.
    """
    names, tensors = list(params), list(params.values())
    g_sum = [_zeros(p) for p in tensors]
    h_sum = [_zeros(p) for p in tensors]
    count = 0
    drawn = 0  # batches whose probes the generator has drawn
    for index, batch in distributed.owned(batches):  # distributed: batch b on rank b mod W
        _skip_probes(tensors, generator, (index - drawn) * probes)  # the other ranks' batches
        drawn = index + 1
        grads = gradients(
            batch_loss(model, batch, loss_fn, temperature), tensors, create_graph=True
        )
        torch._foreach_add_(g_sum, [g.detach().to(s.dtype) for g, s in zip(grads, g_sum)])
        for probe in range(probes):
            z = [_rademacher(p, generator) for p in tensors]
            hz = gradients(grads, tensors, grad_outputs=z, retain_graph=probe < probes - 1)
            torch._foreach_addcmul_(
                h_sum, [zi.to(s.dtype) for zi, s in zip(z, h_sum)],
                [h.to(s.dtype) for h, s in zip(hz, h_sum)],
            )
        count += 1
    count = distributed.reduce_sums(g_sum + h_sum, count)  # distributed: sums over ranks
    torch._foreach_div_(g_sum, count)
    torch._foreach_div_(h_sum, count * probes)
    return dict(zip(names, g_sum)), dict(zip(names, h_sum))


def _rademacher(like: Tensor, generator: torch.Generator) -> Tensor:
    signs = torch.randint(0, 2, like.shape, generator=generator, dtype=torch.int8)
    return (signs.to(like.dtype) * 2 - 1).to(like.device)


def _skip_probes(tensors: list[Tensor], generator: torch.Generator, probes: int) -> None:
    """Advance ``generator`` past ``probes`` probes exactly as :func:`_rademacher` draws them
    (distributed: a rank skips the batches of the others, so every batch keeps its probes)."""
    for _ in range(probes):
        for p in tensors:
            torch.randint(0, 2, p.shape, generator=generator, dtype=torch.int8)


# --- per-sample empirical Fisher -----------------------------------------------------------------


def _per_sample_moments(
    model: nn.Module, params: dict[str, nn.Parameter], batches: Iterable[Batch], loss_fn: LossFn
) -> Moments:
    """ḡ and F̂ with every sample its own batch, exactly, without per-sample backward passes.

    Layer inputs a and output gradients δ are captured with hooks; for a Linear layer
    Σ_n (δ_n a_nᵀ)² = (δ²)ᵀ(a²) is one matrix product; for convolutions the per-sample gradients
    δ_n · unfold(a_n)ᵀ are formed in chunks and squared. Layers the hooks cannot handle (a module
    called twice per forward, Conv3d, non-zero padding modes) fall back to ``torch.func``
    per-sample gradients. The loss must be a mean over the batch, as cross-entropy's default.
    """
    names, tensors = list(params), list(params.values())
    owners = _owner_modules(model, params)
    hooked = {name: mod for name, mod in owners.items() if _hookable(mod)}
    fallback = [n for n in names if n not in hooked]
    sums = {n: _zeros(p) for n, p in params.items()}
    squares = {n: _zeros(p) for n, p in params.items()}
    count = 0
    for _, (inputs, targets) in distributed.owned(batches):  # distributed: b on rank b mod W
        n_batch = inputs.shape[0]
        with _Capture(hooked) as capture:
            loss = batch_loss(model, (inputs, targets), loss_fn) * n_batch  # Σ_n ℓ_n
            grads = gradients(loss, tensors)
        for name, g in zip(names, grads):
            sums[name].add_(g)
        reused = [n for n in hooked if capture.calls[n] != 1]  # its hooks saw only one call
        for name, module in hooked.items():
            if name not in reused:
                sq = _squared_grad_sum(module, capture.inputs[name], capture.grads[name])
                squares[name].add_(sq)
        if fallback or reused:
            rest = {n: params[n] for n in names if n in fallback or n in reused}
            fb = _func_squared_grads(model, rest, inputs, targets, loss_fn)
            for name, sq in fb.items():
                squares[name].add_(sq)
        count += n_batch
    count = distributed.reduce_sums([*sums.values(), *squares.values()], count)  # distributed
    for name in names:
        sums[name].div_(count)
        squares[name].div_(count)
    return Moments(sums, squares, count)


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
    if isinstance(module, nn.Linear):
        return True
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        return module.padding_mode == "zeros" and not isinstance(module.padding, str)
    return False


class _Capture:
    """Forward hooks that keep each layer's input and the gradient of its output."""

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
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
            self.inputs[name] = args[0].detach()

            def keep(grad: Tensor) -> None:
                self.grads[name] = grad.detach()

            output.register_hook(keep)

        return hook


_CHUNK_ELEMENTS = 1 << 25  # bound on the per-sample gradient tensor formed at once (128 MB fp32)


def _squared_grad_sum(module: nn.Module, a: Tensor, delta: Tensor) -> Tensor:
    """Σ_n (∂ℓ_n/∂W)² for one layer from its inputs ``a`` and output gradients ``delta``."""
    dtype = torch.promote_types(a.dtype, torch.float32)
    a, delta = a.to(dtype), delta.to(dtype)
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
    inputs: Tensor,
    targets: Tensor,
    loss_fn: LossFn,
) -> dict[str, Tensor]:
    """Σ_n (∂ℓ_n/∂w)² with ``torch.func.vmap(grad)``: the general (slower) per-sample path."""
    from torch.func import functional_call, grad, vmap

    frozen = {n: t.detach() for n, t in model.named_parameters() if n not in params}
    frozen.update(dict(model.named_buffers()))

    def sample_loss(p: dict[str, Tensor], x: Tensor, y: Tensor) -> Tensor:
        out = functional_call(model, {**frozen, **p}, (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    detached = {n: p.detach() for n, p in params.items()}
    numel = sum(p.numel() for p in params.values())
    step = max(1, _CHUNK_ELEMENTS // max(numel, 1))
    out = {n: _zeros(p) for n, p in params.items()}
    for start in range(0, inputs.shape[0], step):
        s = slice(start, start + step)
        per = vmap(grad(sample_loss), in_dims=(None, 0, 0))(detached, inputs[s], targets[s])
        for name, g in per.items():
            out[name].add_(g.to(out[name].dtype).square().sum(0))
    return out
