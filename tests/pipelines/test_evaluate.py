"""`hyperforget evaluate` end to end on a tiny run directory (sklearn digits, 4 classes, 64-2-4 MLPs)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from hyperforget.pipelines.retrain import init_run
from hyperforget.pipelines.unlearn import RunConfig, UnlearnConfig
from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.files import write_json
from hyperforget.zoo.mlp import load_mlps, save_mlps

torch.set_num_threads(1)

FORGET = (2,)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run with an original model, a fake DiHyFo (noisy retrained models) and a 2-repeat fine-tune."""
    from hyperforget.pipelines.retrain import retrain_into
    from hyperforget.pipelines.unlearn import unlearn

    path = tmp_path_factory.mktemp("run")
    run = init_run(path, RunConfig(preset="mnist4", dataset="digits", epochs=40, seed=1,
                                         retrain_seeds=(100, 101)),
                   forget_sets=[FORGET])
    retrained = retrain_into(run, FORGET)
    # Fake DiHyFo output: 11 "candidates" near the retrained models (odd count on purpose), one NaN.
    gen = torch.Generator().manual_seed(0)
    base = retrained[torch.arange(11) % retrained.shape[0]]
    cands = base + 0.05 * torch.randn(base.shape, generator=gen)
    cands[5, 0] = float("nan")  # samplers can emit NaN rows; the evaluation drops them
    out = run.forget_dir(FORGET) / "dihyfo1"
    out.mkdir(parents=True)
    save_mlps(str(out / "candidates.safetensors"), run.spec, cands)
    save_mlps(str(out / "model.safetensors"), run.spec, cands[:1])
    write_json(out / "record.json", {"method": "dihyfo1", "kind": "dihyfo", "forget": list(FORGET),
                                     "wall_seconds": 0.01})
    unlearn(run, FORGET, UnlearnConfig(method="finetune", repeats=2, overrides={"epochs": 1}))
    unlearn(run, FORGET, UnlearnConfig(method="logit_mask", repeats=1))
    return path


def _small(**kw):
    from hyperforget.pipelines.evaluate import EvalConfig

    base = dict(n_retrained=16, retrain_groups=2, baseline_seeds=3, mia_models=3, probe_models=2,
                relearn_models=2, relearn_max_steps=30, progress=False)
    base.update(kw)
    return EvalConfig(**base)


@pytest.fixture(scope="module")
def result(run_dir):
    from hyperforget.pipelines.evaluate import evaluate

    return evaluate(run_dir, [FORGET], config=_small())["forget-2"]


def _row(result, name):
    return next(r for r in result["rows"] if r["name"] == name)


def test_writes_tables_and_plots(run_dir, result):
    ev = run_dir / "evaluation"
    for name in ("forget-2.json", "forget-2.md", "eps_hist_forget-2.png", "retain_vs_forget_forget-2.png"):
        assert (ev / name).stat().st_size > 0, name
    saved = json.loads((ev / "forget-2.json").read_text())
    assert saved["config"]["n_retrained"] == 16 and saved["forget"] == [2]
    md = (ev / "forget-2.md").read_text()
    for row in ("retrain (floor)", "original (ceiling)", "dihyfo1 (candidates)", "finetune", "logit_mask (control)"):
        assert f"| {row} |" in md


def test_rows_and_populations(result):
    names = [r["name"] for r in result["rows"]]
    assert names[:2] == ["retrain (floor)", "original (ceiling)"]
    assert "logit_mask" not in names  # the saved logit_mask baseline is replaced by the exact control
    assert _row(result, "dihyfo1 (candidates)")["num_models"] == 10
    assert _row(result, "dihyfo1 (selected)")["num_models"] == 1
    # finetune had 2 saved repeats; run_baseline topped it up to 3.
    assert _row(result, "finetune")["num_models"] == 3
    ref = result["reference"]
    assert (ref["reference_models"], ref["negative_models"], ref["floor_models"]) == (8, 4, 4)
    lo, hi = ref["seeds"]
    assert hi - lo == 15 and lo >= 1_000_000_000  # disjoint from the run's seeds 0, 100, 101
    assert "none of the 16 reference seeds" in ref["seed_check"]


