"""The iterative schedule: bit-identity with the straightforward loop, and the linear schedule.

``fp.prune`` does its set-up once and selects on flat buffers (:class:`Survivors`). The
reference below is the loop as it stood before (issue 13): ``fp.score`` → pruned weights to
−inf, live −inf to the lowest finite value → ``select_density`` with ``torch.kthvalue`` →
``fp.apply_masks``, every round. Masks, weights (bit for bit, signed zeros included), buffers and
flags must come out identical, on several models, criteria, round counts, scopes, schedules and
modes, including adversarial scores (±inf, NaN on pruned weights, mixed dtypes, massive ties).
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

import fishprune as fp
import fishprune.selection
from fishprune.criteria import Criterion
from fishprune.criteria._registry import REGISTRY, NoOptions
from fishprune.models import build_model
from fishprune.schedule import round_densities
from fishprune.selection import Survivors, kept_count

INF = math.inf

# --- the reference loop --------------------------------------------------------------------------


def reference_top(flat: Tensor, k: int) -> Tensor:
    n = flat.numel()
    if k <= 0:
        return torch.zeros(n, dtype=torch.bool)
    if k >= n:
        return torch.ones(n, dtype=torch.bool)
    threshold = torch.kthvalue(flat, n - k + 1).values
    above, ties = flat > threshold, flat == threshold
    return above | (ties & (torch.cumsum(ties, 0) <= k - int(above.sum())))


def reference_select(scores: dict[str, Tensor], density: float, scope: str) -> dict[str, Tensor]:
    for name, s in scores.items():
        if torch.isnan(s).any():
            raise ValueError(f"scores for {name} contain NaN")
    if scope == "layer":
        return {n: reference_top(s.reshape(-1), kept_count(density, s.numel())).reshape(s.shape)
                for n, s in scores.items()}
    dtype = torch.float64 if any(s.dtype == torch.float64 for s in scores.values()) else (
        torch.float32)
    flat = torch.cat([s.reshape(-1).to(dtype) for s in scores.values()])
    keep = reference_top(flat, kept_count(density, flat.numel()))
    sizes = [s.numel() for s in scores.values()]
    return {n: m.reshape(s.shape)
            for (n, s), m in zip(scores.items(), torch.split(keep, sizes))}


def alive_first(scores: Tensor, alive: Tensor) -> Tensor:
    lowest = torch.finfo(scores.dtype).min
    return torch.where(alive, scores.clamp_min(lowest), torch.full_like(scores, -INF))


def reference_densities(density: float, rounds: int, schedule: str) -> list[float]:
    if schedule == "exponential":
        return [density ** (r / rounds) if r < rounds else density for r in range(1, rounds + 1)]
    return [1.0 - (1.0 - density) * (r / rounds) if r < rounds else density
            for r in range(1, rounds + 1)]


def reference_prune(model: nn.Module, criterion: str, sparsity: float, batches, *, rounds: int,
                    schedule: str, scope: str, seed: int, mode: str, **options) -> dict:
    masks = None
    for density in reference_densities(1.0 - sparsity, rounds, schedule):
        scores = fp.score(model, criterion, batches, seed=seed, mode=mode, **options)
        if masks is not None:
            scores = {n: alive_first(s, masks[n]) for n, s in scores.items()}
        masks = reference_select(scores, density, scope)
        fp.apply_masks(model, masks)
    assert masks is not None
    return masks


# --- models and criteria -------------------------------------------------------------------------


class Counter(nn.Module):
    """A buffer that every forward pass increments and that scales the output: a criterion sees
    the same model in every round only if the buffers are restored between rounds."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return x * (1 + self.calls)


class ResBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1, bias=False), nn.BatchNorm2d(6))
        self.conv1 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(6)
        self.conv2 = nn.Conv2d(6, 6, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.relu(self.stem(x))
        y = torch.relu(self.bn1(self.conv1(x)))
        return self.fc(torch.relu(x + self.bn2(self.conv2(y))).mean((2, 3)))


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    if name in ("mlp", "mlp64", "tied"):
        model = nn.Sequential(nn.Flatten(), nn.Linear(48, 24), nn.ReLU(), nn.Linear(24, 12),
                              nn.ReLU(), nn.Linear(12, 3))
        if name == "mlp64":
            model.double()
        if name == "tied":  # five distinct weight values: massive ties, live zeros
            with torch.no_grad():
                for p in model.parameters():
                    p.copy_((p * 20).round().clamp(-2, 2) / 10)
        return model
    if name == "dropout":
        return nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.Dropout(0.5), nn.ReLU(),
                             nn.Linear(16, 3))
    if name == "counter":
        return nn.Sequential(nn.Flatten(), nn.Linear(48, 16), Counter(), nn.Tanh(),
                             nn.Linear(16, 3))
    if name in ("cnn_bn", "cnn_cl"):
        model = nn.Sequential(
            nn.Conv2d(3, 6, 3, padding=1), nn.BatchNorm2d(6), nn.ReLU(),
            nn.Conv2d(6, 8, 3, stride=2, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
        )
    else:
        model = ResBlock()
    for m in model.modules():  # non-trivial statistics, so that restoring them matters
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
    if name == "cnn_cl":  # channels-last: the convolution weights are not contiguous
        model.to(memory_format=torch.channels_last)
        assert not model[0].weight.is_contiguous()
    return model


def batches(dtype: torch.dtype = torch.float32) -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(6, 3, 4, 4, generator=gen, dtype=dtype),
             torch.randint(0, 3, (6,), generator=gen)) for _ in range(2)]


def adversary(model, params, data, ctx, opts) -> dict[str, Tensor]:
    """Pruned (zero) weights score +inf or NaN; live ones random with −inf, the lowest finite
    value of their dtype and heavy ties; float32, float64 and bfloat16 tensors mixed."""
    gen = ctx.generator()
    out = {}
    for i, (name, p) in enumerate(params.items()):
        dtype = (torch.float32, torch.float64, torch.bfloat16)[i % 3]
        s = (torch.rand(p.shape, generator=gen) * 4).round().to(dtype)
        s.view(-1)[::7] = -INF
        s.view(-1)[3::11] = torch.finfo(dtype).min
        pruned = INF if ctx.seed % 2 else math.nan
        out[name] = torch.where(p.detach() == 0, torch.full_like(s, pruned), s)
    return out


def moody(model, params, data, ctx, opts) -> dict[str, Tensor]:
    """Scores that depend on the train/eval flag found, then switches the model to eval."""
    sign = 1.0 if model.training else -1.0
    out = {n: sign * torch.rand(p.shape, generator=ctx.generator()) for n, p in params.items()}
    model.eval()
    return out


def backward(model, params, data, ctx, opts) -> dict[str, Tensor]:
    """|∂ℓ/∂w| through ``.backward()`` (accumulates into ``.grad``), then freezes a weight."""
    for inputs, targets in data:
        nn.functional.cross_entropy(model(inputs), targets).backward()
    out = {n: p.grad.abs().clone() for n, p in params.items()}
    next(iter(params.values())).requires_grad_(False)
    return out


