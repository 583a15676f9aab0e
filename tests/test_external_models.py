"""External models from the command line: ``hf:MODEL_TYPE``, ``package.module:factory``,
``timm:NAME``, ``torchvision:NAME``, their ``model_kwargs`` and what they do to run ids.

Everything is built from configs (nothing is downloaded) and trained on the synthetic dataset
(28×28×1, 10 classes). timm and torchvision are tested only where they import: the torchvision
wheels served to this project's CI are CUDA builds that do not load with the CPU torch.
"""

from __future__ import annotations

import importlib
import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from _cli import die_in_epoch

from fishprune import cli, pipeline
from fishprune import config as C
from fishprune import settings as S
from fishprune.cli import flags
from fishprune.models import ExternalModelError, LogitsOnly, build_model
from fishprune.models import external as X

TINY_VIT = ["image_size=28", "patch_size=7", "hidden_size=32", "num_hidden_layers=1",
            "num_attention_heads=2", "intermediate_size=64"]
FACTORY = '''
from torch import nn

CALLS = []


def build(num_classes, in_channels, hidden=16):
    CALLS.append({"num_classes": num_classes, "in_channels": in_channels, "hidden": hidden})
    return nn.Sequential(nn.Conv2d(in_channels, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 28 * 28, hidden), nn.ReLU(),
                         nn.Linear(hidden, num_classes))


def open_ended(**kwargs):
    CALLS.append(dict(kwargs))
    return nn.Sequential(nn.Flatten(), nn.Linear(kwargs["image_size"] ** 2, kwargs["num_classes"]))


def not_a_model(num_classes):
    return "a string"
'''


