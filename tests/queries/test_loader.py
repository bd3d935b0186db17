"""CheckpointStream: exactly-once epochs across workers and ranks, resumption, determinism, augmentation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hyperforget.queries.loader import CheckpointStream, hidden_permutations, make_loader, to_device
from hyperforget.zoo.augment import permutation_index
from hyperforget.queries.views import build_view, load_view
from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.mlp import batched_logits


@pytest.fixture
def all_view(qzoo):
    build_view(qzoo, "split", "everything")
    return "everything"


@pytest.fixture
def pair_view(qzoo):
    build_view(qzoo, "pairs", "pairs6", cap=6)
    return "pairs6"


@pytest.fixture
def raw_zoo(qzoo, tiny_batches, tmp_path):
    """qzoo's checkpoints in an uncompressed zoo (read through MappedShards), with its views."""
    from hyperforget.zoo.store import ZooConfig, ZooWriter, compute_normalization, create_zoo, open_zoo

    path = str(tmp_path / "raw-qzoo")
    cfg = ZooConfig.from_dict({**open_zoo(qzoo).config.to_dict()})
    cfg.compressor = "none"
    with create_zoo(path, cfg) as w:
        for key, params, meta in tiny_batches(117)[1]:
            w.commit(params, meta, key)
    with ZooWriter.open(path) as w:
        w.set_normalization(compute_normalization(open_zoo(path)))
    build_view(path, "split", "everything")
    build_view(path, "pairs", "pairs6", cap=6)
    return path


@pytest.fixture(params=["qzoo", "raw_zoo"])
def any_zoo(request):
    """qzoo (Blosc, read by ShardFiles) or raw_zoo, each with the views "everything" and "pairs6"."""
    path = request.getfixturevalue(request.param)
    if request.param == "qzoo":
        build_view(path, "split", "everything")
        build_view(path, "pairs", "pairs6", cap=6)
    return path


def _ids(batches, key="ids"):
    return np.concatenate([b[key].numpy() for b in batches]) if batches else np.empty(0, np.int64)


def test_single_mode_batches_hold_the_right_rows(qzoo, all_view, zoo_params, zoo_meta):
    s = CheckpointStream(qzoo, all_view, batch_size=10, shuffle_buffer=20)
    batches = list(s)
    assert [len(b["ids"]) for b in batches] == [10] * 11 + [7] and len(s) == 12
    ids = _ids(batches)
    assert sorted(ids) == list(range(117))
    assert not np.array_equal(ids, np.arange(117))  # shuffled
    b = batches[0]
    assert b["params"].dtype == torch.float32 and b["params"].shape == (10, 211) and b["ids"].dtype == torch.int64
    assert b["losses"].shape == (10, 4)
    params = torch.cat([b["params"] for b in batches]).numpy()
    losses = torch.cat([b["losses"] for b in batches]).numpy()
    assert np.array_equal(params, zoo_params[ids])
    assert np.allclose(losses, zoo_meta[[f"loss_{k}" for k in range(4)]].to_numpy()[ids])


def test_pair_mode(qzoo, pair_view, zoo_params):
    view = load_view(qzoo, pair_view)[0].to_pandas()
    s = CheckpointStream(qzoo, pair_view, batch_size=8, shuffle_buffer=12)
    batches = list(s)
    rows = _ids(batches, "rows")
    assert sorted(rows) == list(range(len(view)))
    for b in batches:
        r = b["rows"].numpy()
        assert np.array_equal(b["ids"].numpy(), view.checkpoint_id.values[r])
        assert np.array_equal(b["target_ids"].numpy(), view.target_id.values[r])
        assert np.array_equal(b["params"].numpy(), zoo_params[b["ids"].numpy()])
        assert np.array_equal(b["target_params"].numpy(), zoo_params[b["target_ids"].numpy()])
        assert np.allclose(b["target_losses"].numpy(), view[[f"target_loss_{k}" for k in range(4)]].values[r])


