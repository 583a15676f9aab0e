"""``fishprune report``: emphasis rules, table layout, files and plots of a tiny sweep."""

from __future__ import annotations

import csv
import itertools

import pytest

from fishprune import cli
from fishprune.config import ConfigError
from fishprune.report import make_report
from fishprune.report.render import latex, markdown
from fishprune.report.stats import emphasis
from fishprune.report.tables import build_tables, layer_table
from fishprune.sweep import run_sweep, sweep_from_table

# -- bold / underline on hand-made numbers --


def test_best_is_bold_and_means_within_its_std_are_underlined():
    # 90.43 lies exactly one std (0.12) below the best: within; 89.00 does not.
    assert emphasis([90.55, 90.43, 89.0], [0.12, 0.3, 0.1]) == ["best", "within", ""]


def test_ties_are_all_bold_and_use_the_largest_std():
    assert emphasis([90.0, 90.0, 89.0], [0.5, 1.5, 0.0]) == ["best", "best", "within"]
    # ties of the printed (rounded) numbers are ties
    assert emphasis([90.004, 89.996, 80.0], [0.0, 0.0, 0.0]) == ["best", "best", ""]


def test_single_seed_std_zero_marks_only_exact_ties():
    assert emphasis([90.0, 89.99, 90.0], [0.0, 0.0, 0.0]) == ["best", "", "best"]


def test_lower_is_better_and_missing_cells():
    assert emphasis([0.30, None, 0.35], [0.06, 0.0, 0.0], higher=False) == ["best", "", "within"]
    assert emphasis([None, None], [0.0, 0.0]) == ["", ""]
    assert emphasis([float("nan"), 1.0], [0.0, 0.0]) == ["", "best"]


def fake_runs() -> list[dict]:
    """Two criteria × two sparsities × two seeds, at two scoring batch sizes, plus dense."""
    acc = {("snip", 0.9): [0.90, 0.92], ("magnitude", 0.9): [0.905, 0.907],
           ("snip", 0.98): [0.50, 0.52], ("magnitude", 0.98): [0.60, 0.60]}
    runs = []
    for bs, ((crit, s), values) in itertools.product((1, 128), acc.items()):
        for seed, a in enumerate(values):
            runs.append({"run_id": f"{crit}{s}{seed}{bs}", "model": "lenet300", "width": 0.1,
                         "dataset": "synthetic", "warmup_epochs": 0, "bn_warmup": False,
                         "criterion": crit, "method": crit, "sparsity": s, "seed": seed,
                         "score_batch_size": bs, "scope": "global", "test_acc": a})
    for seed in (0, 1):
        runs.append({"run_id": f"dense{seed}", "model": "lenet300", "width": 0.1,
                     "dataset": "synthetic", "warmup_epochs": 0, "bn_warmup": False,
                     "criterion": "fts", "method": "dense", "sparsity": 0.0, "seed": seed,
                     "score_batch_size": 128, "scope": "global", "test_acc": 0.95 + seed / 100})
    return runs


def test_tables_group_order_and_format():
    tables = build_tables(fake_runs())
    assert [t.settings["score_batch_size"] for t in tables] == [1, 128]
    t = tables[0]
    assert t.methods == ["magnitude", "snip"]  # the order of fishprune.criteria()
    assert t.sparsities == [0.9, 0.98]
    assert len(t.dense) == 1 and t.dense[0][1].n == 2  # dense attaches to every batch size
    md = markdown(t)
    assert "score_batch_size=1" in md and "Dense: 95.50 ± 0.71 (n=2)." in md
    # 0.90: snip 91.00 ± 1.41 best; magnitude 90.60 within 1.41 → underlined
    assert "| 0.90 | <u>90.60 ± 0.14</u> | **91.00 ± 1.41** |" in md
    # 0.98: magnitude 60.00 ± 0.00 best; snip 51.00 is not within 0
    assert "| 0.98 | **60.00 ± 0.00** | 51.00 ± 1.41 |" in md
    tex = latex(t)
    assert "\\underline{90.60 $\\pm$ 0.14}" in tex and "\\textbf{91.00 $\\pm$ 1.41}" in tex
    assert "score\\_batch\\_size" in tex and "±" not in tex and "\\toprule" in tex


def test_layer_table_marks_collapse():
    t = build_tables(fake_runs())[0]
    layers = {r["run_id"]: [{"name": "a", "position": 0, "density": 0.1, "kept": 5},
                            {"name": "b", "position": 1, "density": 0.0 if r["seed"] else 0.2,
                             "kept": 0 if r["seed"] else 3}] for r in t.runs}
    lt = layer_table(t, layers)
    assert lt.sparsity == 0.98 and lt.layers == ["a", "b"]
    assert lt.cell("a", "snip") == "10.00" and lt.cell("b", "snip") == "10.00†"


