"""Oracle tests: every criterion against brute force on tiny float64 networks.

Per-batch gradients from a naive ``loss.backward()`` loop, per-sample gradients from batches of
one, the exact Hessian from ``torch.autograd.functional.hessian``, Hessian-vector products from
finite differences of the gradient, and SynFlow from its closed form on a linear chain.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
from torch import Tensor, nn
from torch.func import functional_call
from torch.nn import functional as F

import fishprune as fp
import fishprune.persample
from fishprune.selection import Survivors, kept_count

GRADIENT_CRITERIA = ("gn", "snip", "fd", "fp", "fts", "fbss")


def float64(model: nn.Module) -> nn.Module:
    return model.double().eval()


def batches_for(shape: tuple[int, ...], sizes=(4, 3, 5), classes: int = 3, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, *shape, generator=gen, dtype=torch.float64),
         torch.randint(0, classes, (n,), generator=gen))
        for n in sizes
    ]


def singletons(batches):
    return [(x[i : i + 1], y[i : i + 1]) for x, y in batches for i in range(x.shape[0])]


def naive_batch_grads(model: nn.Module, batches, temperature: float = 1.0) -> list[dict]:
    """g_b = ∇ℓ(B_b) for every batch, by plain ``loss.backward()`` into ``.grad``."""
    model = copy.deepcopy(model).eval()
    names = list(fp.prunable_parameters(model))
    named = dict(model.named_parameters())
    out = []
    for x, y in batches:
        model.zero_grad(set_to_none=True)
        F.cross_entropy(model(x) / temperature, y).backward()
        out.append({n: named[n].grad.clone() for n in names})
    return out


def moments(grads: list[dict]) -> tuple[dict, dict]:
    mean = {n: sum(g[n] for g in grads) / len(grads) for n in grads[0]}
    sq = {n: sum(g[n] * g[n] for g in grads) / len(grads) for n in grads[0]}
    return mean, sq


def formula(criterion: str, w: Tensor, g: Tensor, f: Tensor, lam: float) -> Tensor:
    if criterion == "gn":
        return g.abs()
    if criterion == "snip":
        return (w * g).abs()
    if criterion == "fd":
        return f
    if criterion == "fp":
        return 0.5 * w**2 * f
    if criterion == "fts":
        return (w * g + 0.5 * w**2 * f).abs()
    assert criterion == "fbss"
    return 0.5 * (f + lam) * (w - g / (f + lam)) ** 2


def assert_close(actual: dict, expected: dict, rtol: float = 1e-10) -> None:
    assert list(actual) == list(expected)
    for name in expected:
        a, e = actual[name], expected[name].to(actual[name].dtype)
        scale = e.abs().max().clamp_min(1e-300)
        err = (a - e).abs().max() / scale
        assert err <= rtol, f"{name}: relative error {err:.3e}"


# --- the models --------------------------------------------------------------------------------


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(12, 7), nn.Tanh(), nn.Linear(7, 3))


def cnn_bn() -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 3, 3, stride=2), nn.Flatten(), nn.Linear(3, 3),
    )
    model[1].running_mean.uniform_(-0.3, 0.3)
    model[1].running_var.uniform_(0.5, 1.5)
    return model


def conv2d_net() -> nn.Module:
    return nn.Sequential(  # (N, 4, 7, 7) -> (N, 6, 3, 3) -> (N, 4, 2, 2)
        nn.Conv2d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2), nn.Tanh(),
        nn.Conv2d(6, 4, (2, 3), stride=(1, 2), padding=(0, 1)), nn.Tanh(),
        nn.Flatten(), nn.Linear(16, 3),
    )


class MeanLast(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.mean(-1)


def conv1d_net() -> nn.Module:
    return nn.Sequential(  # (N, 2, 9) -> (N, 4, 5) -> (N, 3, 3) -> (N, 3)
        nn.Conv1d(2, 4, 3, stride=2, padding=1, groups=2), nn.Tanh(),
        nn.Conv1d(4, 3, 2, dilation=2), MeanLast(),
    )


class SequenceNet(nn.Module):
    """A Linear applied to a (N, T, D) sequence, mean over T, classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.head = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.embed(x)).mean(1))


