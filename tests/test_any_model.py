"""fishprune on models as people write them: dict batches, tuple/dict outputs, layouts that are
not samples-first, operators without second derivatives, more than Linear/Conv weights.

Oracles: per-sample scoring against batches of one sample, finite-difference Hessian-vector
products against exact double backpropagation.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from _model_state import assert_unchanged, snapshot
from torch import nn
from torch.nn import functional as F

import fishprune as fp
from fishprune import autograd as A
from fishprune.criteria._registry import REGISTRY, Criterion, NoOptions

SECOND_ORDER = ("grasp", "hd", "hp", "hts")


def xy(n: int = 6, shape: tuple[int, ...] = (5, 6), seed: int = 1) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *shape, generator=gen), torch.randint(0, 3, (n,), generator=gen)


def fd_of_single_samples(model: nn.Module, x, y, **kw) -> dict[str, torch.Tensor]:
    """The per-sample Fisher diagonal by definition: F̂ over batches of one sample."""
    if isinstance(x, dict):
        singles = [({k: v[i : i + 1] for k, v in x.items()}, y[i : i + 1]) for i in range(len(y))]
    else:
        singles = [(x[i : i + 1], y[i : i + 1]) for i in range(len(y))]
    return fp.score(model, "fd", singles, **kw)


def assert_close(a: dict, b: dict, rtol: float = 1e-4) -> None:
    assert list(a) == list(b)
    for n in a:
        torch.testing.assert_close(a[n], b[n], rtol=rtol, atol=1e-7 * float(b[n].abs().max()))


# --- per-sample scoring: layouts the layer hooks must not misread ---------------------------------


class SequenceFirst(nn.Module):
    """Inputs (N, T, d); the layers see (T, N, d), as with batch_first=False."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.mix, self.out = nn.Linear(6, 8), nn.Linear(8, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.enc(x.transpose(0, 1)))
        return self.out(torch.tanh(self.mix(h)).mean(0))


class FlatTokens(nn.Module):
    """Tokens flattened to (N·T, d) before the Linear layers."""

    def __init__(self) -> None:
        super().__init__()
        self.enc, self.out = nn.Linear(6, 8), nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        h = torch.tanh(self.enc(x.reshape(n * t, d))).reshape(n, t, -1)
        return self.out(h.mean(1))