# -- a real tiny sweep, then the report --


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    s = sweep_from_table({"dataset": "synthetic", "model": "lenet300", "width": 0.1, "lr": 0.2,
                          "epochs": 1, "criterion": ["magnitude", "snip"],
                          "sparsity": [0.9, 0.98], "score_batch_size": [100, 800],
                          "include": [{"sparsity": 0.0, "criterion": "fts",
                                       "score_batch_size": 128}]}, "t.toml", out=root)
    assert run_sweep(s, say=lambda _m: None)["failed"] == 0
    return root


def _valid_png(path) -> bool:
    return path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _valid_pdf(path) -> bool:
    data = path.read_bytes()
    return data.startswith(b"%PDF-") and b"%%EOF" in data[-64:]


def test_report_files_and_plots(sweep_dir, tmp_path, capsys):
    stamps = {p: p.stat().st_mtime_ns for p in sweep_dir.glob("*/*")}
    assert cli.main(["report", str(sweep_dir), "--out", str(tmp_path / "r")]) == 0
    out = capsys.readouterr().out
    assert out.count("### lenet300 · synthetic · no warm-up") == 2  # one per batch size
    assert "| sparsity | magnitude | snip |" in out and "Dense:" in out and "**" in out
    assert "Per-layer density (%) at sparsity 0.98" in out
    assert stamps == {p: p.stat().st_mtime_ns for p in sweep_dir.glob("*/*")}  # read only
    r = tmp_path / "r"
    assert {p.name for p in r.iterdir()} == {"report.md", "report.tex", "runs.csv",
                                             "summary.csv", "layers.csv", "plots"}
    summary = list(csv.DictReader((r / "summary.csv").open()))
    assert {row["method"] for row in summary} == {"magnitude", "snip", "dense"}
    assert len(list(csv.DictReader((r / "runs.csv").open()))) == 9
    names = sorted(p.name.split("-lenet300")[0] for p in (r / "plots").glob("*.png"))
    assert names == ["acc-vs-batch-size", "acc-vs-sparsity", "acc-vs-sparsity",
                     "kept-vs-magnitude", "kept-vs-magnitude", "layer-density",
                     "layer-density"]
    for png in (r / "plots").glob("*.png"):
        assert _valid_png(png) and _valid_pdf(png.with_suffix(".pdf"))
    assert not list((r / "plots").glob(".*"))  # no temporary files left


def test_report_options_and_errors(sweep_dir, tmp_path):
    md, written = make_report(sweep_dir, metric="best_val_acc", out=tmp_path / "r",
                              formats=["md"], plots=False, layer_sparsity=0.9, reindex=True)
    assert [p.name for p in written] == ["report.md"] and "best validation accuracy" in md
    assert "at sparsity 0.9:" in md
    md, _ = make_report(sweep_dir, metric="test_loss", out=tmp_path / "r", formats=[],
                        plots=False)
    assert "lowest mean" in md
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="no finished run"):
        make_report(tmp_path / "empty", plots=False)
    assert cli.main(["report", str(sweep_dir), "--formats", "md,xls"]) == 2
    assert cli.main(["report", str(tmp_path / "nowhere")]) == 2


def test_report_only_reads_the_store(sweep_dir, tmp_path, monkeypatch, capsys):
    """The plots never reload a dataset or rebuild a model: the scored weights come from the
    cache; when it is gone, that figure is skipped with a note naming the cache."""
    import shutil

    import fishprune.data
    import fishprune.pipeline

    def forbidden(*_args, **_kwargs):
        raise AssertionError("the report must not load data or build models")

    monkeypatch.setattr(fishprune.data, "load_dataset", forbidden)
    monkeypatch.setattr(fishprune.pipeline, "load_dataset", forbidden)
    monkeypatch.setattr(fishprune.pipeline, "fresh_model", forbidden)
    _, written = make_report(sweep_dir, out=tmp_path / "with", formats=[])
    assert any(p.name.startswith("kept-vs-magnitude") for p in written)
    copy = tmp_path / "copy"
    shutil.copytree(sweep_dir, copy)
    shutil.rmtree(copy / "_cache")
    capsys.readouterr()
    _, written = make_report(copy, out=tmp_path / "without", formats=[])
    assert not any(p.name.startswith("kept-vs-magnitude") for p in written)
    assert any(p.name.startswith("acc-vs-sparsity") for p in written)
    assert "no longer cached" in capsys.readouterr().err