class Conv3dNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv, self.fc = nn.Conv3d(2, 3, 2), nn.Linear(3 * 8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(torch.tanh(self.conv(x)).flatten(1))


class TwiceNet(nn.Module):
    """The same Linear called twice per forward."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.head = nn.Linear(5, 5), nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(x)))))


class TiedNet(nn.Module):
    """Two Linear modules sharing one weight, and a reflect-padded, 'same'-padded conv."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect")
        self.same = nn.Conv2d(2, 2, 3, padding="same")
        self.a, self.b = nn.Linear(8, 8), nn.Linear(8, 8)
        self.b.weight = self.a.weight
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.tanh(self.same(torch.tanh(self.conv(x)))).flatten(1)
        return self.head(torch.tanh(self.b(torch.tanh(self.a(x)))))


class UnusedLayerNet(nn.Module):
    """A prunable layer the forward never calls: its hooks never fire."""

    def __init__(self) -> None:
        super().__init__()
        self.used, self.unused = mlp(), nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.used(x)


PER_SAMPLE_MODELS = {  # name: (factory, input shape, uses the torch.func fallback)
    "mlp": (mlp, (12,), False),
    "cnn_bn_eval": (cnn_bn, (2, 3, 3), False),
    "conv2d_strided_dilated_grouped": (conv2d_net, (4, 7, 7), False),
    "conv1d": (conv1d_net, (2, 9), False),
    "linear_on_sequence": (SequenceNet, (4, 5), False),
    "conv3d": (Conv3dNet, (2, 3, 3, 3), True),
    "module_called_twice": (TwiceNet, (5,), True),
    "tied_weight_and_padding_modes": (TiedNet, (2, 2, 2), True),
    "unused_layer": (UnusedLayerNet, (12,), True),
}


# --- ḡ and F̂ against a naive backward loop ------------------------------------------------------


@pytest.mark.parametrize("factory", [mlp, cnn_bn, conv2d_net], ids=["mlp", "cnn_bn", "conv2d"])
@pytest.mark.parametrize("criterion", GRADIENT_CRITERIA)
def test_gradient_criteria_match_naive_loop(criterion: str, factory) -> None:
    torch.manual_seed(0)
    model = float64(factory())
    shape = {mlp: (12,), cnn_bn: (2, 3, 3), conv2d_net: (4, 7, 7)}[factory]
    batches = batches_for(shape)  # unequal batch sizes: ḡ is the mean of the batch means
    mean, sq = moments(naive_batch_grads(model, batches))
    lam = 1e-8 * max(float(f.max()) for f in sq.values())
    weights = fp.prunable_parameters(model)
    expected = {n: formula(criterion, w.detach(), mean[n], sq[n], lam) for n, w in weights.items()}
    scores = fp.score(model, criterion, batches)
    assert all(s.dtype == torch.float64 for s in scores.values())
    assert_close(scores, expected, rtol=1e-12)


@pytest.mark.parametrize("model_name", list(PER_SAMPLE_MODELS))
def test_per_sample_equals_batches_of_one(model_name: str, monkeypatch) -> None:
    factory, shape, uses_fallback = PER_SAMPLE_MODELS[model_name]
    torch.manual_seed(0)
    model = float64(factory())
    batches = batches_for(shape, sizes=(3, 4))
    calls = []
    original = fishprune.persample._func_squared_grads

    def counted(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(fishprune.persample, "_func_squared_grads", counted)
    for criterion in ("fd", "gn", "fts"):
        per_sample = fp.score(model, criterion, batches, per_sample=True)
        one_by_one = fp.score(model, criterion, singletons(batches))
        assert_close(per_sample, one_by_one, rtol=1e-10)
    assert bool(calls) == uses_fallback


def test_per_sample_float32_model_is_close() -> None:
    """A float32 model accumulates in float32: close to batches of one, not bit-identical."""
    torch.manual_seed(0)
    model = conv2d_net().eval()
    batches = [(x.float(), y) for x, y in batches_for((4, 7, 7), sizes=(3, 4))]
    per_sample = fp.score(model, "fd", batches, per_sample=True)
    assert all(s.dtype == torch.float32 for s in per_sample.values())
    assert_close(per_sample, fp.score(model, "fd", singletons(batches)), rtol=1e-5)


# --- Hutchinson: hd, hp, hts -------------------------------------------------------------------


def tiny_tanh_net() -> nn.Module:
    torch.manual_seed(0)
    return float64(nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)))