def test_logit_mask_control_is_exposed(result):
    mask, floor, orig = _row(result, "logit_mask (control)"), _row(result, "retrain (floor)"), \
        _row(result, "original (ceiling)")
    assert mask["accuracy"]["forget_train"]["mean"] == 0.0 and mask["accuracy"]["test_forget"]["mean"] == 0.0
    # Forget accuracy 0, yet a poor distributional score: the masked confidences sit far outside
    # the retrained population, so U-LiRA separates them and ε is infinite for most examples.
    assert mask["attacks"]["ulira"]["auc"] > 0.95
    assert mask["epsilon"]["F"] < floor["epsilon"]["F"]
    # Its features still hold the class, and relearning is immediate (the weights are the original's).
    assert mask["probe_forget_acc"]["mean"] == pytest.approx(orig["probe_forget_acc"]["mean"])
    assert mask["relearn"]["steps"]["mean"] == 0.0
    assert mask["cost"]["under_20pct"] is True


def test_floor_and_ceiling_bracket(result):
    floor, orig = _row(result, "retrain (floor)"), _row(result, "original (ceiling)")
    assert floor["accuracy"]["forget_train"]["mean"] == 0.0
    assert orig["accuracy"]["forget_train"]["mean"] > 0.8
    assert 0.3 < floor["attacks"]["ulira"]["auc"] < 0.7
    assert orig["attacks"]["calibrated_threshold"]["auc"] > 0.95
    assert floor["jsd_to_retrained"]["forget_train"]["mean"] < orig["jsd_to_retrained"]["forget_train"]["mean"]
    assert abs(floor["mia"]["entropy"]["minus_retrained"]) < 0.2
    assert orig["relearn"]["steps"]["mean"] == 0.0
    assert result["reference"]["retrain_seconds_one_model"] > 0


def test_nearest_checkpoint_distance_is_permutation_invariant():
    from hyperforget.pipelines.evaluate import permutation_invariant_distance
    from hyperforget.zoo.mlp import MLPSpec, batched_logits, init_params

    for hidden in (3, 6):  # enumeration and Hungarian paths
        spec = MLPSpec(5, hidden, 3)
        a, b = init_params(spec, [1, 2])
        w = spec.layout.unflatten(b)
        perm = torch.randperm(hidden, generator=torch.Generator().manual_seed(hidden))
        permuted = spec.layout.flatten({"fc1.weight": w["fc1.weight"][perm], "fc1.bias": w["fc1.bias"][perm],
                                        "fc2.weight": w["fc2.weight"][:, perm], "fc2.bias": w["fc2.bias"]})
        x = torch.randn(4, 5)
        assert torch.allclose(batched_logits(spec, b[None], x), batched_logits(spec, permuted[None], x), atol=1e-6)
        d = permutation_invariant_distance(spec, a, torch.stack([b, permuted, a]))
        assert d[0] == pytest.approx(d[1], rel=1e-6) and d[2] == pytest.approx(0.0, abs=1e-6)
        assert d[0] <= float((a - b).norm()) + 1e-6
        # Independent check: brute force over every permutation.
        import itertools

        brute = min(float((a - spec.layout.flatten({
            "fc1.weight": w["fc1.weight"][list(p)], "fc1.bias": w["fc1.bias"][list(p)],
            "fc2.weight": w["fc2.weight"][:, list(p)], "fc2.bias": w["fc2.bias"]})).norm())
            for p in itertools.permutations(range(hidden)))
        assert d[0] == pytest.approx(brute, rel=1e-5)