class TorchEncoder(nn.Module):
    """nn.TransformerEncoderLayer with batch_first=False (MHA's projections are bare params)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(6, 2, dim_feedforward=8, dropout=0.0)
        self.out = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.layer(x.transpose(0, 1)).mean(0))


@pytest.mark.parametrize("make", [SequenceFirst, FlatTokens, TorchEncoder])
@pytest.mark.parametrize("n", [6, 5])  # 5: the sequence length equals the batch size
def test_per_sample_is_exact_whatever_the_layout(make, n: int) -> None:
    torch.manual_seed(0)
    model = make()
    x, y = xy(n)
    fast, info = fp.score(model, "fd", [(x, y)], per_sample=True, return_info=True)
    assert_close(fast, fd_of_single_samples(model, x, y))
    if make is SequenceFirst:
        assert "enc.weight" in info.per_sample_fallback  # hooks refused the (T, N, d) layout


def test_per_sample_keeps_the_fast_path_for_samples_first_layers() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(30, 8), nn.Tanh(), nn.Linear(8, 3))
    x, y = xy()
    fast, info = fp.score(model, "fd", [(x, y)], per_sample=True, return_info=True)
    assert info.per_sample_fallback == []
    assert_close(fast, fd_of_single_samples(model, x, y))


def test_per_sample_with_dropout_in_train_mode_is_refused_clearly() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(SequenceFirst(), nn.Dropout(0.5))
    x, y = xy()
    with pytest.raises(ValueError, match=r"per_sample=True: .*dropout.*mode='eval'"):
        fp.score(model, "fts", [(x, y)], per_sample=True, mode="train")
    fp.score(model, "fts", [(x, y)], per_sample=True)  # eval: fine


# --- batches and outputs as they come -------------------------------------------------------------


class KeywordModel(nn.Module):
    """Hugging Face style: keyword inputs, a dict output with logits, a mask."""

    def __init__(self, output: str = "dict") -> None:
        super().__init__()
        self.emb = nn.Embedding(11, 6)
        self.body = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)
        self.output = output

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                flag: bool = True) -> object:
        assert flag is True
        h = torch.tanh(self.body(self.emb(input_ids)))  # (N, T, 8)
        m = attention_mask.unsqueeze(-1).to(h.dtype)
        logits = self.head((h * m).sum(1) / m.sum(1))
        if self.output == "dict":
            return {"hidden": h, "logits": logits}
        if self.output == "tuple":
            return logits, h
        return {"scores": logits}


def keyword_batch(n: int = 5, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    mask = torch.ones(n, 4, dtype=torch.long)
    mask[0, 2:] = 0
    return {"input_ids": torch.randint(0, 11, (n, 4), generator=gen), "attention_mask": mask,
            "labels": torch.randint(0, 3, (n,), generator=gen)}


@pytest.mark.parametrize("criterion", ["snip", "fts", "grasp", "hts"])
def test_dict_batches_and_outputs_equal_a_hand_written_wrapper(criterion: str) -> None:
    torch.manual_seed(0)
    model = KeywordModel("tuple")
    batches = [keyword_batch(seed=s) for s in range(2)]
    opts = {"probes": 2} if criterion == "hts" else {}
    as_labels = fp.score(model, criterion, batches, **opts)
    pairs = [({k: v for k, v in b.items() if k != "labels"}, b["labels"]) for b in batches]
    as_pairs = fp.score(model, criterion, pairs, **opts)
    model.output = "dict"
    as_dict_output = fp.score(model, criterion, (b for b in batches), **opts)  # one-shot
    model.output = "other"
    with pytest.raises(ValueError, match=r"without a 'logits' tensor.*output_fn"):
        fp.score(model, criterion, batches, **opts)
    custom = fp.score(model, criterion, batches, output_fn=lambda out: out["scores"], **opts)

    class Wrapped(nn.Module):  # what users had to write by hand
        def __init__(self, inner: nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, packed: torch.Tensor) -> torch.Tensor:
            return self.inner(packed[:, 0], packed[:, 1])["scores"]

    packed = [(torch.stack([b["input_ids"], b["attention_mask"]], 1), b["labels"])
              for b in batches]
    by_hand = fp.score(Wrapped(model), criterion, packed, **opts)
    for scores in (as_pairs, as_dict_output, custom):
        for n in as_labels:
            assert torch.equal(as_labels[n], scores[n]), n
    for n in as_labels:
        assert torch.equal(as_labels[n], by_hand["inner." + n]), n


def test_per_sample_on_dict_batches_is_exact() -> None:
    torch.manual_seed(0)
    model = KeywordModel()
    batch = keyword_batch(6)
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    fast = fp.score(model, "fd", [batch], per_sample=True, include=[nn.Embedding])
    assert_close(fast, fd_of_single_samples(model, inputs, batch["labels"],
                                            include=[nn.Embedding]))
    with_static = ({**inputs, "flag": True}, batch["labels"])  # a non-tensor keyword input
    assert_close(fp.score(model, "fd", [with_static], per_sample=True), fp.score(
        model, "fd", [batch], per_sample=True))


def test_synflow_on_keyword_inputs_asks_for_tensor_inputs() -> None:
    with pytest.raises(ValueError, match=r"synflow.*tensor inputs"):
        fp.score(KeywordModel(), "synflow", [keyword_batch()])


@pytest.mark.parametrize(
    ("batch", "message"),
    [
        ((torch.tensor(1.0), torch.tensor(0)), "0-dim"),
        ((torch.randn(3, 2), torch.tensor(0)), "targets is a 0-dim"),
        ({"input_ids": torch.zeros(2, 3)}, "without a 'labels' key"),
        (({"a": torch.zeros(2, 3), "b": torch.zeros(3, 3)}, torch.zeros(2)), "'b' has 3 rows"),
        (({"a": 1}, torch.zeros(2)), "holds no tensor"),
    ],
)
def test_bad_batches_get_a_clear_error(batch: object, message: str) -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(3, 3))
    with pytest.raises(ValueError, match=message):
        fp.score(model, "snip", [batch])


def test_nan_loss_names_the_batch() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(30, 3))
    x, y = xy()
    bad = x.clone()
    bad[0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="the loss is NaN on batch 1"):
        fp.score(model, "fts", [(x, y), (bad, y)])
    with pytest.raises(ValueError, match="the loss is NaN on batch 1"):
        fp.score(model, "fts", [(x, y), (bad, y)], per_sample=True)


# --- prune: replay and no partial pruning -----------------------------------------------------


def test_multi_round_prune_reads_a_one_shot_generator_once() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(30, 8), nn.ReLU(), nn.Linear(8, 3))
    x, y = xy()
    listed = fp.prune(_copy(model), "synflow", 0.9, [(x, y)], rounds=5)
    once = fp.prune(_copy(model), "synflow", 0.9, ((x, y) for _ in range(3)), rounds=5)
    assert all(torch.equal(listed[n], once[n]) for n in listed)
    snip = fp.prune(_copy(model), "snip", 0.9, [(x, y)], rounds=3)
    snip_once = fp.prune(_copy(model), "snip", 0.9, iter([(x, y)]), rounds=3)
    assert all(torch.equal(snip[n], snip_once[n]) for n in snip)


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


def test_a_failing_round_leaves_the_model_as_found(monkeypatch) -> None:
    calls = []

    def flaky(model, params, batches, ctx, opts):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("round 3 failed")
        return {n: p.detach().abs() for n, p in params.items()}

    monkeypatch.setitem(REGISTRY, "flaky", Criterion(
        name="flaky", fn=flaky, options=NoOptions, data="none", seeded=False, dtype=None,
        passes=1, default_rounds=5, summary="t"))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(30, 8), nn.ReLU(), nn.Linear(8, 3))
    before = snapshot(model)
    with pytest.raises(RuntimeError, match="round 3 failed"):
        fp.prune(model, "flaky", 0.9, None)
    assert_unchanged(model, before)


# --- layer collapse -----------------------------------------------------------------------------


def test_empty_layers_warn_or_raise() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with torch.no_grad():
        model[1].weight.mul_(1e-3)  # magnitude empties the last layer first
    scores = fp.score(model, "magnitude", None)
    with pytest.warns(fp.LayerCollapseWarning, match=r"no weight of 1 tensor\(s\): 1.weight"):
        fp.select(scores, 0.5)
    with pytest.raises(ValueError, match=r"1.weight"):
        fp.select(scores, 0.5, on_empty="error")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fp.select(scores, 0.5, on_empty="ignore")
        fp.select(scores, 0.1)  # nothing empty: no warning
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"layer collapse.*1.weight"):
        fp.prune(model, "magnitude", 0.5, None, on_empty="error")
    assert_unchanged(model, before)
    with pytest.warns(fp.LayerCollapseWarning):
        fp.prune(model, "magnitude", 0.5, None)
    with pytest.raises(ValueError, match="on_empty must be one of"):
        fp.select(scores, 0.5, on_empty="loud")


# --- which parameters -------------------------------------------------------------------------


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 6)
        self.norm = nn.LayerNorm(6)
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.out = nn.Linear(6, 10, bias=False)
        self.out.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.norm(self.emb(ids))
        return self.out(self.attn(h, h, h, need_weights=False)[0].mean(1))


def test_prunable_set_default_include_exclude_and_tied_weights() -> None:
    model = Tied()
    assert list(fp.prunable_parameters(model)) == ["attn.out_proj.weight", "emb.weight"]
    report = fp.prunable_report(model)
    assert report.skipped["out.weight"].startswith("tied to emb.weight")
    assert "Embedding.weight" not in report.skipped.get("emb.weight", "")
    assert "LayerNorm.bias" in report.skipped["norm.bias"]
    assert "MultiheadAttention.in_proj_weight" in report.skipped["attn.in_proj_weight"]
    # a tied weight is excluded by any of its names
    assert list(fp.prunable_parameters(model, exclude=["out.*"])) == ["attn.out_proj.weight"]
    assert list(fp.prunable_parameters(model, exclude=["emb.*"])) == ["attn.out_proj.weight"]
    wider = fp.prunable_parameters(model, include=[nn.Embedding, nn.LayerNorm, "*.in_proj_weight",
                                                   "*bias"])
    assert list(wider) == ["emb.weight", "norm.weight", "norm.bias", "attn.in_proj_weight",
                           "attn.in_proj_bias", "attn.out_proj.weight", "attn.out_proj.bias"]
    ids = torch.randint(0, 10, (4, 5))
    scores = fp.score(model, "fts", [(ids, torch.randint(0, 10, (4,)))], include=list(wider)[:4])
    assert list(scores) == [*list(wider)[:4], "attn.out_proj.weight"]
    assert all(torch.isfinite(s).all() for s in scores.values())
    assert scores["emb.weight"].any() and scores["attn.in_proj_weight"].any()
    masks = fp.prune(model, "fts", 0.5, [(ids, torch.randint(0, 10, (4,)))],
                     include=["attn.in_proj_weight"], on_empty="ignore")
    assert model.out.weight is model.emb.weight and torch.equal(
        model.emb.weight == 0, ~masks["emb.weight"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"exclude": ["fc.*"]}, "exclude pattern 'fc.\\*' matches no prunable parameter"),
        ({"include": ["*.gamma"]}, "include pattern '\\*.gamma' matches no parameter"),
        ({"include": [nn.Conv2d]}, "include entry Conv2d matches no module"),
        ({"include": [nn.ReLU]}, "include entry ReLU matches"),
        ({"include": [3]}, "include takes glob patterns"),
    ],
)
def test_patterns_that_match_nothing_are_refused(kwargs: dict, message: str) -> None:
    model = nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2))
    if kwargs.get("include") == [nn.ReLU]:
        model = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    with pytest.raises(ValueError, match=message):
        fp.prunable_parameters(model, **kwargs)
    with pytest.raises(ValueError, match=message):
        fp.score(model, "magnitude", None, **kwargs)


# --- Hessian-vector products where double backward is missing --------------------------------


class HardSE(nn.Module):
    """MobileNetV3-style: Hardswish, squeeze-excitation with Hardsigmoid (no double backward)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.se1, self.se2 = nn.Conv2d(8, 4, 1), nn.Conv2d(4, 8, 1)
        self.out = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.hardswish(self.dw(F.hardswish(self.conv(x))))
        w = F.hardsigmoid(self.se2(F.relu(self.se1(y.mean((2, 3), keepdim=True)))))
        return self.out((y * w).mean((2, 3)))