def exact_hessian_diagonal(model: nn.Module, batches, temperature: float) -> dict[str, Tensor]:
    weights = {n: p.detach() for n, p in fp.prunable_parameters(model).items()}
    sizes = [w.numel() for w in weights.values()]

    def loss(flat: Tensor) -> Tensor:
        chunks = dict(zip(weights, (c.view_as(w) for c, w in
                                    zip(flat.split(sizes), weights.values()))))
        return sum(
            F.cross_entropy(functional_call(model, chunks, (x,)) / temperature, y)
            for x, y in batches
        ) / len(batches)

    flat = torch.cat([w.reshape(-1) for w in weights.values()])
    diagonal = torch.autograd.functional.hessian(loss, flat).diagonal()
    return {n: d.view_as(w) for (n, w), d in zip(weights.items(), diagonal.split(sizes))}


def max_error(a: dict, b: dict) -> float:
    return max(float((a[n] - b[n]).abs().max()) for n in a)


def test_hutchinson_converges_to_exact_diagonal() -> None:
    """curvlinops style: the error is driven below a target as the probe count grows, at the
    Monte-Carlo rate (error × √probes stays bounded), never by luck at one count."""
    model, batches = tiny_tanh_net(), batches_for((3,), sizes=(6,))
    exact = exact_hessian_diagonal(model, batches, temperature=200.0)  # the default T
    scale = max(float(d.abs().max()) for d in exact.values())
    target, probes, errors = 0.03 * scale, 4, {}
    while probes <= 4096:
        # the mean error over a few seeds: one seed can be lucky at any single count
        errors[probes] = sum(max_error(fp.score(model, "hd", batches, probes=probes, seed=s),
                                       exact) for s in range(3)) / 3
        if errors[probes] < target:
            break
        probes *= 4
    assert errors[probes] < target, errors  # reached, within 4096 probes (1024 here)
    counts = sorted(errors)
    assert all(errors[b] < errors[a] for a, b in itertools.pairwise(counts)), errors
    rates = [errors[k] * k**0.5 for k in counts]  # ~ constant for a 1/√probes estimator
    assert max(rates) < 3 * min(rates), errors


def test_hutchinson_is_exact_for_a_single_weight() -> None:
    """With one scored weight, z ⊙ Hz = z²H = H for any Rademacher z: ĥ is exact at one probe."""
    torch.manual_seed(0)
    model = float64(nn.Sequential(nn.Linear(1, 1, bias=False), nn.Tanh(), nn.Linear(1, 2)))
    batches = batches_for((1,), sizes=(5,), classes=2)
    exact = exact_hessian_diagonal(model, batches, temperature=1.0)
    ours = fp.score(model, "hd", batches, probes=1, temperature=1.0, exclude=("2.*",))
    assert_close(ours, {"0.weight": exact["0.weight"]}, rtol=1e-10)


class Scaled(nn.Module):
    def __init__(self, inner: nn.Module, temperature: float) -> None:
        super().__init__()
        self.inner, self.temperature = inner, temperature

    def forward(self, x: Tensor) -> Tensor:
        return self.inner(x) / self.temperature


