"""Unlearning pipeline: selection rule, prompts, run directory, baselines, DiHyFo path, retraining, CLI."""

from __future__ import annotations

import json
import sys
import types

import numpy as np
import pytest
import torch

from hyperforget.pipelines.retrain import init_run
from hyperforget.pipelines.unlearn import (LossStats, PromptConfig, RunConfig, UnlearnConfig, build_prompts,
                                           carve_validation, compute_metrics, load_method, params_sha256, parse_classes,
                                           select_best, unlearn)
from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.files import read_json
from hyperforget.zoo.mlp import evaluate_per_class, load_mlps

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------
# Selection (Appendix A.1)


def test_select_best_prefers_lowest_forget_then_highest_retain():
    forget = np.array([0.30, 0.00, 0.00, 0.10, 0.00])
    retain = np.array([0.99, 0.80, 0.95, 0.99, 0.95])
    # Candidates 1, 2, 4 forget fully; 2 and 4 tie on retain: the first index wins.
    assert select_best(forget, retain) == 2


def test_select_best_never_trades_forgetting_for_retain_accuracy():
    assert select_best(np.array([0.01, 0.0]), np.array([1.0, 0.2])) == 1
    # With a tolerance, near-zero forget accuracy counts as a tie and retain accuracy decides.
    assert select_best(np.array([0.01, 0.0]), np.array([1.0, 0.2]), tolerance=0.02) == 0


def test_select_best_skips_nan_candidates_and_rejects_bad_shapes():
    assert select_best(np.array([np.nan, 0.5, 0.5]), np.array([1.0, np.nan, 0.7])) == 2
    with pytest.raises(HyperForgetError):
        select_best(np.zeros(3), np.zeros(2))


def test_carve_validation_is_stratified_disjoint_and_deterministic():
    y = np.repeat(np.arange(4), [50, 31, 17, 2])
    fit, val = carve_validation(y, 0.2, seed=3)
    assert np.intersect1d(fit, val).size == 0 and len(fit) + len(val) == len(y)
    assert [int((y[val] == c).sum()) for c in range(4)] == [10, 6, 3, 1]
    fit2, val2 = carve_validation(y, 0.2, seed=3)
    assert np.array_equal(val, val2) and np.array_equal(fit, fit2)
    with pytest.raises(HyperForgetError):
        carve_validation(y, 1.5, seed=0)


def test_parse_classes():
    assert parse_classes("3,2") == (2, 3) and parse_classes([3, 1]) == (1, 3)
    with pytest.raises(HyperForgetError):
        parse_classes("two")
    with pytest.raises(HyperForgetError, match="more than once"):
        parse_classes("3,2, 3")  # a repeated label would silently address the set without it


# ----------------------------------------------------------------------------------------------
# Prompts


def test_prompts_lie_within_the_zoos_loss_ranges(tiny_zoo):
    from hyperforget.zoo.store import open_zoo

    path, _ = tiny_zoo(rows=117)
    reader = open_zoo(path)
    table = reader.metadata()
    original = np.asarray(table.column("perm_index")) == 0
    losses = np.stack([np.asarray(table.column(f"loss_{k}")) for k in range(4)], 1)[original]
    from hyperforget.hyper.data import zoo_loss_statistics

    stats = LossStats(zoo_loss_statistics(reader))  # what a hypernetwork saves of its zoo
    assert stats.stats["rows"] == len(losses)  # permuted copies left out
    prompts = build_prompts(stats, [2, 3], 9, PromptConfig(retain_mode="quantile"))
    assert prompts.shape == (9, 4) and prompts.dtype == np.float32
    lo, hi = losses.min(0), losses.max(0)
    assert np.all(prompts >= lo - 1e-6) and np.all(prompts <= hi + 1e-6)
    q90, q995, q05 = (np.quantile(losses, q, axis=0) for q in (0.9, 0.995, 0.05))
    # Forget classes spread over the high quantiles, retain classes between the best and the 5% quantile.
    np.testing.assert_allclose(prompts[:, 2].min(), q90[2], rtol=1e-5)
    np.testing.assert_allclose(prompts[:, 2].max(), q995[2], rtol=1e-5)
    assert np.all(prompts[:, :2] <= q05[:2] + 1e-6) and np.all(prompts[:, :2] >= lo[:2] - 1e-6)
    assert np.all(prompts[:, 2:].min(0) > prompts[:, :2].max(0))


