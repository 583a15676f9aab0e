"""Layer collapse, seen before training: empty layers and layers cut off from the output.

A layer *collapses* when it keeps no weight; it is *disconnected* when it keeps weights but none
of them lies on a path from the input to the output (everything before or after it that they
connect to was pruned), so it cannot carry signal either (Tanaka et al. 2020, "layer collapse").
Paths are counted SynFlow-style: with every kept weight set to 1, pruned weights to 0, biases
and BatchNorm shifts to 0 and scales to |·|, R = Σ f(1) in float64 and a kept weight w is on a
path iff w·∂R/∂w > 0. When the dense network itself gives R = 0 (LayerNorm of a constant
input, for instance) the path test is not informative and only empty layers are reported.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fishprune.modes import restored_modes


class CollapseError(RuntimeError):
    """Raised by ``--on-collapse error`` when a layer is empty or disconnected."""


@dataclass(frozen=True)
class LayerDensity:
    name: str
    numel: int
    kept: int
    effective: int | None  # kept weights on an input→output path (None: test not informative)

    @property
    def density(self) -> float:
        return self.kept / max(self.numel, 1)


@dataclass(frozen=True)
class CollapseReport:
    layers: list[LayerDensity]

    @property
    def collapsed(self) -> list[str]:
        """Layers that keep no weight at all."""
        return [lay.name for lay in self.layers if lay.kept == 0]

    @property
    def disconnected(self) -> list[str]:
        """Layers that keep weights, none of them on an input→output path."""
        return [lay.name for lay in self.layers if lay.kept > 0 and lay.effective == 0]

    def warning(self) -> str:
        parts = []
        if self.collapsed:
            parts.append(f"layer collapse: {len(self.collapsed)} layer(s) keep no weight "
                         f"({', '.join(self.collapsed)})")
        if self.disconnected:
            parts.append(f"{len(self.disconnected)} layer(s) are cut off from the output "
                         f"({', '.join(self.disconnected)})")
        return "; ".join(parts) + " — the network cannot learn; try --warmup-epochs 1 or " \
            "--bn-warmup, or a lower sparsity"

    def to_dict(self) -> dict:
        return {"layers": [{**asdict(lay), "density": lay.density} for lay in self.layers],
                "collapsed": self.collapsed, "disconnected": self.disconnected}

    def table(self) -> str:
        lines = [f"{'layer':<40} {'weights':>10} {'kept':>9} {'density':>8}"]
        for lay in self.layers:
            flag = "  EMPTY" if lay.kept == 0 else ("  CUT OFF" if lay.effective == 0 else "")
            lines.append(
                f"{lay.name:<40} {lay.numel:>10,} {lay.kept:>9,} {lay.density:>8.2%}{flag}"
            )
        total = sum(lay.numel for lay in self.layers)
        kept = sum(lay.kept for lay in self.layers)
        lines.append(f"{'total':<40} {total:>10,} {kept:>9,} {kept / max(total, 1):>8.2%}")
        return "\n".join(lines)


def collapse_report(model: nn.Module, masks: dict[str, Tensor], input_shape: tuple[int, ...]
                    ) -> CollapseReport:
    """Per-layer kept and path-connected weight counts for ``masks`` on ``model``."""
    effective = connected_counts(model, masks, input_shape)
    layers = [
        LayerDensity(n, m.numel(), int(m.sum()), None if effective is None else effective[n])
        for n, m in masks.items()
    ]
    return CollapseReport(layers)


def connected_counts(model: nn.Module, masks: dict[str, Tensor], input_shape: tuple[int, ...]
                     ) -> dict[str, int] | None:
    """Kept weights on an input→output path per tensor, or None if the test is uninformative."""
    dense = {n: torch.ones_like(m, dtype=torch.bool) for n, m in masks.items()}
    if _path_gradients(model, dense, input_shape) is None:
        return None
    grads = _path_gradients(model, masks, input_shape)
    if grads is None:  # R = 0: nothing reaches the output
        return {n: 0 for n in masks}
    return {n: int(((g > 0) & masks[n].to(g.device)).sum()) for n, g in grads.items()}


def _path_gradients(model: nn.Module, masks: dict[str, Tensor], input_shape: tuple[int, ...]
                    ) -> dict[str, Tensor] | None:
    state: dict[str, Tensor] = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        leaf = name.rpartition(".")[2]
        if name in masks:
            state[name] = masks[name].to(t.device, torch.float64).requires_grad_(True)
        elif not t.is_floating_point():
            state[name] = t
        elif leaf in ("bias", "running_mean"):
            state[name] = torch.zeros_like(t, dtype=torch.float64)
        elif leaf == "running_var":
            state[name] = torch.ones_like(t, dtype=torch.float64)
        else:
            state[name] = t.detach().abs().double()
    device = next(iter(state.values())).device
    with restored_modes(model), torch.enable_grad():
        model.eval()
        r = functional_call(model, state, (torch.ones((1, *input_shape), dtype=torch.float64,
                                                      device=device),)).sum()
        if not torch.isfinite(r) or r <= 0:
            return None
        grads = torch.autograd.grad(r, [state[n] for n in masks])
    return dict(zip(masks, grads))
