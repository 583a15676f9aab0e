"""Contract tests for every registered criterion (timm/optax style).

Every criterion, on an MLP, a CNN with BatchNorm and a residual CNN: keys, shapes, finite values,
determinism under a seed, and the model left exactly as it was (parameters, buffers, ``.grad``,
``requires_grad``, the train/eval flag of every submodule). Plus the validation errors.
"""

from __future__ import annotations

import math

import pytest
import torch
from _model_state import assert_unchanged, snapshot
from torch import nn

import fishprune as fp
from fishprune.criteria import Criterion
from fishprune.criteria._registry import REGISTRY, NoOptions

CRITERIA = fp.criteria()


def mlp() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 8), nn.ReLU(), nn.Linear(8, 3))


def cnn_bn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
        nn.Conv2d(4, 4, 3, stride=2, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3),
    )


class ResBlockNet(nn.Module):
    """Stem, one basic residual block with a skip connection, classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4))
        self.conv1 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.stem(x))
        y = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(x + self.bn2(self.conv2(y)))
        return self.fc(x.mean((2, 3)))


MODELS = {"mlp": mlp, "cnn_bn": cnn_bn, "resnet": ResBlockNet}


def build(name: str) -> nn.Module:
    torch.manual_seed(0)
    model = MODELS[name]()
    # Non-trivial BN running statistics, so that "restored" means something.
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 1.5)
            m.num_batches_tracked.fill_(7)
    return model


def make_batches(count: int = 2, size: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [
        (torch.randn(size, 3, 4, 4, generator=gen), torch.randint(0, 3, (size,), generator=gen))
        for _ in range(count)
    ]


def fast(criterion: str) -> dict:
    """Two Hutchinson probes instead of ten, for every criterion that has the option."""
    return {"probes": 2} if "probes" in REGISTRY[criterion].option_specs() else {}


def dress(model: nn.Module, start: str) -> None:
    """A frozen weight and bias, a pre-set .grad, and a submodule in the other mode."""
    model.train(start == "train")
    prunable = list(fp.prunable_parameters(model).values())
    prunable[-1].requires_grad_(False)
    biases = [p for n, p in model.named_parameters() if n.endswith("bias")]
    biases[0].requires_grad_(False)
    prunable[0].grad = torch.full_like(prunable[0], 0.25)
    submodules = list(model.children())
    submodules[1].train(start != "train")


@pytest.mark.parametrize("start", ["train", "eval"])
@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("criterion", CRITERIA)
def test_contract(criterion: str, model_name: str, start: str) -> None:
    model = build(model_name)
    dress(model, start)
    before = snapshot(model)
    scores = fp.score(model, criterion, make_batches(), **fast(criterion))
    params = fp.prunable_parameters(model)
    assert list(scores) == list(params)
    for name, s in scores.items():
        assert s.shape == params[name].shape, name
        assert s.dtype == (REGISTRY[criterion].dtype or torch.float32), name
        assert not s.requires_grad, name
        assert torch.isfinite(s).all(), name
    assert_unchanged(model, before)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize(
    "criterion", [c for c in CRITERIA if "per_sample" in REGISTRY[c].option_specs()])
def test_per_sample_contract(criterion: str, model_name: str) -> None:
    model = build(model_name)
    dress(model, "train")
    before = snapshot(model)
    scores = fp.score(model, criterion, make_batches(), per_sample=True)
    assert list(scores) == list(fp.prunable_parameters(model))
    assert all(torch.isfinite(s).all() for s in scores.values())
    assert_unchanged(model, before)


@pytest.mark.parametrize("model_name", list(MODELS))
@pytest.mark.parametrize("criterion", CRITERIA)
def test_deterministic_under_seed(criterion: str, model_name: str) -> None:
    model = build(model_name)
    first = fp.score(model, criterion, make_batches(), seed=3, **fast(criterion))
    again = fp.score(model, criterion, make_batches(), seed=3, **fast(criterion))
    other = fp.score(model, criterion, make_batches(), seed=4, **fast(criterion))
    for name in first:
        assert torch.equal(first[name], again[name]), name
    differs = any(not torch.equal(first[n], other[n]) for n in first)
    assert differs == REGISTRY[criterion].seeded  # the registry's fact, checked


@pytest.mark.parametrize("model_name", ["mlp", "resnet"])
@pytest.mark.parametrize("criterion", CRITERIA)
def test_one_shot_generator_equals_list(criterion: str, model_name: str) -> None:
    """A generator is read once; grasp's second pass must replay exactly the same batches."""
    model = build(model_name)
    listed = fp.score(model, criterion, make_batches(3), **fast(criterion))
    once = fp.score(model, criterion, (b for b in make_batches(3)), **fast(criterion))
    for name in listed:
        assert torch.equal(listed[name], once[name]), name