@pytest.mark.parametrize("pairs", [False, True])
def test_every_row_once_across_two_ranks_and_two_workers(any_zoo, zoo_params, pairs):
    qzoo, all_view, pair_view = any_zoo, "everything", "pairs6"
    view = pair_view if pairs else all_view
    n_rows = load_view(qzoo, view)[1]["rows"]
    seen = []
    counts = []
    for rank in range(2):
        s = CheckpointStream(qzoo, view, batch_size=7, shuffle_buffer=16, rank=rank, world_size=2, seed=5,
                             permute=pairs)
        s.set_epoch(1)
        batches = list(make_loader(s, num_workers=2, pin_memory=False))
        assert len(batches) == len(s)
        counts.append(sum(len(b["ids"]) for b in batches))
        for b in batches:
            if not pairs:
                assert np.array_equal(b["params"].numpy(), zoo_params[b["ids"].numpy()])
        seen.append(_ids(batches, "rows"))
    allrows = np.concatenate(seen)
    assert sorted(allrows) == list(range(n_rows)) and abs(counts[0] - counts[1]) <= 1
    if pairs:
        return
    # the same epoch read in one process gives the same per-rank sets (workers only split the work)
    s = CheckpointStream(qzoo, all_view, batch_size=7, shuffle_buffer=16, rank=0, world_size=2, seed=5)
    s.set_epoch(1)
    assert set(_ids(list(s), "rows")) == set(seen[0])


@pytest.mark.parametrize("even, per_rank", [("pad", 30), ("trim", 29)])
def test_even_ranks(qzoo, all_view, even, per_rank):
    got = []
    for rank in range(4):
        s = CheckpointStream(qzoo, all_view, batch_size=8, rank=rank, world_size=4, even_ranks=even)
        got.append(_ids(list(s)))
        assert len(got[-1]) == per_rank and len(s) == 4
    allids = np.concatenate(got)
    if even == "pad":
        assert set(allids) == set(range(117)) and len(allids) == 120
    else:
        assert len(set(allids)) == len(allids) == 116


def test_deterministic_for_seed_and_epoch(any_zoo):
    def order(seed, epoch, **kw):
        s = CheckpointStream(any_zoo, "everything", batch_size=16, shuffle_buffer=24, seed=seed, **kw)
        s.set_epoch(epoch)
        return _ids(list(s))

    a = order(0, 0)
    assert np.array_equal(a, order(0, 0))
    assert not np.array_equal(a, order(0, 1)) and not np.array_equal(a, order(1, 0))
    assert np.array_equal(order(0, 0, shuffle=False), np.arange(117))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_yields_exactly_the_rest(any_zoo, workers):
    def stream():
        s = CheckpointStream(any_zoo, "everything", batch_size=9, shuffle_buffer=20, seed=2)
        s.set_epoch(3)
        return s

    full = _ids(list(make_loader(stream(), num_workers=workers, pin_memory=False)))
    assert sorted(full) == list(range(117))
    s = stream()
    loader = make_loader(s, num_workers=workers, pin_memory=False)
    it = iter(loader)
    head = [next(it) for _ in range(5)]
    state = s.state_dict()
    del it, loader
    assert state["consumed"] == 45 and state["epoch"] == 3
    s2 = stream()
    s2.set_epoch(0)  # load_state_dict restores the epoch
    s2.load_state_dict(state)
    rest = _ids(list(make_loader(s2, num_workers=workers, pin_memory=False)))
    assert np.array_equal(np.concatenate([_ids(head), rest]), full)
    assert s2.state_dict()["consumed"] == 117
    # the following epoch starts from the beginning again
    s2.set_epoch(4)
    assert len(_ids(list(s2))) == 117


def test_resume_mid_batch_and_mismatch(qzoo, all_view):
    s = CheckpointStream(qzoo, all_view, batch_size=10, seed=1)
    full = _ids(list(s))
    state = s.state_dict()
    state["consumed"] = 33  # not on a batch boundary
    s.load_state_dict(state)
    rest = list(s)
    assert np.array_equal(_ids(rest), full[33:]) and len(rest[0]["ids"]) == 7
    other = CheckpointStream(qzoo, all_view, batch_size=12, seed=1)
    with pytest.raises(HyperForgetError, match="batch_size"):
        other.load_state_dict(state)


