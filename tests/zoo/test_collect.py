"""The collector: selection heuristics, a tiny collection end to end, kill + resume, dask parity, CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter

import numpy as np
import pyarrow.compute as pc
import pytest
import torch

from hyperforget.zoo.collect import CollectConfig, collect, plan_run, resolve_task, train_group
from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.mlp import PerClassEvaluator, batched_logits, evaluate_per_class, init_params
from hyperforget.zoo.selection import REASONS, SelectionConfig, Selector, consider_mask
from hyperforget.zoo.store import open_zoo, verify_zoo

torch.set_num_threads(1)

# A tiny task: sklearn digits, classes 0-3, the MNIST-4 MLP on 8x8 inputs (64-2-4), 9 epochs of
# 5 steps. 11 runs in groups of 4 (4, 4, 3) with 2 permuted copies per checkpoint.
TINY = dict(preset="mnist4", dataset="digits", runs=11, runs_per_group=4, augment=2, seed=3, epochs=9,
            lr_min=0.15, lr_max=0.4, selection=SelectionConfig(max_per_run=14, random_share=0.2))


def tiny_config(**changes) -> CollectConfig:
    return CollectConfig(**{**TINY, **changes})


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    cfg = tiny_config()
    out = str(tmp_path_factory.mktemp("zoo") / "tiny")
    summary = collect(cfg, out, use_dask=False, progress=False)
    return cfg, out, summary


# ----------------------------------------------------------------------------------------------
# Selection heuristics on hand-made losses


def test_selector_gamma_bins_budget_and_phases():
    cfg = SelectionConfig(max_per_run=10, bin_edges=(0.1, 1.0), bin_cap=0.2, forget_share=0.4)
    consider = np.ones((2, 101), dtype=bool)
    # run 0 binned without deletion, run 1 binned deleting at step 50; pivots {0, 1}, C = 4
    sel = Selector(cfg, ["binned", "binned"], np.array([-1, 50]), 100, 10, (0, 1), 4, consider)
    assert sel.bin_cap.tolist() == [[2, 1], [2, 1]]  # phases (10, 0) and (6, 4): ceil(0.2 · budget), at least 1
    runs = np.array([0, 1])
    acc_ok = np.array([[0.9, 0.85, 0.1, 0.2]] * 2)
    acc_bad = np.array([[0.9, 0.79, 0.1, 0.2]] * 2)
    loss = np.array([[0.05, 0.05, 2.0, 0.5]] * 2)  # class 2 in bin 2, class 3 in bin 1
    keep, reason = sel.select(1, runs, loss, acc_bad)
    assert not keep.any()  # a pivot below gamma blocks saving
    keep, reason = sel.select(2, runs, loss, acc_ok)
    assert keep.all() and set(reason) == {REASONS.index("pivot_bin")}
    keep, _ = sel.select(3, runs, loss, acc_ok)
    assert keep.all()
    keep, _ = sel.select(4, runs, loss, acc_ok)
    assert not keep.any()  # (class 2, bin 2) and (class 3, bin 1) hold their cap of 2
    keep, _ = sel.select(5, runs, loss * np.array([1, 1, 1, 0.1]), acc_ok)
    assert not keep.any()  # class 3 moved to bin 0, but class 2's bin is still full
    keep, _ = sel.select(6, runs, np.array([[0.05, 0.05, 0.5, 0.05]] * 2), acc_ok)
    assert keep.all()
    assert sel.count.tolist() == [3, 3]
    # After its deletion step run 1 counts bins afresh, with the forgetting-phase cap.
    assert sel.phase(51, runs).tolist() == [0, 1]
    keep, _ = sel.select(51, runs, loss, acc_ok)
    assert keep.tolist() == [False, True]
    keep, _ = sel.select(52, runs, loss, acc_ok)
    assert keep.tolist() == [False, False]  # forgetting cap is 1
    # Invalid checkpoints (e.g. non-finite parameters) are never kept.
    keep, _ = sel.select(53, runs, np.array([[0.05, 0.05, 0.05, 3.0]] * 2), acc_ok, valid=np.array([False, False]))
    assert not keep.any()


def test_selector_learning_budget_leaves_room_after_deletion():
    cfg = SelectionConfig(max_per_run=10, bin_cap=1.0, forget_share=0.4)
    sel = Selector(cfg, ["binned"], np.array([20]), 40, 10, (0,), 3, np.ones((1, 41), dtype=bool))
    saved = []
    for t in range(1, 41):
        runs = sel.candidates(t)
        if len(runs):
            keep, _ = sel.select(t, runs, np.full((1, 3), 0.3), np.ones((1, 3)))
            saved += [t] * int(keep.sum())
    assert len([t for t in saved if t <= 20]) == 6  # learning stops at max − reserve
    assert len(saved) == 10 and saved[-1] > 20


def test_selector_relaxed_and_random_runs():
    cfg = SelectionConfig(max_per_run=5, mode="relaxed", relaxed_min_change=0.1)
    sel = Selector(cfg, ["relaxed", "random"], np.array([-1, -1]), 10, 5, (0,), 2, np.ones((2, 11), dtype=bool))
    runs = np.array([0, 1])
    low_acc = np.zeros((2, 2))  # relaxed runs ignore pivots
    keep, reason = sel.select(0, runs, np.array([[1.0, 1.0]] * 2), low_acc)
    assert keep.tolist() == [True, True]
    assert [REASONS[r] for r in reason] == ["relaxed", "init"]
    keep, _ = sel.select(1, runs, np.array([[1.05, 1.0]] * 2), low_acc)
    assert keep.tolist() == [False, True]  # |Δ log loss| = 0.049 < 0.1: a near duplicate
    keep, reason = sel.select(10, runs, np.array([[1.2, 1.0]] * 2), low_acc)
    assert keep.tolist() == [True, True] and REASONS[reason[1]] == "final"


def test_consider_mask_schedules():
    cfg = SelectionConfig(consider_factor=1.0, early_boost=8.0)
    rng = np.random.default_rng(0)
    m = consider_mask(cfg, "random", 500, -1, 20, rng)
    assert m.sum() == 20 and m[0] and m[500]
    masks = np.stack([consider_mask(cfg, "binned", 1000, -1, 50, np.random.default_rng(s)) for s in range(40)])
    assert not masks[:, 0].any()
    early, late = masks[:, 1:101].sum(), masks[:, 901:].sum()
    assert early > 4 * late  # β decays across training
    assert abs(masks.sum() / 40 - 50) < 8  # about consider_factor × budget considered
    # A deletion run restarts the high early rate right after its deletion step.
    d = np.stack([consider_mask(cfg, "binned", 1000, 500, 50, np.random.default_rng(s)) for s in range(40)])
    assert d[:, 501:551].sum() > 3 * d[:, 451:501].sum()


def test_config_errors():
    with pytest.raises(HyperForgetError, match="gamma"):
        SelectionConfig(gamma=80)
    with pytest.raises(HyperForgetError, match="mode"):
        SelectionConfig(mode="pivots")
    with pytest.raises(HyperForgetError, match="runs"):
        CollectConfig(runs=0)
    with pytest.raises(HyperForgetError, match="preset"):
        CollectConfig(preset="mnist3")
    with pytest.raises(HyperForgetError, match="unknown collection settings"):
        CollectConfig.from_dict({"runs": 3, "bogus": 1})
    with pytest.raises(HyperForgetError, match=r"unknown selection settings \['gama'\]; known: .*'gamma'"):
        CollectConfig.from_dict({"runs": 3, "selection": {"gama": 0.5}})
    assert CollectConfig.from_dict(tiny_config().to_dict()) == tiny_config()


def test_collector_evaluator_passes_match_one_pass():
    task = resolve_task(tiny_config())
    params = init_params(task.spec, range(9)) * 3
    ev = PerClassEvaluator(task.spec, task.data.x_test, task.data.y_test, max_elements=2000)  # several passes
    got = ev(params)
    loss, acc, tl, ta = got.loss, got.acc, got.total_loss, got.total_acc
    ref = evaluate_per_class(task.spec, params, task.data.x_test, task.data.y_test)
    np.testing.assert_allclose(loss, ref.loss, rtol=1e-5)
    np.testing.assert_allclose(acc, ref.acc, rtol=1e-6)
    np.testing.assert_allclose(tl, ref.total_loss, rtol=1e-5)
    np.testing.assert_allclose(ta, ref.total_acc, rtol=1e-6)


# ----------------------------------------------------------------------------------------------
# A tiny collection end to end


def test_collection_counts_and_run_configs(tiny_zoo):
    cfg, out, summary = tiny_zoo
    assert verify_zoo(out).ok
    r = open_zoo(out)
    meta = r.metadata().to_pandas()
    assert r.committed_keys == {"group-000000", "group-000001", "group-000002"}
    assert summary.groups_committed == 3 and summary.groups_skipped == 0
    assert len(meta) == summary.checkpoints == r.num_rows
    assert (meta.perm_index == 0).sum() * 3 == len(meta)  # K = 2 copies each
    orig = meta[meta.perm_index == 0]
    per_run = orig.groupby("run_id").size()
    assert set(per_run.index) <= set(range(11)) and (per_run <= 14).all()
    assert len(per_run) >= 9  # nearly every run keeps something on this task
    assert not orig.duplicated(["run_id", "step"]).any()
    assert summary.per_reason == dict(sorted(Counter(meta.reason).items()))
    # Metadata carries each run's configuration, recomputed here from (seed, run id) alone.
    task = resolve_task(cfg)
    kinds = set()
    for run_id, rows in orig.groupby("run_id"):
        plan = plan_run(cfg, task, int(run_id))
        kinds.add(plan.kind)
        row = rows.iloc[0]
        assert (row.seed, row.run_kind, row.deletion_step) == (plan.seed, plan.kind, plan.deletion_step)
        assert list(row.deleted) == list(plan.deleted) and list(row.undersampled) == list(plan.undersampled)
        np.testing.assert_allclose(row.lr, plan.lr, rtol=1e-6)
        assert ((rows.step > plan.deletion_step) == (rows.phase == "forgetting")).all() or plan.deletion_step < 0
    assert kinds == {"binned", "random"}
    zoo_json = json.load(open(os.path.join(out, "zoo.json")))
    assert zoo_json["collection"]["config"] == cfg.to_dict()
    assert zoo_json["normalization"]["std"] > 0
    # Stored losses are the stored parameters' real test losses (independent evaluation).
    ids = orig.checkpoint_id.to_numpy()[::7]
    ref = evaluate_per_class(task.spec, r.read(ids), task.data.x_test, task.data.y_test)
    got = orig.set_index("checkpoint_id").loc[ids]
    np.testing.assert_allclose(got[[f"loss_{k}" for k in range(4)]].to_numpy(), ref.loss, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(got.test_acc.to_numpy(), ref.total_acc, rtol=1e-6)


def test_pivot_runs_meet_gamma_and_bin_caps_hold(tiny_zoo):
    cfg, out, _ = tiny_zoo
    meta = open_zoo(out).metadata().to_pandas()
    binned = meta[(meta.run_kind == "binned") & (meta.perm_index == 0)]
    assert len(binned) > 20
    assert (binned.reason == "pivot_bin").all()
    assert (binned[["acc_0", "acc_1"]] >= cfg.selection.gamma).all().all()  # pivots {0, 1}
    edges = np.array(cfg.selection.bin_edges)
    m = 14
    for (run_id, phase), rows in binned.groupby(["run_id", "phase"]):
        deletes = rows.deletion_step.iloc[0] >= 0
        reserve = round(cfg.selection.forget_share * m) if deletes else 0
        budget = (m - reserve) if phase == "learning" else reserve  # what the phase's bins are sized for
        cap = max(1, int(np.ceil(cfg.selection.bin_cap * budget)))
        run_rows = binned[binned.run_id == run_id]
        assert len(run_rows) <= m
        if phase == "learning":
            assert len(rows) <= m - reserve  # the reserve stays free for after the deletion
        for k in (2, 3):
            counts = np.bincount(np.digitize(rows[f"loss_{k}"].to_numpy(), edges), minlength=len(edges) + 1)
            assert counts.max() <= cap, (run_id, phase, k, counts, cap)


def test_deletion_runs_show_rising_loss_on_deleted_classes(tiny_zoo):
    cfg, out, _ = tiny_zoo
    meta = open_zoo(out).metadata().to_pandas()
    orig = meta[meta.perm_index == 0]
    rises = []
    for run_id, rows in orig[orig.deletion_step >= 0].groupby("run_id"):
        before = rows[rows.phase == "learning"].sort_values("step")
        after = rows[rows.phase == "forgetting"].sort_values("step")
        if before.empty or after.empty:
            continue
        deleted = [f"loss_{k}" for k in after.deleted.iloc[0]]
        rise = after[deleted].max().to_numpy() - before[deleted].iloc[-1].to_numpy()  # per deleted class
        assert (rise > 0).all(), (run_id, rise)
        rises.append(rise.mean())
        # The pivots stay learned meanwhile.
        assert after[["loss_0", "loss_1"]].to_numpy().mean() < after[deleted].to_numpy().mean()
    assert len(rises) >= 2 and np.mean(rises) > 0.2


def test_candidates_evaluated_in_batches_keep_what_step_by_step_evaluation_keeps(monkeypatch):
    import hyperforget.zoo.collect.group as group_module  # where train_group reads EVAL_MODELS

    cfg = tiny_config(runs=6, runs_per_group=6, augment=0)
    batched = train_group(cfg, 0).meta.to_pandas()
    monkeypatch.setattr(group_module, "EVAL_MODELS", 1)  # decide after every step
    each = train_group(cfg, 0).meta.to_pandas()
    assert len(batched) > 20
    cols = ["run_id", "step", "reason", "phase"]
    assert batched[cols].equals(each[cols])
    np.testing.assert_allclose(batched[[f"loss_{k}" for k in range(4)]].to_numpy(),
                               each[[f"loss_{k}" for k in range(4)]].to_numpy(), rtol=1e-5, atol=1e-6)


def test_group_task_times_matmul_only_when_asked():
    cfg = tiny_config(runs=4, epochs=2, augment=0)
    assert train_group(cfg, 0).matmul_gflops == 0.0
    assert train_group(cfg, 0, probe_seconds=0.02).matmul_gflops > 0.0


def test_deletion_settings_plan_and_restart_the_forgetting_lr():
    base = tiny_config(runs=40, deletion_share=1.0, deletion_undersample=True, undersample_rate_max=0.4)
    task = resolve_task(base)
    plans = [plan_run(base, task, r) for r in range(40)]
    assert any(p.undersampled for p in plans)  # deletion runs may undersample unless told not to
    clean = tiny_config(runs=40, deletion_share=1.0, deletion_undersample=False, undersample_rate_max=0.4)
    for p, q in zip(plans, (plan_run(clean, task, r) for r in range(40))):
        assert q.undersampled == () and q.undersample_rates == ()
        assert (q.seed, q.lr, q.deleted, q.deletion_step) == (p.seed, p.lr, p.deleted, p.deletion_step)
    # A restarted forgetting lr moves the deleted classes' loss further, from the same deletion step.
    rises = {}
    for flr in (0.0, 3.0):
        cfg = tiny_config(runs=8, runs_per_group=8, deletion_share=1.0, deletion_window=(0.5, 0.5),
                          deletion_undersample=False, forgetting_lr=flr, augment=0,
                          selection=SelectionConfig(mode="relaxed", max_per_run=40, random_share=0.0))
        res = train_group(cfg, 0)
        meta = res.meta.to_pandas()
        rise = []
        for run_id, rows in meta.groupby("run_id"):
            deleted = [f"loss_{k}" for k in rows.deleted.iloc[0]]
            last = rows.sort_values("step").iloc[-1]
            rise.append(last[deleted].to_numpy().mean())
        rises[flr] = np.mean(rise)
    assert rises[3.0] > rises[0.0], rises
    with pytest.raises(HyperForgetError, match="forgetting_lr"):
        tiny_config(forgetting_lr=-1)


def test_branch_families_share_their_past_and_differ_in_what_they_delete():
    cfg = tiny_config(runs=12, runs_per_group=4, branches=4, deletion_window=(0.5, 0.5), augment=0,
                      deletion_undersample=False, selection=SelectionConfig(mode="relaxed", max_per_run=45,
                                                                            random_share=1.0))
    task = resolve_task(cfg)
    for family in range(3):
        plans = [plan_run(cfg, task, 4 * family + b) for b in range(4)]
        assert len({(p.seed, p.lr, p.undersampled, p.kind) for p in plans}) == 1
        assert plans[0].deleted == () and plans[0].deletion_step == -1
        assert sorted(p.deleted for p in plans[1:]) == [(2,), (2, 3), (3,)]  # MNIST-4's non-pivot sets
        assert len({p.deletion_step for p in plans[1:]}) == 1
    # Trained: up to the deletion step a family's runs hold the very same checkpoints, then they part.
    res = train_group(cfg, 0)
    meta = res.meta.to_pandas()
    row = {(int(r), int(t)): i for i, (r, t) in enumerate(zip(meta.run_id, meta.step))}  # augment=0: row i
    d = plan_run(cfg, task, 1).deletion_step
    steps0 = {t for r, t in row if r == 0}
    for r in (1, 2, 3):
        shared = sorted(t for q, t in row if q == r and t in steps0)
        before, after = [t for t in shared if t <= d], [t for t in shared if t > d + 3]
        assert before and after, (r, shared, d)
        for t in before:
            # The same run computed in another row of the batched products: equal up to rounding,
            # which a CPU may do differently per row, so not compared bit for bit.
            np.testing.assert_allclose(res.params[row[r, t]], res.params[row[0, t]], rtol=0, atol=1e-5)
        assert max(np.abs(res.params[row[r, t]] - res.params[row[0, t]]).max() for t in after) > 1e-2
    with pytest.raises(HyperForgetError, match="multiple of branches"):
        tiny_config(runs_per_group=6, branches=4)
    with pytest.raises(HyperForgetError, match="branches must be ≥ 1"):
        tiny_config(branches=0)
    held = tiny_config(runs=8, runs_per_group=4, branches=4, holdout=[[2, 3]])
    assert all(plan_run(held, task, r).deleted != (2, 3) for r in range(8))


def test_branch_steps_delete_every_set_at_each_of_the_familys_steps():
    cfg = tiny_config(runs=14, runs_per_group=7, branches=7, branch_steps=2, augment=0, deletion_undersample=False)
    task = resolve_task(cfg)
    for family in range(2):
        plans = [plan_run(cfg, task, 7 * family + b) for b in range(7)]
        assert len({(p.seed, p.lr, p.undersampled, p.kind) for p in plans}) == 1
        assert plans[0].deleted == () and plans[0].deletion_step == -1
        steps = sorted({p.deletion_step for p in plans[1:]})
        assert len(steps) == 2
        # every set at every step, exactly once
        assert sorted((p.deleted, p.deletion_step) for p in plans[1:]) == sorted(
            (d, s) for d in [(2,), (3,), (2, 3)] for s in steps)
    # One step per family keeps the plans of a plain branch collection.
    one = tiny_config(runs=8, runs_per_group=4, branches=4, augment=0, deletion_undersample=False)
    again = tiny_config(runs=8, runs_per_group=4, branches=4, branch_steps=1, augment=0, deletion_undersample=False)
    assert [plan_run(one, task, r) for r in range(8)] == [plan_run(again, task, r) for r in range(8)]
    with pytest.raises(HyperForgetError, match="branch_steps must be ≥ 1"):
        tiny_config(branches=4, branch_steps=0)
    with pytest.raises(HyperForgetError, match="more branches than steps"):
        tiny_config(runs_per_group=4, branches=4, branch_steps=4)


def test_branch_from_start_retrains_each_set_from_the_familys_initialization():
    cfg = tiny_config(runs=7, runs_per_group=7, branches=7, branch_steps=2, branch_from_start=True, augment=0,
                      deletion_undersample=False, selection=SelectionConfig(mode="relaxed", max_per_run=45,
                                                                            random_share=1.0))
    task = resolve_task(cfg)
    plans = [plan_run(cfg, task, b) for b in range(7)]
    plain = [plan_run(tiny_config(runs=7, runs_per_group=7, branches=7, branch_steps=2, augment=0,
                                  deletion_undersample=False), task, b) for b in range(7)]
    late = max(p.deletion_step for p in plain[1:])
    # Every set is deleted at step 0 (never trained on) and at the plain collection's later step.
    assert sorted((p.deleted, p.deletion_step) for p in plans[1:]) == sorted(
        (d, s) for d in [(2,), (3,), (2, 3)] for s in (0, late))
    res = train_group(cfg, 0)
    meta = res.meta.to_pandas()
    last = meta[meta.step == meta.step.max()].set_index("run_id")
    never = next(b for b, p in enumerate(plans) if p.deleted == (2,) and p.deletion_step == 0)
    # Trained without a single class-2 example, the branch ends predicting class 2 for none of its
    # test images, while the branch that deletes nothing learned it.
    assert last.loc[never, "acc_2"] <= 0.02 < last.loc[0, "acc_2"]
    trained = meta[(meta.run_id == never) & (meta.step > 0)]  # step 0 is the shared initialization
    assert len(trained) and (trained.phase == "forgetting").all()
    with pytest.raises(HyperForgetError, match="branch_from_start needs families"):
        tiny_config(branch_from_start=True)


def test_augmented_copies_are_functionally_identical(tiny_zoo):
    _, out, _ = tiny_zoo
    r = open_zoo(out)
    meta = r.metadata().to_pandas()
    copies = meta[meta.perm_index > 0]
    assert (copies.reason == "augment").all()
    src = meta.set_index("checkpoint_id").loc[copies.source_id]
    assert (src.perm_index == 0).all()
    assert (src.run_id.to_numpy() == copies.run_id.to_numpy()).all()
    assert (src.step.to_numpy() == copies.step.to_numpy()).all()
    task = resolve_task(tiny_zoo[0])
    x = torch.as_tensor(task.data.x_test[:50])
    a = batched_logits(task.spec, torch.as_tensor(r.read(copies.checkpoint_id.to_numpy())), x)
    b = batched_logits(task.spec, torch.as_tensor(r.read(copies.source_id.to_numpy())), x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert not np.array_equal(r.read(copies.checkpoint_id.to_numpy()[:5]), r.read(copies.source_id.to_numpy()[:5]))


def test_rerun_skips_committed_groups_and_rejects_other_settings(tiny_zoo):
    cfg, out, first = tiny_zoo
    again = collect(cfg, out, use_dask=False, progress=False)
    assert again.groups_committed == 0 and again.groups_skipped == 3
    assert again.checkpoints == first.checkpoints
    with pytest.raises(HyperForgetError, match="other settings"):
        collect(tiny_config(seed=4), out, use_dask=False, progress=False)
    with pytest.raises(HyperForgetError, match="resume with --runs 11"):
        collect(tiny_config(runs=13), out, use_dask=False, progress=False)


def test_groups_that_keep_nothing_are_reported(tmp_path):
    # One epoch: the binned runs never reach gamma on the pivots, so nothing is kept.
    cfg = tiny_config(runs=2, runs_per_group=2, epochs=1, lr_min=0.001, lr_max=0.001,
                      selection=SelectionConfig(random_share=0.0))
    summary = collect(cfg, str(tmp_path / "empty"), use_dask=False, progress=False)
    assert (summary.checkpoints, summary.groups_committed, summary.groups_empty) == (0, 0, 1)
    assert verify_zoo(str(tmp_path / "empty")).ok


def test_group_results_do_not_depend_on_the_callers_threads():
    # The same group under 1 and 2 torch threads in the caller: identical bits (parameters and
    # the evaluated losses in the metadata), and the caller's setting is restored.
    cfg = tiny_config(runs=3, runs_per_group=3, epochs=4)
    old = torch.get_num_threads()
    try:
        results = {}
        for n in (1, 2):
            torch.set_num_threads(n)
            results[n] = train_group(cfg, 0)
            assert torch.get_num_threads() == n
    finally:
        torch.set_num_threads(old)
    a, b = results[1], results[2]
    assert len(a.params) > 0
    assert a.params.tobytes() == b.params.tobytes()
    assert a.meta.equals(b.meta)


# ----------------------------------------------------------------------------------------------
# Kill midway, resume; dask workers


_KILLABLE = """
import sys, time
from hyperforget.zoo.collect import CollectConfig, collect
cfg = CollectConfig.from_dict(__import__("json").loads(sys.argv[2]))
collect(cfg, sys.argv[1], use_dask=False, progress=False, on_commit=lambda res, ids: time.sleep(0.5))
"""


def _same_zoo(a: str, b: str) -> None:
    ra, rb = open_zoo(a), open_zoo(b)
    assert ra.num_rows == rb.num_rows
    assert ra.metadata().equals(rb.metadata())
    assert np.array_equal(ra.read_rows(0, ra.num_rows), rb.read_rows(0, rb.num_rows))


def test_killed_collection_resumes_to_the_same_zoo(tiny_zoo, tmp_path):
    cfg, ref, _ = tiny_zoo
    out = str(tmp_path / "killed")
    proc = subprocess.Popen([sys.executable, "-c", _KILLABLE, out, json.dumps(cfg.to_dict())])
    manifest = os.path.join(out, "manifest.json")
    deadline = time.time() + 60
    rows = 0
    try:
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(manifest):
                rows = json.load(open(manifest)).get("num_rows", 0)
                if rows:
                    break
            time.sleep(0.02)
        assert proc.poll() is None, "the collection finished before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert 0 < open_zoo(out).num_rows < open_zoo(ref).num_rows
    summary = collect(cfg, out, use_dask=False, progress=False)
    assert summary.groups_skipped >= 1 and summary.groups_committed >= 1
    assert verify_zoo(out).ok
    meta = open_zoo(out).metadata()
    originals = meta.filter(pc.equal(meta.column("perm_index"), 0)).to_pandas()
    assert not originals.duplicated(["run_id", "step"]).any()  # each run once
    _same_zoo(out, ref)


def test_local_cluster_two_workers_equal_one(tiny_zoo, tmp_path):
    """Two LocalCluster workers build the zoo one worker builds; the one-worker reference is the
    in-process collector (the same task function run group after group), which spares the test
    a second cluster start."""
    cfg, ref, _ = tiny_zoo
    two = str(tmp_path / "two")
    stale = tmp_path / "two" / ".tmp" / "spill"  # a killed run's spilled rows are cleared, then the workers' own
    stale.mkdir(parents=True)
    (stale / "group-000000.npy").write_bytes(b"not an array")
    summary = collect(cfg, two, workers=2, max_in_flight=3, progress=False)
    assert summary.groups_committed == 3
    _same_zoo(two, ref)
    # The workers' rows travelled as files in the zoo's scratch space, removed when committed;
    # nothing is left beside the zoo.
    assert not stale.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["two"]


def test_reopening_a_writer_empties_its_scratch_space(tiny_zoo_path):
    from hyperforget.zoo.store import ZooWriter

    left = os.path.join(tiny_zoo_path, ".tmp", "spill")
    os.makedirs(left)
    open(os.path.join(left, "group-000001.npy"), "wb").close()
    with ZooWriter.open(tiny_zoo_path) as w:
        assert not os.path.exists(os.path.join(tiny_zoo_path, ".tmp"))
        assert w.recovered["temp_files"] == 1
        scratch = w.temp_dir("spill")
        assert os.path.isdir(scratch) and scratch.startswith(os.path.abspath(tiny_zoo_path))


# ----------------------------------------------------------------------------------------------
# CLI


@pytest.fixture
def tiny_zoo_path(tmp_path):
    from hyperforget.zoo.store import ZooConfig, create_zoo
    from tests.conftest import TINY_CLASSES, TINY_SPEC

    path = str(tmp_path / "scratch-zoo")
    create_zoo(path, ZooConfig(TINY_SPEC, TINY_CLASSES, chunk_rows=8)).close()
    return path


def test_cli_collect(tmp_path):
    from typer.testing import CliRunner

    from hyperforget.pipelines.cli import app

    out = str(tmp_path / "cli")
    args = ["zoo", "collect", "--preset", "mnist4", "--dataset", "digits", "--runs", "3", "--out", out,
            "--epochs", "6", "--runs-per-group", "2", "--augment", "1", "--seed", "5", "--no-dask"]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    assert "checkpoints" in res.output
    r = open_zoo(out)
    assert r.num_rows > 0 and r.committed_keys == {"group-000000", "group-000001"}
    res = CliRunner().invoke(app, args[:-2] + ["6", "--no-dask"])  # other seed, same zoo
    assert isinstance(res.exception, HyperForgetError)
    proc = subprocess.run([sys.executable, "-m", "hyperforget", "zoo", "collect", "--preset", "mnist9",
                           "--runs", "2", "--out", str(tmp_path / "bad"), "--no-dask"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "error: unknown preset" in proc.stderr
