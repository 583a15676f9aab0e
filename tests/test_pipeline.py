"""End-to-end tests of the experiment pipeline: score → prune → train → evaluate → stored result.

Everything runs on the synthetic dataset (1000 train / 200 test images, 28×28×1) with a small
LeNet-300-100 (width 0.25) and lr 0.1, which learns it within three epochs of seven steps each.
The module-scoped ``reference`` run is shared by several tests; each test that needs its own run
directory uses ``tmp_path``. One slow test trains on the real Fashion-MNIST.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import fishprune as fp
from fishprune import atomic, cli, pipeline
from fishprune import config as C
from fishprune import settings as S
from fishprune import tensorfiles as tf
from fishprune.cli import flags
from fishprune.data import TensorBatches, load_dataset, stratified_split
from fishprune.models import build_model
from fishprune.rundir import CHECKPOINT

#: Settings under which the synthetic task is learned in about a second.
FAST: dict[str, Any] = {
    "dataset": "synthetic",
    "model": "lenet300",
    "width": 0.25,
    "lr": 0.1,
    "epochs": 3,
    "sparsity": 0.9,
}
TIMING_KEYS = ("warmup_seconds", "score_seconds", "train_seconds")
ARTIFACTS = ("config.json", "provenance.json", "layers.json", "masks.json", "masks.safetensors",
             "metrics.json", "best.safetensors", "result.json")


def make_cfg(out: Path, **overrides: Any) -> C.RunConfig:
    """The FAST configuration writing into ``out``, with ``overrides``."""
    return S.build({**FAST, "out": str(out), **overrides})


def run_quiet(cfg: C.RunConfig, messages: list[str] | None = None) -> dict[str, Any]:
    """``pipeline.run`` without a progress bar, collecting its messages in ``messages``."""
    sink = messages if messages is not None else []
    return pipeline.run(cfg, show_progress=False, echo=sink.append)


def without_timings(result: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in result.items() if k not in TIMING_KEYS}


def expected_kept(density: float, total: int) -> int:
    """round(density · total) with halves rounded up (the selection's documented rule)."""
    return math.floor(round(density * total, 6) + 0.5)


def assert_states_equal(a: dict[str, Tensor], b: dict[str, Tensor]) -> None:
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def assert_pruned_zero(state: dict[str, Tensor], masks: dict[str, Tensor]) -> None:
    """Every pruned weight of ``state`` is exactly 0.0."""
    for name, mask in masks.items():
        assert torch.count_nonzero(state[name][~mask]) == 0, name


@dataclass
class Reference:
    """The shared uninterrupted FAST run."""

    cfg: C.RunConfig
    result: dict[str, Any]
    dir: Path
    messages: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Reference:
    cfg = make_cfg(tmp_path_factory.mktemp("reference"))
    messages: list[str] = []
    result = run_quiet(cfg, messages)
    return Reference(cfg, result, cfg.directory(), messages)


class CallCounter:
    """Wraps ``fn``; raises ``RuntimeError`` on call number ``fail_on`` (1-based), if given."""

    def __init__(self, fn: Callable[..., Any], fail_on: int | None = None) -> None:
        self.fn, self.fail_on, self.calls = fn, fail_on, 0

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        self.calls += 1
        if self.calls == self.fail_on:
            raise RuntimeError("simulated kill")
        return self.fn(*args, **kwargs)


# --------------------------------------------------------------------------- end to end


def test_library_run_stores_a_complete_result(reference: Reference) -> None:
    """result.json fields, exact kept count, every artifact present and parseable."""
    out, result, cfg = reference.dir, reference.result, reference.cfg
    for name in ARTIFACTS:
        assert (out / name).is_file(), name
    assert not (out / CHECKPOINT).exists()  # superseded by the result

    assert result == json.loads((out / "result.json").read_text())
    assert result["run_id"] == cfg.run_id() == out.name
    assert result["label"] == "lenet300-synthetic-fts-s0.9-seed0"
    assert result["criterion"] == "fts" and result["sparsity"] == 0.9
    assert result["epochs"] == 3 and 1 <= result["best_epoch"] <= 3
    assert result["collapsed_layers"] == [] and result["disconnected_layers"] == []
    for key in (*TIMING_KEYS, "test_loss"):
        assert isinstance(result[key], float) and result[key] >= 0
    assert result["warmup_seconds"] == 0.0

    masks = tf.load_masks(out / "masks.safetensors")
    model = build_model("lenet300", width=0.25)
    assert set(masks) == set(fp.prunable_parameters(model))
    prunable = sum(m.numel() for m in masks.values())
    kept = sum(int(m.sum()) for m in masks.values())
    assert result["prunable"] == prunable
    assert result["parameters"] == sum(p.numel() for p in model.parameters())
    assert result["kept"] == kept == expected_kept(0.1, prunable)
    assert result["density"] == pytest.approx(kept / prunable)

    best = tf.load_state(out / "best.safetensors")
    model.load_state_dict(best)  # a plain state_dict of the architecture
    assert_pruned_zero(best, masks)
    assert all(torch.count_nonzero(best[n][m]) > 0.9 * int(m.sum()) for n, m in masks.items())

    stored = json.loads((out / "config.json").read_text())
    assert S.from_dict(stored) == cfg  # the derived run_id and label are ignored
    assert stored.pop("run_id") == cfg.run_id() and stored.pop("label") == cfg.label()
    assert S.from_dict(stored) == cfg
    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["torch"] == torch.__version__ and provenance["device"] == "cpu"
    metrics = json.loads((out / "metrics.json").read_text())
    assert [m["epoch"] for m in metrics] == [1, 2, 3]
    assert metrics[result["best_epoch"] - 1]["val_acc"] == result["best_val_acc"]
    assert result["best_val_acc"] == max(m["val_acc"] for m in metrics)
    assert json.loads((out / "masks.json").read_text())["score_seconds"] >= 0
    layers = json.loads((out / "layers.json").read_text())
    assert isinstance(layers, dict) and layers


def test_synthetic_task_is_learned(reference: Reference) -> None:
    """3 epochs at 90% sparsity reach far above the 10% chance level."""
    assert reference.result["test_acc"] > 0.8
    assert reference.result["best_val_acc"] > 0.8


def test_rerun_skips_finished_run(reference: Reference, monkeypatch: pytest.MonkeyPatch) -> None:
    """A finished run is read back, not retrained or rescored."""
    for stage in ("train_epoch", "evaluate", "load_dataset", "pruning_masks"):
        monkeypatch.setattr(pipeline, stage, CallCounter(lambda *a, **k: None, fail_on=1))
    messages: list[str] = []
    again = run_quiet(make_cfg(reference.cfg.out), messages)
    assert again == reference.result
    assert any("already finished" in m for m in messages)


def test_same_config_in_two_directories_is_identical(reference: Reference, tmp_path: Path
                                                     ) -> None:
    """Determinism: the same settings give the same masks, weights and accuracies."""
    result = run_quiet(make_cfg(tmp_path))
    assert without_timings(result) == without_timings(reference.result)
    out = make_cfg(tmp_path).directory()
    assert_states_equal(tf.load_masks(out / "masks.safetensors"),
                        tf.load_masks(reference.dir / "masks.safetensors"))
    assert_states_equal(tf.load_state(out / "best.safetensors"),
                        tf.load_state(reference.dir / "best.safetensors"))


def test_cli_run_end_to_end(reference: Reference, tmp_path: Path,
                            capsys: pytest.CaptureFixture[str]) -> None:
    """``fishprune run ...`` gives the library's result; a second call skips."""
    argv = ["run", "--dataset", "synthetic", "--model", "lenet300", "--width", "0.25",
            "--lr", "0.1", "--epochs", "3", "--sparsity", "0.9", "--out", str(tmp_path),
            "--quiet"]
    assert cli.main(argv) == 0
    printed = capsys.readouterr().out
    assert reference.cfg.run_id() in printed and "test accuracy" in printed
    result = json.loads((tmp_path / reference.cfg.run_id() / "result.json").read_text())
    assert without_timings(result) == without_timings(reference.result)
    assert cli.main(argv) == 0
    assert "already finished" in capsys.readouterr().out


# --------------------------------------------------------------------------- resume


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_resume_after_kill_is_bit_identical(optimizer: str, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed during epoch 2, rerun: the same weights, history and result as one clean run."""
    over = {"optimizer": optimizer, "lr": 0.1 if optimizer == "sgd" else 0.003}
    killed, clean = make_cfg(tmp_path / "killed", **over), make_cfg(tmp_path / "clean", **over)
    with monkeypatch.context() as patch:
        patch.setattr(pipeline, "train_epoch", CallCounter(pipeline.train_epoch, fail_on=2))
        with pytest.raises(RuntimeError, match="simulated kill"):
            run_quiet(killed)
    out = killed.directory()
    assert (out / CHECKPOINT).exists() and not (out / "result.json").exists()
    assert len(json.loads((out / "metrics.json").read_text())) == 1

    counter = CallCounter(pipeline.train_epoch)
    monkeypatch.setattr(pipeline, "train_epoch", counter)
    resumed = run_quiet(killed)
    assert counter.calls == 2  # epochs 2 and 3 only
    monkeypatch.undo()
    uninterrupted = run_quiet(clean)

    assert without_timings(resumed) == without_timings(uninterrupted)
    assert resumed["test_acc"] > 0.5
    ref = clean.directory()
    assert_states_equal(tf.load_state(out / "best.safetensors"),
                        tf.load_state(ref / "best.safetensors"))
    drop = [{k: v for k, v in m.items() if k != "seconds"}
            for m in json.loads((out / "metrics.json").read_text())]
    keep = [{k: v for k, v in m.items() if k != "seconds"}
            for m in json.loads((ref / "metrics.json").read_text())]
    assert drop == keep


def test_kill_while_storing_masks_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    """A kill between the two mask files must not leave a run that can never finish."""
    cfg = make_cfg(tmp_path)
    real = atomic.write_json

    def dies_on_masks_json(path: Any, *args: Any, **kwargs: Any) -> None:
        if Path(path).name == "masks.json":
            raise RuntimeError("simulated kill")
        real(path, *args, **kwargs)

    with monkeypatch.context() as patch:
        patch.setattr(atomic, "write_json", dies_on_masks_json)
        with pytest.raises(RuntimeError, match="simulated kill"):
            run_quiet(cfg)
    result = run_quiet(cfg)
    assert result["kept"] == expected_kept(0.1, result["prunable"])


# --------------------------------------------------------------------------- warm-up


def test_warmup_epoch_keeps_pruned_weights_zero_and_is_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After a dense warm-up epoch (momentum built up), training keeps pruned weights at 0;
    the warm-up is stored in ``_cache`` and reused, with the same outcome as recomputing it."""
    first = make_cfg(tmp_path / "a", warmup_epochs=1)
    result = run_quiet(first)
    out = first.directory()
    masks = tf.load_masks(out / "masks.safetensors")
    assert_pruned_zero(tf.load_state(out / "best.safetensors"), masks)
    assert result["warmup_seconds"] > 0 and result["test_acc"] > 0.8
    cached = sorted((tmp_path / "a" / "_cache").glob("warmup-*.safetensors"))
    assert len(cached) == 1
    init = next((tmp_path / "a" / "_cache").glob("init-*.safetensors"))
    warm, start = tf.load_state(cached[0]), tf.load_state(init)
    assert any(not torch.equal(warm[k], start[k]) for k in warm)  # it did train

    # Another sparsity in the same out dir reuses the warm-up: only the 3 sparse epochs train.
    counter = CallCounter(pipeline.train_epoch)
    monkeypatch.setattr(pipeline, "train_epoch", counter)
    messages: list[str] = []
    reused = run_quiet(make_cfg(tmp_path / "a", warmup_epochs=1, sparsity=0.8), messages)
    assert counter.calls == 3  # the warm-up's own time is stored with it and reported again
    assert reused["warmup_seconds"] == pytest.approx(result["warmup_seconds"], abs=1e-3)
    assert any("warm-up loaded" in m for m in messages)
    monkeypatch.undo()
    fresh = run_quiet(make_cfg(tmp_path / "b", warmup_epochs=1, sparsity=0.8))
    assert without_timings(fresh) == without_timings(reused)
    a = make_cfg(tmp_path / "a", warmup_epochs=1, sparsity=0.8).directory()
    b = make_cfg(tmp_path / "b", warmup_epochs=1, sparsity=0.8).directory()
    assert_states_equal(tf.load_state(a / "best.safetensors"),
                        tf.load_state(b / "best.safetensors"))


BN_MODEL: dict[str, Any] = {"model": "vgg11", "width": 0.0625, "epochs": 1, "lr": 0.01}


def _bn_state_at_scoring(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, bn_warmup: bool
                         ) -> tuple[dict[str, Tensor], nn.Module]:
    """The BatchNorm buffers (and a copy of the model) as the criterion sees them."""
    seen: dict[str, Any] = {}
    real = fp.prune

    def spy(model: nn.Module, *args: Any, **kwargs: Any) -> dict[str, Tensor]:
        seen["buffers"] = {k: v.clone() for k, v in model.named_buffers()}
        seen["model"] = build_model("vgg11", width=0.0625)
        seen["model"].load_state_dict(model.state_dict())
        return real(model, *args, **kwargs)

    monkeypatch.setattr(fp, "prune", spy)
    run_quiet(make_cfg(tmp_path, **BN_MODEL, bn_warmup=bn_warmup))
    monkeypatch.undo()
    return seen["buffers"], seen["model"]


def test_bn_warmup_refreshes_statistics_before_scoring(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """``--bn-warmup``: running stats = the average of the per-batch statistics of one
    train-mode pass over the training split (weights untouched); without it, the defaults."""
    plain, _ = _bn_state_at_scoring(tmp_path / "plain", monkeypatch, bn_warmup=False)
    warmed, model = _bn_state_at_scoring(tmp_path / "warm", monkeypatch, bn_warmup=True)
    assert torch.equal(plain["features.1.running_mean"], torch.zeros(4))
    assert torch.equal(plain["features.1.running_var"], torch.ones(4))
    for name in plain:
        if name.endswith(("running_mean", "running_var")):
            assert not torch.equal(plain[name], warmed[name]), name

    init = tf.load_state(next((tmp_path / "warm" / "_cache").glob("init-*.safetensors")))
    for name, value in model.state_dict().items():
        if "running" not in name and "num_batches" not in name:
            assert torch.equal(value, init[name]), name  # only statistics changed

    ds = load_dataset("synthetic")
    train_idx, _ = stratified_split(ds.train_y, 0.2, 0)
    batches = TensorBatches(ds.train_x[train_idx], ds.train_y[train_idx], batch_size=128,
                            mean=ds.mean, std=ds.std)
    with torch.no_grad():
        pad = [model.input_padding] * 4  # VGG zero-pads 28-px inputs to 32 before features
        means = torch.stack([model.features[0](torch.nn.functional.pad(x, pad)).mean(dim=(0, 2, 3))
                             for x, _ in batches])
    torch.testing.assert_close(warmed["features.1.running_mean"], means.mean(0))


# --------------------------------------------------------------------------- checkpoint choice


class EvalSpy:
    """Wraps ``evaluate``: fakes the validation accuracies and records the evaluated weights.

    Validation and test are told apart by size (FAST with val_fraction 0.3: 300 vs 200).
    """

    def __init__(self, real: Callable[..., tuple[float, float]], fake_val: list[float]) -> None:
        self.real, self.fake_val = real, list(fake_val)
        self.val_states: list[dict[str, Tensor]] = []
        self.test_states: list[dict[str, Tensor]] = []

    def __call__(self, model: nn.Module, batches: TensorBatches, **kw: Any) -> tuple[float, float]:
        loss, acc = self.real(model, batches, **kw)
        state = {k: v.clone() for k, v in model.state_dict().items()}
        if batches.num_samples == 200:
            self.test_states.append(state)
            return loss, acc
        self.val_states.append(state)
        return loss, self.fake_val[len(self.val_states) - 1]


def test_best_checkpoint_is_chosen_on_validation(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation says epoch 2 is best although training goes on improving: the stored and
    tested weights are epoch 2's, and the test set is evaluated exactly once."""
    spy = EvalSpy(pipeline.evaluate, fake_val=[0.5, 0.9, 0.7])
    monkeypatch.setattr(pipeline, "evaluate", spy)
    result = run_quiet(make_cfg(tmp_path, val_fraction=0.3))
    assert len(spy.val_states) == 3 and len(spy.test_states) == 1
    assert result["best_epoch"] == 2 and result["best_val_acc"] == 0.9
    assert_states_equal(spy.test_states[0], spy.val_states[1])
    out = make_cfg(tmp_path, val_fraction=0.3).directory()
    assert_states_equal(tf.load_state(out / "best.safetensors"), spy.val_states[1])
    epoch2, epoch3 = spy.val_states[1], spy.val_states[2]
    assert any(not torch.equal(epoch2[k], epoch3[k]) for k in epoch2)  # the choice matters


def test_without_validation_the_last_epoch_is_stored_and_tested(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch
                                                                 ) -> None:
    """val_fraction 0: no choice at all; best.safetensors holds the weights that were tested."""
    seen: list[dict[str, Tensor]] = []
    real = pipeline.evaluate

    def spy(model: nn.Module, batches: TensorBatches, **kw: Any) -> tuple[float, float]:
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return real(model, batches, **kw)

    monkeypatch.setattr(pipeline, "evaluate", spy)
    cfg = make_cfg(tmp_path, val_fraction=0.0)
    result = run_quiet(cfg)
    assert len(seen) == 1  # the test set, once
    assert result["best_epoch"] == 3 and result["best_val_acc"] is None
    assert_states_equal(tf.load_state(cfg.directory() / "best.safetensors"), seen[0])


# --------------------------------------------------------------------------- configuration


def settings(argv: list[str]) -> C.RunConfig:
    """The config ``fishprune run ARGV`` would use."""
    return flags.settings_from(cli.build_parser().parse_args(["run", *argv]))


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_toml_sections_and_flat_keys_equal_flags(tmp_path: Path) -> None:
    toml = write(tmp_path / "c.toml", 'dataset = "synthetic"\nseed = 3\n'
                 '[model]\nmodel = "lenet300"\nwidth = 0.25\n'
                 '[prune]\nsparsity = 0.9\nexclude = ["classifier.*"]\n'
                 '[train]\nlr-milestones = [2]\nlr = 1\nnesterov = true\n')
    from_file = settings(["--config", str(toml)])
    from_flags = settings(["--dataset", "synthetic", "--seed", "3", "--model", "lenet300",
                           "--width", "0.25", "--sparsity", "0.9", "--exclude", "classifier.*",
                           "--lr-milestones", "2", "--lr", "1", "--nesterov"])
    assert from_file == from_flags
    assert from_file.train.lr == 1.0 and isinstance(from_file.train.lr, float)
    assert from_file.prune.exclude == ("classifier.*",)
    assert from_file.train.lr_milestones == (2,)
    assert from_file.run_id() == from_flags.run_id()


def test_precedence_defaults_preset_config_flags(tmp_path: Path) -> None:
    toml = write(tmp_path / "c.toml", "[train]\nlr = 0.05\nepochs = 7\n")
    cfg = settings(["--preset", "fts-vgg19", "--config", str(toml), "--epochs", "3"])
    assert cfg.model.model == "vgg19"  # preset
    assert cfg.train.weight_decay == 1e-4 and cfg.train.lr_milestones == (60, 120)  # preset
    assert cfg.train.lr == 0.05  # config file over preset
    assert cfg.train.epochs == 3  # flag over config file and preset
    assert cfg.train.momentum == C.TrainConfig().momentum  # default
    assert settings(["--preset", "fts-vgg19"]).train.lr == 0.1


def test_boolean_flags_have_no_forms(tmp_path: Path) -> None:
    assert settings(["--bn-warmup"]).warmup.bn_warmup is True
    assert settings(["--bn-warmup", "--no-bn-warmup"]).warmup.bn_warmup is False
    assert settings([]).data.augment is None
    assert settings(["--no-augment"]).data.augment is False
    toml = write(tmp_path / "c.toml", "nesterov = true\n")
    assert settings(["--config", str(toml)]).train.nesterov is True
    assert settings(["--config", str(toml), "--no-nesterov"]).train.nesterov is False


@pytest.mark.parametrize(("toml", "flags"), [
    ("bogus = 1\n", []),
    ("[train]\nmodel = \"lenet5\"\n", []),  # a real setting in the wrong section
    ('epochs = "3"\n', []),
    ("lr = \n", []),  # not TOML
    (None, ["--bogus", "1"]),
    (None, ["--epochs", "three"]),
    (None, ["--sparsity", "1.0"]),
])
def test_bad_settings_exit_2_with_one_line(toml: str | None, flags: list[str], tmp_path: Path,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["run", "--out", str(tmp_path / "runs"), *flags]
    if toml is not None:
        argv += ["--config", str(write(tmp_path / "c.toml", toml))]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fishprune: error: ") and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()  # nothing ran


#: Pinned run ids: changing any of them orphans every stored result (hash regression).
PINNED = [
    ({}, "44136fa355b3"),
    (FAST, "68328fd693c0"),
    ({"criterion": "snip", "sparsity": 0.95, "seed": 2, "lr_milestones": [60, 120],
      "exclude": ["classifier.*"], "bn_warmup": True}, "a3385bbc340b"),
]


@pytest.mark.parametrize(("values", "run_id"), PINNED)
def test_pinned_run_ids(values: dict[str, Any], run_id: str) -> None:
    assert S.build(values).run_id() == run_id


def test_location_settings_do_not_change_the_id() -> None:
    base = S.build({"dataset": "synthetic"})
    moved = S.build({"dataset": "synthetic", "out": "/elsewhere", "device": "cpu",
                     "data_dir": "/data", "on_collapse": "error"})
    assert moved.run_id() == base.run_id() == "e046b583c3fc"
    explicit_default = S.build({"dataset": "synthetic", "lr": C.TrainConfig().lr, "seed": 0})
    assert explicit_default.run_id() == base.run_id()


@dataclass(frozen=True)
class _TrainPlus(C.TrainConfig):
    """TrainConfig with one more option, as a future version might add."""

    label_smoothing: float = 0.0


@dataclass(frozen=True)
class _RunPlus(C.RunConfig):
    train: _TrainPlus = field(default_factory=_TrainPlus)


def test_a_new_default_valued_option_keeps_old_ids(monkeypatch: pytest.MonkeyPatch) -> None:
    """open_lth property: ids hash only non-default settings, so old ids survive a new option."""
    monkeypatch.setattr(C, "RunConfig", _RunPlus)
    assert "label_smoothing" in C.flat_fields()
    for values, run_id in PINNED:
        assert S.build(values).run_id() == run_id
        assert "label_smoothing" not in C.non_default(S.build(values))
        assert S.build({**values, "label_smoothing": 0.1}).run_id() != run_id


# --------------------------------------------------------------------------- Masker invariants
# Stale optimizer state (momentum / Adam moments left by dense steps) and the weight guard are
# covered by tests/test_selection.py; here: what the pipeline relies on with a fresh optimizer.


OPTIMIZERS: dict[str, Callable[[list[nn.Parameter]], torch.optim.Optimizer]] = {
    "sgd-momentum-wd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-3),
    "sgd-nesterov": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=5e-3,
                                              nesterov=True),
    "adam": lambda p: torch.optim.Adam(p, lr=0.01, weight_decay=1e-3),
    "adamw": lambda p: torch.optim.AdamW(p, lr=0.01, weight_decay=0.1),
}


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_masked_gradients_alone_suffice_with_a_fresh_optimizer(name: str) -> None:
    """With a fresh optimizer (what the pipeline builds after warm-up), masking gradients before
    the step already keeps pruned weights at 0, without the weight guard: the update of a zero
    weight with zero gradient and zero optimizer state is zero, weight decay included."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.ReLU(), nn.Linear(8, 3))
    gen = torch.Generator().manual_seed(1)
    masks = {n: torch.rand(w.shape, generator=gen) < 0.5
             for n, w in fp.prunable_parameters(model).items()}
    fp.apply_masks(model, masks)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = OPTIMIZERS[name](list(model.parameters()))
    masker = fp.Masker(model, masks)
    for _ in range(10):
        x, y = torch.randn(16, 6, generator=gen), torch.randint(3, (16,), generator=gen)
        optimizer.zero_grad(set_to_none=True)
        nn.functional.cross_entropy(model(x), y).backward()
        masker.mask_grads_()
        optimizer.step()  # no mask_weights_()
        assert_pruned_zero(dict(model.named_parameters()), masks)
    for n, m in masks.items():
        assert not torch.equal(model.get_parameter(n)[m], before[n][m])  # kept weights train


# --------------------------------------------------------------------------- real data (slow)


FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.slow
@pytest.mark.skipif(not (FASHION / "train-images-idx3-ubyte.gz").exists(),
                    reason="Fashion-MNIST not installed")
def test_fashion_mnist_lenet300_fts_learns(tmp_path: Path) -> None:
    """LeNet-300-100, FTS at 90% sparsity, 2 epochs on Fashion-MNIST: well above chance."""
    cfg = S.build({"dataset": "fashion-mnist", "data_dir": str(FASHION), "model": "lenet300",
                   "criterion": "fts", "sparsity": 0.9, "epochs": 2, "out": str(tmp_path)})
    result = run_quiet(cfg)
    assert result["kept"] == expected_kept(0.1, result["prunable"])
    assert result["test_acc"] > 0.8
    masks = tf.load_masks(cfg.directory() / "masks.safetensors")
    assert_pruned_zero(tf.load_state(cfg.directory() / "best.safetensors"), masks)
