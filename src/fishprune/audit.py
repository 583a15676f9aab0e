"""``fishprune verify``: check run directories, and with ``recompute`` re-derive their numbers.

Checksums (:meth:`fishprune.rundir.RunDir.verify`) catch a file that changed after it was
written: a flipped bit, a truncated copy, an edit that forgot the manifest. They cannot catch a
``result.json`` edited *and* re-recorded, or written by buggy code: its checksum is then right
and its number is wrong. ``recompute`` closes that gap at the cost of one test-set evaluation
per run. It loads the run's best-validation weights (``best.safetensors``) into a fresh model
of the run's architecture and checks

* that every pruned weight (``masks.safetensors``) is exactly zero in them, and
* that their test accuracy and loss are the ones ``result.json`` reports: the accuracy within
  ``max_samples`` test samples, the loss within a relative ``loss_rtol`` (an evaluation on
  another device or with another kernel may round differently; on the run's own machine the
  numbers are identical).

Any difference is named with the file and both values.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fishprune import tensorfiles as tf
from fishprune.rundir import RESULT, RunDir, RunDirError

Say = Callable[[str], None]


@dataclass
class Audit:
    """What :func:`verify_tree` found: problems by run directory, and what was checked."""

    checked: int = 0
    recomputed: int = 0
    problems: dict[str, list[str]] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def run_directories(root: Path) -> list[Path]:
    """``root`` itself when it is a run directory, else the run directories under it."""
    from fishprune.resultsdb import run_dirs

    if RunDir(root).is_run():
        return [root]
    return run_dirs(root)


def recompute(rd: RunDir, *, device: str | torch.device = "cpu", max_samples: int = 2,
              loss_rtol: float = 1e-4, data_cache: dict[Any, Any] | None = None) -> list[str]:
    """Problems found by re-evaluating a finished, checksum-intact run (empty: it agrees)."""
    from fishprune.data import load_dataset
    from fishprune.pipeline import fresh_model, test_batches
    from fishprune.train import evaluate

    cfg = rd.read_config()
    result = rd.read_json(RESULT)
    if not rd.best.is_file():
        return [] if cfg.train.epochs == 0 else [f"{rd.best} is missing: cannot recompute"]
    d = cfg.data
    key = (d.dataset, d.data_dir, d.image_size)
    cache = data_cache if data_cache is not None else {}
    if key not in cache:
        cache[key] = load_dataset(d.dataset, d.data_dir, image_size=d.image_size,
                                  num_workers=d.num_workers, download=False)
    ds = cache[key]
    model = fresh_model(cfg, ds, seed=cfg.seed)
    try:
        model.load_state_dict(tf.load_state(rd.best))
    except (RuntimeError, ValueError) as err:
        return [f"{rd.best} does not load into the model of {rd.config.name}: "
                f"{str(err).splitlines()[0]}"]
    problems = []
    if rd.masks.is_file():
        params = dict(model.named_parameters())
        for name, mask in tf.load_masks(rd.masks).items():
            w = params.get(name)
            if w is None or w.shape != mask.shape:
                problems.append(f"{rd.masks}: {name} is not a weight of the model's shape")
                continue
            alive = int(torch.count_nonzero(w.detach()[~mask]))
            if alive:
                problems.append(f"{rd.best}: {alive} pruned weight(s) of {name} are not zero")
    device = torch.device(device)
    model.to(device)
    loss, acc = evaluate(model, test_batches(cfg, ds, device), device=device)
    n = int(ds.test_y.shape[0])
    stored_acc, stored_loss = result.get("test_acc"), result.get("test_loss")
    if not isinstance(stored_acc, (int, float)) or abs(acc - stored_acc) * n > max_samples + 1e-6:
        problems.append(f"{rd.result}: test_acc {stored_acc!r}, but the stored weights give "
                        f"{acc!r} on the {n} test samples")
    if not isinstance(stored_loss, (int, float)) or not math.isclose(
            loss, stored_loss, rel_tol=loss_rtol, abs_tol=1e-7):
        problems.append(f"{rd.result}: test_loss {stored_loss!r}, but the stored weights give "
                        f"{loss!r}")
    return problems


def verify_tree(root: str | Path, *, recompute_results: bool = False,
                device: str | torch.device = "cpu", say: Say = lambda _m: None) -> Audit:
    """Verify every run directory at or under ``root`` (checksums and consistency), and with
    ``recompute_results`` re-evaluate every finished one (see the module docstring)."""
    root = Path(root)
    if not root.is_dir():
        raise RunDirError(f"{root} is not a directory")
    audit = Audit()
    data_cache: dict[Any, Any] = {}
    for path in run_directories(root):
        rd = RunDir(path)
        audit.checked += 1
        problems = rd.verify()
        if not problems and recompute_results and rd.is_finished():
            problems = recompute(rd, device=device, data_cache=data_cache)
            audit.recomputed += 1
        if problems:
            audit.problems[str(path)] = problems
            for problem in problems:
                say(f"{path.name}: {problem}")
    return audit
