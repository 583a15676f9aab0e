"""Plug-in criteria: ``fp.register_criterion`` and the ``fishprune.criteria`` entry-point group.

The entry-point tests install a real distribution the way ``importlib.metadata`` finds one: a
``.dist-info`` directory with ``entry_points.txt`` on a ``sys.path`` entry (what ``pip install``
leaves), then run the CLI in a subprocess with that entry on ``PYTHONPATH``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from torch import nn

import fishprune as fp
from fishprune.criteria._registry import REGISTRY

PLUGIN = '''"""Scaled magnitude: s = scale · |w| (a test plug-in)."""

from dataclasses import dataclass, field

from fishprune.criteria import register


@dataclass(frozen=True)
class MyOptions:
    scale: float = field(default=1.0, metadata={"help": "multiplies |w|"})


@register("mycrit", options=MyOptions, data="none")
def mycrit(model, params, batches, ctx, opts):
    return {n: opts.scale * p.detach().abs() for n, p in params.items()}
'''


def install(site: Path, name: str, entry: str, files: dict[str, str]) -> None:
    """A distribution ``name`` with one ``fishprune.criteria`` entry point, as pip leaves it."""
    for path, text in files.items():
        (site / path).write_text(text)
    info = site / f"{name}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text(f"[fishprune.criteria]\n{entry}\n")


def run(site: Path, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(site)}
    return subprocess.run([sys.executable, "-m", "fishprune", *args], capture_output=True,
                          text=True, env=env, cwd=cwd, timeout=300)


def test_an_installed_plugin_is_listed_and_runs_from_the_cli(tmp_path: Path) -> None:
    site = tmp_path / "site"
    site.mkdir()
    install(site, "mycrit_plugin", "mycrit = mycrit_plugin", {"mycrit_plugin.py": PLUGIN})
    install(site, "broken_plugin", "broken = broken_plugin",
            {"broken_plugin.py": "raise ImportError('needs a missing library')\n"})
    listed = run(site, "criteria", cwd=tmp_path)
    assert listed.returncode == 0, listed.stderr
    assert "mycrit" in listed.stdout and "Scaled magnitude" in listed.stdout
    assert "criterion plug-in 'broken' (broken_plugin) was not loaded: ImportError: needs a " \
           "missing library" in listed.stderr
    helped = run(site, "run", "--help", cwd=tmp_path)
    assert "--scale" in helped.stdout  # the plug-in's option became a flag
    out = tmp_path / "runs"
    done = run(site, "run", "--criterion", "mycrit", "--scale", "2.0", "--dataset", "synthetic",
               "--model", "lenet300", "--width", "0.25", "--epochs", "1", "--sparsity", "0.5",
               "--quiet", "--out", str(out), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    config = json.loads(next(out.glob("*/config.json")).read_text())
    assert config["prune"]["criterion"] == "mycrit"
    assert next(out.glob("*/result.json")).exists()


def test_register_criterion_in_process() -> None:
    @dataclass(frozen=True)
    class Opts:
        power: int = field(default=2, metadata={"help": "exponent"})

    def powered(model, params, batches, ctx, opts):
        return {n: p.detach().abs() ** opts.power for n, p in params.items()}

    try:
        crit = fp.register_criterion("powered", powered, options=Opts, data="none")
        assert crit.name == "powered" and "powered" in fp.criteria()
        model = nn.Linear(4, 3)
        scores = fp.score(model, "powered", None, power=3)
        assert torch.equal(scores["weight"], model.weight.detach().abs() ** 3)
        with pytest.raises(ValueError, match="registered twice"):
            fp.register_criterion("powered", powered)
        with pytest.raises(ValueError, match="options must be a dataclass"):
            fp.register_criterion("other", powered, options=dict)
        with pytest.raises(ValueError, match="must be an identifier"):
            fp.register_criterion("my crit", powered)
    finally:
        REGISTRY.pop("powered", None)
