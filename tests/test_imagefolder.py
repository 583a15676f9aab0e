"""Streamed image-folder datasets: ``imagefolder`` and ``tinyimagenet``, generated on the fly
as a few tiny PNG/JPEG files per class (nothing is downloaded).

The oracle of the streamed batches is :class:`fishprune.data.TensorBatches` over the same images
decoded into one tensor: same order, same crops and flips, same normalization, for every epoch
and any number of workers.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from _cli import die_in_epoch
from PIL import Image

from fishprune import cli, pipeline
from fishprune import settings as S
from fishprune import tensorfiles as tf
from fishprune.config import ConfigError
from fishprune.data import (
    DatasetFileError,
    DatasetNotFoundError,
    FolderData,
    ImageBatches,
    ImageFiles,
    TensorBatches,
    load_dataset,
    make_batches,
    scoring_indices,
    stratified_split,
)
from fishprune.data.folders import decode

CLASSES = ("cat", "dog", "emu")


def write_images(folder: Path, label: int, count: int, *, size: tuple[int, int] = (8, 8),
                 mode: str = "RGB", suffix: str = ".png", seed: int = 0) -> None:
    """``count`` images whose mean brightness encodes ``label`` (a learnable task)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, label, count])
    channels = 1 if mode == "L" else 3
    for i in range(count):
        base = 40 + 80 * label
        pixels = np.clip(base + rng.integers(-30, 30, (size[1], size[0], channels)), 0, 255)
        array = pixels.astype(np.uint8)
        img = Image.fromarray(array[:, :, 0] if mode == "L" else array, mode=mode)
        img.save(folder / f"img{i:03d}{suffix}")


def make_folder(root: Path, splits: dict[str, int], *, mode: str = "RGB",
                size: tuple[int, int] = (8, 8)) -> Path:
    for s, (split, count) in enumerate(splits.items()):
        for label, name in enumerate(CLASSES):
            write_images(root / split / name, label, count, mode=mode, size=size, seed=s)
    return root


def decoded(files: ImageFiles) -> torch.Tensor:
    return torch.stack([files.load(i) for i in range(len(files))])


# --------------------------------------------------------------------------- layout and splits


def test_imagefolder_with_train_val_test(tmp_path: Path) -> None:
    root = make_folder(tmp_path, {"train": 10, "val": 4, "test": 3})
    (root / "train" / "cat" / "notes.txt").write_text("not an image")
    ds = load_dataset("imagefolder", root, image_size=8, num_workers=0)
    assert isinstance(ds, FolderData)
    assert ds.classes == CLASSES and ds.num_classes == 3 and ds.in_channels == 3
    assert ds.train_x.shape == (42, 3, 8, 8) and ds.test_x.shape == (9, 3, 8, 8)
    assert ds.train_y.tolist() == [0] * 10 + [1] * 10 + [2] * 10 + [0] * 4 + [1] * 4 + [2] * 4
    assert ds.test_y.tolist() == [0] * 3 + [1] * 3 + [2] * 3
    train_idx, val_idx = ds.val_split
    assert train_idx.tolist() == list(range(30)) and val_idx.tolist() == list(range(30, 42))
    assert all("/val/" in ds.train_x.paths[i] for i in val_idx.tolist())
    assert ds.notes == ("validation: val/; test: test/",)
    # The statistics are the training images' (not val's), per channel on [0, 1].
    train_pixels = decoded(ds.train_x[train_idx]).transpose(0, 1).reshape(3, -1).double() / 255
    assert torch.allclose(torch.tensor(ds.mean, dtype=torch.float64), train_pixels.mean(1))
    assert torch.allclose(torch.tensor(ds.std, dtype=torch.float64),
                          train_pixels.std(1, unbiased=False), atol=1e-9)


