"""Hessian-vector products (GraSP, Hutchinson) and the setting of the enclosing ``score`` call.

:func:`hessian_vector_mean` is mean_b H_b v for a fixed v (GraSP); :func:`hutchinson_diagonal`
is ĥ = mean over batches b and Rademacher probes z of z ⊙ (H_b z), unbiased for diag(H)
(Hutchinson 1989; Bekas et al. 2007).

The products use exact double backpropagation when the model's operators have second
derivatives; when one does not (e.g. ``hardsigmoid_backward``, the fused CPU flash-attention
kernel), ``hvp="auto"`` retries under the math SDPA kernel, then with central finite differences
of gradients (:func:`fd_step`). The method used is reported (a warning and :class:`ScoreInfo`),
never changed silently. :func:`hvp_setting` sets the method and the :class:`ScoreInfo` that the
helpers record into (per-sample Fisher records its fallbacks there too).
"""

from __future__ import annotations

import contextlib
import contextvars
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from fishprune import distributed
from fishprune.batches import Batch
from fishprune.losses import LossFn, _zeros, batch_loss, gradients

#: Values of ``hvp=``: "auto" (exact, else exact under the math SDPA kernel, else finite
#: differences), "exact" (double backpropagation or an error), "fd" (finite differences).
HVP_METHODS = ("auto", "exact", "fd")


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
