"""Contract and parameter-count tests for the model zoo (``fishprune.models``)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from fishprune.models import INITS, build_model, count_parameters, models

INPUTS = [pytest.param(1, 28, id="1x28"), pytest.param(3, 32, id="3x32")]
FAST_WIDTH = 0.125  # keeps the big models' forward/backward passes cheap on CPU


def _build(name: str, in_channels: int = 3, image_size: int = 32, **kwargs: object) -> nn.Module:
    torch.manual_seed(0)
    return build_model(name, in_channels=in_channels, image_size=image_size, **kwargs)


def test_registry_lists_every_model() -> None:
    expected = {"lenet300", "lenet5", "vgg11", "vgg16", "vgg19", "resnet18", "resnet20", "vit"}
    assert set(models()) == expected


@pytest.mark.parametrize("name", models())
@pytest.mark.parametrize(("in_channels", "image_size"), INPUTS)
def test_forward_backward(name: str, in_channels: int, image_size: int) -> None:
    model = _build(name, in_channels, image_size, num_classes=7, width=FAST_WIDTH)
    x = torch.randn(2, in_channels, image_size, image_size)
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.logsumexp(dim=1).sum().backward()
    for param_name, param in model.named_parameters():
        assert param.grad is not None, param_name
        assert torch.isfinite(param.grad).all(), param_name


@pytest.mark.parametrize("name", models())
def test_channels_last_matches_contiguous(name: str) -> None:
    model = _build(name, width=FAST_WIDTH).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x)
        actual = model(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", models())
def test_build_is_deterministic_under_seed(name: str) -> None:
    first = _build(name, width=FAST_WIDTH).state_dict()
    second = _build(name, width=FAST_WIDTH).state_dict()
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
    torch.manual_seed(1)
    other = build_model(name, in_channels=3, image_size=32, width=FAST_WIDTH).state_dict()
    assert any(not torch.equal(first[key], other[key]) for key in first)


@pytest.mark.parametrize("name", models())
def test_width_multiplier_reduces_parameters(name: str) -> None:
    full = count_parameters(_build(name, width=1.0))
    half = count_parameters(_build(name, width=0.5))
    tiny = count_parameters(_build(name, width=0.01))
    assert tiny < half < full


@pytest.mark.parametrize(
    ("name", "in_channels", "image_size", "expected"),
    [
        ("lenet300", 1, 28, 266_610),  # 784·300+300 + 300·100+100 + 100·10+10
        ("lenet5", 1, 28, 431_080),  # 520 + 25,050 + 800·500+500 + 5,010
        ("lenet5", 3, 32, 657_080),  # flatten 50·5·5 = 1250
        ("vgg11", 3, 32, 9_231_114),
        ("vgg16", 3, 32, 14_728_266),
        ("vgg19", 3, 32, 20_040_522),
        ("vgg19", 1, 28, 20_039_370),
        ("resnet18", 3, 32, 11_173_962),
        ("resnet20", 3, 32, 272_474),  # option B; option A would be 269,722
        ("vit", 3, 32, 811_146),
        ("vit", 1, 28, 805_130),
    ],
)
def test_parameter_counts(name: str, in_channels: int, image_size: int, expected: int) -> None:
    model = _build(name, in_channels, image_size, num_classes=10)
    assert count_parameters(model) == expected


def test_lenet5_flatten_size_follows_image_size() -> None:
    assert _build("lenet5", 1, 28).classifier[0].in_features == 800
    assert _build("lenet5", 3, 32).classifier[0].in_features == 1250


def test_vit_width_keeps_embed_dim_divisible_by_heads() -> None:
    for width in (0.01, 0.3, 0.77, 1.0, 1.5):
        dim = _build("vit", width=width).head.in_features
        assert dim % 4 == 0 and dim >= 4


def test_vit_attention_weights_are_linear_layers() -> None:
    model = _build("vit", width=FAST_WIDTH)
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    attn = model.blocks[0].attn
    assert isinstance(attn.qkv, nn.Linear) and isinstance(attn.proj, nn.Linear)


@pytest.mark.parametrize("name", models())
def test_parameters_live_in_standard_layers(name: str) -> None:
    """Every parameter is a standard layer's weight/bias (ViT's two embeddings excepted)."""
    model = _build(name, width=FAST_WIDTH)
    standard = (nn.Conv2d, nn.Linear, nn.BatchNorm2d, nn.LayerNorm)
    owners = {
        f"{prefix}.{p}" if prefix else p
        for prefix, module in model.named_modules()
        if isinstance(module, standard)
        for p, _ in module.named_parameters(recurse=False)
    }
    names = {n for n, _ in model.named_parameters()}
    assert names - owners <= {"cls_token", "pos_embed"}


def test_parameter_names_are_stable() -> None:
    assert "fc1.weight" in dict(_build("lenet300").named_parameters())
    assert "features.0.weight" in dict(_build("lenet5").named_parameters())
    assert "features.0.weight" in dict(_build("vgg19", width=FAST_WIDTH).named_parameters())
    assert "classifier.weight" in dict(_build("vgg19", width=FAST_WIDTH).named_parameters())
    resnet = dict(_build("resnet20").named_parameters())
    assert {"conv1.weight", "layers.1.0.shortcut.0.weight", "fc.weight"} <= resnet.keys()
    assert "blocks.0.attn.qkv.weight" in dict(_build("vit", width=FAST_WIDTH).named_parameters())


def _std(init: str, fan_in: int, fan_out: int) -> float:
    if init == "kaiming_normal":
        return math.sqrt(2.0 / fan_in)
    if init == "xavier_normal":
        return math.sqrt(2.0 / (fan_in + fan_out))
    return 1.0 / math.sqrt(3.0 * fan_in)  # PyTorch default: Kaiming-uniform with a = √5


@pytest.mark.parametrize("init", INITS)
def test_init_sets_linear_weight_std(init: str) -> None:
    layer = _build("lenet300", 1, 28, init=init).fc1  # 300 × 784: 235,200 samples
    assert layer.weight.std().item() == pytest.approx(_std(init, 784, 300), rel=0.02)
    assert abs(layer.weight.mean().item()) < 1e-3
    if init != "default":
        assert torch.all(layer.bias == 0)


@pytest.mark.parametrize("init", INITS)
def test_init_sets_conv_weight_std(init: str) -> None:
    model = _build("resnet18", init=init)
    conv = model.layers[3][1].conv2  # 512 × 512 × 3 × 3
    fan_in = fan_out = 512 * 9
    assert conv.weight.std().item() == pytest.approx(_std(init, fan_in, fan_out), rel=0.02)
    bn = model.layers[3][1].bn2
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)  # norms keep their defaults


def test_init_changes_weights_but_not_default() -> None:
    default = _build("lenet5", init="default").state_dict()
    again = _build("lenet5").state_dict()
    kaiming = _build("lenet5", init="kaiming_normal").state_dict()
    assert all(torch.equal(default[k], again[k]) for k in default)
    assert not torch.equal(default["features.0.weight"], kaiming["features.0.weight"])


def test_unknown_model_raises_with_choices() -> None:
    with pytest.raises(ValueError, match=r"valid choices.*lenet300"):
        build_model("alexnet")


def test_unknown_init_raises_with_choices() -> None:
    with pytest.raises(ValueError, match=r"valid choices.*kaiming_normal"):
        build_model("lenet300", init="orthogonal")


@pytest.mark.parametrize(
    "kwargs", [{"image_size": 64}, {"width": 0.0}, {"width": -1.0}, {"in_channels": 0}]
)
def test_invalid_shapes_raise(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        build_model("lenet5", **kwargs)


@pytest.mark.parametrize("name", ["vgg11", "vgg16", "vgg19"])
@pytest.mark.parametrize("channels,size", [(1, 28), (3, 32)])
def test_vgg_last_stage_sees_2x2_maps(name: str, channels: int, size: int) -> None:
    """28-px inputs are padded to 32 so no last-stage kernel tap sees only padding."""
    model = build_model(name, in_channels=channels, image_size=size, width=0.0625)
    shapes = []
    last_conv = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)][-1]
    last_conv.register_forward_hook(lambda m, a, out: shapes.append(tuple(out.shape[-2:])))
    model(torch.zeros(2, channels, size, size))
    assert shapes == [(2, 2)]