def run_cli(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    code = cli.main(argv)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture
def user_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``mypackage/models.py`` in a fresh working directory, forgotten afterwards."""
    package = tmp_path / "work" / "mypackage"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "models.py").write_text(textwrap.dedent(FACTORY))
    monkeypatch.chdir(package.parent)
    yield package.parent
    for name in [m for m in sys.modules if m == "mypackage" or m.startswith("mypackage.")]:
        del sys.modules[name]


# --------------------------------------------------------------------------- hf:


def test_hf_vit_trains_end_to_end_from_the_cli(tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    """The issue's command: a transformers ViT from its config, trained on CPU; the parameter
    names are the HF ones under ``model.``; the channels come from the data (1, not 3)."""
    pytest.importorskip("transformers", reason="the [hf] extra is part of [test]")
    argv = ["run", "--model", "hf:vit", "--dataset", "synthetic", "--criterion", "snip",
            "--model-kwargs", *TINY_VIT, "--epochs", "1", "--sparsity", "0.5", "--out",
            str(tmp_path), "--quiet"]
    code, out, err = run_cli(argv, capsys)
    assert code == 0, err
    run_dir = next(p for p in tmp_path.iterdir() if p.name != "_cache")
    result = json.loads((run_dir / "result.json").read_text())
    assert result["epochs"] == 1 and 0.0 <= result["test_acc"] <= 1.0
    assert result["kept"] == result["prunable"] // 2
    layers = json.loads((run_dir / "layers.json").read_text())
    names = json.dumps(layers)
    assert "model.vit.embeddings.patch_embeddings.projection.weight" in names
    assert "model.classifier.weight" in names
    assert "test accuracy" in out


def test_hf_model_is_a_logits_module_with_the_data_shape() -> None:
    pytest.importorskip("transformers", reason="the [hf] extra is part of [test]")
    kwargs = dict(pair.split("=") for pair in TINY_VIT)
    kwargs = {k: int(v) for k, v in kwargs.items()}
    torch.manual_seed(0)
    model = build_model("hf:vit", in_channels=3, num_classes=7, image_size=28, kwargs=kwargs)
    assert isinstance(model, LogitsOnly)
    assert model.model.config.num_labels == 7 and model.model.config.num_channels == 3
    out = model(torch.randn(2, 3, 28, 28))
    assert isinstance(out, torch.Tensor) and out.shape == (2, 7)
    torch.manual_seed(0)
    again = build_model("hf:vit", in_channels=3, num_classes=7, image_size=28, kwargs=kwargs)
    for (n, a), (m, b) in zip(model.state_dict().items(), again.state_dict().items()):
        assert n == m and torch.equal(a, b), n  # seeded like the zoo


@pytest.mark.parametrize("model_type, kwargs", [
    ("deit", {"patch_size": 8, "hidden_size": 16, "num_hidden_layers": 1,
              "num_attention_heads": 2, "intermediate_size": 32}),  # two heads: the first
    ("resnet", {"embedding_size": 8, "hidden_sizes": [8, 16], "depths": [1, 1]}),
    ("convnext", {"hidden_sizes": [8, 16], "depths": [1, 1], "num_stages": 2}),
    ("swin", {"patch_size": 4, "embed_dim": 8, "depths": [1, 1], "num_heads": [1, 2],
              "window_size": 4}),
])
def test_hf_vision_families_take_the_data_shape(model_type: str, kwargs: dict[str, Any]) -> None:
    pytest.importorskip("transformers", reason="the [hf] extra is part of [test]")
    torch.manual_seed(0)
    model = build_model(f"hf:{model_type}", in_channels=1, num_classes=5, image_size=32,
                        kwargs=kwargs)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 5)
    assert all(n.startswith("model.") for n, _ in model.named_parameters())


def test_hf_kwargs_contradicting_the_data_are_refused() -> None:
    pytest.importorskip("transformers", reason="the [hf] extra is part of [test]")
    with pytest.raises(ExternalModelError, match="image_size=32 contradicts the dataset"):
        build_model("hf:vit", in_channels=1, num_classes=10, image_size=28,
                    kwargs={"image_size": 32, "patch_size": 4, "hidden_size": 32,
                            "num_hidden_layers": 1, "num_attention_heads": 2})
    with pytest.raises(ExternalModelError, match="hf:no-such-type"):
        build_model("hf:no-such-type", num_classes=10)


@pytest.mark.parametrize("criterion", ["grasp", "hts"])
def test_hf_second_order_criteria_with_eager_attention(criterion: str, tmp_path: Path) -> None:
    """GraSP and Hutchinson need a double backward, which torch's CPU SDPA attention kernel
    lacks; ``attn_implementation=eager`` (a config field, as a model kwarg) scores them."""
    pytest.importorskip("transformers", reason="the [hf] extra is part of [test]")
    kwargs = {k: int(v) for k, v in (pair.split("=") for pair in TINY_VIT)}
    cfg = S.build({"model": "hf:vit", "dataset": "synthetic", "criterion": criterion,
                   "score_samples": 2, "epochs": 0, "sparsity": 0.5, "out": str(tmp_path),
                   "model_kwargs": {**kwargs, "attn_implementation": "eager"}})
    result = pipeline.run(cfg, show_progress=False)
    assert result["kept"] == result["prunable"] // 2


# --------------------------------------------------------------------------- module:factory


def test_user_factory_trains_end_to_end(user_package: Path, tmp_path: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """``--model mypackage.models:build`` imports from the working directory and calls the
    factory with the data's classes and channels (not image_size: it does not take it)."""
    argv = ["run", "--model", "mypackage.models:build", "--model-kwargs", "hidden=24",
            "--dataset", "synthetic", "--criterion", "fts", "--epochs", "2", "--lr", "0.05",
            "--sparsity", "0.8", "--out", str(tmp_path / "runs"), "--quiet"]
    code, _, err = run_cli(argv, capsys)
    assert code == 0, err
    calls = importlib.import_module("mypackage.models").CALLS
    assert calls[0] == {"num_classes": 10, "in_channels": 1, "hidden": 24}
    run_dir = next(p for p in (tmp_path / "runs").iterdir() if p.name != "_cache")
    result = json.loads((run_dir / "result.json").read_text())
    assert result["label"].startswith("mypackage.models:build-synthetic-fts")
    assert result["test_acc"] > 0.5  # the synthetic task is learned
    config = json.loads((run_dir / "config.json").read_text())
    assert config["model"]["model_kwargs"] == {"hidden": 24}
    assert S.from_dict(config).run_id() == run_dir.name


def test_factory_arguments_follow_its_signature(user_package: Path) -> None:
    torch.manual_seed(0)
    model = build_model("mypackage.models:open_ended", in_channels=1, num_classes=3,
                        image_size=28)
    calls = importlib.import_module("mypackage.models").CALLS
    assert calls[-1] == {"num_classes": 3, "in_channels": 1, "image_size": 28}
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 3)
    with pytest.raises(ExternalModelError, match=r"returned a str, not a torch\.nn\.Module"):
        build_model("mypackage.models:not_a_model", num_classes=3)
    with pytest.raises(ExternalModelError, match="has no callable 'nothing'"):
        build_model("mypackage.models:nothing", num_classes=3)
    with pytest.raises(ExternalModelError, match=r"cannot import mypackage\.absent"):
        build_model("mypackage.absent:build", num_classes=3)
    with pytest.raises(ExternalModelError, match="num_classes=5 contradicts the dataset"):
        build_model("mypackage.models:build", num_classes=3, kwargs={"num_classes": 5})
    with pytest.raises(ExternalModelError, match="unexpected keyword argument 'depth'"):
        build_model("mypackage.models:build", num_classes=3, kwargs={"depth": 5})


def test_a_missing_factory_module_is_one_line_exit_1(user_package: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["run", "--model", "mypackage.nope:build", "--dataset", "synthetic",
                            "--epochs", "0", "--out", str(tmp_path)], capsys)
    assert code == 1
    assert err.count("\n") == 1 and "cannot import mypackage.nope" in err