@pytest.mark.parametrize("criterion", ["hd", "hp", "hts", "grasp"])
def test_temperature_divides_the_logits(criterion: str) -> None:
    model, batches = tiny_tanh_net(), batches_for((3,))
    ours = fp.score(model, criterion, batches, temperature=3.0, seed=2, **_probes(criterion))
    scaled = fp.score(Scaled(model, 3.0), criterion, batches, temperature=1.0, seed=2,
                      **_probes(criterion))
    assert_close(ours, {n.removeprefix("inner."): s for n, s in scaled.items()}, rtol=1e-12)
    plain = fp.score(model, criterion, batches, temperature=1.0, seed=2, **_probes(criterion))
    assert max_error(ours, plain) > 1e-3 * max(float(s.abs().max()) for s in plain.values())


def _probes(criterion: str) -> dict:
    return {"probes": 3} if criterion in ("hd", "hp", "hts") else {}


def test_hp_and_hts_use_the_same_diagonal_as_hd() -> None:
    model, batches = tiny_tanh_net(), batches_for((3,))
    h = fp.score(model, "hd", batches, seed=5)
    g, _ = moments(naive_batch_grads(model, batches, temperature=200.0))
    weights = {n: p.detach() for n, p in fp.prunable_parameters(model).items()}
    assert_close(fp.score(model, "hp", batches, seed=5),
                 {n: 0.5 * w**2 * h[n] for n, w in weights.items()}, rtol=1e-12)
    assert_close(fp.score(model, "hts", batches, seed=5),
                 {n: (w * g[n] + 0.5 * w**2 * h[n]).abs() for n, w in weights.items()},
                 rtol=1e-10)


# --- GraSP ---------------------------------------------------------------------------------------


def test_grasp_matches_finite_differences_and_keeps_highest_w_hg() -> None:
    model, batches, t = tiny_tanh_net(), batches_for((3,)), 200.0
    g, _ = moments(naive_batch_grads(model, batches, temperature=t))
    norm = torch.sqrt(sum((v**2).sum() for v in g.values()))
    eps = 1e-3 / float(norm)

    def gradient_at(sign: float) -> dict:
        moved = copy.deepcopy(model)
        with torch.no_grad():
            for n, p in fp.prunable_parameters(moved).items():
                p.add_(sign * eps * g[n])
        mean, _ = moments(naive_batch_grads(moved, batches, temperature=t))
        return mean

    plus, minus = gradient_at(+1.0), gradient_at(-1.0)
    weights = fp.prunable_parameters(model)
    w_hg = {n: w.detach() * (plus[n] - minus[n]) / (2 * eps) for n, w in weights.items()}
    scores = fp.score(model, "grasp", batches)
    assert_close(scores, w_hg, rtol=1e-6)  # + w ⊙ Hg: Wang et al. remove the highest −w ⊙ Hg
    masks = fp.select(scores, 0.5)
    flat_scores = torch.cat([w_hg[n].reshape(-1) for n in w_hg])
    flat_masks = torch.cat([masks[n].reshape(-1) for n in masks])
    assert flat_scores[flat_masks].min() >= flat_scores[~flat_masks].max()


def test_grasp_excluding_a_layer_leaves_the_others_scores_unchanged() -> None:
    """Regression: ``exclude=`` restricted ḡ and Hḡ to the included weights, so excluding the
    classifier changed every other layer's scores (Spearman −0.02 on a small MLP). Wang et al.'s
    and the authors' code keep every weight in ḡ: Hḡ couples all of them."""
    torch.manual_seed(3)
    model = float64(nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4), nn.Tanh(),
                                  nn.Linear(4, 3)))
    batches = batches_for((5,))
    every = fp.score(model, "grasp", batches)
    without_head = fp.score(model, "grasp", batches, exclude=("4.*",))
    assert list(without_head) == ["0.weight", "2.weight"]
    assert_close(without_head, {n: every[n] for n in without_head}, rtol=1e-12)


# --- SynFlow -------------------------------------------------------------------------------------


def linear_chain() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(3, 4, bias=False), nn.ReLU(), nn.Linear(4, 5, bias=False), nn.ReLU(),
        nn.Linear(5, 2, bias=False),
    )


