"""Views respect their definitions: splits by run, pairs within a run in step order, balanced caps."""

from __future__ import annotations

import json
import os

import numpy as np
import pandas as pd
import pytest

from hyperforget.queries import views
from hyperforget.zoo.errors import HyperForgetError


def _build(qzoo, kind, name, **params) -> pd.DataFrame:
    rec = views.build_view(qzoo, kind, name, **params)
    table, rec2 = views.load_view(qzoo, name)
    assert rec2 == rec and rec["rows"] == table.num_rows
    return table.to_pandas()


def test_split_is_disjoint_by_run_and_covers_everything(qzoo, zoo_meta):
    train = _build(qzoo, "split", "tr", split="train", test_fraction=0.4, split_seed=3)
    test = _build(qzoo, "split", "te", split="test", test_fraction=0.4, split_seed=3)
    both = _build(qzoo, "split", "al", split="all", test_fraction=0.4, split_seed=3)
    assert len(train) and len(test)
    assert not set(train.run_id) & set(test.run_id)
    assert sorted(np.r_[train.checkpoint_id, test.checkpoint_id]) == list(range(117))
    assert sorted(both.checkpoint_id) == list(range(117))
    labelled = both.set_index("checkpoint_id").split
    assert (labelled[train.checkpoint_id] == "train").all() and (labelled[test.checkpoint_id] == "test").all()
    # whole runs on one side: every checkpoint of a test run is in the test view
    assert len(test) == int(zoo_meta.run_id.isin(set(test.run_id)).sum())
    # deterministic, and the seed matters
    assert _build(qzoo, "split", "te2", split="test", test_fraction=0.4, split_seed=3).equals(test)
    others = [set(_build(qzoo, "split", f"o{s}", split="test", test_fraction=0.4, split_seed=s).run_id)
              for s in range(4, 8)]
    assert any(o != set(test.run_id) for o in others)
    assert len(_build(qzoo, "split", "none", split="test", test_fraction=0.0)) == 0
    originals = _build(qzoo, "split", "orig", include_augmented=False)
    assert (originals.perm_index == 0).all() and len(originals) == int((zoo_meta.perm_index == 0).sum())


def _all_pairs(meta: pd.DataFrame, max_gap: int = -1) -> pd.DataFrame:
    """Every valid (θ, θ*) pair, by brute force."""
    m = meta[["checkpoint_id", "run_id", "perm_index", "step"]]
    j = m.merge(m, on=["run_id", "perm_index"], suffixes=("", "_t"))
    j = j[j.step < j.step_t]
    if max_gap > 0:
        j = j[j.step_t - j.step <= max_gap]
    return j


def test_pairs_follow_their_definition(qzoo, zoo_meta):
    pairs = _build(qzoo, "pairs", "p", cap=20, include_augmented=True)
    allp = _all_pairs(zoo_meta)
    meta = zoo_meta.set_index("checkpoint_id")
    a, b = meta.loc[pairs.checkpoint_id], meta.loc[pairs.target_id]
    assert (a.run_id.values == b.run_id.values).all() and (pairs.run_id.values == a.run_id.values).all()
    assert (a.perm_index.values == b.perm_index.values).all()
    assert (a.step.values < b.step.values).all()
    assert (pairs.step.values == a.step.values).all() and (pairs.target_step.values == b.step.values).all()
    for k in range(4):
        assert np.allclose(pairs[f"loss_{k}"], a[f"loss_{k}"]) and np.allclose(pairs[f"target_loss_{k}"], b[f"loss_{k}"])
        assert np.allclose(pairs[f"delta_{k}"], b[f"loss_{k}"].values - a[f"loss_{k}"].values)
    # cap per run: exactly min(cap, available pairs), no duplicates
    got = pairs.groupby("run_id").size()
    avail = allp.groupby("run_id").size()
    assert (got == np.minimum(20, avail.loc[got.index])).all() and set(got.index) == set(avail.index)
    assert not pairs.duplicated(["checkpoint_id", "target_id"]).any()
    # both phases, including pairs that cross the deletion step
    assert {"learning", "forgetting"} <= set(pairs.target_phase)
    assert ((pairs.phase == "learning") & (pairs.target_phase == "forgetting")).any()
    # deterministic for a seed; another seed picks other pairs
    assert _build(qzoo, "pairs", "p_again", cap=20, include_augmented=True).equals(pairs)
    other = _build(qzoo, "pairs", "p_seed", cap=20, seed=1, include_augmented=True)
    assert set(zip(other.checkpoint_id, other.target_id)) != set(zip(pairs.checkpoint_id, pairs.target_id))