# --------------------------------------------------------------------------- timm:, torchvision:


@pytest.mark.parametrize("prefix, extra", [("timm", "timm"), ("torchvision", "torchvision"),
                                           ("hf", "hf")])
def test_a_missing_library_names_its_extra(prefix: str, extra: str,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.import_module
    package = X.LIBRARIES[prefix][0]

    def missing(name: str, *args: Any) -> Any:
        if name == package:
            raise ModuleNotFoundError(f"No module named {name!r}")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", missing)
    with pytest.raises(ExternalModelError) as err:
        build_model(f"{prefix}:resnet18", num_classes=10)
    assert str(err.value) == (f"'{prefix}:' models need {package}: "
                              f"pip install 'fishprune[{extra}]'")


def test_a_library_that_does_not_import_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """This environment's torchvision: installed, but its import raises a RuntimeError."""
    real = importlib.import_module

    def broken(name: str, *args: Any) -> Any:
        if name == "torchvision":
            raise RuntimeError("operator torchvision::nms does not exist\nmore lines")
        return real(name, *args)

    monkeypatch.setattr(importlib, "import_module", broken)
    with pytest.raises(ExternalModelError) as err:
        build_model("torchvision:resnet18", in_channels=3, num_classes=10, image_size=32)
    message = str(err.value)
    assert "\n" not in message and "torchvision::nms" in message
    assert "fishprune[torchvision]" in message


def _importable(package: str) -> bool:
    try:
        importlib.import_module(package)
    except Exception:
        return False
    return True


@pytest.mark.skipif(not _importable("timm"), reason="timm is not installed or does not import "
                    "(the torchvision wheels served here do not load with the CPU torch)")
def test_timm_models_are_built_for_the_data() -> None:
    torch.manual_seed(0)
    cnn = build_model("timm:resnet18", in_channels=1, num_classes=7, image_size=32)
    assert cnn(torch.randn(2, 1, 32, 32)).shape == (2, 7)
    vit = build_model("timm:vit_tiny_patch16_224", in_channels=3, num_classes=5, image_size=32,
                      kwargs={"patch_size": 8, "depth": 1})
    assert vit(torch.randn(2, 3, 32, 32)).shape == (2, 5)


@pytest.mark.skipif(not _importable("torchvision"), reason="torchvision is not installed or "
                    "does not import (a CUDA build against the CPU torch)")
def test_torchvision_models_are_built_for_the_data() -> None:
    torch.manual_seed(0)
    model = build_model("torchvision:resnet18", in_channels=3, num_classes=7, image_size=32)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 7)
    vit = build_model("torchvision:vit_b_16", in_channels=3, num_classes=4, image_size=32)
    assert vit.image_size == 32 and vit(torch.randn(2, 3, 32, 32)).shape == (2, 4)
    with pytest.raises(ExternalModelError, match="takes 3-channel images"):
        build_model("torchvision:resnet18", in_channels=1, num_classes=7)