def test_imagefolder_without_test_tests_on_val_and_says_so(tmp_path: Path) -> None:
    root = make_folder(tmp_path, {"train": 10, "val": 2})
    ds = load_dataset("imagefolder", root, image_size=8, num_workers=0)
    assert ds.val_split is None and ds.num_test == 6
    assert all("/val/" in p for p in ds.test_x.paths)
    assert ds.notes[0].startswith("no test/ folder: val/ is the test set")


def test_imagefolder_without_val_splits_train(tmp_path: Path) -> None:
    root = make_folder(tmp_path, {"train": 10, "test": 2})
    ds = load_dataset("imagefolder", root, image_size=8, num_workers=0)
    assert ds.val_split is None and ds.num_train == 30
    assert ds.notes == ("validation: a stratified split of train/; test: test/",)


@pytest.mark.parametrize("splits, error, message", [
    ({"train": 3}, DatasetNotFoundError, "neither test/ nor val/"),
    ({"val": 3}, DatasetNotFoundError, "has no train/ folder"),
])
def test_imagefolder_layout_errors(splits: dict[str, int], error: type, message: str,
                                   tmp_path: Path) -> None:
    root = make_folder(tmp_path, splits)
    with pytest.raises(error, match=message):
        load_dataset("imagefolder", root, num_workers=0)


def test_imagefolder_refuses_a_test_class_unknown_to_train(tmp_path: Path) -> None:
    root = make_folder(tmp_path, {"train": 3, "test": 1})
    write_images(root / "test" / "yak", 0, 1)
    with pytest.raises(DatasetFileError, match="yak are not classes of train/"):
        load_dataset("imagefolder", root, num_workers=0)


def test_one_class_is_refused_and_an_undecodable_file_is_named(tmp_path: Path) -> None:
    write_images(tmp_path / "one" / "train" / "a", 0, 2)
    write_images(tmp_path / "one" / "test" / "a", 0, 1)
    with pytest.raises(DatasetFileError, match="at least 2"):
        load_dataset("imagefolder", tmp_path / "one", num_workers=0)
    root = make_folder(tmp_path / "two", {"train": 2, "test": 1})
    bad = root / "train" / "dog" / "broken.png"
    bad.write_bytes(b"not a png")
    with pytest.raises(DatasetFileError, match=r"broken\.png"):
        decode(str(bad), 3, 8)


def test_decode_resizes_the_shorter_side_and_centre_crops(tmp_path: Path) -> None:
    """A 16×8 image: half width, the middle 8×8 of the 16×8 → 8 wide columns 4..11."""
    array = np.zeros((8, 16), dtype=np.uint8)
    array[:, 4:12] = 200  # the middle square is bright, the sides dark
    Image.fromarray(array, mode="L").save(tmp_path / "wide.png")
    out = decode(str(tmp_path / "wide.png"), 1, 8)
    assert out.shape == (1, 8, 8) and out.dtype == torch.uint8
    assert torch.equal(out, torch.full((1, 8, 8), 200, dtype=torch.uint8))
    rgb = decode(str(tmp_path / "wide.png"), 3, 4)  # grey → RGB, downscaled
    assert rgb.shape == (3, 4, 4) and torch.equal(rgb[0], rgb[2])


def test_grayscale_folders_have_one_channel(tmp_path: Path) -> None:
    root = make_folder(tmp_path, {"train": 4, "test": 1}, mode="L", size=(10, 12))
    ds = load_dataset("imagefolder", root, image_size=6, num_workers=0)
    assert ds.in_channels == 1 and ds.train_x.shape == (12, 1, 6, 6)
    assert len(ds.mean) == 1