@pytest.mark.parametrize("model_name", ["cnn_bn", "resnet"])
@pytest.mark.parametrize("criterion", CRITERIA)
def test_train_mode_restores_running_stats(criterion: str, model_name: str) -> None:
    model = build(model_name)
    dress(model, "eval")
    before = snapshot(model)
    scores = fp.score(model, criterion, make_batches(), mode="train", **fast(criterion))
    assert all(torch.isfinite(s).all() for s in scores.values())
    assert_unchanged(model, before)


def vandal(model, params, batches, ctx, opts) -> dict:
    """A criterion that does everything a careless one might: backward() into .grad, forwards
    in train mode, flips flags. ``score`` must still hand the model back untouched."""
    model.train()
    for p in model.parameters():
        p.requires_grad_(True)
    for x, y in batches:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    return {n: p.grad.detach().clone() for n, p in params.items()}


@pytest.mark.parametrize("start", ["train", "eval"])
def test_score_restores_the_model_after_a_careless_criterion(start: str, monkeypatch) -> None:
    vandalism = Criterion(name="vandal", fn=vandal, options=NoOptions, data="batches", seeded=False,
                          dtype=None, passes=1, default_rounds=1, summary="t")
    monkeypatch.setitem(REGISTRY, "vandal", vandalism)
    model = build("resnet")
    dress(model, start)
    before = snapshot(model)
    fp.score(model, "vandal", make_batches())
    assert_unchanged(model, before)


def test_registry_lists_every_criterion_in_table_order() -> None:
    assert CRITERIA == [
        "random", "magnitude", "gn", "snip", "grasp", "synflow",
        "fd", "fp", "fts", "fbss", "hd", "hp", "hts",
    ]