def test_permutation_augmentation_preserves_function(qzoo, pair_view, zoo_params, tiny_dataset, tiny_spec):
    s = CheckpointStream(qzoo, pair_view, batch_size=16, permute=True)
    b = next(iter(s))
    raw = torch.as_tensor(zoo_params[b["ids"].numpy()])
    traw = torch.as_tensor(zoo_params[b["target_ids"].numpy()])
    assert not torch.equal(b["params"], raw)  # some permutation is not the identity
    x = torch.as_tensor(tiny_dataset.x_test[:50])
    assert torch.allclose(batched_logits(tiny_spec, b["params"], x), batched_logits(tiny_spec, raw, x), atol=1e-5)
    assert torch.allclose(batched_logits(tiny_spec, b["target_params"], x), batched_logits(tiny_spec, traw, x),
                          atol=1e-5)
    # θ and θ* got the same permutation: recover it from fc1.bias of each
    h = tiny_spec.hidden
    off = tiny_spec.layout.slot("fc1.bias").offset
    for i in range(16):
        p1 = [int(np.argmin(np.abs(raw[i, off:off + h].numpy() - v))) for v in b["params"][i, off:off + h].numpy()]
        p2 = [int(np.argmin(np.abs(traw[i, off:off + h].numpy() - v))) for v in b["target_params"][i, off:off + h].numpy()]
        assert p1 == p2
    # the index maps agree with an explicit per-layer permutation
    perms = hidden_permutations(np.arange(3, dtype=np.uint64), h)
    idx = permutation_index(tiny_spec, perms)
    w = tiny_spec.layout.unflatten(raw[:3])
    moved = tiny_spec.layout.unflatten(torch.take_along_dim(raw[:3], torch.as_tensor(idx), 1))
    for i in range(3):
        pi = torch.as_tensor(perms[i])
        assert torch.equal(moved["fc1.weight"][i], w["fc1.weight"][i][pi])
        assert torch.equal(moved["fc2.weight"][i], w["fc2.weight"][i][:, pi])


@pytest.mark.parametrize("mode", ["global", "layer"])
def test_normalization(qzoo, all_view, zoo_params, mode):
    from hyperforget.zoo.store import open_zoo

    stats = open_zoo(qzoo).config.normalization
    s = CheckpointStream(qzoo, all_view, batch_size=32, normalize=mode)
    b = next(iter(s))
    raw = zoo_params[b["ids"].numpy()]
    if mode == "global":
        expect = (raw - stats["mean"]) / stats["std"]
    else:
        expect = np.empty_like(raw)
        for slot in s.spec.layout.slots:
            st = stats["layers"][slot.name]
            expect[:, slot.offset:slot.stop] = (raw[:, slot.offset:slot.stop] - st["mean"]) / st["std"]
    assert np.allclose(b["params"].numpy(), expect, atol=1e-5)
    assert np.allclose(s.denormalize(b["params"]).numpy(), raw, atol=1e-5)


def test_weights_to_device_and_errors(qzoo, tmp_path):
    build_view(qzoo, "balanced", "bw", mode="weights", n_bins=3)
    b = next(iter(CheckpointStream(qzoo, "bw", batch_size=5)))
    assert b["weights"].shape == (5,)
    moved = to_device(b, "cpu")
    assert set(moved) == set(b) and torch.equal(moved["params"], b["params"])
    with pytest.raises(HyperForgetError, match="no view"):
        CheckpointStream(qzoo, "missing")
    with pytest.raises(HyperForgetError, match="normalize"):
        CheckpointStream(qzoo, "bw", normalize="batch")
    with pytest.raises(HyperForgetError, match="rank"):
        CheckpointStream(qzoo, "bw", rank=2, world_size=2)


