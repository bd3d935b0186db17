"""A tiny end-to-end run of `hyperforget demo --quick` on sklearn digits, and its resumption."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hyperforget.pipelines.cost import break_even

torch.set_num_threads(1)


@pytest.mark.slow
def test_demo_quick_end_to_end_and_resume(tmp_path):
    from typer.testing import CliRunner

    from hyperforget.pipelines.cli import app
    from hyperforget.pipelines.unlearn import load_method, open_run
    from hyperforget.zoo.mlp import load_mlps

    out = tmp_path / "demo"
    args = ["demo", "--quick", "--dataset", "digits", "--out", str(out), "--methods", "logit_mask,neggrad_plus"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    run = open_run(out / "run")
    assert run.forget_sets == [(2,), (2, 3)]
    for forget in run.forget_sets:
        folder = run.forget_dir(forget)
        for method in ("dihyfo1", "dihyfo2", "zoo_retrieval", "logit_mask", "neggrad_plus"):
            record = json.loads((folder / method / "record.json").read_text())
            assert record["forget"] == list(forget)
        metrics = json.loads((folder / "metrics.json").read_text())
        assert {"dihyfo1", "dihyfo2", "zoo_retrieval", "logit_mask", "neggrad_plus", "retrain",
                "original"} <= set(metrics["methods"])
        # The unlearned models are the selected candidates, bit for bit.
        params, record = load_method(run, forget, "dihyfo1")
        _, candidates, _ = load_mlps(str(folder / "dihyfo1" / "candidates.safetensors"))
        assert torch.equal(params, candidates[record["selected"]])
        # Selection never picks a candidate that forgets less than another in its group.
        f = np.asarray(record["candidates"]["forget_acc_val"], dtype=float)
        k = record["config"]["candidates"]
        for g, idx in enumerate(record["selected"]):
            assert f[idx] == np.nanmin(f[g * k:(g + 1) * k])
    md = (out / "run" / "report" / "report.md").read_text()
    assert "DiHyFo-1 D_f={2,3}" in md and "| logit_mask |" in md
    assert "Zoo retrieval" in md
    # DiHyFo-1 unlearns from the model to unlearn by default (the preset's guidance), and also learned noise starts.
    assert record["config"]["start"] == "model" and record["config"]["guidance"] == "auto"
    d1 = json.loads((out / "models" / "dihyfo1" / "config.json").read_text())
    assert d1["train"]["noise_start_share"] == 0.2
    state = json.loads((out / "demo.json").read_text())
    # The two variants trained at once, in two processes.
    assert {"collect", "collect_families", "train_dihyfo1_dihyfo2", "original", "quality", "unlearn",
            "report"} <= set(state["stages"])
    # DiHyFo-1 learned from the branch-family zoo's pairs, DiHyFo-2 from the main zoo.
    d1_config = json.loads((out / "models" / "dihyfo1" / "config.json").read_text())
    assert d1_config["train"]["view"]["pairs"]["family"] == 4
    assert (out / "models" / "dihyfo1" / d1_config["zoo"]).resolve() == (out / "zoo-families").resolve()
    # Generation quality of single samples, per variant and DiHyFo-1 start, with its figure.
    assert set(state["quality"]) == {"dihyfo1-from-model", "dihyfo1-from-noise", "dihyfo2"}
    for name in state["quality"]:
        q = json.loads((out / "quality" / f"{name}.json").read_text())
        assert set(q["classes"]) == {"2", "3"} and set(q["forget_sets"]) == {"2", "2-3"}
        assert np.asarray(q["classes"]["2"]["observed"]).shape == (3, 2)
        assert (out / "quality" / f"{name}.png").stat().st_size > 1000
    # The amortized cost, from the measured times: K* = ceil(F / (r - u)) or never.
    for variant in ("dihyfo1", "dihyfo2"):
        c = state["cost"][variant]
        summary = json.loads((out / "models" / variant / "summary.json").read_text())
        # DiHyFo-1 pays for the branch-family zoo its pairs come from as well.
        collected = state["stages"]["collect"] + (state["stages"]["collect_families"] if variant == "dihyfo1" else 0)
        assert c["train_s"] == round(summary["seconds"], 3) and c["collect_s"] == pytest.approx(collected, abs=2e-3)
        assert c["fixed_s"] == pytest.approx(c["collect_s"] + c["train_s"], abs=2e-3)
        assert (c["break_even"] is None) == (c["retrain_s"] <= c["request_s"])

    # Resuming redoes nothing: models and records keep their bytes.
    before = {p: p.read_bytes() for p in (out / "run").rglob("*.safetensors")}
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert all(p.read_bytes() == b for p, b in before.items())
    stages = json.loads((out / "demo.json").read_text())["stages"]
    assert stages["train_dihyfo1_dihyfo2"] == state["stages"]["train_dihyfo1_dihyfo2"]

    # The reproducibility check: a copy agrees; one metric moved by 0.1 is named, and the command exits 1.
    import shutil

    from hyperforget.pipelines.demo import compare_runs

    copy = tmp_path / "copy"
    shutil.copytree(out / "run", copy)
    compared, diffs = compare_runs(out / "run", copy)
    assert compared > 20 and diffs == []
    path = copy / "forget-2" / "metrics.json"
    m = json.loads(path.read_text())
    m["methods"]["dihyfo2"]["acc_retain"]["mean"] += 0.1
    path.write_text(json.dumps(m))
    _, diffs = compare_runs(out / "run", copy, tolerance=0.05)
    assert len(diffs) == 1 and diffs[0].startswith("forget-2.dihyfo2.acc_retain.mean")
    res = CliRunner().invoke(app, ["compare", str(out / "run"), str(copy)])
    assert res.exit_code == 1 and "DIFFERS forget-2.dihyfo2.acc_retain.mean" in res.output


def test_break_even_counts_requests():
    assert break_even(100.0, 1.0, 3.0) == 50  # 100 + 50 * 1 <= 50 * 3
    assert break_even(100.0, 1.0, 3.01) == 50 and break_even(100.0, 1.0, 2.99) == 51
    assert break_even(100.0, 3.0, 3.0) is None and break_even(0.0, 0.5, 1.0) == 1


def test_demo_rejects_unknown_methods(tmp_path):
    from hyperforget.pipelines.demo import DemoConfig, run_demo
    from hyperforget.zoo.errors import HyperForgetError

    with pytest.raises(HyperForgetError, match="unknown baselines"):
        run_demo(DemoConfig.for_mode(out=str(tmp_path), quick=True, dataset="digits", methods=["forgetting_spell"]))
    with pytest.raises(HyperForgetError, match="unknown preset"):
        run_demo(DemoConfig.for_mode(out=str(tmp_path), quick=True, preset="mnist7"))


def test_quick_mode_sizes_are_small():
    from hyperforget.pipelines.demo import DemoConfig

    quick = DemoConfig.for_mode(out="x", quick=True)
    full = DemoConfig.for_mode(out="x")
    assert quick.runs < full.runs and quick.candidates < full.candidates and quick.train_steps is not None
    assert DemoConfig.for_mode(out="x", quick=True, runs=7).runs == 7


def test_demo_families_retrain_from_the_start_for_mnist4_and_delete_late_for_mnist10():
    from hyperforget.pipelines.demo import DemoConfig, collect_config

    four = collect_config(DemoConfig.for_mode(out="x"), families=True)
    assert (four.branches, four.branch_steps, four.branch_from_start) == (4, 1, True)
    ten = collect_config(DemoConfig.for_mode(out="x", preset="mnist10"), families=True)
    assert (ten.branches, ten.branch_steps, ten.branch_from_start) == (10, 3, False)
    mine = DemoConfig.for_mode(out="x", preset="mnist10", family_from_start=True, family_branches=4, family_branch_steps=1)
    assert collect_config(mine, families=True).branch_from_start


def test_the_mnist10_main_zoo_deletes_in_more_runs():
    from hyperforget.pipelines.demo import DemoConfig, collect_config

    assert collect_config(DemoConfig.for_mode(out="x")).deletion_share == 0.4
    assert collect_config(DemoConfig.for_mode(out="x", preset="mnist10")).deletion_share == 0.8
    assert collect_config(DemoConfig.for_mode(out="x", preset="mnist10"), families=True).deletion_share == 0.4


def test_each_variant_trains_with_its_own_preset(tmp_path):
    from hyperforget.pipelines.demo import DemoConfig, _train_kwargs, run_demo
    from hyperforget.zoo.errors import HyperForgetError

    cfg = DemoConfig.for_mode(out="x")
    # DiHyFo-2 matches hidden units to a template network; DiHyFo-1 keeps the fc1.bias order.
    assert _train_kwargs(cfg, "dihyfo2", tmp_path, tmp_path / "m2")["preset"] == "cpu-mlp3-fn"
    assert _train_kwargs(cfg, "dihyfo1", tmp_path, tmp_path / "m1")["preset"] == "cpu-mlp2-fn-cl"
    # Class-loss matching helps MNIST-4's DiHyFo-1, not MNIST-10's.
    mnist10 = DemoConfig.for_mode(out="x", preset="mnist10")
    assert _train_kwargs(mnist10, "dihyfo1", tmp_path, tmp_path / "m1")["preset"] == "cpu-mlp2-fn"
    # DiHyFo-1's pair starts: MNIST-4 bounds their class losses at 0.5, MNIST-10 at 1.5 times a plainly
    # trained network's largest class loss.
    pairs = _train_kwargs(cfg, "dihyfo1", tmp_path, tmp_path / "m1")["overrides"]["view"]["pairs"]
    assert pairs["start_max_loss"] == 0.5 and pairs["start_loss_factor"] == -1
    cfg10 = DemoConfig.for_mode(out="x", preset="mnist10")
    pairs = _train_kwargs(cfg10, "dihyfo1", tmp_path, tmp_path / "m1")["overrides"]["view"]["pairs"]
    assert pairs["start_max_loss"] == -1 and pairs["start_loss_factor"] == 1.5
    # Per-variant options: MNIST-10's DiHyFo-1 trains fewer steps; --train-steps overrides both.
    assert _train_kwargs(cfg10, "dihyfo1", tmp_path, tmp_path / "m1")["overrides"]["steps"] == 1500
    assert "steps" not in _train_kwargs(cfg10, "dihyfo2", tmp_path, tmp_path / "m2")["overrides"]
    cfg10 = DemoConfig.for_mode(out="x", preset="mnist10", train_steps=7)
    assert _train_kwargs(cfg10, "dihyfo1", tmp_path, tmp_path / "m1")["overrides"]["steps"] == 7
    with pytest.raises(HyperForgetError, match="variant_overrides keys"):
        run_demo(DemoConfig.for_mode(out=str(tmp_path / "v"), quick=True, dataset="digits",
                                     variant_overrides={"dihyfo3": {"steps": 5}}))
    assert not (tmp_path / "v" / "zoo").exists()
    with pytest.raises(HyperForgetError, match="unknown hypernetwork preset"):
        run_demo(DemoConfig.for_mode(out=str(tmp_path / "d"), quick=True, dataset="digits",
                                     hyper_presets={"dihyfo1": "tiny", "dihyfo2": "cpu-huge"}))
    assert not (tmp_path / "d" / "zoo").exists()  # refused before any work