@pytest.fixture
def with_adversary(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, fn, needs_data in [("adversary", adversary, False), ("moody", moody, False),
                                 ("backward", backward, True)]:
        monkeypatch.setitem(REGISTRY, name, Criterion(
            name=name, fn=fn, options=NoOptions, data="batches" if needs_data else "none",
            seeded=False, dtype=None, passes=1, default_rounds=1, summary="t"))


def bits(t: Tensor) -> Tensor:
    return t.detach().reshape(-1).contiguous().view(torch.uint8)


def state(model: nn.Module) -> list:
    return [
        *[(n, bits(p), p.requires_grad, p.grad) for n, p in model.named_parameters()],
        *[(n, bits(b)) for n, b in model.named_buffers()],
        *[(n, m.training) for n, m in model.named_modules()],
    ]


def assert_same_state(a: nn.Module, b: nn.Module) -> None:
    for x, y in zip(state(a), state(b), strict=True):
        assert x[0] == y[0]
        for u, v in zip(x[1:], y[1:]):
            assert (torch.equal(u, v) if isinstance(u, Tensor) else u == v), x[0]


CASES = [
    # model, criterion, rounds, scope, schedule, mode, options
    ("mlp", "synflow", 100, "global", "exponential", "eval", {}),
    ("resnet", "synflow", 30, "layer", "exponential", "eval", {}),
    ("cnn_bn", "synflow", 10, "global", "linear", "eval", {}),
    ("mlp", "synflow", 1, "layer", "exponential", "eval", {}),
    ("mlp", "snip", 5, "layer", "linear", "eval", {}),
    ("mlp64", "fts", 4, "global", "exponential", "eval", {}),
    ("resnet", "fts", 4, "global", "exponential", "train", {}),
    ("cnn_bn", "fts", 1, "global", "exponential", "eval", {}),
    ("cnn_bn", "hts", 3, "global", "linear", "eval", {"probes": 2}),
    ("resnet", "grasp", 3, "layer", "exponential", "eval", {}),
    ("tied", "magnitude", 7, "global", "linear", "eval", {}),
    ("tied", "magnitude", 7, "layer", "exponential", "eval", {}),
    ("dropout", "snip", 4, "global", "exponential", "train", {}),
    ("counter", "gn", 4, "layer", "exponential", "eval", {}),
    ("mlp", "random", 6, "global", "linear", "eval", {}),
    ("mlp", "adversary", 6, "global", "exponential", "eval", {}),
    ("cnn_bn", "adversary", 6, "layer", "linear", "eval", {}),
    ("mlp", "moody", 4, "global", "exponential", "train", {}),
    ("cnn_bn", "backward", 4, "global", "exponential", "eval", {}),
    ("cnn_cl", "snip", 4, "global", "exponential", "eval", {}),
    ("cnn_cl", "magnitude", 3, "layer", "linear", "eval", {}),
]


@pytest.fixture(params=["numpy", "torch"])
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Selection passes on NumPy views of CPU tensors (the default) or with torch ops (as on
    a GPU)."""
    monkeypatch.setattr(fishprune.selection, "USE_NUMPY", request.param == "numpy")
    return request.param


@pytest.mark.parametrize(("model_name", "criterion", "rounds", "scope", "schedule", "mode",
                          "options"), CASES, ids=["-".join(map(str, c[:6])) for c in CASES])
@pytest.mark.parametrize("seed", [0, 1])
def test_prune_is_bit_identical_to_the_reference_loop(
    model_name, criterion, rounds, scope, schedule, mode, options, seed, with_adversary, backend,
) -> None:
    dtype = torch.float64 if model_name == "mlp64" else torch.float32
    data = batches(dtype)
    ours, theirs = build(model_name), build(model_name)
    got = fp.prune(ours, criterion, 0.9, data, rounds=rounds, schedule=schedule, scope=scope,
                   seed=seed, mode=mode, **options)
    want = reference_prune(theirs, criterion, 0.9, data, rounds=rounds, schedule=schedule,
                           scope=scope, seed=seed, mode=mode, **options)
    assert list(got) == list(want)
    for name in want:
        assert got[name].dtype == torch.bool and torch.equal(got[name], want[name]), name
    assert_same_state(ours, theirs)


@pytest.mark.parametrize("start", ["train", "eval"])
@pytest.mark.parametrize(("criterion", "mode", "rounds"),
                         [("synflow", "eval", 5), ("fts", "train", 3), ("snip", "eval", 1)])
def test_prune_leaves_all_but_the_pruned_weights_as_found(criterion, mode, rounds,
                                                          start) -> None:
    """Flags, ``requires_grad``, ``.grad`` (the same objects), buffers and live weights."""
    model = build("resnet")
    model.train(start == "train")
    model.bn1.train(start != "train")
    model.conv2.weight.requires_grad_(False)
    model.fc.bias.requires_grad_(False)
    grad = torch.full_like(model.conv1.weight, 0.25)
    model.conv1.weight.grad = grad
    params = [(n, p, p.detach().clone(), p.requires_grad, p.grad)
              for n, p in model.named_parameters()]
    buffers = [(b, b.clone()) for b in model.buffers()]
    modes = [m.training for m in model.modules()]
    masks = fp.prune(model, criterion, 0.8, batches(), rounds=rounds, mode=mode)
    for name, p, value, flag, g in params:
        assert p.requires_grad == flag and p.grad is g, name
        expected = value * masks[name] if name in masks else value
        assert torch.equal(p.detach(), expected), name
    assert torch.equal(grad, torch.full_like(grad, 0.25))
    assert all(torch.equal(b, value) for b, value in buffers)
    assert [m.training for m in model.modules()] == modes


@pytest.mark.slow
@pytest.mark.parametrize(("model_name", "scope"), [("lenet5", "global"), ("resnet20", "global"),
                                                   ("resnet20", "layer")])
def test_synflow_100_rounds_on_the_benchmark_models(model_name: str, scope: str) -> None:
    torch.manual_seed(0)
    ours = build_model(model_name)
    theirs = build_model(model_name)
    theirs.load_state_dict(ours.state_dict())
    got = fp.prune(ours, "synflow", 0.98, None, input_shape=(1, 28, 28), scope=scope)
    want = reference_prune(theirs, "synflow", 0.98, None, rounds=100, schedule="exponential",
                           scope=scope, seed=0, mode="eval", input_shape=(1, 28, 28))
    assert all(torch.equal(got[n], want[n]) for n in want)
    assert_same_state(ours, theirs)


def test_nan_on_a_live_weight_is_refused_naming_the_tensor(monkeypatch) -> None:
    def nan_in_round_two(model, params, data, ctx, opts) -> dict[str, Tensor]:
        pruned = any(bool((p == 0).any()) for p in params.values())
        out = {n: torch.rand(p.shape, generator=ctx.generator()) for n, p in params.items()}
        if pruned:  # second round: a NaN on a live weight of the last tensor
            last = list(params)[-1]
            live = params[last].detach().reshape(-1).ne(0).nonzero()
            out[last].view(-1)[int(live[0, 0])] = math.nan
        return out

    monkeypatch.setitem(REGISTRY, "nan2", Criterion(
        name="nan2", fn=nan_in_round_two, options=NoOptions, data="none", seeded=False,
        dtype=None, passes=1, default_rounds=1, summary="test"))
    for scope in ("global", "layer"):
        with pytest.raises(ValueError, match=r"scores for 5\.weight contain 1 NaN"):
            fp.prune(build("mlp"), "nan2", 0.5, None, rounds=3, scope=scope)


# --- Survivors against the reference selection, on arbitrary score sequences -------------------

VALUES = st.one_of(
    st.sampled_from([-INF, -1.0, 0.0, 0.5, 1.0, INF, -3.4028234663852886e38]),
    st.floats(-10, 10, allow_nan=False, width=32),
)


@st.composite
def score_sequences(draw) -> tuple[list[dict[str, Tensor]], list[float]]:
    shapes = draw(st.lists(st.lists(st.integers(1, 4), min_size=1, max_size=3),
                           min_size=1, max_size=3))
    dtypes = [draw(st.sampled_from([torch.float32, torch.float64])) for _ in shapes]
    rounds = draw(st.integers(1, 4))
    sequence = []
    for _ in range(rounds):
        sequence.append({
            f"layer{i}.weight": torch.tensor(
                draw(st.lists(VALUES, min_size=math.prod(s), max_size=math.prod(s))),
                dtype=dtype).reshape(s)
            for i, (s, dtype) in enumerate(zip(shapes, dtypes))
        })
    densities = sorted((draw(st.integers(0, 1000)) / 1000 for _ in range(rounds)), reverse=True)
    return sequence, densities


@settings(max_examples=150, deadline=None)
@given(case=score_sequences(), scope=st.sampled_from(["global", "layer"]),
       numpy=st.booleans())
def test_survivors_equal_the_reference_selection_round_by_round(case, scope: str,
                                                                numpy: bool) -> None:
    sequence, densities = case
    fishprune.selection.USE_NUMPY = numpy
    try:
        survivors = Survivors({n: s.shape for n, s in sequence[0].items()}, scope=scope)
    finally:
        fishprune.selection.USE_NUMPY = True
    masks = None
    for scores, density in zip(sequence, densities):
        if masks is not None:
            scores_ref = {n: alive_first(s, masks[n]) for n, s in scores.items()}
        else:
            scores_ref = scores
        masks = reference_select(scores_ref, density, scope)
        survivors.update(scores, density)
        got = survivors.masks()
        assert all(torch.equal(got[n], masks[n]) for n in masks)
        assert all(torch.equal(p, ~m) for p, m in zip(survivors.pruned, masks.values()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("numpy", [True, False])
def test_survivors_tie_a_live_minus_inf_with_the_lowest_finite_value(dtype, numpy,
                                                                     monkeypatch) -> None:
    monkeypatch.setattr(fishprune.selection, "USE_NUMPY", numpy)
    lowest = torch.finfo(dtype).min
    scores = {"a": torch.tensor([-INF, lowest, 1.0], dtype=dtype)}
    survivors = Survivors({"a": scores["a"].shape})
    survivors.update(scores, 1.0)  # first update: −inf ranks below the lowest finite value
    assert survivors.masks()["a"].tolist() == [True, True, True]
    survivors.update(scores, 2 / 3)  # later: they tie, and the lower index stays
    assert survivors.masks()["a"].tolist() == [True, False, True]
    fresh = Survivors({"a": scores["a"].shape})
    fresh.update(scores, 2 / 3)
    assert fresh.masks()["a"].tolist() == [False, True, True]


def test_survivors_rank_a_live_minus_inf_as_the_lowest_value_of_its_own_dtype() -> None:
    f32_min = torch.finfo(torch.float32).min
    scores = {"a": torch.tensor([-INF, f32_min, 1.0]), "b": torch.tensor([2.0],
                                                                           dtype=torch.float64)}
    survivors = Survivors({n: s.shape for n, s in scores.items()})
    survivors.update(scores, 1.0)
    survivors.update(scores, 0.75)  # keep 3 of 4: −inf and f32_min tie, the lower index stays
    assert survivors.masks()["a"].tolist() == [True, False, True]
    assert reference_select({n: alive_first(s, torch.ones_like(s, dtype=torch.bool))
                             for n, s in scores.items()}, 0.75, "global")["a"].tolist() == [
        True, False, True]


# --- the linear schedule -------------------------------------------------------------------------


@pytest.mark.parametrize("rounds", [1, 2, 5, 100])
@pytest.mark.parametrize("density", [0.02, 0.1, 0.5, 0.999])
def test_round_densities(rounds: int, density: float) -> None:
    linear = round_densities(density, rounds, "linear")
    exponential = round_densities(density, rounds, "exponential")
    for seq in (linear, exponential):
        assert len(seq) == rounds and seq[-1] == density
        assert all(a >= b for a, b in itertools.pairwise([1.0, *seq]))
    for r, value in enumerate(linear, start=1):  # equal steps from 1 down to d
        assert value == pytest.approx(1 - (1 - density) * r / rounds, abs=1e-15)
    for r, value in enumerate(exponential, start=1):
        assert value == pytest.approx(density ** (r / rounds), rel=1e-15)
    with pytest.raises(ValueError, match="schedule must be one of exponential, linear"):
        round_densities(density, rounds, "cosine")


@pytest.fixture
def record_rounds(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, dict[str, Tensor]]]:
    seen: list[tuple[float, dict[str, Tensor]]] = []
    original = Survivors.update

    def recorded(self: Survivors, scores: dict[str, Tensor], density: float) -> None:
        original(self, scores, density)
        seen.append((density, self.masks()))

    monkeypatch.setattr(Survivors, "update", recorded)
    return seen


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("criterion", ["synflow", "snip"])
def test_linear_schedule_keeps_equal_steps_monotone_and_exact(criterion, scope,
                                                              record_rounds) -> None:
    model, rounds, sparsity = build("mlp"), 8, 0.95
    params = fp.prunable_parameters(model)
    masks = fp.prune(model, criterion, sparsity, batches(), rounds=rounds, schedule="linear",
                     scope=scope)
    assert len(record_rounds) == rounds
    groups = ([sum(p.numel() for p in params.values())] if scope == "global"
              else [p.numel() for p in params.values()])
    d = 1 - sparsity
    for r, (density, round_masks) in enumerate(record_rounds, start=1):
        assert density == pytest.approx(1 - (1 - d) * r / rounds, abs=1e-15)
        kept = ([sum(int(m.sum()) for m in round_masks.values())] if scope == "global"
                else [int(m.sum()) for m in round_masks.values()])
        assert kept == [kept_count(density, n) for n in groups]
    for (_, earlier), (_, later) in itertools.pairwise(record_rounds):
        assert all(not (later[n] & ~earlier[n]).any() for n in earlier), "a weight came back"
    if scope == "global":
        assert sum(int(m.sum()) for m in masks.values()) == kept_count(d, groups[0])
    for name, p in params.items():
        assert (p[~masks[name]] == 0).all() and (p[masks[name]] != 0).all()


def test_linear_and_exponential_differ_and_bad_schedule_is_refused() -> None:
    first = fp.prune(build("mlp"), "synflow", 0.95, batches(), rounds=10, schedule="linear")
    second = fp.prune(build("mlp"), "synflow", 0.95, batches(), rounds=10)
    assert any(not torch.equal(first[n], second[n]) for n in first)
    with pytest.raises(ValueError, match="schedule must be one of exponential, linear"):
        fp.prune(build("mlp"), "synflow", 0.95, batches(), schedule="cosine")