def _rgb_folder(root: Path) -> Path:
    """train/ and test/ with 2 classes of 32×32 RGB PNGs (dark and bright)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", 12), ("test", 4)):
        for label in range(2):
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.integers(0, 120, (32, 32, 3)) + 120 * label
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


@pytest.mark.parametrize("spec, package", [("timm:resnet18", "timm"),
                                           ("torchvision:resnet18", "torchvision")])
def test_timm_and_torchvision_models_train_end_to_end(spec: str, package: str, tmp_path: Path,
                                                      capsys: pytest.CaptureFixture[str]
                                                      ) -> None:
    """On an RGB image folder (torchvision's classifiers take 3 channels), any device."""
    if not _importable(package):
        pytest.skip(f"{package} is not installed or does not import (the torchvision wheels "
                    "served here are CUDA builds that do not load with the CPU torch)")
    root = _rgb_folder(tmp_path / "data")
    code, _, err = run_cli(["run", "--model", spec, "--dataset", "imagefolder", "--data-dir",
                            str(root), "--image-size", "32", "--num-workers", "0",
                            "--criterion", "snip", "--sparsity", "0.9", "--epochs", "1",
                            "--batch-size", "8", "--out", str(tmp_path / "runs"), "--quiet"],
                           capsys)
    assert code == 0, err
    (result,) = (tmp_path / "runs").glob("*/result.json")
    assert json.loads(result.read_text())["epochs"] == 1


# --------------------------------------------------------------------------- settings and ids


def test_model_kwargs_count_in_the_id_only_when_set(tmp_path: Path) -> None:
    base = S.build({"model": "hf:vit"})
    empty = S.build({"model": "hf:vit", "model_kwargs": {}})
    assert base.run_id() == empty.run_id()
    assert "model_kwargs" not in C.non_default(base)
    a = S.build({"model": "hf:vit", "model_kwargs": {"hidden_size": 32, "patch_size": 7}})
    b = S.build({"model": "hf:vit", "model_kwargs": {"patch_size": 7, "hidden_size": 32}})
    c = S.build({"model": "hf:vit", "model_kwargs": {"patch_size": 7, "hidden_size": 64}})
    assert a.run_id() == b.run_id() != c.run_id() != base.run_id()
    toml = tmp_path / "vit.toml"
    toml.write_text('[model]\nmodel = "hf:vit"\n[model.model_kwargs]\nhidden_size = 32\n'
                    'patch_size = 7\n')
    from_file = flags.settings_from(_parse(["--config", str(toml)]))
    flat = tmp_path / "flat.toml"
    flat.write_text('model = "hf:vit"\nmodel_kwargs = {hidden_size = 32, patch_size = 7}\n')
    assert flags.settings_from(_parse(["--config", str(flat)])) == a
    from_flags = flags.settings_from(_parse(["--model", "hf:vit", "--model-kwargs",
                                             "hidden_size=32", "patch_size=7"]))
    merged = flags.settings_from(_parse(["--config", str(toml), "--model-kwargs",
                                         "hidden_size=64"]))
    assert from_file == from_flags == a
    assert merged == c
    assert S.from_dict(json.loads(json.dumps(a.to_dict()))) == a


def test_model_kwargs_values_are_toml() -> None:
    cfg = flags.settings_from(_parse(["--model", "x.y:z", "--model-kwargs", "depth=2",
                                      "rate=0.5", "flag=true", "name=plain", "sizes=[1, 2]",
                                      'quoted="a b"']))
    assert cfg.model.model_kwargs == {"depth": 2, "rate": 0.5, "flag": True, "name": "plain",
                                      "sizes": [1, 2], "quoted": "a b"}


@pytest.mark.parametrize("argv, message", [
    (["--model", "lenet5", "--model-kwargs", "depth=2"], "apply to external models"),
    (["--model", "hf:vit", "--width", "2"], "width applies to the zoo models only"),
    (["--model", "not a spec:x"], "neither a zoo model"),
    (["--model", "hf:"], "names no hf model"),
    (["--model", "resnet1000"], "model must be one of"),
    (["--model", "hf:vit", "--model-kwargs", "depth=2", "depth=3"], "depth is given twice"),
])
def test_bad_model_settings_are_usage_errors(argv: list[str], message: str, tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(["run", *argv, "--out", str(tmp_path)], capsys)
    assert code == 2 and message in err and err.count("\n") == 1
    assert not any(tmp_path.iterdir())


def test_models_lists_the_zoo_and_the_external_specs(capsys: pytest.CaptureFixture[str]
                                                     ) -> None:
    code, out, _ = run_cli(["models"], capsys)
    assert code == 0
    lines = out.splitlines()
    assert "lenet5" in lines and "vit" in lines
    for spec in ("timm:NAME", "torchvision:NAME", "hf:MODEL_TYPE", "package.module:factory"):
        assert any(line.startswith(spec) for line in lines), spec
    hf_line = next(line for line in lines if line.startswith("hf:"))
    assert ("installed" in hf_line) and ("not installed" in hf_line) != X.available("hf")


def test_run_help_shows_every_default() -> None:
    """Every setting and criterion option with a default says it in ``run --help``."""
    parser = cli.build_parser()
    run = parser._subparsers._group_actions[0].choices["run"]
    helps = {a.dest: a.help for a in run._actions}
    defaults = C.flat_values(C.RunConfig())
    for name in S.setting_names():
        if name in C.option_specs() or defaults.get(name) not in (None, [], {}):
            assert "default" in helps[name], (name, helps[name])
    assert "default: 10" in helps["probes"] and "default: 0.98" in helps["sparsity"]


def test_resumed_run_says_so(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = S.build({"dataset": "synthetic", "model": "lenet300", "width": 0.25, "epochs": 2,
                   "sparsity": 0.5, "out": str(tmp_path)})
    die_in_epoch(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="simulated kill"):
        pipeline.run(cfg, show_progress=False)
    monkeypatch.undo()
    messages: list[str] = []
    pipeline.run(cfg, show_progress=False, echo=messages.append)
    assert "resuming from epoch 2/2 (checkpoint.safetensors)" in messages
    fresh: list[str] = []
    other = S.build({"out": str(tmp_path / "other")}, base=cfg)
    pipeline.run(other, show_progress=False, echo=fresh.append)
    assert not any("resuming" in m for m in fresh)


def _parse(argv: list[str]) -> Any:
    parser = flags.Parser(prog="t")
    flags.add_run_flags(parser)
    return parser.parse_args(argv)

