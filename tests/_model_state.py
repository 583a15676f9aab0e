"""What "the model is left exactly as it was" means, for the contract tests."""

from __future__ import annotations

import torch
from torch import nn


def snapshot(model: nn.Module) -> dict:
    """Parameters (objects and values), ``requires_grad``, ``.grad``, buffers and modes."""
    return {
        "params": [
            (n, p, p.detach().clone(), p.requires_grad, p.grad,
             None if p.grad is None else p.grad.clone())
            for n, p in model.named_parameters()
        ],
        "buffers": [(n, b, b.clone()) for n, b in model.named_buffers()],
        "modes": [(n, m.training) for n, m in model.named_modules()],
    }


def assert_unchanged(model: nn.Module, before: dict) -> None:
    """The model matches ``before`` bit for bit and carries no leftover hook."""
    after = snapshot(model)
    for (n, p, value, flag, grad, grad_value), (_, p2, value2, flag2, grad2, _) in zip(
        before["params"], after["params"], strict=True
    ):
        assert p2 is p, f"{n}: parameter object replaced"
        assert torch.equal(value, value2), f"{n}: value changed"
        assert flag2 == flag, f"{n}: requires_grad {flag} -> {flag2}"
        assert grad2 is grad, f"{n}: .grad object changed"
        if grad is not None:
            assert torch.equal(grad2, grad_value), f"{n}: .grad values changed"
    for (n, b, value), (_, b2, _) in zip(before["buffers"], after["buffers"], strict=True):
        assert b2 is b and torch.equal(b, value), f"buffer {n} changed"
    assert after["modes"] == before["modes"]
    for n, m in model.named_modules():
        assert not (m._forward_hooks or m._forward_pre_hooks or m._backward_hooks), f"hook on {n}"