def test_joint_retain_prompts_are_the_best_checkpoints_levels_on_the_retain_classes_together():
    # Classes 0 and 1 trade off (their losses sum to 1): no checkpoint has both at their own 5 %
    # quantile, which the per-class prompt asks for; the joint prompt asks for what the best have.
    rng = np.random.default_rng(3)
    n = 401
    a = rng.uniform(0.0, 1.0, n)
    losses = np.stack([a, 1.0 - a, rng.gamma(2.0, 1.0, n), rng.gamma(2.0, 0.2, n)], 1)
    stats = LossStats.of_losses(losses)
    for f in (0.02, 0.1):
        prompts = build_prompts(stats, [2], 3, PromptConfig(retain_mode="joint", retain_fractions=(f, f)))
        retain = [0, 1, 3]
        best = np.argsort(losses[:, retain].mean(1))[:int(np.ceil(f * n))]  # independent of hyper.data
        np.testing.assert_allclose(prompts[:, retain], np.broadcast_to(np.median(losses[best][:, retain], 0), (3, 3)),
                                   rtol=1e-5)
        assert prompts[0, 0] + prompts[0, 1] > 0.9  # a combination the zoo holds, not two 5 % quantiles
    per_class = build_prompts(stats, [2], 3, PromptConfig(retain_mode="quantile"))
    assert np.all(per_class[:, 0] + per_class[:, 1] < 0.15)
    spread = build_prompts(stats, [2, 3], 5)  # the default: joint, spread over the best 0.5-5 %
    assert len(np.unique(spread[:, 0])) > 1
    old = LossStats({k: v for k, v in stats.stats.items() if k != "retain_profiles"})
    with pytest.raises(HyperForgetError, match="retain-mode quantile"):
        build_prompts(old, [2], 3)
    many = LossStats.of_losses(rng.gamma(2.0, 0.3, size=(50, 10)))  # 10 forgettable classes: not saved
    with pytest.raises(HyperForgetError, match="more than 8 non-pivot classes"):
        build_prompts(many, [2], 3)
    assert build_prompts(many, [2], 3, PromptConfig(retain_mode="quantile")).shape == (3, 10)


def test_prompt_modes():
    rng = np.random.default_rng(0)
    losses = rng.gamma(2.0, 0.3, size=(301, 4))
    p = build_prompts(losses, [3], 5, PromptConfig(forget_mode="max", retain_mode="min"))
    np.testing.assert_allclose(p[:, 3], losses[:, 3].max(), rtol=1e-6)
    np.testing.assert_allclose(p[:, :3], np.broadcast_to(losses[:, :3].min(0), (5, 3)), rtol=1e-6)
    p = build_prompts(losses, [3], 4, PromptConfig(forget_mode="fixed", forget_value=7.0, retain_mode="min",
                                                   retain_scale=0.5))
    assert np.all(p[:, 3] == 7.0)
    np.testing.assert_allclose(p[0, :3], 0.5 * losses[:, :3].min(0), rtol=1e-6)
    with pytest.raises(HyperForgetError):
        PromptConfig(forget_mode="loud")
    with pytest.raises(HyperForgetError):
        build_prompts(losses, [9], 3)