class SDPA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.out = nn.Linear(6, 18), nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, _ = x.shape
        q, k, v = self.qkv(x).reshape(n, t, 3, 2, 3).permute(2, 0, 3, 1, 4)
        h = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, 6)
        return self.out(h.mean(1))


@pytest.mark.parametrize("criterion", SECOND_ORDER)
def test_missing_double_backward_falls_back_to_finite_differences(criterion: str) -> None:
    torch.manual_seed(0)
    model = HardSE()
    x, y = xy(4, (3, 6, 6))
    before = snapshot(model)
    opts = {"probes": 2} if criterion != "grasp" else {}
    with pytest.warns(UserWarning, match=f"{criterion}: Hessian-vector products by central "
                      "finite differences .*hardsigmoid_backward"):
        scores, info = fp.score(model, criterion, [(x, y)], return_info=True, **opts)
    assert info.hvp == "fd" and "hardsigmoid_backward" in info.hvp_reason and info.fd_step > 0
    assert all(torch.isfinite(s).all() for s in scores.values())
    assert_unchanged(model, before)  # the perturbed weights are restored bit for bit
    with pytest.raises(RuntimeError, match="hvp='auto' or hvp='fd'"):
        fp.score(model, criterion, [(x, y)], hvp="exact", **opts)
    assert_unchanged(model, before)
    with pytest.warns(UserWarning, match="finite differences"):
        masks, info = fp.prune(model, criterion, 0.5, [(x, y)], return_info=True, **opts)
    assert info.hvp == "fd" and sum(int(m.sum()) for m in masks.values()) == sum(
        m.numel() for m in masks.values()) // 2


