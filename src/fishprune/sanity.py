"""Sanity checks for pruning at initialization, as tested mask/data transformations.

Frankle et al. 2021 ("Pruning neural networks at initialization: why are we missing the
mark?") and Su et al. 2020 ("Sanity-checking pruning methods: random tickets can win the
jackpot") ask whether a criterion knows *which* weights matter or only *how many* per layer:

- ``shuffle``: permute the mask's positions within each layer (layer densities unchanged);
- ``reinit``: keep the mask, draw fresh values for the weights (a new initialization);
- ``invert``: keep the *lowest*-scored weights instead of the highest;
- ``random-labels``: score on data whose labels are replaced by uniform random classes.

If accuracy survives a transformation, the criterion's information was not in what it removed.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def shuffle_masks(masks: dict[str, Tensor], seed: int) -> dict[str, Tensor]:
    """Each mask's entries randomly permuted within its tensor (same kept count per layer)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, mask in masks.items():
        flat = mask.reshape(-1).cpu()
        out[name] = flat[torch.randperm(flat.numel(), generator=gen)].reshape(mask.shape).to(
            mask.device
        )
    return out


def invert_scores(scores: dict[str, Tensor]) -> dict[str, Tensor]:
    """Negated scores, so that selection keeps the weights the criterion ranks lowest."""
    return {n: -s for n, s in scores.items()}


def randomize_labels(targets: Tensor, num_classes: int, seed: int) -> Tensor:
    """Uniformly random labels in ``[0, num_classes)``, seeded, same shape and device."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(num_classes, targets.shape, generator=gen).to(targets.device)


@torch.no_grad()
def reinitialize_(model: nn.Module, fresh: nn.Module) -> nn.Module:
    """Copy every parameter of ``fresh`` (a new initialization) into ``model``.

    Buffers (BatchNorm statistics from a warm-up) are kept; the caller re-applies the masks.
    """
    fresh_params = dict(fresh.named_parameters())
    for name, p in model.named_parameters():
        p.copy_(fresh_params[name])
    return model
