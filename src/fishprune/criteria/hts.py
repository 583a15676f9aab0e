"""HTS (Hutchinson-Taylor Sensitivity): s_q = |w_q ḡ_q + ½ w_q² ĥ_q| (arXiv 2502.11450).

FTS with the Fisher diagonal replaced by Hutchinson's Hessian diagonal ĥ. As in the authors'
code, the logits are divided by T = 200 for both ḡ and ĥ, which come from the same pass.

``signed=True`` scores s_q = −(w_q ḡ_q + ½ w_q² ĥ_q): the weights with the most negative Taylor
term are kept first (fishprune keeps the highest score). This is the ``use_negative=True``
branch of ``hutchinson_taylor`` in the authors' code (github Gollini/Scalable_Second_Order_PaI,
``batch_exp/experiments/utils/compressors.py``, commit bfb50ad: ``s = p * g + 0.5 * p**2 * h``,
then ``-s``, then the top-k highest are kept; their shipped runs use ``s.abs()``). The sign
convention is that of FTS (see :mod:`fishprune.criteria.fts`): the term is eq. 14 of the FTS
paper at δw_q = w_q, which the papers call the change of the loss.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from fishprune.batches import Batches
from fishprune.criteria._registry import Context, positive, register
from fishprune.hvp import hutchinson_diagonal


@dataclass(frozen=True)
class HTSOptions:
    """Options of HTS; the defaults of ``probes`` and ``temperature`` are the authors' code's."""

    probes: int = field(default=10, metadata={
        "help": "Rademacher probes per batch for Hutchinson's Hessian diagonal",
    })
    temperature: float = field(default=200.0, metadata={
        "help": "the logits are divided by T before the loss, for ḡ and ĥ alike",
    })
    signed: bool = field(default=False, metadata={
        "help": "keep the most negative w·ḡ + ½w²ĥ first (score −(w·ḡ + ½w²ĥ), the authors' "
                "use_negative) instead of the largest |w·ḡ + ½w²ĥ|",
    })

    def validate(self) -> None:
        if self.probes < 1:
            raise ValueError(f"probes must be an integer >= 1, got {self.probes!r}")
        positive(self.temperature, "temperature")


@register("hts", options=HTSOptions, seeded=True)
def hts(
    model: nn.Module, params: dict[str, nn.Parameter], batches: Batches, ctx: Context,
    opts: HTSOptions,
) -> dict[str, Tensor]:
    g, h = hutchinson_diagonal(
        model, params, batches, ctx.loss_fn,
        probes=opts.probes, temperature=opts.temperature, generator=ctx.generator(),
    )
    scores = {}
    for name, gq in g.items():
        w = params[name].detach().to(gq.dtype)
        taylor = w * gq + 0.5 * w.square() * h[name]
        scores[name] = taylor.neg() if opts.signed else taylor.abs()
    return scores
