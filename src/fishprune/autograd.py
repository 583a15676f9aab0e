"""Shared autograd math for the criteria: gradient moments, per-sample Fisher, Hessian products.

Every criterion calls these helpers; none re-implements them. Notation (REFERENCE.md): for
scoring batches B_1..B_M, g_b = ∇_w ℓ(B_b) is the gradient of the batch-mean loss,
ḡ = mean_b g_b and F̂ = mean_b g_b ⊙ g_b (the batch-wise empirical Fisher diagonal, eq. 16 of
Gollini Navarrete et al. 2025). With ``per_sample=True`` every sample is its own batch (eq. 8),
computed without one backward pass per sample.

Models are called as ``model(inputs)`` or ``model(**inputs)`` (dict inputs); their outputs go
through an ``output_fn`` to the logits (:func:`logits_of` by default: a tensor, the first element
of a tuple, or ``outputs["logits"]`` of a dict / Hugging Face ``ModelOutput``).

Hessian-vector products (GraSP, Hutchinson) use exact double backpropagation when the model's
operators have second derivatives; when one does not (e.g. ``hardsigmoid_backward``, the fused
CPU flash-attention kernel), ``hvp="auto"`` retries under the math SDPA kernel, then with central
finite differences of gradients (:func:`fd_step`). The method used is reported (a warning and
:class:`ScoreInfo`), never changed silently.
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fishprune import distributed
from fishprune.batches import Batch, Inputs, batch_size, take

LossFn = Callable[[Tensor, Tensor], Tensor]
OutputFn = Callable[[Any], Tensor]

#: Values of ``hvp=``: "auto" (exact, else exact under the math SDPA kernel, else finite
#: differences), "exact" (double backpropagation or an error), "fd" (finite differences).
HVP_METHODS = ("auto", "exact", "fd")


def logits_of(outputs: Any) -> Tensor:
    """The logits in a model's outputs: a tensor, the first element of a tuple or list, or the
    ``"logits"`` entry of a dict or Hugging Face ``ModelOutput``."""
    if isinstance(outputs, Tensor):
        return outputs
    if isinstance(outputs, Mapping):
        if isinstance(outputs.get("logits"), Tensor):
            return outputs["logits"]
        raise ValueError(
            f"the model returned a {type(outputs).__name__} without a 'logits' tensor (keys: "
            f"{', '.join(map(str, outputs))}): pass output_fn=lambda out: ... to pick the logits"
        )
    if isinstance(outputs, (tuple, list)) and outputs and isinstance(outputs[0], Tensor):
        return outputs[0]
    raise ValueError(
        f"cannot find the logits in the model's output (a {type(outputs).__name__}): pass "
        "output_fn=lambda out: ... to pick them"
    )


@dataclass(frozen=True)
class Loss:
    """``loss_fn(output_fn(model(inputs)), targets)``: what the criteria receive as ``loss_fn``.

    Calling it applies ``loss_fn`` to logits, so a criterion may also use it directly.
    """

    loss_fn: LossFn = F.cross_entropy
    output_fn: OutputFn = logits_of

    def __call__(self, logits: Tensor, targets: Tensor) -> Tensor:
        return self.loss_fn(logits, targets)


def call_model(model: nn.Module, inputs: Inputs) -> Any:
    """``model(**inputs)`` for dict inputs, ``model(inputs)`` otherwise."""
    return model(**inputs) if isinstance(inputs, dict) else model(inputs)


@dataclass
class ScoreInfo:
    """How a :func:`fishprune.score` call computed its scores (``return_info=True``).

    ``hvp``: the Hessian-vector product method used ("exact", "exact-math-sdpa" or "fd"; None
    when the criterion needs none), ``hvp_reason`` why it was chosen, ``fd_step`` the finite-
    difference step ε of the first product (fd only), ``per_sample_fallback`` the weights whose
    per-sample squared gradients came from ``torch.func`` instead of layer hooks.
    """

    criterion: str = ""
    hvp: str | None = None
    hvp_reason: str = ""
    fd_step: float | None = None
    per_sample_fallback: list[str] = field(default_factory=list)


_SETTINGS: contextvars.ContextVar[tuple[str, ScoreInfo] | None] = contextvars.ContextVar(
    "fishprune_hvp", default=None
)


@contextlib.contextmanager
def hvp_setting(method: str, info: ScoreInfo) -> Iterator[None]:
    """Inside, Hessian-vector products use ``method`` and record what they did in ``info``."""
    if method not in HVP_METHODS:
        raise ValueError(f"hvp must be one of {', '.join(HVP_METHODS)}, got {method!r}")
    token = _SETTINGS.set((method, info))
    try:
        yield
    finally:
        _SETTINGS.reset(token)


def _setting() -> tuple[str, ScoreInfo]:
    return _SETTINGS.get() or ("auto", ScoreInfo())


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


def batch_loss(
    model: nn.Module, batch: Batch, loss_fn: LossFn, temperature: float = 1.0,
    index: int | None = None,
) -> Tensor:
    """ℓ(B) with the logits divided by ``temperature`` (GraSP and Hutchinson use T = 200).

    A NaN or infinite loss is refused (``index`` names the batch): its gradients would turn
    into scores that look like numbers.
    """
    inputs, targets = batch
    output_fn = loss_fn.output_fn if isinstance(loss_fn, Loss) else logits_of
    logits = output_fn(call_model(model, inputs))
    if temperature != 1.0:
        logits = logits / temperature
    loss = loss_fn(logits, targets)
    if not bool(torch.isfinite(loss.detach()).all()):
        where = f" on batch {index}" if index is not None else ""
        kind = "NaN" if bool(torch.isnan(loss.detach()).any()) else "inf"
        raise ValueError(f"the loss is {kind}{where}: check the inputs, targets and the model "
                         "(scores from it would be meaningless)")
    return loss


def gradient_moments(
    model: nn.Module,
    params: dict[str, nn.Parameter],
    batches: Iterable[Batch],
    loss_fn: LossFn,
    *,
    per_sample: bool = False,
    squares: bool = True,
) -> Moments:
    """ḡ and F̂ in one forward+backward pass per batch (Algorithm 1 of the FTS paper).

    ``squares=False`` skips F̂ (``sq_mean`` is then empty) for criteria that only need ḡ. The
    first batch's gradients start the sums (no zero-filled accumulators) and a single batch is
    not divided by 1: on large models these parameter-sized passes cost as much as a layer.
    """
    if per_sample:
        return _per_sample_moments(model, params, batches, loss_fn)
    names, tensors = list(params), list(params.values())
    sums: list[Tensor] = []
    sq: list[Tensor] = []
    count = 0
    for index, batch in distributed.owned(batches):  # distributed: batch b on rank b mod W
        grads = gradients(batch_loss(model, batch, loss_fn, index=index), tensors)
        grads = [g.to(torch.promote_types(g.dtype, torch.float32)) for g in grads]
        if count == 0:
            sums = grads
            sq = torch._foreach_mul(grads, grads) if squares else []
        else:
            torch._foreach_add_(sums, grads)
            if squares:
                torch._foreach_addcmul_(sq, grads, grads)
        count += 1
    if distributed.active():  # distributed: sums over ranks (a rank may own no batch)
        if count == 0:
            sums = [_zeros(p) for p in tensors]
            sq = [_zeros(p) for p in tensors] if squares else []
        count = distributed.reduce_sums([*sums, *sq], count)
    if count > 1:
        torch._foreach_div_(sums, count)
        if squares:
            torch._foreach_div_(sq, count)
    return Moments(dict(zip(names, sums)), dict(zip(names, sq)), count)


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
    for index, batch in distributed.owned(batches):  # distributed: batch b on rank b mod W
        grads = gradients(batch_loss(model, batch, loss_fn, temperature, index), tensors)
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
    """mean_b H_b v: the Hessian of each batch loss times a fixed vector ``v`` (held constant).

    The products are exact (double backpropagation) or, where the model's operators lack second
    derivatives, as chosen by the enclosing ``score(..., hvp=...)`` (see :class:`_HVP`).
    """
    names, tensors = list(params), list(params.values())
    v = [vector[n].to(p.dtype) for n, p in zip(names, tensors)]
    sums = [_zeros(p) for p in tensors]
    hvp = _HVP()
    count = 0
    for index, batch in distributed.owned(batches):  # distributed: batch b on rank b mod W
        hvp.batch(model, batch, index, tensors, loss_fn, temperature, draw=lambda: v, probes=1,
                  consume=lambda _v, hv: torch._foreach_add_(
                      sums, [h.to(s.dtype) for h, s in zip(hv, sums)]))
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
    so that a seed gives the same estimate on every device (and with every HVP method).
    """
    names, tensors = list(params), list(params.values())
    g_sum = [_zeros(p) for p in tensors]
    h_sum = [_zeros(p) for p in tensors]
    hvp = _HVP()
    count = 0
    drawn = 0  # batches whose probes the generator has drawn
    for index, batch in distributed.owned(batches):  # distributed: batch b on rank b mod W
        _skip_probes(tensors, generator, (index - drawn) * probes)  # the other ranks' batches
        drawn = index + 1
        g = hvp.batch(
            model, batch, index, tensors, loss_fn, temperature,
            draw=lambda: [_rademacher(p, generator) for p in tensors], probes=probes,
            consume=lambda z, hz: torch._foreach_addcmul_(
                h_sum, [zi.to(s.dtype) for zi, s in zip(z, h_sum)],
                [h.to(s.dtype) for h, s in zip(hz, h_sum)]),
            generator=generator,
        )
        torch._foreach_add_(g_sum, [gi.to(s.dtype) for gi, s in zip(g, g_sum)])
        count += 1
    count = distributed.reduce_sums(g_sum + h_sum, count)  # distributed: sums over ranks
    torch._foreach_div_(g_sum, count)
    torch._foreach_div_(h_sum, count * probes)
    return dict(zip(names, g_sum)), dict(zip(names, h_sum))


