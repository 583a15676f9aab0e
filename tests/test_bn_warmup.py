"""``bn_warmup_``: BatchNorm statistics by cumulative average (default) or moving average.

Both are checked against a hand computation of the per-batch means and unbiased variances,
layer by layer through a train-mode forward pass; the default against the function as it was
before the ``momentum`` option (bit for bit); ``momentum=0.1`` against the authors' warm-up
(a plain train-mode pass with PyTorch's default momentum on a fresh model).
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import Tensor, nn
from torch.nn import functional as F

from fishprune.train import bn_warmup_

EPS = 1e-5


def net(dtype: torch.dtype = torch.float64) -> nn.Sequential:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Flatten(),
        nn.Linear(3 * 3 * 3, 4), nn.BatchNorm1d(4),
    ).to(dtype)
    with torch.no_grad():  # affine parameters away from (1, 0), so the first BN's output matters
        for bn in (model[1], model[5]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return model.eval()


def batches(dtype: torch.dtype = torch.float64) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 2, 5, 5, generator=gen).to(dtype) * 2 + 1, torch.zeros(n))
            for n in (6, 6, 4)]  # the last batch is partial


def per_batch_statistics(model: nn.Sequential, data) -> list[list[tuple[Tensor, Tensor]]]:
    """[(μ_b, unbiased σ²_b) for each BN] for each batch, by hand, in a train-mode pass."""
    out = []
    for x, _ in data:
        a1 = F.conv2d(x, model[0].weight, model[0].bias)
        m1, v1 = a1.mean((0, 2, 3)), a1.var((0, 2, 3), unbiased=False)
        n1 = a1.numel() / a1.shape[1]
        y1 = (a1 - m1[None, :, None, None]) / torch.sqrt(v1[None, :, None, None] + EPS)
        y1 = y1 * model[1].weight[None, :, None, None] + model[1].bias[None, :, None, None]
        a2 = F.linear(torch.relu(y1).flatten(1), model[4].weight, model[4].bias)
        m2, v2 = a2.mean(0), a2.var(0, unbiased=True)
        out.append([(m1, v1 * n1 / (n1 - 1)), (m2, v2)])
    return out


def expected(model: nn.Sequential, data, momentum: float | None) -> list[tuple[Tensor, Tensor]]:
    stats = per_batch_statistics(model, data)
    result = []
    for layer in range(2):
        means = [s[layer][0] for s in stats]
        variances = [s[layer][1] for s in stats]
        if momentum is None:
            result.append((sum(means) / len(means), sum(variances) / len(variances)))
            continue
        mean, var = torch.zeros_like(means[0]), torch.ones_like(variances[0])  # reset values
        for mu, sigma2 in zip(means, variances):
            mean = (1 - momentum) * mean + momentum * mu
            var = (1 - momentum) * var + momentum * sigma2
        result.append((mean, var))
    return result


def dirty(model: nn.Sequential) -> None:
    """Statistics and momenta that the warm-up must not depend on (and must restore)."""
    for bn in (model[1], model[5]):
        bn.running_mean.fill_(3.0)
        bn.running_var.fill_(7.0)
        bn.num_batches_tracked.fill_(11)
        bn.momentum = 0.3
    model[5].train()


@pytest.mark.parametrize("momentum", [None, 0.1, 0.5, 1.0, 1])
def test_statistics_match_the_hand_computation(momentum: float | None) -> None:
    model, data = net(), batches()
    want = expected(model, data, momentum)
    params = {n: p.clone() for n, p in model.named_parameters()}
    dirty(model)
    modes = [m.training for m in model.modules()]
    assert bn_warmup_(model, data, momentum=momentum) is model
    for bn, (mean, var) in zip((model[1], model[5]), want):
        torch.testing.assert_close(bn.running_mean, mean, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(bn.running_var, var, rtol=1e-12, atol=1e-12)
        assert int(bn.num_batches_tracked) == len(data)
        assert bn.momentum == 0.3  # restored
    assert [m.training for m in model.modules()] == modes
    assert all(torch.equal(p, params[n]) for n, p in model.named_parameters())


def test_ema_and_cumulative_differ_and_ema_weights_recent_batches() -> None:
    data = batches()
    cumulative = bn_warmup_(net(), data)[5].running_mean
    ema = bn_warmup_(net(), data, momentum=0.5)[5].running_mean
    last = bn_warmup_(net(), data[-1:], momentum=1.0)[5].running_mean
    assert not torch.allclose(cumulative, ema)
    assert torch.equal(bn_warmup_(net(), data, momentum=1.0)[5].running_mean, last)


def previous_bn_warmup_(model: nn.Module, data) -> None:
    """``bn_warmup_`` as it was before the ``momentum`` option."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [(m, m.momentum) for m in norms]
    flags = [(m, m.training) for m in model.modules()]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        for inputs, _ in data:
            model(inputs)
    for m, momentum in momenta:
        m.momentum = momentum
    for m, training in flags:
        m.training = training


def test_default_is_bit_identical_to_the_previous_behaviour() -> None:
    data = batches(torch.float32)
    ours, explicit, theirs = net(torch.float32), net(torch.float32), net(torch.float32)
    for model in (ours, explicit, theirs):
        dirty(model)
    bn_warmup_(ours, data)
    bn_warmup_(explicit, data, momentum=None)
    previous_bn_warmup_(theirs, data)
    for a, b, c in zip(ours.buffers(), explicit.buffers(), theirs.buffers()):
        assert torch.equal(a, c) and torch.equal(b, c)


def test_momentum_0_1_is_the_authors_warmup_on_a_fresh_model() -> None:
    """Their warm-up: train mode, no_grad, one pass, the modules' default momentum 0.1."""
    data = batches(torch.float32)
    ours, theirs = net(torch.float32), net(torch.float32)
    bn_warmup_(ours, data, momentum=0.1)
    theirs.train()
    with torch.no_grad():
        for inputs, _ in data:
            theirs(inputs)
    for a, b in zip(ours.buffers(), theirs.buffers()):
        assert torch.equal(a, b)


@pytest.mark.parametrize("momentum", [0, 0.0, -0.1, 1.5, math.nan, math.inf, True, "0.1"])
def test_bad_momentum_is_refused(momentum: object) -> None:
    model = net()
    before = [b.clone() for b in model.buffers()]
    with pytest.raises(ValueError, match=r"momentum must be None .* or in \(0, 1\]"):
        bn_warmup_(model, batches(), momentum=momentum)  # type: ignore[arg-type]
    assert all(torch.equal(a, b) for a, b in zip(before, model.buffers()))


def test_model_without_batchnorm_is_left_alone() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(50, 3)).eval()
    assert bn_warmup_(model, batches(), momentum=0.1) is model and not model.training