def test_tinyimagenet_layout(tmp_path: Path) -> None:
    root = tmp_path / "tiny-imagenet-200"
    wnids = ["n02", "n01"]
    (root).mkdir()
    (root / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for label, wnid in enumerate(sorted(wnids)):
        write_images(root / "train" / wnid / "images", label, 5, suffix=".JPEG")
    write_images(root / "val" / "images", 0, 4, suffix=".JPEG")
    lines = [f"img{i:03d}.JPEG\t{sorted(wnids)[i % 2]}\t0\t0\t7\t7" for i in range(4)]
    (root / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    ds = load_dataset("tinyimagenet", tmp_path, num_workers=0)  # finds the folder below
    assert ds.classes == ("n01", "n02") and ds.image_size == 64
    assert ds.train_x.shape == (10, 3, 64, 64) and ds.train_y.tolist() == [0] * 5 + [1] * 5
    assert ds.test_y.tolist() == [0, 1, 0, 1] and ds.val_split is None
    (root / "val" / "val_annotations.txt").write_text("img000.JPEG\tn99\n")
    with pytest.raises(DatasetFileError, match=r"val_annotations\.txt:1"):
        load_dataset("tinyimagenet", root, num_workers=0)


# --------------------------------------------------------------------------- streamed batches


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("shuffle, augment, drop_last", [(False, False, False),
                                                          (True, True, False),
                                                          (True, False, True)])
def test_streamed_batches_equal_the_resident_ones(workers: int, shuffle: bool, augment: bool,
                                                  drop_last: bool, tmp_path: Path) -> None:
    root = make_folder(tmp_path, {"train": 7, "test": 1})
    ds = load_dataset("imagefolder", root, image_size=8, num_workers=0)
    resident = decoded(ds.train_x)
    common = {"batch_size": 4, "mean": ds.mean, "std": ds.std, "shuffle": shuffle, "seed": 3,
              "augment": augment, "drop_last": drop_last}
    streamed = make_batches(ds.train_x, ds.train_y, num_workers=workers, **common)
    oracle = TensorBatches(resident, ds.train_y, **common)
    assert isinstance(streamed, ImageBatches)
    assert len(streamed) == len(oracle) and streamed.num_samples == oracle.num_samples == 21
    for epoch in (0, 1, 0):
        streamed.set_epoch(epoch)
        oracle.set_epoch(epoch)
        got, want = list(streamed), list(oracle)
        assert len(got) == len(want)
        for (x, y), (u, v) in zip(got, want):
            assert torch.equal(y, v)
            assert torch.allclose(x, u, atol=1e-6, rtol=0)
    streamed.set_epoch(0)
    oracle.set_epoch(0)
    next(iter(streamed))  # a pass broken off (as a data-free criterion reads one batch)
    for (x, y), (u, v) in zip(streamed, oracle, strict=True):
        assert torch.equal(y, v) and torch.allclose(x, u, atol=1e-6, rtol=0)
    if shuffle:  # epochs differ
        streamed.set_epoch(1)
        first = next(iter(streamed))[1]
        streamed.set_epoch(2)
        assert not torch.equal(first, next(iter(streamed))[1])


def test_scoring_subset_of_a_folder_follows_the_resident_rules(tmp_path: Path) -> None:
    """The split and the k-per-class scoring subset are functions of the labels only."""
    root = make_folder(tmp_path, {"train": 10, "test": 1})
    cfg = S.build({"dataset": "imagefolder", "data_dir": str(root), "image_size": 8,
                   "num_workers": 0, "score_samples": 2, "out": str(tmp_path / "runs")})
    ds = load_dataset("imagefolder", root, image_size=8, num_workers=0)
    train_idx, _ = stratified_split(ds.train_y, 0.2, 0)
    batches = pipeline.scoring_batches(cfg, ds, train_idx, torch.device("cpu"))
    idx = scoring_indices(ds.train_y, 2, cfg.seed, indices=train_idx)
    assert isinstance(batches, ImageBatches) and batches.num_samples == 6
    assert list(batches.x.paths) == [ds.train_x.paths[i] for i in idx.tolist()]


# --------------------------------------------------------------------------- settings and runs


def test_the_folder_is_part_of_the_run_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch
                                          ) -> None:
    a, b = make_folder(tmp_path / "a", {"train": 2, "test": 1}), tmp_path / "b"
    make_folder(b, {"train": 2, "test": 1})
    cfg_a = S.build({"dataset": "imagefolder", "data_dir": str(a)})
    cfg_b = S.build({"dataset": "imagefolder", "data_dir": str(b)})
    assert cfg_a.run_id() != cfg_b.run_id()
    monkeypatch.chdir(tmp_path)
    relative = S.build({"dataset": "imagefolder", "data_dir": "a"})
    assert relative.data.data_dir == str(a) and relative.run_id() == cfg_a.run_id()
    workers = S.build({"dataset": "imagefolder", "data_dir": "a", "num_workers": 3})
    assert workers.run_id() == cfg_a.run_id()  # how, not what
    assert S.build({"dataset": "imagefolder", "data_dir": "a", "image_size": 32}).run_id() \
        != cfg_a.run_id()


@pytest.mark.parametrize("values, message", [
    ({"dataset": "imagefolder"}, "needs --data-dir"),
    ({"dataset": "synthetic", "image_size": 32}, "image_size applies to image folders"),
    ({"dataset": "imagefolder", "data_dir": "x", "image_size": 0}, "image_size must be >= 1"),
    ({"num_workers": -1}, "num_workers must be >= 0"),
])
def test_bad_folder_settings(values: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        S.build(values)


def test_imagefolder_run_end_to_end(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``fishprune run --dataset imagefolder``: streamed with two workers, trained, tested on
    test/; a rerun from another directory with a relative path is the same run."""
    root = make_folder(tmp_path / "data", {"train": 12, "val": 3, "test": 4})
    argv = ["run", "--dataset", "imagefolder", "--data-dir", str(root), "--image-size", "32",
            "--num-workers", "2", "--model", "lenet5", "--width", "0.25", "--epochs", "2",
            "--lr", "0.05", "--batch-size", "8", "--sparsity", "0.5", "--criterion", "fts",
            "--out", str(tmp_path / "runs"), "--quiet"]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "validation: val/; test: test/" in out
    run_dir = next(p for p in (tmp_path / "runs").iterdir() if p.name != "_cache")
    result = json.loads((run_dir / "result.json").read_text())
    assert result["epochs"] == 2 and result["best_val_acc"] is not None
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert all(np.isfinite(m["train_loss"]) for m in metrics)
    layers = json.loads((run_dir / "layers.json").read_text())
    assert layers  # the collapse report saw the streamed input shape
    assert cli.main(argv) == 0 and "already finished" in capsys.readouterr().out


def test_a_killed_imagefolder_run_resumes_bit_identically(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed in epoch 2 and rerun (with another number of workers): the same weights and
    history as an uninterrupted run — the streamed order and augmentation are per epoch."""
    root = make_folder(tmp_path / "data", {"train": 8, "test": 2})
    over = {"dataset": "imagefolder", "data_dir": str(root), "image_size": 28,
            "model": "lenet300", "width": 0.25, "epochs": 3, "lr": 0.05, "batch_size": 6,
            "augment": True, "sparsity": 0.5, "criterion": "snip"}
    killed = S.build({**over, "num_workers": 2, "out": str(tmp_path / "killed")})
    clean = S.build({**over, "num_workers": 0, "out": str(tmp_path / "clean")})
    assert killed.run_id() == clean.run_id()
    die_in_epoch(monkeypatch, 2)
    with pytest.raises(RuntimeError, match="simulated kill"):
        pipeline.run(killed, show_progress=False)
    monkeypatch.undo()
    messages: list[str] = []
    resumed = pipeline.run(S.build({"num_workers": 1}, base=killed), show_progress=False,
                           echo=messages.append)
    assert "resuming from epoch 2/3 (checkpoint.safetensors)" in messages
    uninterrupted = pipeline.run(clean, show_progress=False)
    timing = ("warmup_seconds", "score_seconds", "train_seconds")
    assert {k: v for k, v in resumed.items() if k not in timing} == \
        {k: v for k, v in uninterrupted.items() if k not in timing}
    a = tf.load_state(killed.directory() / "best.safetensors")
    b = tf.load_state(clean.directory() / "best.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
