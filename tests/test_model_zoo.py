"""The model-zoo contract: every criterion on the models people use.

Hugging Face ``transformers`` models from small configs (random init, nothing downloaded): ViT
(SDPA attention), ResNet, ConvNeXt, MobileNetV2, BERT for sequence classification, GPT-2 as a
classifier; and in-test modules: a MobileNetV3-style block (Hardswish, Hardsigmoid,
squeeze-excitation), attention through ``F.scaled_dot_product_attention``, GRU and LSTM
classifiers, an embedding model, grouped/depthwise convolutions, tied weights. Each: the scores
are finite with the prunable weights' names and shapes, the model is left exactly as it was, the
mask keeps exactly round((1 − s)·N) weights, and per-sample scoring equals batches of one sample.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import pytest
import torch
from _model_state import assert_unchanged, snapshot
from test_any_model import SDPA, HardSE, Tied
from torch import nn
from torch.nn import functional as F

import fishprune as fp
from fishprune.selection import kept_count

transformers = pytest.importorskip("transformers")
CRITERIA = fp.criteria()


def hf_vit() -> nn.Module:
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=8,
                                 num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                                 num_labels=3, attn_implementation="sdpa")
    return transformers.ViTForImageClassification(cfg)


def hf_resnet() -> nn.Module:
    cfg = transformers.ResNetConfig(num_channels=3, embedding_size=8, hidden_sizes=[8, 16],
                                    depths=[1, 1], layer_type="basic", num_labels=3)
    return transformers.ResNetForImageClassification(cfg)


def hf_convnext() -> nn.Module:
    cfg = transformers.ConvNextConfig(num_channels=3, hidden_sizes=[8, 16], depths=[1, 1],
                                      num_stages=2, patch_size=2, num_labels=3)
    return transformers.ConvNextForImageClassification(cfg)


def hf_mobilenet_v2() -> nn.Module:
    cfg = transformers.MobileNetV2Config(num_channels=3, image_size=8, depth_multiplier=0.25,
                                         num_labels=3)
    return transformers.MobileNetV2ForImageClassification(cfg)


def hf_bert() -> nn.Module:
    cfg = transformers.BertConfig(vocab_size=30, hidden_size=8, num_hidden_layers=1,
                                  num_attention_heads=2, intermediate_size=16,
                                  max_position_embeddings=8, num_labels=3)
    return transformers.BertForSequenceClassification(cfg)


def hf_gpt2() -> nn.Module:
    cfg = transformers.GPT2Config(vocab_size=30, n_embd=8, n_layer=1, n_head=2, n_positions=8,
                                  num_labels=3, pad_token_id=0, bos_token_id=1, eos_token_id=1)
    return transformers.GPT2ForSequenceClassification(cfg)


class RNNClassifier(nn.Module):
    def __init__(self, cell: type[nn.Module]) -> None:
        super().__init__()
        self.rnn = cell(4, 8, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(x)[0][:, -1])


class EmbeddingBag(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(30, 8)
        self.fc = nn.Linear(8, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.tanh(self.emb(ids)).mean(1))


def grouped() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, groups=8, padding=1),
        nn.ReLU(), nn.Conv2d(8, 8, 1, groups=2), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(8, 3),
    )


def images(seed: int) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 8, 8, generator=gen), torch.randint(0, 3, (4,), generator=gen))
            for _ in range(2)]


def sequences(seed: int) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 5, 4, generator=gen), torch.randint(0, 3, (4,), generator=gen))
            for _ in range(2)]


def tokens(seed: int) -> list:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(2):
        mask = torch.ones(4, 6, dtype=torch.long)
        mask[0, 4:] = 0
        out.append({"input_ids": torch.randint(1, 30, (4, 6), generator=gen),
                    "attention_mask": mask, "labels": torch.randint(0, 3, (4,), generator=gen)})
    return out


def token_pairs(seed: int) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 30, (4, 6), generator=gen), torch.randint(0, 3, (4,), generator=gen))
            for _ in range(2)]


def attention_inputs(seed: int) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 5, 6, generator=gen), torch.randint(0, 3, (4,), generator=gen))
            for _ in range(2)]


def tied_inputs(seed: int) -> list:
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, 10, (4, 5), generator=gen), torch.randint(0, 10, (4,), generator=gen))
            for _ in range(2)]


#: name → (model factory, batches factory, extra score keywords)
ZOO: dict[str, tuple[Callable[[], nn.Module], Callable[[int], list], dict]] = {
    "hf-vit": (hf_vit, images, {}),
    "hf-resnet": (hf_resnet, images, {}),
    "hf-convnext": (hf_convnext, images, {}),
    "hf-mobilenet-v2": (hf_mobilenet_v2, images, {}),
    "hf-bert": (hf_bert, tokens, {}),
    "hf-gpt2": (hf_gpt2, tokens, {}),
    "mobilenet-v3-block": (HardSE, lambda s: [(x[:, :, :6, :6], y) for x, y in images(s)], {}),
    "sdpa-attention": (SDPA, attention_inputs, {}),
    "gru": (lambda: RNNClassifier(nn.GRU), sequences, {"include": ["rnn.weight_*"]}),
    "lstm": (lambda: RNNClassifier(nn.LSTM), sequences, {"include": ["rnn.weight_*"]}),
    "embedding": (EmbeddingBag, token_pairs, {"include": [nn.Embedding]}),
    "grouped-conv": (grouped, images, {}),
    "tied": (Tied, tied_inputs, {}),
}

_BUILT: dict[str, nn.Module] = {}


def build(name: str) -> nn.Module:
    """One model per zoo entry for the whole module (scoring leaves it as it was: tested)."""
    if name not in _BUILT:
        torch.manual_seed(0)
        _BUILT[name] = ZOO[name][0]()
    return _BUILT[name]


def options(criterion: str) -> dict:
    return {"probes": 1} if criterion in ("hd", "hp", "hts") else {}


@pytest.mark.parametrize("criterion", CRITERIA)
@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_contract(name: str, criterion: str) -> None:
    model = build(name)
    _, make_batches, extra = ZOO[name]
    batches = make_batches(0)
    if criterion == "synflow" and (isinstance(batches[0], dict)
                                   or not batches[0][0].is_floating_point()):
        with pytest.raises(ValueError, match=r"synflow is defined for (tensor|real-valued) inputs"):
            fp.score(model, criterion, batches, **extra)
        return
    before = snapshot(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the HVP fallback warning: asserted in test_any_model
        scores, info = fp.score(model, criterion, batches, return_info=True, **extra,
                                **options(criterion))
    assert_unchanged(model, before)
    params = fp.prunable_parameters(model, include=extra.get("include", ()))
    assert list(scores) == list(params)
    for n, s in scores.items():
        assert s.shape == params[n].shape and torch.isfinite(s).all(), n
    if criterion in ("grasp", "hd", "hp", "hts"):
        assert info.hvp in ("exact", "exact-math-sdpa", "fd")
    total = sum(s.numel() for s in scores.values())
    masks = fp.select(scores, 0.9, on_empty="ignore")
    assert sum(int(m.sum()) for m in masks.values()) == kept_count(0.1, total)


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_per_sample_equals_batches_of_one(name: str) -> None:
    model = build(name)
    _, make_batches, extra = ZOO[name]
    batch = make_batches(1)[0]
    if isinstance(batch, dict):
        x = {k: v for k, v in batch.items() if k != "labels"}
        y = batch["labels"]
        singles = [({k: v[i : i + 1] for k, v in x.items()}, y[i : i + 1]) for i in range(len(y))]
    else:
        x, y = batch
        singles = [(x[i : i + 1], y[i : i + 1]) for i in range(len(y))]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.func batching-rule performance notes
        fast = fp.score(model, "fd", [batch], per_sample=True, **extra)
    slow = fp.score(model, "fd", singles, **extra)
    for n in fast:
        torch.testing.assert_close(fast[n], slow[n], rtol=1e-4,
                                   atol=1e-6 * float(slow[n].abs().max()) + 1e-12)


def test_gpt2_conv1d_layers_are_prunable_and_the_embeddings_are_not() -> None:
    names = list(fp.prunable_parameters(build("hf-gpt2")))
    assert "transformer.h.0.attn.c_attn.weight" in names
    assert "transformer.h.0.mlp.c_fc.weight" in names
    assert not any("wte" in n or "wpe" in n for n in names)
    report = fp.prunable_report(build("hf-gpt2"))
    assert "Embedding.weight" in report.skipped["transformer.wte.weight"]
    # per-sample scoring reads the Conv1D layers with hooks (exactness: the zoo oracle above)
    _, info = fp.score(build("hf-gpt2"), "fd", tokens(0), per_sample=True, return_info=True)
    assert info.per_sample_fallback == []


def test_hf_loss_from_labels_matches_the_default_loss() -> None:
    """fishprune's cross-entropy on the logits is the loss the HF model computes from labels."""
    model = build("hf-bert").eval()
    batch = tokens(2)[0]
    with torch.no_grad():
        theirs = model(**batch).loss
        ours = F.cross_entropy(model(**{k: v for k, v in batch.items() if k != "labels"}).logits,
                               batch["labels"])
    torch.testing.assert_close(theirs, ours)