# --- Hessian-vector products: exact, exact under the math SDPA kernel, finite differences ------


def fd_step(w_norm: float, v_norm: float, dtype: torch.dtype) -> float:
    """The central-difference step ε for Hv ≈ (g(w + εv) − g(w − εv)) / 2ε.

    ε = u^(1/3) · (1 + ‖w‖) / ‖v‖ with u the unit roundoff of ``dtype``: the truncation error of
    the central difference is O(ε²‖v‖³) (third derivatives) and its rounding error O(u‖g‖/ε),
    balanced at ε ∝ u^(1/3) (Nocedal & Wright, Numerical Optimization, §8.1); scaling by
    (1 + ‖w‖)/‖v‖ makes the perturbation εv a fixed fraction u^(1/3) of the weights' norm, so the
    step does not depend on the scale of ``v`` (GraSP's ḡ at T = 200 is tiny) nor of ``w``.
    float32: u^(1/3) ≈ 4.9e-3; float64: ≈ 6.1e-6.
    """
    u = torch.finfo(dtype).eps
    return u ** (1 / 3) * (1.0 + w_norm) / v_norm


def _missing_double_backward(error: BaseException) -> bool:
    text = str(error)
    return isinstance(error, (RuntimeError, NotImplementedError)) and (
        "derivative for" in text and "not implemented" in text
    )


