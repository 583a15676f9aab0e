"""Signed FTS and HTS (``signed=True``): s_q = −(w_q ḡ_q + ½ w_q² D_qq), higher = keep.

Checked against brute force: ḡ and F̂ from a plain loop of ``loss.backward()`` per batch, the
exact Hessian diagonal from ``torch.autograd.functional.hessian`` (with one scored weight,
Hutchinson's z ⊙ Hz = z²H is exact), and the mask keeping the most negative Taylor terms.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

import fishprune as fp
from fishprune.criteria import get_criterion


def model64() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 3)).double().eval()


def data(sizes=(4, 3, 5), features: int = 5, classes: int = 3) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(n, features, generator=gen, dtype=torch.float64),
             torch.randint(0, classes, (n,), generator=gen)) for n in sizes]


def brute_moments(model: nn.Module, batches, temperature: float = 1.0) -> tuple[dict, dict]:
    """ḡ = mean_b g_b and F̂ = mean_b g_b², every g_b by ``loss.backward()`` into ``.grad``."""
    model = copy.deepcopy(model)
    names = list(fp.prunable_parameters(model))
    named = dict(model.named_parameters())
    grads = []
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x) / temperature, y).backward()
        grads.append({n: named[n].grad.clone() for n in names})
    mean = {n: sum(g[n] for g in grads) / len(grads) for n in names}
    sq = {n: sum(g[n] ** 2 for g in grads) / len(grads) for n in names}
    return mean, sq


def close(actual: dict, expected: dict, rtol: float = 1e-10) -> None:
    assert list(actual) == list(expected)
    for name, e in expected.items():
        scale = e.abs().max().clamp_min(1e-300)
        assert (actual[name] - e).abs().max() / scale <= rtol, name


def test_signed_fts_is_minus_the_taylor_term() -> None:
    model, batches = model64(), data()
    g, f = brute_moments(model, batches)
    weights = {n: p.detach() for n, p in fp.prunable_parameters(model).items()}
    taylor = {n: w * g[n] + 0.5 * w**2 * f[n] for n, w in weights.items()}
    signed = fp.score(model, "fts", batches, signed=True)
    close(signed, {n: -t for n, t in taylor.items()})
    assert any((t > 0).any() and (t < 0).any() for t in taylor.values())  # both signs occur
    unsigned = fp.score(model, "fts", batches)
    assert all(torch.equal(signed[n].abs(), unsigned[n]) for n in unsigned)  # same term


def test_signed_fts_per_sample_equals_batches_of_one() -> None:
    model, batches = model64(), data()
    singles = [(x[i : i + 1], y[i : i + 1]) for x, y in batches for i in range(x.shape[0])]
    close(fp.score(model, "fts", batches, signed=True, per_sample=True),
          fp.score(model, "fts", singles, signed=True), rtol=1e-12)


def test_signed_keeps_the_most_negative_taylor_terms() -> None:
    model, batches = model64(), data()
    g, f = brute_moments(model, batches)
    weights = {n: p.detach() for n, p in fp.prunable_parameters(model).items()}
    taylor = torch.cat([(w * g[n] + 0.5 * w**2 * f[n]).reshape(-1) for n, w in weights.items()])
    masks = fp.prune(copy.deepcopy(model), "fts", 0.75, batches, signed=True)
    kept = torch.cat([m.reshape(-1) for m in masks.values()])
    assert int(kept.sum()) == round(0.25 * taylor.numel())
    assert taylor[kept].max() < taylor[~kept].min()  # every kept term below every pruned one
    assert torch.equal(kept, taylor <= taylor.sort().values[int(kept.sum()) - 1])


def exact_hessian_diagonal(model: nn.Module, batches, temperature: float) -> dict[str, Tensor]:
    weights = {n: p.detach() for n, p in fp.prunable_parameters(model).items()}
    sizes = [w.numel() for w in weights.values()]

    def loss(flat: Tensor) -> Tensor:
        chunks = {n: c.view_as(w) for (n, w), c in zip(weights.items(), flat.split(sizes))}
        return sum(F.cross_entropy(functional_call(model, chunks, (x,)) / temperature, y)
                   for x, y in batches) / len(batches)

    flat = torch.cat([w.reshape(-1) for w in weights.values()])
    diagonal = torch.autograd.functional.hessian(loss, flat).diagonal()
    return {n: d.view_as(w) for (n, w), d in zip(weights.items(), diagonal.split(sizes))}


@pytest.mark.parametrize("temperature", [1.0, 200.0])
def test_signed_hts_is_minus_the_exact_taylor_term_for_one_weight(temperature: float) -> None:
    """One scored weight: ĥ is exact at any probe count, so HTS has a closed form."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(1, 1, bias=False), nn.Tanh(), nn.Linear(1, 2)).double()
    batches = data(sizes=(5, 4), features=1, classes=2)
    exclude = ("2.*",)
    w = model[0].weight.detach()
    g, _ = brute_moments(model, batches, temperature)
    h = exact_hessian_diagonal(model, batches, temperature)
    expected = -(w * g["0.weight"] + 0.5 * w**2 * h["0.weight"])
    got = fp.score(model, "hts", batches, signed=True, probes=1, temperature=temperature,
                   exclude=exclude)
    close(got, {"0.weight": expected})


def test_signed_hts_uses_the_same_estimates_as_hd() -> None:
    model, batches = model64(), data()
    h = fp.score(model, "hd", batches, seed=3, probes=4)
    g, _ = brute_moments(model, batches, temperature=200.0)
    weights = {n: p.detach() for n, p in fp.prunable_parameters(model).items()}
    signed = fp.score(model, "hts", batches, seed=3, probes=4, signed=True)
    close(signed, {n: -(w * g[n] + 0.5 * w**2 * h[n]) for n, w in weights.items()})
    unsigned = fp.score(model, "hts", batches, seed=3, probes=4)
    assert all(torch.equal(signed[n].abs(), unsigned[n]) for n in unsigned)


@pytest.mark.parametrize("criterion", ["fts", "hts"])
def test_options_have_help_and_defaults(criterion: str) -> None:
    options = get_criterion(criterion).options
    fields = {f.name: f for f in dataclasses.fields(options)}
    expected = {"fts": {"per_sample": False, "signed": False},
                "hts": {"probes": 10, "temperature": 200.0, "signed": False}}[criterion]
    assert {n: f.default for n, f in fields.items()} == expected
    assert all(f.metadata["help"].strip() for f in fields.values())
    with pytest.raises(ValueError, match=r"signed .* must be bool"):
        fp.score(model64(), criterion, data(), signed=1)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options().signed = True  # type: ignore[misc]
