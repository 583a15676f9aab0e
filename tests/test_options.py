"""Criterion options: owned by each criterion, validated before anything runs, one cache key.

- a criterion's options travel in ``PruneConfig.options`` and are checked against the
  criterion's own dataclass when the config is built: a wrong one fails at once (exit 2),
  before any data is loaded or any file written;
- run ids of configs that set options are the ones they had when options were flat settings;
- a criterion added in a module of its own, with an option of its own, works from the CLI and
  from TOML without touching any other file;
- the init/warm-up cache keys exist once: the sweep groups runs exactly as the pipeline caches.
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
from _cli import FAST, one_error_line

from fishprune import cachekeys, cli
from fishprune import config as C
from fishprune import settings as S
from fishprune.criteria import REGISTRY
from fishprune.sweep.driver import plan, warmup_group


@pytest.mark.parametrize(("argv", "mention"), [
    (["--criterion", "fts", "--damping", "1e-3"], "unknown option(s) damping for criterion 'fts'"),
    (["--criterion", "snip", "--probes", "3"], "unknown option(s) probes"),
    (["--criterion", "hts", "--probes", "0"], "probes must be an integer >= 1"),
    (["--criterion", "hd", "--temperature", "0"], "temperature must be a finite number > 0"),
    (["--criterion", "fbss", "--damping", "-1"], "damping must be a finite number > 0"),
    (["--criterion", "hts", "--option", "probes=1.5"], "probes must be int; got 1.5"),
    (["--criterion", "hts", "--option", "nope=1"], "unknown criterion option 'nope'"),
    (["--criterion", "hts", "--option", "probes"], "--option needs NAME=VALUE"),
    (["--criterion", "hts", "--probes", "2", "--option", "probes=3"], "given twice"),
    (["--criterion", "synflow", "--option", "input_shape=[1, 28, 28]"],
     "unknown criterion option 'input_shape'"),
])
@pytest.mark.parametrize("warmup", [[], ["--warmup-epochs", "1"]])
def test_bad_criterion_options_fail_at_once(argv: list[str], mention: str, warmup: list[str],
                                            tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    """Regression: ``--criterion fts --damping 1e-3`` loaded the data and ran (and cached) a
    warm-up epoch before failing with exit 1. Now: exit 2 and nothing on disk."""
    out = tmp_path / "runs"
    status = cli.main(["run", *FAST, *argv, *warmup, "--out", str(out)])
    assert status == 2
    assert mention in one_error_line(capsys)
    assert not out.exists()


@pytest.mark.parametrize(("values", "run_id"), [
    # Ids computed before options moved out of the flat settings: they must never change.
    ({"criterion": "hts", "probes": 20, "temperature": 100.0}, "a54b213c858e"),
    ({"criterion": "fts", "per_sample": True}, "d9e613ab7dae"),
    ({"criterion": "fbss", "damping": 1e-6, "per_sample": True}, "c6c04fde6ebf"),
    ({"criterion": "grasp", "temperature": 50.0}, "296f7b50dc74"),
    ({"criterion": "fts", "per_sample": False}, "44136fa355b3"),  # the default: no option
])
def test_option_run_ids_are_pinned(values: dict[str, Any], run_id: str) -> None:
    assert S.build(values).run_id() == run_id
    options = {k: v for k, v in values.items() if k != "criterion"}
    assert S.build({"criterion": values["criterion"], "options": options}).run_id() == run_id


def test_an_option_at_its_default_is_no_option() -> None:
    explicit = S.build({"criterion": "hts", "probes": 10})
    assert explicit.prune.options == {} and explicit == S.build({"criterion": "hts"})
    assert S.build({"criterion": "hts", "temperature": 50}).prune.options == {"temperature": 50.0}


def test_options_flat_in_tables_and_as_a_table_agree(tmp_path: Path) -> None:
    flat = tmp_path / "flat.toml"
    flat.write_text('criterion = "hts"\nprobes = 3\n')
    table = tmp_path / "table.toml"
    table.write_text('[prune]\ncriterion = "hts"\n[prune.options]\nprobes = 3\n')
    section = tmp_path / "section.toml"
    section.write_text('[prune]\ncriterion = "hts"\nprobes = 3\n')
    cfgs = [S.build(S.from_toml(p)) for p in (flat, table, section)]
    assert cfgs[0] == cfgs[1] == cfgs[2] and cfgs[0].prune.options == {"probes": 3}


def test_an_option_given_twice_in_toml_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "twice.toml"
    path.write_text('criterion = "hts"\nprobes = 3\n[prune.options]\nprobes = 4\n')
    with pytest.raises(C.ConfigError, match="probes is given twice"):
        S.from_toml(path)


def test_config_json_of_earlier_versions_still_reads() -> None:
    """Run directories written before options moved hold them flat in ``prune``."""
    old = {"run_id": "x", "label": "y", "prune": {
        "criterion": "hts", "sparsity": 0.9, "probes": 20, "temperature": None, "damping": None,
        "per_sample": False}, "seed": 1}
    cfg = S.from_dict(old)
    assert cfg.prune.options == {"probes": 20}
    assert cfg == S.build({"criterion": "hts", "sparsity": 0.9, "probes": 20, "seed": 1})
    assert S.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


PLUGIN = '''
"""Sign: s_q = w_q * sign(g_q) * strength (a made-up criterion for the plug-in test)."""

from dataclasses import dataclass, field

import torch

from fishprune.autograd import mean_gradient
from fishprune.criteria import register


@dataclass(frozen=True)
class SignOptions:
    strength: float = field(default=1.0, metadata={"help": "scale of the scores"})

    def validate(self) -> None:
        if not self.strength > 0:
            raise ValueError(f"strength must be > 0, got {self.strength!r}")


@register("signcrit", options=SignOptions)
def signcrit(model, params, batches, ctx, opts):
    g = mean_gradient(model, params, batches, ctx.loss_fn)
    return {n: params[n].detach() * torch.sign(g[n]) * opts.strength for n in params}
'''


@pytest.fixture
def plugin(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A criterion in a module of its own, imported as a user's own code would be."""
    (tmp_path / "mycriteria.py").write_text(textwrap.dedent(PLUGIN))
    monkeypatch.syspath_prepend(str(tmp_path))
    before = dict(REGISTRY)
    importlib.import_module("mycriteria")
    yield "signcrit"
    REGISTRY.clear()
    REGISTRY.update(before)
    sys.modules.pop("mycriteria", None)


