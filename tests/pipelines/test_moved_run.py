"""Run directories keep working when moved, copied on their own, or used from another directory."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from typer.testing import CliRunner

from hyperforget.pipelines.cli import app
from hyperforget.pipelines.retrain import init_run
from hyperforget.pipelines.unlearn import RunConfig, open_run
from hyperforget.zoo.errors import HyperForgetError

torch.set_num_threads(1)
runner = CliRunner()


def _zoo(path, seed: int = 0):
    from tests.conftest import TINY_CLASSES, TINY_SPEC, make_tiny_batches
    from hyperforget.zoo.datasets import load_dataset
    from hyperforget.zoo.store import ZooConfig, create_zoo

    ds = load_dataset("digits", classes=TINY_CLASSES)
    _, batches = make_tiny_batches(ds, 45, seed=seed)
    config = ZooConfig(TINY_SPEC, TINY_CLASSES, pivots=(0, 1), dataset=ds.describe(), chunk_rows=8, shard_rows=16,
                       collection={"generator": "tests/pipelines/test_moved_run.py", "seed": seed})
    with create_zoo(str(path), config) as w:
        for key, p, meta in batches:
            w.commit(p, meta, key)
    return str(path)


@pytest.fixture(scope="module")
def made(tmp_path_factory):
    """base/zoo and base/run (made from base, the working directory of the time)."""
    from hyperforget.pipelines.retrain import retrain_into

    base = tmp_path_factory.mktemp("made")
    zoo = _zoo(base / "zoo")
    run = init_run(base / "run", RunConfig(zoo=zoo, epochs=10, retrain_seeds=(100, 101)))
    retrain_into(run, (2,))
    return base


def test_run_json_stores_paths_relative_to_the_run(made):
    meta = json.loads((made / "run" / "run.json").read_text())
    assert meta["paths"] == "run-relative"
    assert meta["config"]["zoo"] == "../zoo"
    assert meta["locations"]["zoo"] == str(made / "zoo")
    assert len(meta["zoo_identity"]) == 16


@pytest.mark.parametrize("layout", ["moved-with-zoo", "copied-alone"])
def test_moved_run_unlearns_reports_and_evaluates(made, tmp_path, monkeypatch, layout):
    if layout == "moved-with-zoo":
        shutil.copytree(made, tmp_path / "moved")
        run, zoo = tmp_path / "moved" / "run", tmp_path / "moved" / "zoo"
    else:  # only the run directory travels; its zoo stays where it was made
        shutil.copytree(made / "run", tmp_path / "alone")
        run, zoo = tmp_path / "alone", made / "zoo"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert open_run(run).config.zoo == str(zoo)

    res = runner.invoke(app, ["unlearn", "--run", str(run), "--zoo", str(zoo), "--forget", "2",
                              "--method", "finetune", "--repeats", "1", "--set", "epochs=1"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert (run / "forget-2" / "finetune" / "model.safetensors").exists()
    res = runner.invoke(app, ["report", str(run), "--no-figures"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert (run / "report" / "report.md").exists()
    res = runner.invoke(app, ["evaluate", str(run), "--retrained", "8", "--baseline-seeds", "1", "--no-progress"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert (run / "evaluation" / "forget-2.md").exists()


def test_another_zoo_is_refused_naming_both_paths(made, tmp_path):
    other = _zoo(tmp_path / "other", seed=1)
    shutil.copytree(made / "run", tmp_path / "run")
    with pytest.raises(HyperForgetError) as exc:
        init_run(tmp_path / "run", RunConfig(zoo=other))
    assert str(made / "zoo") in str(exc.value) and other in str(exc.value)