def test_cli_evaluate_and_errors(run_dir, tmp_path):
    from typer.testing import CliRunner

    from hyperforget.pipelines.cli import app

    r = CliRunner().invoke(app, ["evaluate", str(tmp_path)])
    assert r.exit_code != 0 and isinstance(r.exception, HyperForgetError)
    r = CliRunner().invoke(app, ["evaluate", str(run_dir), "--forget", "3"])
    assert isinstance(r.exception, HyperForgetError) and "forget-3" in str(r.exception)
    r = CliRunner().invoke(app, ["evaluate", str(run_dir), "--retrained", "4"])
    assert isinstance(r.exception, HyperForgetError) and "--retrained" in str(r.exception)


def test_main_exit_code_2(run_dir, monkeypatch, capsys):
    import sys

    from hyperforget.pipelines.cli import main

    monkeypatch.setattr(sys, "argv", ["hyperforget", "evaluate", str(run_dir), "--retrained", "2"])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    assert capsys.readouterr().err.startswith("error: ")


def test_zoo_seed_check_and_nearest_checkpoint(run_dir, tmp_path):
    """With a zoo: reference seeds skip the zoo's seeds; the nearest-checkpoint control finds the
    permuted near-copy of the selected DiHyFo model and ignores augmented (perm_index > 0) rows."""
    import shutil

    from hyperforget.pipelines.evaluate import SEED_BASE, evaluate
    from hyperforget.zoo.mlp import init_params
    from hyperforget.zoo.store import ZooConfig, create_zoo

    run_copy = tmp_path / "run"
    shutil.copytree(run_dir, run_copy)
    meta = json.loads((run_copy / "run.json").read_text())
    spec, selected, _ = load_mlps(str(run_copy / "forget-2" / "dihyfo1" / "model.safetensors"))
    n = 37
    rows = init_params(spec, range(n)).numpy()
    w = spec.layout.unflatten(selected[0])
    swapped = spec.layout.flatten({"fc1.weight": w["fc1.weight"].flip(0), "fc1.bias": w["fc1.bias"].flip(0),
                                   "fc2.weight": w["fc2.weight"].flip(1), "fc2.bias": w["fc2.bias"]})
    rows[20] = (swapped + 0.01).numpy()  # the near-copy, hidden units swapped
    rows[30] = selected[0].numpy()  # an exact copy, but marked as a permuted (augmented) row
    c = spec.num_classes
    cols = {"run_id": np.arange(n), "step": np.zeros(n, np.int32), "epoch": np.zeros(n, np.int32),
            "phase": ["learning"] * n, "test_loss": np.ones(n, np.float32), "test_acc": np.zeros(n, np.float32),
            "seed": np.r_[SEED_BASE + 3, np.arange(1, n)], "perm_index": np.where(np.arange(n) == 30, 1, 0),
            "source_id": np.where(np.arange(n) == 30, 0, np.arange(n)),
            **{f"loss_{k}": np.ones(n, np.float32) for k in range(c)},
            **{f"acc_{k}": np.zeros(n, np.float32) for k in range(c)}}
    writer = create_zoo(tmp_path / "zoo", ZooConfig(spec=spec, classes=tuple(meta["classes"]), chunk_rows=8))
    writer.commit(rows, cols, key="all")
    writer.close()
    meta["config"]["zoo"] = str(tmp_path / "zoo")
    (run_copy / "run.json").write_text(json.dumps(meta))

    res = evaluate(run_copy, [FORGET], config=_small(n_retrained=8, baseline_seeds=1))["forget-2"]
    lo, hi = res["reference"]["seeds"]
    assert lo > SEED_BASE + 3  # moved past the zoo's seed
    assert "zoo" in res["reference"]["seed_check"]
    near = _row(res, "nearest zoo checkpoint (dihyfo1)")
    assert near["nearest"]["checkpoint_id"] == 20
    assert near["nearest"]["rows_scanned"] == n - 1
    expected = float(torch.full((spec.num_params,), 0.01).norm())
    assert near["nearest"]["distance"] == pytest.approx(expected, rel=1e-4)
    assert near["num_models"] == 1