def test_a_new_criterion_with_a_new_option_works_from_cli_and_toml(
        plugin: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "runs"
    assert cli.main(["run", *FAST, "--criterion", plugin, "--strength", "2",
                     "--out", str(out)]) == 0
    (run_dir,) = [p for p in out.iterdir() if p.name != "_cache"]
    stored = json.loads((run_dir / "config.json").read_text())
    assert stored["prune"]["options"] == {"strength": 2.0}
    config = tmp_path / "c.toml"
    config.write_text(f'criterion = "{plugin}"\n[prune.options]\nstrength = 2\n')
    assert cli.main(["run", *FAST, "--config", str(config), "--out", str(out)]) == 0
    assert "already finished" in capsys.readouterr().out  # the same run, the same id
    assert cli.main(["run", *FAST, "--criterion", plugin, "--strength", "-1",
                     "--out", str(out)]) == 2
    assert "strength must be > 0" in one_error_line(capsys)
    assert cli.main(["criteria"]) == 0
    assert "signcrit" in capsys.readouterr().out


def test_warmup_grouping_is_the_pipeline_cache_key(tmp_path: Path) -> None:
    """Regression: the sweep grouped by its own key (with ``epochs``, ``data_dir`` and the
    device string) while the pipeline cached by another, so runs that differ only in the
    epochs trained after pruning shared one warm-up file but were planned as two groups."""
    base = {"dataset": "synthetic", "model": "lenet300", "warmup_epochs": 1, "out": str(tmp_path)}
    a = S.build({**base, "epochs": 1})
    b = S.build({**base, "epochs": 5, "data_dir": str(tmp_path), "device": "cpu"})
    c = S.build({**base, "epochs": 1, "lr": 0.5})  # trains the warm-up differently
    assert warmup_group(a) == warmup_group(b) == cachekeys.warmup_key(a, "cpu")
    assert cachekeys.warmup_path(a, "cpu") == cachekeys.warmup_path(b, "cpu")
    assert warmup_group(c) != warmup_group(a)
    prepares, blocked, free = plan([a, b, c])
    assert len(prepares) == 1 and [t.cfg for t in blocked[warmup_group(a)]] == [a, b]
    assert [t.cfg for t in free] == [c]
    assert warmup_group(S.build({"dataset": "synthetic"})) is None


def test_init_key_needs_no_data() -> None:
    a = S.build({"dataset": "synthetic", "seed": 1})
    assert cachekeys.init_key(a) == cachekeys.init_key(S.build({"dataset": "synthetic", "seed": 1,
                                                                 "epochs": 3, "lr": 0.5}))
    assert cachekeys.init_key(a) != cachekeys.init_key(S.build({"dataset": "synthetic"}))
    assert cachekeys.init_key(a) != cachekeys.init_key(S.build({"dataset": "mnist", "seed": 1}))


def test_schedule_signed_and_bn_momentum_reach_the_run(tmp_path: Path) -> None:
    """The new library parameters are run settings: they change the id only when set, and the
    run uses them (signed FTS keeps another mask; the EMA BN pass another warm-up)."""
    base = {"dataset": "synthetic", "model": "lenet300", "width": 0.25, "epochs": 0,
            "out": str(tmp_path)}
    assert S.build({**base, "schedule": "exponential"}).run_id() == S.build(base).run_id()
    assert S.build({**base, "schedule": "linear"}).run_id() != S.build(base).run_id()
    plain, signed = S.build(base), S.build({**base, "signed": True})
    assert signed.prune.options == {"signed": True}
    from fishprune import pipeline
    from fishprune import tensorfiles as tf

    masks = []
    for cfg in (plain, signed):
        pipeline.run(cfg, show_progress=False)
        masks.append(tf.load_masks(cfg.directory() / "masks.safetensors"))
    assert any(not (masks[0][n] == masks[1][n]).all() for n in masks[0])
    with pytest.raises(C.ConfigError, match="bn_momentum"):
        S.build({**base, "bn_momentum": 0.0})
    bn = {**base, "model": "vgg11", "width": 0.125, "bn_warmup": True}
    assert cachekeys.warmup_key(S.build(bn), "cpu") != cachekeys.warmup_key(
        S.build({**bn, "bn_momentum": 0.1}), "cpu")


def test_score_augment_scores_on_augmented_images(tmp_path: Path) -> None:
    """``score_augment``: the scoring batches are the same samples, cropped and flipped by the
    run's seed (reproducibly), and the masks follow them. Off by default and then not in the id."""
    from fishprune import pipeline
    from fishprune import tensorfiles as tf

    base = {"dataset": "synthetic", "model": "lenet300", "width": 0.25, "epochs": 0,
            "criterion": "snip", "sparsity": 0.9, "score_samples": 8, "out": str(tmp_path)}
    plain, aug = S.build(base), S.build({**base, "score_augment": True})
    assert S.build({**base, "score_augment": False}).run_id() == plain.run_id()
    assert aug.run_id() != plain.run_id()
    assert C.flat_values(aug)["score_augment"] is True

    def batches(cfg: C.RunConfig) -> list[tuple[Any, Any]]:
        prep = pipeline.prepare(cfg, lambda _m: None)
        got = pipeline.scoring_batches(cfg, prep.ds, prep.train_idx, prep.device)
        return [(x.clone(), y.clone()) for x, y in got]

    a, b, c = batches(plain), batches(aug), batches(aug)
    assert len(a) == len(b) and all((ya == yb).all() for (_, ya), (_, yb) in zip(a, b))
    assert all((xb == xc).all() for (xb, _), (xc, _) in zip(b, c))  # seeded: reproducible
    assert any(not (xa == xb).all() for (xa, _), (xb, _) in zip(a, b))  # but augmented
    # Same pixels, moved: a crop with zero padding and a flip never brighten an image.
    for (xa, _), (xb, _) in zip(a, b):
        assert (xb.amax(dim=(1, 2, 3)) <= xa.amax(dim=(1, 2, 3))).all()
    masks = []
    for cfg in (plain, aug):
        pipeline.run(cfg, show_progress=False)
        masks.append(tf.load_masks(cfg.directory() / "masks.safetensors"))
    assert any(not (masks[0][n] == masks[1][n]).all() for n in masks[0])