# ----------------------------------------------------------------------------------------------
# A tiny run (digits, the tiny zoo's 64-3-4 task): original, retrained models, baselines, DiHyFo.


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A run made from a tiny zoo: original model and 3 retrained models for forget set {2}."""
    from hyperforget.pipelines.retrain import retrain_into
    from tests.conftest import TINY_CLASSES, TINY_SPEC, make_tiny_batches
    from hyperforget.zoo.datasets import load_dataset
    from hyperforget.zoo.store import ZooConfig, create_zoo

    base = tmp_path_factory.mktemp("unlearn")
    ds = load_dataset("digits", classes=TINY_CLASSES)
    _, batches = make_tiny_batches(ds, 117)
    config = ZooConfig(TINY_SPEC, TINY_CLASSES, pivots=(0, 1), dataset=ds.describe(), chunk_rows=8, shard_rows=32)
    with create_zoo(str(base / "zoo"), config) as w:
        for key, p, meta in batches:
            w.commit(p, meta, key)
    run = init_run(base / "run", RunConfig(zoo=str(base / "zoo"), epochs=30, retrain_seeds=(100, 101, 102)))
    retrain_into(run, (2,))
    return run


def test_run_directory_holds_original_and_retrained_models(tiny_run):
    run = tiny_run
    meta = read_json(run.path / "run.json")
    assert meta["format"] == "hyperforget-run" and meta["spec"]["hidden"] == 3 and meta["pivots"] == [0, 1]
    assert meta["config"]["dataset"] == "digits" and meta["forget_sets"] == [[2]]
    original = read_json(run.path / "original" / "original.json")
    assert original["metrics"]["test"]["total_acc"][0] > 0.8
    retrained, record = load_method(run, (2,), "retrain")
    assert retrained.shape == (3, run.spec.num_params) and record["seeds"] == [100, 101, 102]
    # A retrained model never saw class 2 and so never predicts it.
    d = run.data()
    acc = evaluate_per_class(run.spec, retrained, d.x_test, d.y_test).acc
    assert np.all(acc[:, 2] == 0.0) and np.all(acc[:, [0, 1, 3]].mean(1) > 0.8)


@pytest.mark.parametrize("method", ["logit_mask", "neggrad_plus"])
def test_unlearn_with_a_baseline_writes_the_method_folder(tiny_run, method):
    run = tiny_run
    before = run.original_params().clone()
    record = unlearn(run, "2", UnlearnConfig(method=method, repeats=2))
    folder = run.forget_dir((2,)) / method
    spec, params, _ = load_mlps(str(folder / "model.safetensors"))
    assert params.shape == (2, spec.num_params)
    saved = read_json(folder / "record.json")
    assert saved["method"] == method and saved["forget"] == [2] and saved["wall_seconds"] >= 0
    assert saved["config"]["repeats"] == 2 and saved["hyperparameters"]["overrides"] == {}
    from hyperforget.pipelines.baselines import BASELINES

    assert saved["hyperparameters"]["effective"] == json.loads(json.dumps(BASELINES[method].defaults))
    assert saved["selected_sha256"] == [params_sha256(p) for p in params]
    assert torch.equal(run.original_params(), before)  # the model to unlearn is untouched
    d = run.data()
    original_forget = evaluate_per_class(run.spec, before[None], d.x_val, d.y_val).acc[0, 2]
    assert np.all(record["metrics_val"]["forget_acc"] < original_forget)
    if method == "logit_mask":
        assert saved["output_mask"] == [2] and np.allclose(saved["metrics_val"]["forget_acc"], 0.0)
        assert torch.equal(params[0], before)  # the control keeps the original parameters


def test_a_diverged_baseline_is_refused_and_nothing_is_saved(tiny_run, monkeypatch):
    import hyperforget.pipelines.baselines as baselines
    from hyperforget.zoo.mlp import MLP

    def diverges(method, model, *args, **kwargs):
        flat = torch.as_tensor(tiny_run.original_params()).clone()
        flat[-3:] = float("nan")
        return MLP.from_flat(tiny_run.spec, flat), 0.0

    monkeypatch.setattr(baselines, "run_baseline", diverges)
    with pytest.raises(HyperForgetError, match="finetune diverged on forget set \\[2\\]: 2 of its 2 models"):
        unlearn(tiny_run, "2", UnlearnConfig(method="finetune", repeats=2))
    assert not (tiny_run.forget_dir((2,)) / "finetune" / "model.safetensors").exists()


def test_metrics_compare_every_method_with_the_retrained_models(tiny_run):
    run = tiny_run
    unlearn(run, (2,), UnlearnConfig(method="logit_mask", repeats=1))
    metrics = compute_metrics(run, (2,))
    saved = read_json(run.forget_dir((2,)) / "metrics.json")
    assert set(saved["methods"]) >= {"original", "retrain", "logit_mask"}
    for name in ("logit_mask", "retrain", "original"):
        m = metrics["methods"][name]
        for key in ("acc_retain", "acc_forget", "acc_test", "mia", "overlap_retain", "overlap_forget",
                    "overlap_test", "phi"):
            assert np.isfinite(m[key]["mean"]), (name, key)
    assert metrics["methods"]["logit_mask"]["acc_forget"]["mean"] == 0.0
    assert metrics["methods"]["original"]["acc_forget"]["mean"] > 0.5
    assert metrics["methods"]["retrain"]["acc_forget"]["mean"] == 0.0
    # Retrained vs retrained compares distinct seeds only: 3 models -> 6 ordered pairs.
    assert metrics["methods"]["retrain"]["overlap_test"]["n"] == 6


class FakeHypernetwork:
    """Stands in for hyper.sample's sampler: candidates are the start model plus seeded noise, with
    class 2's output bias pushed down in every other candidate (so some candidates forget)."""

    def __init__(self, run, variant):
        from hyperforget.hyper.data import zoo_loss_statistics
        from hyperforget.zoo.store import open_zoo

        self.spec, self.variant, self.calls = run.spec, variant, []
        self.loss_stats = zoo_loss_statistics(open_zoo(run.config.zoo))  # as a trained one saves them

    def sample(self, target_losses, current_params, current_losses, method="ddim", steps=50, seed=0,
               guidance="auto"):
        self.calls.append({"targets": target_losses.clone(), "current": current_params, "losses": current_losses,
                           "method": method, "steps": steps, "seed": seed, "guidance": guidance})
        k = target_losses.shape[0]
        gen = torch.Generator().manual_seed(seed)
        start = current_params if current_params is not None else torch.zeros(k, self.spec.num_params)
        out = start + 0.01 * torch.randn(k, self.spec.num_params, generator=gen)
        bias = self.spec.layout.slot("fc2.bias")
        out[::2, bias.offset + 2] -= 50.0
        return out