def _math_sdpa() -> contextlib.AbstractContextManager:
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel(SDPBackend.MATH)


class _HVP:
    """Per-batch gradient and Hessian-vector products with the method of the enclosing setting.

    "auto" tries exact double backpropagation on the first batch; if an operator has no second
    derivative it retries the batch under the math SDPA kernel (fused attention kernels lack
    double backward; the math kernel is plain matmuls and softmax), then with finite
    differences. The first method that works is kept for every later batch, reported once with
    a warning, and recorded in :class:`ScoreInfo`.
    """

    def __init__(self) -> None:
        self.policy, self.info = _setting()
        self.method: str | None = None

    def batch(
        self, model: nn.Module, batch: Batch, index: int, tensors: list[Tensor], loss_fn: LossFn,
        temperature: float, *, draw: Callable[[], list[Tensor]], probes: int,
        consume: Callable[[list[Tensor], list[Tensor]], Any],
        generator: torch.Generator | None = None,
    ) -> list[Tensor]:
        """The batch gradient g; calls ``consume(v_k, H v_k)`` for v_k = draw(), k < probes.

        A method that fails does so before its first product (a missing derivative is
        structural), so nothing is consumed twice when the batch is retried.
        """
        if self.method is not None:
            candidates = [self.method]
        else:
            candidates = {"auto": ["exact", "exact-math-sdpa", "fd"], "exact": ["exact"],
                          "fd": ["fd"]}[self.policy]
        reasons: list[str] = []
        for attempt, method in enumerate(candidates):
            state = generator.get_state() if generator is not None else None
            try:
                args = (model, batch, index, tensors, loss_fn, temperature, draw, probes, consume)
                if method == "fd":
                    result = self._finite_differences(*args)
                elif method == "exact-math-sdpa":
                    with _math_sdpa():
                        result = _exact(*args)
                else:
                    result = _exact(*args)
            except (RuntimeError, NotImplementedError) as error:
                if not _missing_double_backward(error):
                    raise
                reason = str(error).strip().splitlines()[0]
                if attempt == len(candidates) - 1:
                    raise RuntimeError(
                        f"exact Hessian-vector products are not available on this model "
                        f"({reason}): use hvp='auto' or hvp='fd'"
                    ) from error
                reasons.append(reason)
                if state is not None:
                    generator.set_state(state)  # the retry draws the same probes
                continue
            if self.method is None:
                self._report(method, reasons)
            self.method = method
            return result
        raise AssertionError("unreachable")

    def _report(self, method: str, reasons: list[str]) -> None:
        self.info.hvp = method
        if method == "exact":
            self.info.hvp_reason = "double backpropagation"
            return
        if self.policy == "fd":
            self.info.hvp_reason = "requested (hvp='fd')"
        else:
            unique = list(dict.fromkeys(reasons))
            self.info.hvp_reason = unique[0] + (
                "" if len(unique) > 1 or method != "fd" or len(reasons) < 2
                else "; also under the math SDPA kernel"
            ) + "".join(f"; then {r}" for r in unique[1:])
        what = {"exact-math-sdpa": "exact, under the math SDPA kernel",
                "fd": "central finite differences of gradients"}[method]
        warnings.warn(
            f"fishprune: {self.info.criterion or 'scoring'}: Hessian-vector products by {what} "
            f"({self.info.hvp_reason})", stacklevel=4,
        )

    def _finite_differences(
        self, model: nn.Module, batch: Batch, index: int, tensors: list[Tensor],
        loss_fn: LossFn, temperature: float, draw: Callable[[], list[Tensor]], probes: int,
        consume: Callable[[list[Tensor], list[Tensor]], Any],
    ) -> list[Tensor]:
        """Hv ≈ (g(w + εv) − g(w − εv)) / 2ε (ε from :func:`fd_step`), the same dropout draws
        in every evaluation, and the weights restored bit for bit afterwards."""
        device = tensors[0].device
        cuda = [device.index or 0] if device.type == "cuda" else []
        rng = torch.get_rng_state(), [torch.cuda.get_rng_state(d) for d in cuda]

        def grad_at() -> list[Tensor]:
            torch.set_rng_state(rng[0])
            for d, state in zip(cuda, rng[1]):
                torch.cuda.set_rng_state(state, d)
            return [g.detach() for g in gradients(
                batch_loss(model, batch, loss_fn, temperature, index), tensors)]

        saved = [t.detach().clone() for t in tensors]
        w_norm = float(torch.linalg.vector_norm(torch.stack(
            [torch.linalg.vector_norm(t.double()) for t in saved])))
        try:
            g = grad_at()
            for _ in range(probes):
                v = draw()
                v_norm = float(torch.linalg.vector_norm(torch.stack(
                    [torch.linalg.vector_norm(x.double()) for x in v])))
                if v_norm == 0.0:
                    hv = [torch.zeros_like(t) for t in saved]
                else:
                    eps = fd_step(w_norm, v_norm, tensors[0].dtype)
                    if self.info.fd_step is None:
                        self.info.fd_step = eps
                    with torch.no_grad():
                        torch._foreach_add_(tensors, v, alpha=eps)
                    plus = grad_at()
                    with torch.no_grad():
                        torch._foreach_copy_(tensors, saved)
                        torch._foreach_add_(tensors, v, alpha=-eps)
                    minus = grad_at()
                    with torch.no_grad():
                        torch._foreach_copy_(tensors, saved)
                    hv = torch._foreach_sub(plus, minus)
                    torch._foreach_div_(hv, 2 * eps)
                consume(v, hv)
        finally:
            with torch.no_grad():
                torch._foreach_copy_(tensors, saved)
        return g