class WithUnusedHead(nn.Module):
    """A prunable layer that the forward never uses (an auxiliary head off in eval)."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.aux = mlp(), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


@pytest.mark.parametrize("criterion", CRITERIA)
def test_unused_prunable_layer_scores_zero(criterion: str) -> None:
    torch.manual_seed(0)
    model = WithUnusedHead()
    options = {**fast(criterion), **({"per_sample": True} if criterion in ("fd", "fts") else {})}
    scores = fp.score(model, criterion, make_batches(), **options)
    assert all(torch.isfinite(s).all() for s in scores.values())
    if criterion not in ("random", "magnitude", "fbss"):  # fbss: ½λw², tiny but not zero
        assert not scores["aux.weight"].any()
        assert scores["body.1.weight"].any()


def dropout_net() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 8), nn.Dropout(0.5), nn.ReLU(),
                         nn.Linear(8, 3))


@pytest.mark.parametrize("criterion", ["snip", "grasp", "hts", "fd"])
def test_train_mode_dropout_is_seeded_and_leaves_the_global_rng_alone(criterion: str) -> None:
    torch.manual_seed(0)
    model = dropout_net()
    state = torch.get_rng_state()
    first = fp.score(model, criterion, make_batches(), mode="train", seed=1, **fast(criterion))
    assert torch.equal(torch.get_rng_state(), state)
    again = fp.score(model, criterion, make_batches(), mode="train", seed=1, **fast(criterion))
    other = fp.score(model, criterion, make_batches(), mode="train", seed=2, **fast(criterion))
    assert all(torch.equal(first[n], again[n]) for n in first)
    assert any(not torch.equal(first[n], other[n]) for n in first)


def test_train_mode_uses_batch_statistics() -> None:
    model = build("cnn_bn")
    evaluated = fp.score(model, "snip", make_batches())
    trained = fp.score(model, "snip", make_batches(), mode="train")
    assert any(not torch.allclose(evaluated[n], trained[n]) for n in evaluated)


def test_exclude_and_frozen_weights() -> None:
    model = build("resnet")
    model.fc.weight.requires_grad_(False)
    scores = fp.score(model, "fts", make_batches(), exclude=("stem.*",))
    assert list(scores) == ["conv1.weight", "conv2.weight"]  # frozen: not prunable by default
    report = fp.prunable_report(model, exclude=("stem.*",))
    assert report.skipped["fc.weight"].startswith("frozen")
    assert report.skipped["stem.0.weight"] == "excluded by 'stem.*'"
    scores = fp.score(model, "fts", make_batches(), include=("fc.weight",))
    assert list(scores) == ["stem.0.weight", "conv1.weight", "conv2.weight", "fc.weight"]
    assert scores["fc.weight"].abs().sum() > 0  # named in include: scored
    assert not model.fc.weight.requires_grad


def test_synflow_without_batches_needs_input_shape() -> None:
    model = build("cnn_bn")
    with_data = fp.score(model, "synflow", make_batches())
    data_free = fp.score(model, "synflow", None, input_shape=(3, 4, 4))
    for name in with_data:
        assert torch.equal(with_data[name], data_free[name])
    with pytest.raises(ValueError, match="input shape"):
        fp.score(model, "synflow", None)


# --- validation errors ---------------------------------------------------------------------------


def test_unknown_criterion_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match="unknown criterion 'snipp'") as info:
        fp.score(build("mlp"), "snipp", make_batches())
    for name in CRITERIA:
        assert name in str(info.value)
    with pytest.raises(ValueError, match="unknown criterion"):
        fp.prune(build("mlp"), "snipp", 0.5, make_batches())


def test_unknown_option_lists_the_valid_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown option\(s\) probes .*valid options: per_sample"):
        fp.score(build("mlp"), "snip", make_batches(), probes=3)
    with pytest.raises(ValueError, match="valid options: none"):
        fp.score(build("mlp"), "magnitude", None, temperature=2.0)


@pytest.mark.parametrize(
    ("criterion", "options", "message"),
    [
        ("hd", {"probes": 2.5}, "probes .* must be int"),
        ("hd", {"probes": True}, "probes .* must be int"),
        ("hd", {"probes": 0}, "probes must be an integer >= 1"),
        ("hts", {"temperature": True}, "temperature .* must be float"),
        ("hts", {"temperature": "200"}, "temperature .* must be float"),
        ("grasp", {"temperature": -1.0}, "temperature must be a finite number > 0"),
        ("grasp", {"temperature": math.nan}, "temperature must be a finite number > 0"),
        ("snip", {"per_sample": 1}, "per_sample .* must be bool"),
        ("fbss", {"damping": 0.0}, "damping must be a finite number > 0"),
        ("fbss", {"damping": math.nan}, "damping must be a finite number > 0"),
        ("synflow", {"input_shape": [3, 4.5, 4]}, "input_shape .* must be a list of int"),
        ("synflow", {"input_shape": 3}, "input_shape .* must be a list of int"),
    ],
)
def test_bad_option_values(criterion: str, options: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fp.score(build("mlp"), criterion, make_batches(), **options)


@pytest.mark.parametrize("sparsity", [1.0, -0.1, math.nan, True, 1.5, "0.5", None])
def test_bad_sparsity(sparsity: object) -> None:
    model = build("mlp")
    with pytest.raises(ValueError, match="sparsity"):
        fp.prune(model, "magnitude", sparsity, None)  # type: ignore[arg-type]
    scores = fp.score(model, "magnitude", None)
    with pytest.raises(ValueError, match="sparsity"):
        fp.select(scores, sparsity)  # type: ignore[arg-type]


@pytest.mark.parametrize("criterion", [c for c in CRITERIA if c not in ("random", "magnitude")])
def test_empty_batches(criterion: str) -> None:
    for empty in ([], iter([])):
        with pytest.raises(ValueError, match="batches is empty"):
            fp.score(build("mlp"), criterion, empty, **fast(criterion))


@pytest.mark.parametrize("criterion", [c for c in CRITERIA if c not in ("random", "magnitude")])
@pytest.mark.parametrize("batch", [(torch.tensor(1.0), torch.tensor(0)),
                                   (torch.zeros(2, 48), torch.tensor(0))])
def test_zero_dim_batch_is_named(criterion: str, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
    """Regression: a 0-dim tensor raised a bare "IndexError: tuple index out of range"."""
    with pytest.raises(ValueError, match=r"batch 0: .*0-dim tensor; samples must lie on dim 0"):
        fp.score(build("mlp"), criterion, [batch], **fast(criterion))


def test_no_prunable_layer() -> None:
    model = nn.Sequential(nn.Flatten(), nn.BatchNorm1d(48))
    with pytest.raises(ValueError, match=r"no prunable weights.*Linear"):
        fp.score(model, "snip", make_batches())
    with pytest.raises(ValueError, match=r"no prunable weights.*excluding \['\*'\]"):
        fp.score(build("mlp"), "magnitude", None, exclude=("*",))


@pytest.mark.parametrize(
    ("batches", "message"),
    [
        ([torch.randn(4, 3, 4, 4)], "batch 0 is a Tensor, expected an .inputs, targets. pair"),
        ([(torch.randn(4, 3, 4, 4),)], "batch 0 is a tuple, expected an .inputs, targets. pair"),
        ([{"x": 1, "y": 2}], "batch 0 is a dict"),
        ([*make_batches(1), (torch.randn(4, 3, 4, 4), torch.zeros(4), torch.zeros(4))], "batch 1"),
        ([(torch.randn(4, 3, 4, 4), [0, 1, 2, 0])], "must be tensors"),
        ([(torch.randn(4, 3, 4, 4), torch.zeros(3, dtype=torch.long))], "4 inputs and 3 targets"),
        (torch.randn(4, 3, 4, 4), "iterable of .inputs, targets. pairs"),
        (5, "iterable of .inputs, targets. pairs"),
    ],
)
def test_batches_that_are_not_pairs(batches: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        fp.score(build("mlp"), "snip", batches)


@pytest.mark.parametrize("criterion", ["snip", "grasp", "hd", "fts"])
def test_none_batches_for_data_criteria(criterion: str) -> None:
    with pytest.raises(ValueError, match=f"criterion '{criterion}' needs"):
        fp.score(build("mlp"), criterion, None)


def test_other_bad_arguments() -> None:
    model, batches = build("cnn_bn"), make_batches()
    with pytest.raises(ValueError, match="mode must be one of eval, train"):
        fp.score(model, "snip", batches, mode="training")
    with pytest.raises(ValueError, match="seed must be an integer"):
        fp.score(model, "random", batches, seed=1.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"per_sample=True needs .*mode='eval'"):
        fp.score(model, "fd", batches, mode="train", per_sample=True)
    with pytest.raises(ValueError, match="scope must be one of global, layer"):
        fp.prune(model, "magnitude", 0.5, None, scope="model")
    for rounds in (0, True, 1.5):
        with pytest.raises(ValueError, match="rounds must be an integer >= 1"):
            fp.prune(model, "magnitude", 0.5, None, rounds=rounds)  # type: ignore[arg-type]