@pytest.fixture
def fake_hyper(monkeypatch):
    nets = {}

    def load_hypernetwork(model_dir):
        return nets[str(model_dir)]

    module = types.ModuleType("hyperforget.hyper.sample")
    module.load_hypernetwork = load_hypernetwork
    monkeypatch.setitem(sys.modules, "hyperforget.hyper.sample", module)
    return nets


def test_dihyfo_unlearning_saves_the_selected_candidates_exactly(tiny_run, fake_hyper, tmp_path):
    run = tiny_run
    net = FakeHypernetwork(run, "dihyfo1")
    fake_hyper[str(tmp_path)] = net
    record = unlearn(run, [2], UnlearnConfig(method="dihyfo1", candidates=6, repeats=2, sample_batch=5),
                     model_dir=str(tmp_path))
    folder = run.forget_dir((2,)) / "dihyfo1"
    _, selected, _ = load_mlps(str(folder / "model.safetensors"))
    _, candidates, _ = load_mlps(str(folder / "candidates.safetensors"))
    assert candidates.shape == (12, run.spec.num_params) and selected.shape == (2, run.spec.num_params)
    chosen = record["selected"]
    assert chosen[0] in range(0, 6) and chosen[1] in range(6, 12)
    assert torch.equal(selected, candidates[chosen])  # bit-identical to what the sampler returned
    assert record["selected_sha256"] == [params_sha256(p) for p in selected]
    # DiHyFo-1 starts from the model to unlearn and its per-class test losses.
    assert torch.equal(net.calls[0]["current"][0], run.original_params())
    assert net.calls[0]["losses"].shape == (5, 4)
    assert sum(c["targets"].shape[0] for c in net.calls) == 12  # batched in chunks of 5
    # The selection is the A.1 rule on the validation accuracies recorded.
    f = np.asarray(record["candidates"]["forget_acc_val"])
    r = np.asarray(record["candidates"]["retain_acc_val"])
    assert chosen[0] == select_best(f[:6], r[:6]) and f[chosen[0]] == 0.0
    saved = read_json(folder / "record.json")
    assert np.asarray(saved["prompts"]).shape == (6, 4) and saved["config"]["candidates"] == 6
    assert saved["timings"]["sample_s"] >= 0