def test_synflow_closed_form_on_a_linear_chain() -> None:
    model = linear_chain()  # float32: SynFlow still computes in float64
    w1, w2, w3 = (model[i].weight.detach().double().abs() for i in (0, 2, 4))
    ones_in, ones_out = torch.ones(3, dtype=torch.float64), torch.ones(2, dtype=torch.float64)
    # R = 1ᵀ|W3||W2||W1|1; ∂R/∂|W_k|[i, j] = (1ᵀ|W3|…|W_{k+1}|)[i] · (|W_{k-1}|…|W1|1)[j]
    expected = {
        "0.weight": w1 * torch.outer(ones_out @ w3 @ w2, ones_in),
        "2.weight": w2 * torch.outer(ones_out @ w3, w1 @ ones_in),
        "4.weight": w3 * torch.outer(ones_out, w2 @ w1 @ ones_in),
    }
    scores = fp.score(model, "synflow", None, input_shape=(3,))
    assert all(s.dtype == torch.float64 for s in scores.values())
    assert_close(scores, expected, rtol=1e-14)
    r = ones_out @ w3 @ w2 @ w1 @ ones_in
    for s in scores.values():  # for a chain, every layer's scores sum to R (conservation)
        assert torch.allclose(s.sum(), r, rtol=1e-12)


def test_synflow_schedule_is_exponential_in_the_kept_fraction(monkeypatch) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(20, 30), nn.ReLU(), nn.Linear(30, 30), nn.ReLU(),
                          nn.Linear(30, 10))
    total = sum(p.numel() for p in fp.prunable_parameters(model).values())
    seen: list[tuple[float, dict]] = []
    original = Survivors.update

    def recorded(self: Survivors, scores: dict, density: float) -> None:
        original(self, scores, density)
        seen.append((density, self.masks()))

    monkeypatch.setattr(Survivors, "update", recorded)
    sparsity, rounds = 0.98, 100
    masks = fp.prune(model, "synflow", sparsity, None, input_shape=(20,))
    assert len(seen) == rounds  # synflow's default
    d = 1 - sparsity
    first_kept = sum(int(m.sum()) for m in seen[0][1].values()) / total
    assert first_kept > 0.9  # d^(1/100) ≈ 0.962, not ~0.1% (the pruned-fraction bug)
    for r, (density, round_masks) in enumerate(seen, start=1):
        assert density == pytest.approx(d ** (r / rounds), rel=1e-12)
        kept = sum(int(m.sum()) for m in round_masks.values())
        assert kept == kept_count(d ** (r / rounds), total)
    for (_, earlier), (_, later) in itertools.pairwise(seen):
        assert all(not (later[n] & ~earlier[n]).any() for n in earlier)
    assert sum(int(m.sum()) for m in masks.values()) == kept_count(d, total)
    for name, p in fp.prunable_parameters(model).items():
        assert (p[~masks[name]] == 0).all()


# --- FBSS where F̂ = 0 ---------------------------------------------------------------------------


def test_fbss_is_finite_and_half_lambda_w_squared_where_fisher_is_zero() -> None:
    torch.manual_seed(0)
    model = float64(nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)))
    with torch.no_grad():
        model[0].bias[0] = -1e3  # unit 0 is dead: its ReLU output and gradient are always 0
    batches = batches_for((4,))
    for x, _ in batches:
        x[:, 1] = 0.0  # input 1 is always 0: the weights reading it get no gradient
    _, sq = moments(naive_batch_grads(model, batches))
    lam = 1e-8 * max(float(f.max()) for f in sq.values())
    scores = fp.score(model, "fbss", batches)
    weights = fp.prunable_parameters(model)
    zero_total = 0
    for name, s in scores.items():
        assert torch.isfinite(s).all()
        zero = sq[name] == 0
        zero_total += int(zero.sum())
        w = weights[name].detach()
        assert torch.allclose(s[zero], 0.5 * lam * w[zero] ** 2, rtol=1e-12, atol=0)
    assert zero_total >= 4 + 4 + 3  # dead row, zero-input column, dead unit's outgoing weights
    assert (fp.score(model, "fbss", batches, damping=1e-3)["0.weight"][0] > 0).all()
