"""`hyperforget train` and `hyperforget sample` on a real (tiny) zoo through the streaming loader."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from typer.testing import CliRunner

from hyperforget.pipelines.cli import app
from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.mlp import load_mlps


@pytest.fixture
def zoo_path(normalized_zoo):
    return normalized_zoo


@pytest.mark.parametrize("variant", ["dihyfo1", "dihyfo2"])
def test_train_then_sample(zoo_path, tmp_path, variant):
    runner = CliRunner()
    model = tmp_path / variant
    res = runner.invoke(app, ["train", "--variant", variant, "--zoo", zoo_path, "--preset", "tiny", "--out",
                              str(model), "--steps", "6", "--batch-size", "8", "--eval-every", "6", "--quiet"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    cfg = json.load(open(model / "config.json"))
    assert cfg["variant"] == variant and cfg["dataset"]["name"] == "digits"
    # The zoo is recorded relative to the model directory, so the two may move together.
    assert not os.path.isabs(cfg["zoo"]) and os.path.samefile(model / cfg["zoo"], zoo_path)
    assert cfg["train"]["steps"] == 6 and cfg["mlp_spec"]["input_size"] == 64
    summary = json.load(open(model / "summary.json"))
    assert summary["steps"] == 6 and len(summary["alignment"]["r2"]) == 4

    out = tmp_path / "sampled.safetensors"
    args = ["sample", str(model), "--targets", "0.05,0.05,3.0,0.05", "--n", "3", "--steps", "5", "--out", str(out)]
    if variant == "dihyfo1":
        args += ["--from-checkpoint", "4"]
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    spec, params, meta = load_mlps(str(out))
    assert params.shape == (3, spec.num_params) and json.loads(meta["targets"]) == [0.05, 0.05, 3.0, 0.05]
    assert len(json.loads(meta["losses"])) == 3

    # Generation quality of single samples: JSON and the observed-vs-target figure.
    qargs = ["quality", str(model), "--targets", "3", "--samples", "2", "--steps", "3"]  # the paper's forget sets
    if variant == "dihyfo1":
        qargs += ["--start", str(out)]
    res = runner.invoke(app, qargs)
    assert res.exit_code == 0, res.output + repr(res.exception)
    q = json.load(open(model / "quality" / "quality.json"))
    assert set(q["classes"]) == {"2", "3"} and set(q["forget_sets"]) == {"2", "2-3"}
    assert q["start"] == ("model" if variant == "dihyfo1" else None) and q["hold_name"] == "joint"
    assert len(q["classes"]["2"]["observed"]) == 3 and (model / "quality" / "quality.png").stat().st_size > 1000
    # The joint hold: the zoo's best 1 % on the held classes together, from the saved profiles.
    from hyperforget.hyper.data import retain_profile

    for held, level in q["hold"].items():
        np.testing.assert_allclose(level, retain_profile(cfg["loss_stats"], held.split("-"), 0.01), rtol=1e-5)
    assert set(q["hold"]) == {"2", "3", "2-3"}
    res = runner.invoke(app, ["quality", str(model), "--forget", "0"])  # a pivot
    assert isinstance(res.exception, HyperForgetError) and "pivot" in str(res.exception)
    res = runner.invoke(app, ["quality", str(model), "--hold", "q42"])
    assert isinstance(res.exception, HyperForgetError) and "q42" in str(res.exception)

    # Resuming a finished run with more steps continues it.
    res = runner.invoke(app, ["train", "--variant", variant, "--zoo", zoo_path, "--out", str(model),
                              "--steps", "8", "--resume", "--quiet"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert json.load(open(model / "summary.json"))["steps"] == 8


def test_cli_errors(zoo_path, tmp_path):
    runner = CliRunner()
    res = runner.invoke(app, ["train", "--variant", "dihyfo9", "--zoo", zoo_path, "--out", str(tmp_path / "m")])
    assert isinstance(res.exception, HyperForgetError) and "dihyfo1 or dihyfo2" in str(res.exception)
    res = runner.invoke(app, ["train", "--variant", "dihyfo2", "--zoo", zoo_path, "--preset", "giant",
                              "--out", str(tmp_path / "m")])
    assert isinstance(res.exception, HyperForgetError) and "preset" in str(res.exception)
    res = runner.invoke(app, ["sample", str(tmp_path / "nothing"), "--targets", "1,1,1,1", "--out", "x.st"])
    assert isinstance(res.exception, HyperForgetError) and "hyperforget train" in str(res.exception)


def test_main_exits_2_on_bad_targets(zoo_path, tmp_path, monkeypatch, capsys):
    from hyperforget.pipelines.cli import main

    model = tmp_path / "m"
    res = CliRunner().invoke(app, ["train", "--variant", "dihyfo2", "--zoo", zoo_path, "--preset", "tiny",
                                   "--out", str(model), "--steps", "2", "--batch-size", "8", "--eval-every", "-1",
                                   "--quiet"])
    assert res.exit_code == 0, repr(res.exception)
    monkeypatch.setattr("sys.argv", ["hyperforget", "sample", str(model), "--targets", "1,2", "--out",
                                     str(tmp_path / "s.safetensors")])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    assert "--targets gives 2 losses" in capsys.readouterr().err