@pytest.mark.parametrize("criterion", ["grasp", "hts"])
def test_fused_attention_falls_back_to_the_math_kernel(criterion: str) -> None:
    torch.manual_seed(0)
    model = SDPA()
    x, y = xy(4, (5, 6))
    opts = {"probes": 2} if criterion != "grasp" else {}
    with pytest.warns(UserWarning, match="exact, under the math SDPA kernel"):
        scores, info = fp.score(model, criterion, [(x, y)], return_info=True, **opts)
    assert info.hvp == "exact-math-sdpa"
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        exact, info = fp.score(model, criterion, [(x, y)], return_info=True, hvp="exact", **opts)
    assert info.hvp == "exact"
    assert_close(scores, exact)  # grasp: ḡ from the fused kernel, Hḡ from the math one


def test_exact_models_report_exact_and_do_not_warn() -> None:
    model = nn.Sequential(nn.Flatten(), nn.Linear(30, 3))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _, info = fp.score(model, "grasp", [xy()], return_info=True)
    assert info.hvp == "exact"
    _, info = fp.score(model, "snip", [xy()], return_info=True)
    assert info.hvp is None
    with pytest.raises(ValueError, match="hvp must be one of auto, exact, fd"):
        fp.score(model, "grasp", [xy()], hvp="numeric")