def _exact(
    model: nn.Module, batch: Batch, index: int, tensors: list[Tensor], loss_fn: LossFn,
    temperature: float, draw: Callable[[], list[Tensor]], probes: int,
    consume: Callable[[list[Tensor], list[Tensor]], Any],
) -> list[Tensor]:
    grads = gradients(
        batch_loss(model, batch, loss_fn, temperature, index), tensors, create_graph=True
    )
    for probe in range(probes):
        v = draw()
        hv = gradients(grads, tensors, grad_outputs=v, retain_graph=probe < probes - 1)
        consume(v, hv)
    return [g.detach() for g in grads]


def _skip_probes(tensors: list[Tensor], generator: torch.Generator, probes: int) -> None:
    """Advance ``generator`` past ``probes`` probes exactly as :func:`_rademacher` draws them
    (distributed: a rank skips the batches of the others, so every batch keeps its probes)."""
    for _ in range(probes):
        for p in tensors:
            torch.randint(0, 2, p.shape, generator=generator, dtype=torch.int8)


def _rademacher(like: Tensor, generator: torch.Generator) -> Tensor:
    signs = torch.randint(0, 2, like.shape, generator=generator, dtype=torch.int8)
    return (signs.to(like.dtype) * 2 - 1).to(like.device)


# --- per-sample empirical Fisher -----------------------------------------------------------------


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


def _is_hf_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2 blocks): a Linear with the weight stored (in, out)."""
    kind = type(module)
    return kind.__name__ == "Conv1D" and kind.__module__.startswith("transformers")


def _hookable(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear) or _is_hf_conv1d(module):
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
    if _is_hf_conv1d(module):  # y = a W + b, W (in, out): the Linear result, transposed
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