def test_pairs_uncapped_gap_and_split(qzoo, zoo_meta):
    full = _build(qzoo, "pairs", "pall", cap=10_000, max_gap=30, include_augmented=True)
    brute = _all_pairs(zoo_meta, max_gap=30)
    originals = _build(qzoo, "pairs", "porig", cap=10_000)  # default: originals only (see VIEW_KINDS)
    brute0 = _all_pairs(zoo_meta[zoo_meta.perm_index == 0])
    assert (originals.perm_index == 0).all()
    assert set(zip(originals.checkpoint_id, originals.target_id)) == set(zip(brute0.checkpoint_id,
                                                                            brute0.checkpoint_id_t))
    assert set(zip(full.checkpoint_id, full.target_id)) == set(zip(brute.checkpoint_id, brute.checkpoint_id_t))
    split = _build(qzoo, "split", "s_test", split="test", test_fraction=0.4)
    tr = _build(qzoo, "pairs", "p_tr", split="train", test_fraction=0.4)
    te = _build(qzoo, "pairs", "p_te", split="test", test_fraction=0.4)
    assert set(te.run_id) == set(split.run_id) and not set(tr.run_id) & set(te.run_id)


def test_pairs_from_trained_starts(qzoo, zoo_meta):
    losses = [f"loss_{k}" for k in range(4)]
    limit = float(np.median(zoo_meta[losses].max(axis=1)))
    view = _build(qzoo, "pairs", "ptrained", cap=10_000, start_max_loss=limit)
    brute = _all_pairs(zoo_meta[zoo_meta.perm_index == 0])
    starts = zoo_meta.checkpoint_id[zoo_meta[losses].max(axis=1) <= np.float32(limit)]
    brute = brute[brute.checkpoint_id.isin(starts)]
    assert len(view) > 0 and (view[losses].max(axis=1) <= np.float32(limit)).all()
    assert set(zip(view.checkpoint_id, view.target_id)) == set(zip(brute.checkpoint_id, brute.checkpoint_id_t))
    with pytest.raises(HyperForgetError, match="start_max_loss"):
        _build(qzoo, "pairs", "pbad", start_max_loss=-0.5)


def test_pairs_spread_over_their_starts(qzoo, zoo_meta):
    """start_cap k keeps at most k pairs per θ, all valid; with the run cap out of reach every θ keeps
    min(k, its candidates), so late starts are no rarer than early ones (brute force)."""
    brute = _all_pairs(zoo_meta[zoo_meta.perm_index == 0])
    candidates = brute.groupby("checkpoint_id").size()
    for k in (1, 3):
        view = _build(qzoo, "pairs", f"pspread{k}", cap=10_000, start_cap=k)
        kept = view.groupby("checkpoint_id").size()
        assert kept.index.equals(candidates.index)
        assert (kept == np.minimum(candidates, k)).all()
        assert set(zip(view.checkpoint_id, view.target_id)) <= set(zip(brute.checkpoint_id, brute.checkpoint_id_t))
        assert not view.duplicated(["checkpoint_id", "target_id"]).any()
    # the run cap still binds, over the spread pairs
    capped = _build(qzoo, "pairs", "pspread_cap", cap=4, start_cap=2)
    assert (capped.groupby("checkpoint_id").size() <= 2).all() and (capped.groupby("run_id").size() <= 4).all()
    assert _build(qzoo, "pairs", "pspread_again", cap=4, start_cap=2).equals(capped)
    # uniform pairs favour early starts (more later checkpoints to pair with); spread pairs do not
    uniform = _build(qzoo, "pairs", "puniform", cap=4)
    assert capped.step.mean() > uniform.step.mean()
    with pytest.raises(HyperForgetError, match="start_cap"):
        _build(qzoo, "pairs", "pbadcap", start_cap=0)