def test_dihyfo1_from_noise_with_guidance_cycled_over_all_candidates(tiny_run, fake_hyper, tmp_path):
    net = FakeHypernetwork(tiny_run, "dihyfo1")
    fake_hyper[str(tmp_path)] = net
    cfg = UnlearnConfig(method="dihyfo1", candidates=4, repeats=2, sample_batch=3, start="noise", guidance=[1.0, 2.0, 4.0])
    record = unlearn(tiny_run, [2], cfg, model_dir=str(tmp_path), out=tmp_path / "u")
    assert all(c["current"] is None and c["losses"] is None for c in net.calls)  # the sampler draws the inits
    assert [g for c in net.calls for g in c["guidance"]] == [1.0, 2.0, 4.0] * 2 + [1.0, 2.0]
    assert record["config"]["start"] == "noise" and record["config"]["guidance"] == [1.0, 2.0, 4.0]
    with pytest.raises(HyperForgetError, match="guidance"):
        UnlearnConfig(guidance="strong")


def test_dihyfo_refuses_pivots_and_unknown_classes(tiny_run, fake_hyper, tmp_path):
    fake_hyper[str(tmp_path)] = FakeHypernetwork(tiny_run, "dihyfo2")
    with pytest.raises(HyperForgetError, match="pivots"):
        unlearn(tiny_run, [0], UnlearnConfig(method="dihyfo2"), model_dir=str(tmp_path))
    with pytest.raises(HyperForgetError, match="not in the task"):
        unlearn(tiny_run, [7], UnlearnConfig(method="logit_mask"))
    with pytest.raises(HyperForgetError, match="holds a dihyfo2"):
        unlearn(tiny_run, [2], UnlearnConfig(method="dihyfo1"), model_dir=str(tmp_path))
    with pytest.raises(HyperForgetError, match="unknown unlearning method"):
        unlearn(tiny_run, [2], UnlearnConfig(method="forgetful"))


# ----------------------------------------------------------------------------------------------
# CLI


def test_cli_unlearn_and_errors(tiny_run, capsys):
    from typer.testing import CliRunner

    from hyperforget.pipelines.cli import app, main

    runner = CliRunner()
    res = runner.invoke(app, ["unlearn", "--method", "logit_mask", "--run", str(tiny_run.path), "--forget", "2",
                              "--repeats", "1"])
    assert res.exit_code == 0, res.output
    assert "acc D_f 0.0000" in res.output
    res = runner.invoke(app, ["unlearn", "--method", "logit_mask", "--run", str(tiny_run.path), "--forget", "9"])
    assert isinstance(res.exception, HyperForgetError)
    argv = sys.argv
    try:
        sys.argv = ["hyperforget", "unlearn", "--method", "ssd", "--run", str(tiny_run.path), "--forget", "2,9"]
        with pytest.raises(SystemExit) as exc:
            main()
    finally:
        sys.argv = argv
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "not in the task" in err and len(err.strip().splitlines()) == 1