def smooth_net(dtype: torch.dtype) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 4, 3, groups=2), nn.Softplus(),
        nn.Flatten(), nn.Linear(16, 8), nn.GELU(), nn.Linear(8, 3),
    ).to(dtype)


@pytest.mark.parametrize(("dtype", "bound"), [(torch.float64, 1e-8), (torch.float32, 2e-3)])
@pytest.mark.parametrize("temperature", [1.0, 200.0])
def test_finite_difference_hvp_against_exact_double_backward(dtype, bound, temperature) -> None:
    """‖Hv_fd − Hv‖ / ‖Hv‖ within the bound of the step's O(ε²) + O(u/ε) error."""
    model = smooth_net(dtype)
    gen = torch.Generator().manual_seed(2)
    batches = [(torch.randn(5, 3, 4, 4, generator=gen, dtype=dtype),
                torch.randint(0, 3, (5,), generator=gen)) for _ in range(2)]
    params = fp.prunable_parameters(model)
    for p in model.parameters():
        p.requires_grad_(any(p is q for q in params.values()))
    for scale in (1.0, 1e-6):  # the step adapts to ‖v‖ (GraSP's ḡ at T = 200 is tiny)
        v = {n: scale * torch.randn(p.shape, generator=gen, dtype=dtype)
             for n, p in params.items()}
        results = {}
        for method in ("exact", "fd"):
            info = A.ScoreInfo()
            with A.hvp_setting(method, info), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                results[method] = A.hessian_vector_mean(model, params, batches, F.cross_entropy,
                                                        v, temperature=temperature)
        num = sum(float((results["fd"][n] - results["exact"][n]).norm()) ** 2 for n in params)
        den = sum(float(results["exact"][n].norm()) ** 2 for n in params)
        assert (num / den) ** 0.5 < bound


def test_fd_step_formula() -> None:
    assert A.fd_step(0.0, 1.0, torch.float32) == pytest.approx(torch.finfo(torch.float32).eps
                                                                ** (1 / 3))
    assert A.fd_step(9.0, 2.0, torch.float64) == pytest.approx(
        torch.finfo(torch.float64).eps ** (1 / 3) * 10 / 2)


def test_hutchinson_by_finite_differences_uses_the_same_probes() -> None:
    model = smooth_net(torch.float64)
    x = torch.randn(4, 3, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))
    with pytest.warns(UserWarning, match="requested"):
        fd = fp.score(model, "hts", [(x, y)], hvp="fd", probes=3)
    exact = fp.score(model, "hts", [(x, y)], hvp="exact", probes=3)
    assert_close(fd, exact, rtol=1e-6)


def test_per_sample_on_batches_of_one_sample_is_the_batch_gradient() -> None:
    """N = 1: the hooks are skipped (a layout probe cannot tell) and g² is exact."""
    torch.manual_seed(0)
    model = SequenceFirst()
    x, y = xy(3)
    singles = [(x[i : i + 1], y[i : i + 1]) for i in range(3)]
    per_sample = fp.score(model, "fd", singles, per_sample=True)
    assert_close(per_sample, fp.score(model, "fd", singles))
