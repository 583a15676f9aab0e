"""Selection, schedule and masking invariants.

Exact kept counts under massive ties and ±inf, deterministic tie-breaking, masks monotone across
rounds (pruned weights never come back), and pruned weights exactly zero through training with
SGD (momentum, weight decay, Nesterov), Adam and AdamW, stale optimizer state included.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.nn import functional as F

import fishprune as fp
import fishprune.selection
from fishprune.criteria import Criterion
from fishprune.criteria._registry import REGISTRY, NoOptions
from fishprune.selection import Survivors

INF = math.inf


def expected_kept(sparsity: float, total: int) -> int:
    """round((1 − s) · N), halves up, in exact decimal arithmetic."""
    return math.floor((1 - Fraction(repr(sparsity))) * total + Fraction(1, 2))


def kept(masks: dict[str, Tensor]) -> int:
    return sum(int(m.sum()) for m in masks.values())


def flat(tensors: dict[str, Tensor]) -> Tensor:
    return torch.cat([t.reshape(-1).double() for t in tensors.values()])


# --- exact counts --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sparsity", "total", "count"),
    [
        (0.5, 3, 2),  # 1.5 -> 2
        (0.9, 25, 3),  # 2.5 -> 3, although 1 - 0.9 = 0.0999…98 in binary
        (0.75, 2, 1),  # 0.5 -> 1
        (0.98, 100, 2),
        (0.99, 1000, 10),
        (0.96, 10, 0),  # 0.4 -> 0: k = 0
        (0.95, 10, 1),  # 0.5 -> 1
        (0.0, 17, 17),  # k = N
        (0.01, 17, 17),  # 16.83 -> 17
    ],
)
@pytest.mark.parametrize("scope", ["global", "layer"])
def test_exact_count_with_all_scores_equal(sparsity, total, count, scope) -> None:
    masks = fp.select({"w": torch.ones(total)}, sparsity, scope=scope)
    assert kept(masks) == count == expected_kept(sparsity, total)
    assert masks["w"][:count].all() and not masks["w"][count:].any()  # lower index first


def test_global_ties_prefer_earlier_layers_then_lower_index() -> None:
    scores = {"a": torch.zeros(2, 3), "b": torch.zeros(4), "c": torch.zeros(5)}
    masks = fp.select(scores, 0.6)  # keep round(0.4 · 15) = 6
    assert masks["a"].all() and masks["b"].tolist() == [False] * 4 and not masks["c"].any()
    masks = fp.select(scores, 0.5)  # keep 7.5 -> 8
    assert masks["a"].all() and masks["b"].tolist() == [True, True, False, False]


def test_layer_scope_keeps_the_fraction_of_every_tensor() -> None:
    scores = {"a": torch.arange(10.0), "b": torch.zeros(3, 2), "c": -torch.arange(5.0)}
    masks = fp.select(scores, 0.5, scope="layer")
    assert [int(m.sum()) for m in masks.values()] == [5, 3, 3]
    assert masks["a"].tolist() == [False] * 5 + [True] * 5
    assert masks["b"].reshape(-1).tolist() == [True] * 3 + [False] * 3
    assert masks["c"].tolist() == [True] * 3 + [False] * 2


def test_infinite_scores() -> None:
    scores = {"a": torch.tensor([-INF, 1.0, INF, -INF]), "b": torch.tensor([INF, 0.0, -INF])}
    for sparsity, expected in [
        (1 - 1 / 7, [[False, False, True, False], [False, False, False]]),
        (1 - 2 / 7, [[False, False, True, False], [True, False, False]]),
        (1 - 3 / 7, [[False, True, True, False], [True, False, False]]),
        (1 - 5 / 7, [[True, True, True, False], [True, True, False]]),
        (0.0, [[True] * 4, [True] * 3]),
    ]:
        masks = fp.select(scores, sparsity)
        assert [m.tolist() for m in masks.values()] == expected, sparsity
    all_minus = {"a": torch.full((4,), -INF)}
    assert fp.select(all_minus, 0.5)["a"].tolist() == [True, True, False, False]


def test_float64_scores_rank_in_float64() -> None:
    scores = {"a": torch.ones(1, dtype=torch.float32),
              "b": torch.tensor([1 + 1e-12], dtype=torch.float64)}
    assert fp.select(scores, 0.5)["b"].item()  # 1 + 1e-12 > 1, invisible in float32


def test_layer_scope_ranks_in_the_scores_own_dtype() -> None:
    big = torch.tensor([2**60 + 1, 2**60, 2**60 + 2, 5], dtype=torch.int64)  # not in float64
    assert fp.select({"a": big}, 0.5, scope="layer")["a"].tolist() == [True, False, True, False]
    half = torch.tensor([0.5, 0.25, 1.0, 0.25], dtype=torch.bfloat16)
    assert fp.select({"a": half}, 0.5, scope="layer")["a"].tolist() == [True, False, True, False]


def test_scores_that_require_grad_are_accepted() -> None:
    scores = {"a": torch.tensor([0.3, 0.1, 0.2], requires_grad=True),
              "b": torch.tensor([0.4, 0.0], dtype=torch.float64, requires_grad=True)}
    assert fp.select(scores, 0.6)["b"].tolist() == [True, False]
    assert fp.select(scores, 0.5, scope="layer")["a"].tolist() == [True, False, True]


def test_masks_are_bool_with_the_scores_shapes() -> None:
    scores = {"a": torch.rand(2, 3, 4), "b": torch.rand(5)}
    for scope in ("global", "layer"):
        masks = fp.select(scores, 0.3, scope=scope)
        assert list(masks) == ["a", "b"]
        assert all(m.dtype == torch.bool and m.shape == scores[n].shape for n, m in masks.items())


def test_nan_scores_are_rejected_naming_the_tensor() -> None:
    scores = {"conv.weight": torch.rand(3), "fc.weight": torch.tensor([0.1, math.nan, 0.2])}
    for scope in ("global", "layer"):
        with pytest.raises(ValueError, match=r"scores for fc\.weight contain 1 NaN"):
            fp.select(scores, 0.5, scope=scope)


def test_select_bad_arguments() -> None:
    with pytest.raises(ValueError, match="scores is empty"):
        fp.select({}, 0.5)
    with pytest.raises(ValueError, match="scope must be one of global, layer"):
        fp.select({"a": torch.rand(3)}, 0.5, scope="tensor")
    with pytest.raises(ValueError, match=r"scores\['a'\] is a list"):
        fp.select({"a": [1.0, 2.0]}, 0.5)  # type: ignore[dict-item]


# --- property tests ------------------------------------------------------------------------------

VALUES = st.one_of(
    st.sampled_from([-INF, -1.0, 0.0, 0.5, 1.0, INF]),  # heavy ties
    st.floats(-10, 10, allow_nan=False, width=32),
)


@st.composite
def score_dicts(draw) -> dict[str, Tensor]:
    out = {}
    for i in range(draw(st.integers(1, 3))):
        shape = draw(st.lists(st.integers(1, 4), min_size=1, max_size=3))
        values = draw(st.lists(VALUES, min_size=math.prod(shape), max_size=math.prod(shape)))
        dtype = draw(st.sampled_from([torch.float32, torch.float64]))
        out[f"layer{i}.weight"] = torch.tensor(values, dtype=dtype).reshape(shape)
    return out


def assert_top_with_ties_in_order(scores: Tensor, mask: Tensor) -> None:
    """Kept ≥ every pruned score; among equal scores the kept ones come first."""
    if mask.all() or not mask.any():
        return
    lowest_kept, highest_pruned = scores[mask].min(), scores[~mask].max()
    assert lowest_kept >= highest_pruned
    if lowest_kept == highest_pruned:
        tied = (scores == lowest_kept).nonzero().reshape(-1)
        kept_tied, pruned_tied = tied[mask[tied]], tied[~mask[tied]]
        assert kept_tied.max() < pruned_tied.min()


def select_with(scores: dict[str, Tensor], sparsity: float, *, numpy: bool,
                scope: str = "global") -> dict[str, Tensor]:
    """``fp.select`` on NumPy views of the scores (the CPU default) or with torch ops only."""
    fishprune.selection.USE_NUMPY = numpy
    try:
        return fp.select(scores, sparsity, scope=scope)
    finally:
        fishprune.selection.USE_NUMPY = True


@settings(max_examples=150, deadline=None)
@given(scores=score_dicts(), per_mille=st.integers(0, 999), numpy=st.booleans())
def test_property_global(scores: dict[str, Tensor], per_mille: int, numpy: bool) -> None:
    sparsity = per_mille / 1000
    masks = select_with(scores, sparsity, numpy=numpy)
    total = sum(s.numel() for s in scores.values())
    assert kept(masks) == expected_kept(sparsity, total)
    assert_top_with_ties_in_order(flat(scores), flat(masks).bool())


@settings(max_examples=150, deadline=None)
@given(scores=score_dicts(), per_mille=st.integers(0, 999), numpy=st.booleans())
def test_property_layer(scores: dict[str, Tensor], per_mille: int, numpy: bool) -> None:
    sparsity = per_mille / 1000
    masks = select_with(scores, sparsity, numpy=numpy, scope="layer")
    for name, s in scores.items():
        assert int(masks[name].sum()) == expected_kept(sparsity, s.numel())
        assert_top_with_ties_in_order(s.reshape(-1).double(), masks[name].reshape(-1))


# --- prune: schedule, monotone masks, zeros -------------------------------------------------------


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2), nn.ReLU(), nn.Flatten(), nn.Linear(4, 3),
    )


def batches() -> list[tuple[Tensor, Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(4, 2, 3, 3, generator=gen), torch.randint(0, 3, (4,), generator=gen))
            for _ in range(2)]


def adversary(model, params, batches, ctx, opts) -> dict[str, Tensor]:
    """Scores pruned (zero) weights +inf and every third live weight -inf: tempts resurrection."""
    gen = ctx.generator()
    out = {}
    for name, p in params.items():
        s = torch.rand(p.shape, generator=gen)
        s.view(-1)[::3] = -INF
        out[name] = torch.where(p.detach() == 0, torch.full_like(s, INF), s)
    return out


@pytest.fixture
def record_rounds(monkeypatch) -> list[dict[str, Tensor]]:
    """The masks after every round of ``fp.prune`` (each selection goes through Survivors)."""
    seen: list[dict[str, Tensor]] = []
    original = Survivors.update

    def recorded(self: Survivors, scores: dict[str, Tensor], density: float) -> None:
        original(self, scores, density)
        seen.append(self.masks())

    monkeypatch.setattr(Survivors, "update", recorded)
    return seen


@pytest.mark.parametrize("scope", ["global", "layer"])
@pytest.mark.parametrize("criterion", ["adversary", "random", "snip"])
def test_iterative_masks_are_monotone(criterion, scope, monkeypatch, record_rounds) -> None:
    monkeypatch.setitem(REGISTRY, "adversary", Criterion(
        name="adversary", fn=adversary, options=NoOptions, data="none", seeded=False, dtype=None,
        passes=1, default_rounds=1, summary="test"))
    model = small_cnn()
    masks = fp.prune(model, criterion, 0.9, batches(), rounds=6, scope=scope, seed=3)
    assert len(record_rounds) == 6
    for earlier, later in itertools.pairwise(record_rounds):
        for name in earlier:
            assert not (later[name] & ~earlier[name]).any(), f"{name}: a pruned weight came back"
    params = fp.prunable_parameters(model)
    if scope == "global":
        assert kept(masks) == expected_kept(0.9, sum(p.numel() for p in params.values()))
    else:
        assert all(int(masks[n].sum()) == expected_kept(0.9, p.numel()) for n, p in params.items())
    for name, p in params.items():
        assert (p[~masks[name]] == 0).all()
        assert (p[masks[name]] != 0).all()


def test_prune_zeroes_exactly_the_pruned_weights() -> None:
    model = small_cnn()
    before = {n: p.detach().clone() for n, p in fp.prunable_parameters(model).items()}
    masks = fp.prune(model, "fts", 0.75, batches())
    for name, p in fp.prunable_parameters(model).items():
        assert torch.equal(p[masks[name]], before[name][masks[name]])
        assert (p[~masks[name]] == 0).all()
    assert kept(masks) == expected_kept(0.75, sum(m.numel() for m in masks.values()))
    assert model[0].bias.ne(0).all()  # biases are not pruned


def test_prune_exclude_as_a_generator_holds_for_every_round() -> None:
    model = small_cnn()
    masks = fp.prune(model, "magnitude", 0.5, None, rounds=3, exclude=(p for p in ["6.*"]))
    assert list(masks) == ["0.weight", "3.weight"]


@pytest.mark.parametrize("criterion", fp.criteria())
def test_prune_over_rounds_reads_a_generator_like_a_list(criterion: str) -> None:
    """Regression: synflow (data-free, 100 rounds) read only the first batch of the first round
    from a generator, so round 2 said "batches is empty"."""
    data = batches()
    from_list = fp.prune(small_cnn(), criterion, 0.8, data, rounds=3, seed=7)
    from_gen = fp.prune(small_cnn(), criterion, 0.8, (b for b in data), rounds=3, seed=7)
    assert all(torch.equal(from_list[n], from_gen[n]) for n in from_list)


@pytest.mark.parametrize("criterion", fp.criteria())
def test_prune_is_deterministic(criterion: str) -> None:
    first = fp.prune(small_cnn(), criterion, 0.8, batches(), seed=7)
    again = fp.prune(small_cnn(), criterion, 0.8, batches(), seed=7)
    assert list(first) == list(again)
    for name in first:
        assert torch.equal(first[name], again[name]), name


# --- apply_masks and Masker ----------------------------------------------------------------------


def test_apply_masks_rejects_bad_masks() -> None:
    model = small_cnn()
    with pytest.raises(ValueError, match=r"mask for 0\.weight has shape \(4, 2, 3\), param"):
        fp.apply_masks(model, {"0.weight": torch.ones(4, 2, 3, dtype=torch.bool)})
    with pytest.raises(ValueError, match=r"mask for 'conv9\.weight', which is not a parameter"):
        fp.apply_masks(model, {"conv9.weight": torch.ones(1, dtype=torch.bool)})
    with pytest.raises(ValueError, match="must be a bool tensor"):
        fp.apply_masks(model, {"6.weight": torch.ones(3, 4)})
    with pytest.raises(ValueError, match="has shape"):
        fp.Masker(model, {"6.weight": torch.ones(4, 3, dtype=torch.bool)})


OPTIMIZERS = {
    "sgd_nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-4,
                                              nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=5e-4),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.05),
}


def train_masked(optimizer: str, *, dense_steps: int, guard: bool = True):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    opt = OPTIMIZERS[optimizer](model.parameters())
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))

    def step(masker: fp.Masker | None) -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if masker is not None:
            masker.mask_grads_()
        opt.step()
        if masker is not None and guard:
            masker.mask_weights_()

    for _ in range(dense_steps):  # leaves momentum / Adam moments for every weight
        step(None)
    masks = fp.prune(model, "magnitude", 0.7, None)
    pruned_at = {n: p.detach().clone() for n, p in fp.prunable_parameters(model).items()}
    masker = fp.Masker(model, masks)
    leaks = 0
    for _ in range(20):
        step(masker)
        leaks += sum(int((p[~masks[n]] != 0).sum())
                     for n, p in fp.prunable_parameters(model).items())
    moved = any(not torch.equal(p[masks[n]], pruned_at[n][masks[n]])
                for n, p in fp.prunable_parameters(model).items())
    return leaks, moved


@pytest.mark.parametrize("dense_steps", [0, 5], ids=["fresh", "stale_state"])
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_masker_keeps_pruned_weights_exactly_zero(optimizer: str, dense_steps: int) -> None:
    leaks, moved = train_masked(optimizer, dense_steps=dense_steps)
    assert leaks == 0
    assert moved  # the live weights did train


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_stale_state_needs_the_weight_guard(optimizer: str) -> None:
    """Without mask_weights_, leftover momentum moves pruned weights: the guard is not idle."""
    leaks, _ = train_masked(optimizer, dense_steps=5, guard=False)
    assert leaks > 0
