"""Held-out forget sets: the run plans, the saved checkpoints, zoo info, and the CLI's refusals."""

from __future__ import annotations

import duckdb
import numpy as np
import pytest

from hyperforget.zoo.collect import CollectConfig, collect, plan_run, resolve_task
from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.holdout import check_holdout, forgets, restrict_plan
from hyperforget.zoo.selection import SelectionConfig
from hyperforget.zoo.store import open_zoo, zoo_info

# sklearn digits, MNIST-4 classes on 8x8 inputs; many deletion runs so that the control zoo does hold
# models that forgot {2, 3}. Thresholds loose enough for 9 short epochs.
TINY = dict(preset="mnist4", dataset="digits", runs=13, runs_per_group=7, seed=5, epochs=9, lr_min=0.2,
            lr_max=0.5, deletion_share=0.8, holdout_forget_acc=0.3, holdout_retain_acc=0.6,
            selection=SelectionConfig(max_per_run=15, random_share=0.0))
FORGETS_23 = """SELECT count(*) FROM '{meta}' WHERE acc_2 <= 0.3 AND acc_3 <= 0.3 AND acc_0 >= 0.6 AND acc_1 >= 0.6"""
COVERS_23 = """SELECT count(DISTINCT run_id) FROM '{meta}'
               WHERE list_has_all(list_concat(deleted, undersampled)::INTEGER[], [2, 3])"""


@pytest.fixture(scope="module")
def zoos(tmp_path_factory):
    root = tmp_path_factory.mktemp("holdout")
    out = {}
    for name, holdout in (("control", []), ("held", [[3, 2]])):
        path = str(root / name)
        collect(CollectConfig(**TINY, holdout=holdout), path, use_dask=False, progress=False)
        out[name] = path
    return out


def _count(sql: str, zoo: str) -> int:
    return duckdb.connect().execute(sql.format(meta=f"{zoo}/meta/*.parquet")).fetchall()[0][0]


def test_holdout_zoo_holds_no_model_that_forgot_the_set(zoos):
    # The control shows the check is not vacuous: the same collection without the option has both.
    assert _count(FORGETS_23, zoos["control"]) > 0
    assert _count(COVERS_23, zoos["control"]) > 0
    assert _count(FORGETS_23, zoos["held"]) == 0
    assert _count(COVERS_23, zoos["held"]) == 0
    assert open_zoo(zoos["held"]).num_rows > 0
    info = zoo_info(zoos["held"])["holdout"]
    assert info == {"sets": [[2, 3]], "forget_acc": 0.3, "retain_acc": 0.6, "forgetting": {"2-3": 0}}
    assert zoo_info(zoos["control"])["holdout"] is None


def test_holdout_leaves_other_plans_and_other_sets_alone():
    task = resolve_task(CollectConfig(**TINY))
    plain, held = CollectConfig(**TINY), CollectConfig(**TINY, holdout=[[2, 3]])
    changed = 0
    for r in range(40):
        a, b = plan_run(plain, task, r), plan_run(held, task, r)
        assert (a.seed, a.lr, a.kind) == (b.seed, b.lr, b.kind)
        assert not {2, 3} <= set(b.deleted) | set(b.undersampled)
        if not {2, 3} <= set(a.deleted) | set(a.undersampled):
            assert a == b  # a plan that never covered the set is untouched
        else:
            changed += 1
            assert set(b.deleted) | set(b.undersampled) < set(a.deleted) | set(a.undersampled)
            assert b.deletion_step == (a.deletion_step if b.deleted else -1)
    assert changed > 0


def test_restrict_plan_gives_one_class_back():
    rng = np.random.default_rng(0)
    under, rates, deleted = restrict_plan([[2, 3]], (2,), (0.1,), (3,), rng)
    assert len(set(under) | set(deleted)) == 1 and len(rates) == len(under)
    assert restrict_plan([[2, 3]], (2,), (0.1,), (), rng) == ((2,), (0.1,), ())


def test_forgets_compares_in_float32():
    acc = np.array([[0.97, 0.99, 0.0, 0.2], [0.97, 0.99, 0.0, 0.21], [0.5, 0.99, 0.0, 0.0]], dtype=np.float32)
    assert forgets(acc, [2, 3], 0.2, 0.8).tolist() == [True, False, False]


@pytest.mark.parametrize("sets, match", [([[]], "empty"), ([[7]], "outside"), ([[0, 2]], "pivots")])
def test_check_holdout_refuses(sets, match):
    with pytest.raises(HyperForgetError, match=match):
        check_holdout(sets, 4, (0, 1))


def test_holdout_thresholds_checked():
    with pytest.raises(HyperForgetError, match="holdout_forget_acc"):
        CollectConfig(**{**TINY, "holdout_forget_acc": 0.9, "holdout_retain_acc": 0.5})
