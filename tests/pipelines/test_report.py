"""The report renders the paper's tables, the comparison table and figures from a fixture run directory."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch

from hyperforget.pipelines.retrain import init_run
from hyperforget.pipelines.unlearn import RunConfig, UnlearnConfig, compute_metrics, create_run, unlearn
from hyperforget.zoo.files import read_json

torch.set_num_threads(1)
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


class _FakeNet:
    """A stand-in sampler: the start model (or zeros) plus noise; class biases of the forget
    classes pushed down in every other candidate."""

    def __init__(self, spec, variant, forget_push=(2, 3)):
        self.spec, self.variant, self.push = spec, variant, forget_push

    def sample(self, targets, current_params, current_losses, method="ddim", steps=50, seed=0, guidance="auto"):
        k = targets.shape[0]
        gen = torch.Generator().manual_seed(seed)
        base = current_params if current_params is not None else self._start.expand(k, -1)
        out = base + 0.02 * torch.randn(k, self.spec.num_params, generator=gen)
        bias = self.spec.layout.slot("fc2.bias").offset
        for c in self.push:
            out[::2, bias + c] -= 40.0
        return out


@pytest.fixture(scope="module")
def fixture_run(tmp_path_factory):
    """A run with two forget sets, both DiHyFo variants (fake sampler), two baselines, metrics."""
    from hyperforget.pipelines.retrain import retrain_into
    from tests.conftest import TINY_CLASSES, TINY_SPEC, make_tiny_batches
    from hyperforget.zoo.datasets import load_dataset
    from hyperforget.zoo.store import ZooConfig, create_zoo

    base = tmp_path_factory.mktemp("report")
    ds = load_dataset("digits", classes=TINY_CLASSES)
    _, batches = make_tiny_batches(ds, 61)
    with create_zoo(str(base / "zoo"), ZooConfig(TINY_SPEC, TINY_CLASSES, pivots=(0, 1), dataset=ds.describe(),
                                                 chunk_rows=8, shard_rows=16)) as w:
        for key, p, meta in batches:
            w.commit(p, meta, key)
    models = {}
    for variant in ("dihyfo1", "dihyfo2"):
        d = base / variant
        d.mkdir()
        models[variant] = str(d)
        curves = {"train": [{"step": s, "mse": 1.0 / s, "lr": 1e-3} for s in (10, 20, 30)],
                  "test": [{"step": 30, "mse": 0.05}],
                  "eval": [{"step": s, "r2": [0.1 * s / 10, -0.2, 0.3, 0.4], "pearson": [0.5, 0.6, 0.7, None],
                            "r2_mean": 0.1, "pearson_mean": 0.5} for s in (10, 30)]}
        (d / "curves.json").write_text(json.dumps(curves))
    run = init_run(base / "run", RunConfig(zoo=str(base / "zoo"), epochs=20, retrain_seeds=(100, 101),
                                           models=models))
    from hyperforget.hyper.data import zoo_loss_statistics
    from hyperforget.zoo.store import open_zoo

    nets = {}
    for variant, d in models.items():
        nets[d] = _FakeNet(run.spec, variant)
        nets[d]._start = run.original_params()[None]
        nets[d].loss_stats = zoo_loss_statistics(open_zoo(str(base / "zoo")))  # as a trained one saves them
    module = types.ModuleType("hyperforget.hyper.sample")
    module.load_hypernetwork = lambda model_dir: nets[str(model_dir)]
    saved = sys.modules.get("hyperforget.hyper.sample")
    sys.modules["hyperforget.hyper.sample"] = module
    try:
        for forget in ((2,), (2, 3)):
            retrain_into(run, forget)
            for variant in ("dihyfo1", "dihyfo2"):
                unlearn(run, forget, UnlearnConfig(method=variant, candidates=4, repeats=2))
            for method in ("logit_mask", "neggrad_plus"):
                unlearn(run, forget, UnlearnConfig(method=method, repeats=1))
            compute_metrics(run, forget)
    finally:
        if saved is not None:
            sys.modules["hyperforget.hyper.sample"] = saved
        else:
            del sys.modules["hyperforget.hyper.sample"]
    return run


def test_report_writes_tables_and_figures(fixture_run):
    from hyperforget.pipelines.report import write_report

    path = write_report(fixture_run.path)
    md = path.read_text()
    out = path.parent
    # Tables 1/3: DiHyFo-1, DiHyFo-2 and retrained columns for each forget set.
    for col in ("DiHyFo-1 D_f={2}", "DiHyFo-2 D_f={2,3}", "Retrained D_f={2,3}"):
        assert col in md
    for row in ("Accuracy on D_r (↑)", "Accuracy on D_f (↓)", "MIA (↓)", "Outputs overlap on D_f (−)",
                "Unlearning score (φ) (↑)"):
        assert row in md
    # The comparison table lists every method with its wall time.
    assert md.count("| logit_mask |") == 2 and md.count("| neggrad_plus |") == 2
    data = json.loads((out / "report.json").read_text())
    comparison = data["tables"]["comparison"]["forget-2-3"]
    assert comparison["header"][-1] == "wall time / model"
    assert [r[0] for r in comparison["rows"]] == ["DiHyFo-1", "DiHyFo-2", "neggrad_plus", "logit_mask", "Retrained",
                                                  "Original"]
    # Figures: losses, selection and confusion per DiHyFo method and forget set, trade-off, training curves.
    expected = {"tradeoff_forget-2.png", "tradeoff_forget-2-3.png", "losses_forget-2_dihyfo1.png",
                "selection_forget-2-3_dihyfo2.png", "confusion_forget-2_dihyfo2.png", "training_dihyfo1.png",
                "training_dihyfo2.png"}
    assert expected <= set(data["figures"])
    for name in data["figures"]:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
        assert f"]({name})" in md


def test_report_says_where_dihyfo1_started(fixture_run, tmp_path):
    from hyperforget.pipelines.report import _start_note, write_report

    md = write_report(fixture_run.path, tmp_path / "r", figures=False).read_text()
    assert "DiHyFo-1 starts from the model to unlearn" in md
    mixed = _start_note([{"forget": [2], "dihyfo1_start": "model"}, {"forget": [2, 3], "dihyfo1_start": "noise"}])
    assert "D_f={2}: the model to unlearn" in mixed[0] and "D_f={2,3}: random MLP initializations" in mixed[0]
    assert _start_note([{"forget": [2], "dihyfo1_start": None}]) == []


def test_report_numbers_match_metrics_json(fixture_run):
    from hyperforget.pipelines.report import collect, comparison_table, paper_tables

    data = collect(fixture_run)
    metrics = read_json(fixture_run.forget_dir((2,)) / "metrics.json")
    header, rows, _, _ = paper_tables(data)
    col = header.index("Retrained D_f={2}")
    acc_r = metrics["methods"]["retrain"]["acc_retain"]
    expected = f"{acc_r['mean']:.4f}" + (f" ± {acc_r['std']:.4f}" if acc_r["std"] > 0 else "")
    assert rows[0][col] == expected
    # The logit-mask control forgets perfectly by construction.
    h, body = comparison_table(next(s for s in data["forget_sets"] if s["forget"] == [2]))
    row = next(r for r in body if r[0] == "logit_mask")
    assert row[h.index("acc D_f")] == "0.000"


def test_confusion_matrices_count_every_example(fixture_run):
    from hyperforget.pipelines.report import confusion_matrices

    m = confusion_matrices(fixture_run, (2,), "dihyfo1")
    d = fixture_run.data()
    assert m["test set"].sum() == len(d.y_test) and m["test set"].shape == (4, 4)
    # The retrained model never predicts class 2: its row is empty.
    assert m["test set"][2].sum() == 0 and np.all(m["D_r"][2] == 0)


def test_report_without_metrics_is_a_clear_error(tmp_path, fixture_run):
    from hyperforget.pipelines.report import write_report
    from hyperforget.zoo.errors import HyperForgetError

    with pytest.raises(HyperForgetError, match="not a run directory"):
        write_report(tmp_path)
    run = create_run(tmp_path / "empty", RunConfig(dataset="digits", epochs=1))
    with pytest.raises(HyperForgetError, match="no forget-X/metrics.json"):
        write_report(run.path)


def test_report_cli(fixture_run, tmp_path):
    from typer.testing import CliRunner

    from hyperforget.pipelines.cli import app

    res = CliRunner().invoke(app, ["report", str(fixture_run.path), "--out", str(tmp_path / "r"), "--no-figures"])
    assert res.exit_code == 0, res.output
    assert (tmp_path / "r" / "report.md").exists() and not list((tmp_path / "r").glob("*.png"))