def test_pairs_to_targets_that_kept_their_retained_classes(tmp_path, tiny_dataset):
    """target_min_retain_acc drops every θ* with a class its run kept below the accuracy (brute force)."""
    from tests.conftest import TINY_CLASSES, TINY_SPEC, make_tiny_batches
    from hyperforget.zoo.store import ZooConfig, create_zoo, open_zoo

    # The tiny zoo's random networks miss some class entirely, so their accuracies are redrawn here.
    _, batches = make_tiny_batches(tiny_dataset, rows=61, seed=2)
    rng = np.random.default_rng(0)
    path = str(tmp_path / "zoo")
    config = ZooConfig(TINY_SPEC, TINY_CLASSES, pivots=(0, 1), dataset=tiny_dataset.describe(), chunk_rows=8,
                       shard_rows=32)
    with create_zoo(path, config) as w:
        for key, params, meta in batches:
            for k in TINY_CLASSES:
                meta[f"acc_{k}"] = rng.uniform(0.5, 1.0, len(params)).astype(np.float32)
            w.commit(params, meta, key)
    meta = open_zoo(path).metadata().to_pandas()
    accs = meta[[f"acc_{k}" for k in TINY_CLASSES]].to_numpy(np.float32)
    kept = np.array([[k not in set(d) for k in TINY_CLASSES] for d in meta.deleted])
    retain_min = np.where(kept, accs, np.float32(1.0)).min(axis=1)
    limit = 0.75  # exact in float32, so DuckDB and numpy compare alike
    assert (retain_min < limit).any() and (retain_min >= limit).any()  # the limit cuts this zoo
    view = _build(path, "pairs", "pkept", cap=10_000, target_min_retain_acc=limit)
    brute = _all_pairs(meta[meta.perm_index == 0])
    brute = brute[brute.checkpoint_id_t.isin(meta.checkpoint_id[retain_min >= np.float32(limit)])]
    assert len(view) > 0
    assert set(zip(view.checkpoint_id, view.target_id)) == set(zip(brute.checkpoint_id, brute.checkpoint_id_t))
    with pytest.raises(HyperForgetError, match="target_min_retain_acc"):
        _build(path, "pairs", "pbad", target_min_retain_acc=1.5)