def test_benchmark_unlearning_cli_runs_every_method_and_prints_the_table(tmp_path):
    from typer.testing import CliRunner

    from hyperforget.pipelines.cli import app

    out = tmp_path / "bench"
    res = CliRunner().invoke(app, ["benchmark-unlearning", "--preset", "mnist4", "--dataset", "digits",
                                   "--forget", "3", "--methods", "logit_mask,ssd", "--seeds", "2", "--repeats", "1",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert "| logit_mask |" in res.output and "| ssd |" in res.output and "| Retrained |" in res.output
    metrics = read_json(out / "forget-3" / "metrics.json")
    assert set(metrics["methods"]) == {"original", "retrain", "logit_mask", "ssd"}


def test_cli_unlearn_with_a_model_creates_the_run_from_the_models_zoo(tiny_run, fake_hyper, tmp_path):
    import json

    from typer.testing import CliRunner

    from hyperforget.pipelines.cli import app
    from hyperforget.pipelines.unlearn import open_run

    model_dir = tmp_path / "model"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps({"variant": "dihyfo2", "zoo": tiny_run.config.zoo}))
    fake_hyper[str(model_dir)] = FakeHypernetwork(tiny_run, "dihyfo2")
    res = CliRunner().invoke(app, ["unlearn", "--model", str(model_dir), "--run", str(tmp_path / "run"),
                                   "--forget", "3", "--candidates", "4", "--repeats", "1"])
    assert res.exit_code == 0, res.output
    run = open_run(tmp_path / "run")
    assert run.config.zoo == tiny_run.config.zoo and run.config.models == {"dihyfo2": str(model_dir)}
    record = read_json(run.forget_dir((3,)) / "dihyfo2" / "record.json")
    assert record["method"] == "dihyfo2" and len(record["selected"]) == 1


def test_keep_converged_replaces_failed_trainings_by_spares():
    from hyperforget.pipelines.retrain import keep_converged

    acc = np.array([0.97, 0.66, 0.98, 0.33, 0.96, 0.95, 0.97])
    keep, failed = keep_converged(acc, 3, 0.1)
    assert keep == [0, 2, 4] and failed == [1, 3]
    assert keep_converged(acc, 2, None) == ([0, 1], [])
    with pytest.raises(HyperForgetError, match="spare_seeds"):
        keep_converged(acc, 6, 0.1)


def test_zoo_retrieval_picks_what_a_hand_written_query_and_the_selection_rule_pick(tiny_run):
    import duckdb

    from hyperforget.pipelines.retrieval import METHOD
    from hyperforget.zoo.store import open_zoo

    run = tiny_run
    record = unlearn(run, "2", UnlearnConfig(method=METHOD, candidates=4, repeats=2))
    reader = open_zoo(run.config.zoo)
    # Independently: rank originals by forget accuracy, then retain accuracy, straight from the Parquet parts.
    ranked = duckdb.sql(
        "SELECT checkpoint_id FROM read_parquet($files, union_by_name = true) "
        "WHERE perm_index = 0 AND isfinite(acc_2) ORDER BY acc_2 ASC, (acc_0 + acc_1 + acc_3) / 3.0 DESC, "
        "checkpoint_id LIMIT 8", params={"files": reader.meta_files()}).fetchnumpy()["checkpoint_id"]
    groups = [ranked[0::2], ranked[1::2]]
    assert np.array_equal(record["candidates"]["checkpoint_id"], np.concatenate(groups))
    d = run.data()
    expected = []
    for group in groups:
        acc = evaluate_per_class(run.spec, torch.as_tensor(reader.read(group)), d.x_val, d.y_val).acc
        expected.append(int(group[select_best(acc[:, 2], acc[:, [0, 1, 3]].mean(1))]))
    assert np.array_equal(record["selected_checkpoint_ids"], expected)
    params, saved = load_method(run, (2,), METHOD)
    np.testing.assert_array_equal(params.numpy(), reader.read(np.array(expected)))
    assert saved["kind"] == "retrieval"
    metrics = compute_metrics(run, (2,))
    assert METHOD in metrics["methods"]


def test_run_config_refuses_unknown_keys():
    with pytest.raises(HyperForgetError, match="unknown run settings \\['zooo'\\]"):
        RunConfig.from_dict({"zooo": "x"})
    assert RunConfig.from_dict({"retrain_seeds": [1, 2]}).retrain_seeds == (1, 2)