def test_shard_files_match_zarr_and_catch_damage(qzoo, all_view, zoo_params):
    import glob

    from hyperforget.zoo.store import open_zoo
    from hyperforget.zoo.store.shards import ShardFiles

    cfg = open_zoo(qzoo).config
    files = ShardFiles.open(qzoo, cfg.chunk_rows, cfg.shard_rows, cfg.num_params)
    assert files is not None and files.blosc
    for c in range(-(-117 // 8)):
        n = min(8, 117 - 8 * c)
        assert np.array_equal(files.chunk(c)[:n], zoo_params[8 * c:8 * c + n])
    fast = _ids(list(CheckpointStream(qzoo, all_view, batch_size=16, seed=4)))
    slow = _ids(list(CheckpointStream(qzoo, all_view, batch_size=16, seed=4, fast_reads=False)))
    assert np.array_equal(fast, slow)
    # flip one byte inside the first chunk: the checksum catches it
    shard = sorted(glob.glob(f"{qzoo}/params.zarr/c/0/0"))[0]
    data = bytearray(open(shard, "rb").read())
    data[20] ^= 0xFF
    open(shard, "wb").write(bytes(data))
    with pytest.raises(HyperForgetError, match="checksum"):
        ShardFiles.open(qzoo, cfg.chunk_rows, cfg.shard_rows, cfg.num_params).chunk(0)


def test_each_chunk_is_read_once_per_epoch(qzoo, all_view, monkeypatch):
    from hyperforget.zoo.store.shards import ShardFiles

    calls = []
    real = ShardFiles.chunk
    monkeypatch.setattr(ShardFiles, "chunk", lambda self, c: calls.append(c) or real(self, c))
    s = CheckpointStream(qzoo, all_view, batch_size=16, shuffle_buffer=30, chunk_cache=1)
    assert len(_ids(list(s))) == 117
    assert sorted(calls) == list(range(15))  # 117 rows in chunks of 8


@pytest.mark.parametrize("capacity, batch", [(0, 5), (7, 4), (50, 16), (1000, 3)])
def test_buffer_plan_is_a_bounded_permutation(capacity, batch):
    from hyperforget.queries.loader import PIECE_ROWS, _BufferPlan

    rng = np.random.default_rng(capacity)
    sizes = rng.integers(1, 40, size=30)
    bounds = np.r_[0, np.cumsum(sizes)]
    n = int(bounds[-1])
    plan = _BufferPlan(bounds, n, capacity, np.random.default_rng(1), batch)
    assert sorted(plan.out_pos) == list(range(n))
    assert plan.store_rows <= capacity + PIECE_ROWS + batch
    sizes_out = [len(s) for step in plan.ready for s, _ in step]
    assert all(k == batch for k in sizes_out[:-1]) and 0 < sizes_out[-1] <= batch
    # no slot is reused while a row in it is still waiting to be gathered
    live = {}
    for s in range(len(bounds) - 1):
        for slot, pos in zip(plan.slots[bounds[s]:bounds[s + 1]], range(bounds[s], bounds[s + 1])):
            assert slot not in live
            live[slot] = pos
        for slots, pos in plan.ready[s]:
            for slot, q in zip(slots, pos):
                assert live.pop(slot) == q
    for slots, pos in plan.ready[-1]:
        for slot, q in zip(slots, pos):
            assert live.pop(slot) == q
    assert not live
    if capacity == 0:
        assert np.array_equal(plan.out_pos, np.arange(n))


def test_uncompressed_zoo_reads_through_mapped_shards(tmp_path, tiny_spec):
    from hyperforget.zoo.store import ZooConfig, create_zoo, open_zoo
    from hyperforget.zoo.store.shards import ShardFiles

    path = str(tmp_path / "raw-zoo")
    rng = np.random.default_rng(0)
    cfg = ZooConfig(tiny_spec, (0, 1, 2, 3), pivots=(0, 1), compressor="none", chunk_rows=8, shard_rows=16)
    with create_zoo(path, cfg) as w:
        for start, n in [(0, 21), (21, 30)]:  # the second commit rewrites the half-filled shard 1
            ids = np.arange(start, start + n)
            meta = {"run_id": ids // 10, "step": ids % 10, "epoch": np.zeros(n), "phase": ["learning"] * n,
                    "test_loss": rng.random(n), "test_acc": rng.random(n)}
            for k in range(4):
                meta[f"loss_{k}"], meta[f"acc_{k}"] = rng.random(n), rng.random(n)
            w.commit(rng.normal(size=(n, tiny_spec.num_params)).astype(np.float32), meta, key=f"k{start}")
    r = open_zoo(path, fast_reads=False)  # zarr, to check the shard files against
    files = ShardFiles.open(path, 8, 16, tiny_spec.num_params)
    assert files is not None and not files.blosc
    for c in range(7):
        n = min(8, 51 - 8 * c)
        assert np.array_equal(files.chunk(c)[:n], r.read_rows(8 * c, 8 * c + n))
    build_view(path, "split", "all_rows")
    batches = list(CheckpointStream(path, "all_rows", batch_size=5, shuffle_buffer=9))
    ids = _ids(batches)
    assert sorted(ids) == list(range(51))
    assert np.array_equal(torch.cat([b["params"] for b in batches]).numpy(), r.read_rows(0, 51)[ids])


def test_rank_and_world_size_come_from_torch_distributed(qzoo, all_view, monkeypatch):
    import torch.distributed as dist

    s = CheckpointStream(qzoo, all_view, batch_size=10, seed=3)  # built before the process group
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    got = _ids(list(s))
    assert (s.rank, s.world_size) == (1, 2) and s.state_dict()["world_size"] == 2
    explicit = CheckpointStream(qzoo, all_view, batch_size=10, seed=3, rank=1, world_size=2)
    assert np.array_equal(got, _ids(list(explicit))) and len(got) == 117 - 117 // 2


def test_two_iterations_at_once_do_not_share_buffers(qzoo, all_view, zoo_params):
    s = CheckpointStream(qzoo, all_view, batch_size=10, shuffle_buffer=40)
    a, b = iter(s), iter(s)
    for x, y in zip(a, b):
        assert torch.equal(x["ids"], y["ids"])
        assert np.array_equal(x["params"].numpy(), zoo_params[x["ids"].numpy()])
        assert np.array_equal(y["params"].numpy(), zoo_params[y["ids"].numpy()])


def test_mapped_shards_match_zarr_reads(any_zoo):
    """Uncompressed zoos gather batches straight from the mapped shard files; the batches are the
    ones the zarr path gives, normalization and augmentation included."""
    for view, kw in [("everything", {"normalize": "layer"}), ("pairs6", {"permute": True, "normalize": "global"})]:
        fast = CheckpointStream(any_zoo, view, batch_size=13, shuffle_buffer=20, seed=7, **kw)
        lean = CheckpointStream(any_zoo, view, batch_size=13, shuffle_buffer=20, seed=7, release_pages=True, **kw)
        slow = CheckpointStream(any_zoo, view, batch_size=13, shuffle_buffer=20, seed=7, fast_reads=False, **kw)
        for e in (0, 1):
            fast.set_epoch(e), lean.set_epoch(e), slow.set_epoch(e)
            want = list(slow)
            for got in (list(fast), list(lean)):
                assert len(got) == len(want)
                for a, b in zip(got, want):
                    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert (fast._mapped is not None) == any_zoo.endswith("raw-qzoo")


def test_mapped_shards_check_each_chunk_once_and_catch_damage(raw_zoo, monkeypatch):
    import google_crc32c

    checked = []
    real = google_crc32c.value
    monkeypatch.setattr(google_crc32c, "value", lambda b: checked.append(len(b)) or real(b))
    s = CheckpointStream(raw_zoo, "everything", batch_size=16, shuffle_buffer=30)
    for e in range(2):
        s.set_epoch(e)
        assert len(_ids(list(s))) == 117
    chunk_bytes = 8 * s.spec.num_params * 4
    assert checked.count(chunk_bytes) == 15  # 117 rows in chunks of 8, each checked in the first epoch only
    # flip one byte of chunk 1 (shard 0 holds chunks 0-3, stored in order): a fresh stream names it
    shard = f"{raw_zoo}/params.zarr/c/0/0"
    data = bytearray(open(shard, "rb").read())
    data[chunk_bytes + 4 + 100] ^= 0xFF
    open(shard, "wb").write(bytes(data))
    with pytest.raises(HyperForgetError, match="chunk 1 of .*checksum mismatch"):
        list(CheckpointStream(raw_zoo, "everything", batch_size=16, shuffle=False))


def test_buffer_displacement_matches_one_row_at_a_time():
    """The vectorized shuffle buffer (_replace) against the textbook loop it stands for."""
    from hyperforget.queries.loader import _replace

    rng = np.random.default_rng(0)
    for trial in range(200):
        capacity, m = int(rng.integers(1, 8)), int(rng.integers(0, 40))  # small: many repeated places
        held = rng.permutation(100)[:capacity]
        new = np.arange(100, 100 + m)
        got_held = held.copy()
        got = _replace(got_held, new, np.random.default_rng(trial))
        place = np.random.default_rng(trial).integers(0, capacity, m)
        want, want_held = [], held.copy()
        for k in range(m):
            want.append(want_held[place[k]])
            want_held[place[k]] = new[k]
        assert list(got) == want and list(got_held) == list(want_held)