def test_start_loss_factor_scales_the_trained_level(tmp_path, tiny_dataset):
    """start_loss_factor f keeps the pairs whose θ has a largest class loss ≤ f × the median, over the
    runs that neither undersample nor delete, of their last original checkpoint's largest class loss
    (computed here with pandas); the bound is recorded, and a zoo without such runs is refused."""
    from tests.conftest import TINY_CLASSES, TINY_SPEC, make_tiny_batches
    from hyperforget.zoo.store import ZooConfig, create_zoo, open_zoo

    _, batches = make_tiny_batches(tiny_dataset, rows=61, seed=3)
    path = str(tmp_path / "zoo")
    config = ZooConfig(TINY_SPEC, TINY_CLASSES, pivots=(0, 1), dataset=tiny_dataset.describe(), chunk_rows=8,
                       shard_rows=32)
    with create_zoo(path, config) as w:
        for i, (key, params, meta) in enumerate(batches):
            if i % 4 == 0:  # runs 0 and 4 train plainly on every class (the tiny zoo's odd runs delete)
                meta["undersampled"], meta["undersample_rates"] = [[]] * len(params), [[]] * len(params)
            w.commit(params, meta, key)
    meta = open_zoo(path).metadata().to_pandas()
    losses = [f"loss_{k}" for k in TINY_CLASSES]
    meta["worst"] = meta[losses].max(axis=1)
    plain = meta[(meta.perm_index == 0) & (meta.deleted.map(len) == 0) & (meta.undersampled.map(len) == 0)]
    level = float(np.median(plain.sort_values("step").groupby("run_id").worst.last()))
    factor = 1.1
    rec = views.build_view(path, "pairs", "pfactor", cap=10_000, start_loss_factor=factor)
    assert rec["resolved"]["trained_runs"] == 2
    assert rec["resolved"]["start_max_loss"] == pytest.approx(factor * level, rel=1e-5)
    view, _ = views.load_view(path, "pfactor")
    bound = rec["resolved"]["start_max_loss"]
    same = _build(path, "pairs", "pabsolute", cap=10_000, start_max_loss=bound)
    got = view.to_pandas()
    assert 0 < len(got) < len(_build(path, "pairs", "pany", cap=10_000))  # the bound cuts this zoo
    assert set(zip(got.checkpoint_id, got.target_id)) == set(zip(same.checkpoint_id, same.target_id))
    # a given start_max_loss still caps the bound
    capped = views.build_view(path, "pairs", "pcapped", start_loss_factor=factor, start_max_loss=bound / 2)
    assert capped["resolved"]["start_max_loss"] == pytest.approx(bound / 2, rel=1e-5)
    with pytest.raises(HyperForgetError, match="start_loss_factor"):
        _build(path, "pairs", "pbad", start_loss_factor=0)


def test_start_loss_factor_needs_plainly_trained_runs(qzoo):
    with pytest.raises(HyperForgetError, match="nothing undersampled or deleted"):
        _build(qzoo, "pairs", "pnone", start_loss_factor=1.5)  # every run of qzoo undersamples class 3


def test_family_pairs_reach_across_the_runs_of_a_family(qzoo, zoo_meta, tmp_path):
    """family=K pairs θ with θ* of any run r // K == θ's, at its step or later (a brute-force check),
    and splits train/test by family; only on a zoo collected in families of K."""
    import json
    import shutil

    k = 3
    with pytest.raises(HyperForgetError, match="--branches 1"):
        _build(qzoo, "pairs", "pfam", family=k)
    qzoo = str(shutil.copytree(qzoo, tmp_path / "branched"))  # the same checkpoints, said to be families of 3
    zoo_json = tmp_path / "branched" / "zoo.json"
    saved = json.loads(zoo_json.read_text())
    saved["collection"] = {**saved.get("collection", {}), "config": {"branches": k}}
    zoo_json.write_text(json.dumps(saved))
    view = _build(qzoo, "pairs", "pfam", cap=100_000, family=k)
    m = zoo_meta[zoo_meta.perm_index == 0][["checkpoint_id", "run_id", "perm_index", "step"]].copy()
    m["family"] = m.run_id // k
    j = m.merge(m, on=["family", "perm_index"], suffixes=("", "_t"))
    j = j[(j.step < j.step_t) | ((j.step == j.step_t) & (j.run_id != j.run_id_t))]
    assert set(zip(view.checkpoint_id, view.target_id)) == set(zip(j.checkpoint_id, j.checkpoint_id_t))
    target_run = zoo_meta.set_index("checkpoint_id").loc[view.target_id, "run_id"].to_numpy()
    assert (view.run_id.to_numpy() // k == target_run // k).all()
    assert _build(qzoo, "pairs", "pfam1", cap=100_000, family=1).equals(_build(qzoo, "pairs", "prun", cap=100_000))
    train = _build(qzoo, "pairs", "pft", cap=100_000, family=k, split="train", test_fraction=0.5)
    test = _build(qzoo, "pairs", "pfs", cap=100_000, family=k, split="test", test_fraction=0.5)
    assert len(train) and len(test) and not set(train.run_id // k) & set(test.run_id // k)
    with pytest.raises(HyperForgetError, match="family"):
        _build(qzoo, "pairs", "pbad", family=0)


def _bins(x: np.ndarray, n_bins: int) -> np.ndarray:
    lo, hi = x.min(), x.max()
    if hi == lo:
        return np.zeros(len(x), int)
    return np.minimum(np.floor((x - lo) / (hi - lo) * n_bins).astype(int), n_bins - 1)


@pytest.mark.parametrize("scale", ["log", "linear"])
def test_balanced_cap_respects_bins_and_caps(qzoo, zoo_meta, scale):
    n_bins, cap = 5, 3
    view = _build(qzoo, "balanced", "b", n_bins=n_bins, cap=cap, scale=scale, offset=1e-3)
    chosen = set(view.checkpoint_id)
    assert len(chosen) == len(view) and (view.weight == 1).all()
    upper = 0
    for k in (2, 3):  # the non-pivot classes (pivots are 0, 1)
        loss = zoo_meta[f"loss_{k}"].to_numpy().astype(np.float64)
        x = np.log(loss + 1e-3) if scale == "log" else loss
        bins = _bins(x, n_bins)
        for b in np.unique(bins):
            members = set(zoo_meta.checkpoint_id[bins == b])
            # every bin gets min(cap, its size) of its own members (more may come through the other class)
            assert len(members & chosen) >= min(cap, len(members))
            upper += min(cap, len(members))
    assert len(view) <= upper
    assert _build(qzoo, "balanced", "b2", n_bins=n_bins, cap=cap, scale=scale).equals(view)
    # the re-sampled losses are flatter than the original: the fullest bin shrinks
    x = np.log(zoo_meta.loss_2.to_numpy() + 1e-3) if scale == "log" else zoo_meta.loss_2.to_numpy()
    before = np.bincount(_bins(x, n_bins)).max() / len(x)
    sel = zoo_meta.checkpoint_id.isin(chosen).to_numpy()
    after = np.bincount(_bins(x, n_bins)[sel]).max() / sel.sum()
    assert after <= before


def test_balanced_weights_match_an_independent_computation(qzoo, zoo_meta):
    n_bins = 4
    view = _build(qzoo, "balanced", "w", n_bins=n_bins, mode="weights", include_augmented=False)
    meta = zoo_meta[zoo_meta.perm_index == 0].reset_index(drop=True)
    n = len(meta)
    terms = []
    for k in (2, 3):
        bins = _bins(np.log(meta[f"loss_{k}"].to_numpy().astype(np.float64) + 1e-3), n_bins)
        counts = np.bincount(bins)
        terms.append(n / ((counts > 0).sum() * counts[bins]))
    expect = np.mean(terms, axis=0)
    assert list(view.checkpoint_id) == list(meta.checkpoint_id)
    assert np.allclose(view.weight, expect, rtol=1e-5)
    assert abs(view.weight.mean() - 1) < 1e-5


def test_records_list_and_bad_params(qzoo):
    rec = views.build_view(qzoo, "pairs", cap=7)
    assert rec["name"].startswith("pairs_") and rec["params"]["cap"] == 7 and rec["mode"] == "pairs"
    assert rec["zoo_rows"] == 117 and rec["num_classes"] == 4
    assert [r["name"] for r in views.list_views(qzoo)] == [rec["name"]]
    with open(os.path.join(qzoo, "views", rec["name"] + ".json")) as f:
        assert json.load(f)["params"]["split"] == "all"
    for bad, match in [({"cap": 0}, "cap >= 1"), ({"split": "val"}, "split must be"), ({"nope": 1}, "no parameter"),
                       ({"cap": "x"}, "not a valid int"), ({"test_fraction": 2}, r"\[0, 1\]")]:
        with pytest.raises(HyperForgetError, match=match):
            views.build_view(qzoo, "pairs", **bad)
    with pytest.raises(HyperForgetError, match="unknown view kind"):
        views.build_view(qzoo, "triples")
    with pytest.raises(HyperForgetError, match="view name"):
        views.build_view(qzoo, "split", "runs")
    with pytest.raises(HyperForgetError, match="already exists"):
        views.build_view(qzoo, "pairs", rec["name"], overwrite=False, cap=7)
    with pytest.raises(HyperForgetError, match="no view"):
        views.load_view(qzoo, "missing")


def test_ensure_training_views(qzoo):
    tr, te = views.ensure_training_views(qzoo, "dihyfo1", seed=1, cap=9, test_fraction=0.4)
    rtr, rte = views.view_record(qzoo, tr), views.view_record(qzoo, te)
    assert rtr["kind"] == rte["kind"] == "pairs" and rtr["params"]["split"] == "train"
    assert rtr["params"]["split_seed"] == 1 and rtr["params"]["cap"] == 9
    a, b = views.load_view(qzoo, tr)[0].to_pandas(), views.load_view(qzoo, te)[0].to_pandas()
    assert not set(a.run_id) & set(b.run_id)
    mtime = os.path.getmtime(os.path.join(qzoo, "views", tr + ".parquet"))
    assert views.ensure_training_views(qzoo, "dihyfo1", seed=1, cap=9, test_fraction=0.4) == (tr, te)
    assert os.path.getmtime(os.path.join(qzoo, "views", tr + ".parquet")) == mtime  # not rebuilt
    tr2, te2 = views.ensure_training_views(qzoo, "dihyfo2", seed=1, n_bins=3)
    assert views.view_record(qzoo, tr2)["kind"] == "balanced" and tr2 != tr
    cols = views.load_view(qzoo, tr2)[0].column_names
    assert cols[0] == "checkpoint_id" and all(f"loss_{k}" in cols for k in range(4))
    with pytest.raises(HyperForgetError, match="unknown variant"):
        views.ensure_training_views(qzoo, "dihyfo3")


def test_resampled_views_draw_by_weight_with_replacement_and_flatten_the_histogram(qzoo, zoo_meta):
    weighted = _build(qzoo, "balanced", "bw", mode="weights", n_bins=4, seed=5)
    drawn = _build(qzoo, "balanced", "br", mode="resample", n_bins=4, seed=5)
    assert len(drawn) == len(weighted) and "weight" not in drawn.columns
    assert set(drawn.checkpoint_id) <= set(weighted.checkpoint_id)
    assert drawn.checkpoint_id.is_monotonic_increasing  # chunk order kept for the loader
    assert drawn.equals(_build(qzoo, "balanced", "br2", mode="resample", n_bins=4, seed=5))
    # Independent check of the draw's expectation: each row's share approaches its weight's share.
    expected = weighted.set_index("checkpoint_id").weight / weighted.weight.sum()
    big = views.resample_rows(__import__("pyarrow").Table.from_pandas(weighted.loc[weighted.index.repeat(200)]),
                              weighted.weight.repeat(200).to_numpy(), 0, ["checkpoint_id"]).to_pandas()
    share = big.checkpoint_id.value_counts(normalize=True).reindex(expected.index, fill_value=0)
    assert np.abs(share - expected).max() < 0.02


def test_delta_balanced_pairs_are_pairs_of_the_plain_view_with_more_large_moves(qzoo):
    plain = _build(qzoo, "pairs", "pp", cap=64)
    drawn = _build(qzoo, "pairs", "pd", cap=64, balance="delta", n_bins=5)
    assert len(drawn) == len(plain)
    known = set(zip(plain.checkpoint_id, plain.target_id))
    assert set(zip(drawn.checkpoint_id, drawn.target_id)) <= known
    assert (drawn.step < drawn.target_step).all()
    # One column: every non-empty bin carries the same total weight (the histogram is flat).
    col = np.r_[np.zeros(90), np.ones(9), 2.0]
    w = views.inverse_frequency_weights([col], 3)
    assert np.allclose([w[col == v].sum() for v in (0, 1, 2)], 1 / 3)
    with pytest.raises(HyperForgetError, match="balance"):
        views.build_view(qzoo, "pairs", "bad", balance="sideways")
