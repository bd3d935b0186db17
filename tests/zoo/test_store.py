"""The zoo format: round trips, atomic commits under SIGKILL, corruption detection, fsspec, errors."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.mlp import MLPSpec, batched_logits
from hyperforget.zoo.store import (COMPRESSORS, DEFAULT_COMPRESSOR, ZooConfig, ZooWriter, compact,
                                   compute_normalization, create_zoo, open_zoo, verify_zoo, zoo_info)

torch.set_num_threads(1)
SPEC = MLPSpec(64, 3, 4)
P = SPEC.num_params

# Deterministic batches shared by the test and the writer subprocess it kills.
BATCH_SRC = r'''
import numpy as np
def batch(i, p=211, c=4):
    n = 1 + (i * 7919) % 23
    rng = np.random.default_rng(i)
    params = rng.normal(size=(n, p)).astype(np.float32)
    meta = {"run_id": np.full(n, i), "step": np.arange(n), "epoch": np.zeros(n, int),
            "phase": ["learning"] * n, "test_loss": rng.random(n), "test_acc": rng.random(n)}
    for k in range(c):
        meta[f"loss_{k}"] = rng.random(n)
        meta[f"acc_{k}"] = rng.random(n)
    return params, meta
'''
_ns: dict = {}
exec(BATCH_SRC, _ns)
batch = _ns["batch"]


def config(**kw) -> ZooConfig:
    return ZooConfig(SPEC, (0, 1, 2, 3), (0, 1), chunk_rows=kw.pop("chunk_rows", 8),
                     shard_rows=kw.pop("shard_rows", 32), **kw)


# ---------------------------------------------------------------------------------------------
# Round trips


def test_round_trip_odd_sizes(tiny_zoo):
    path, params = tiny_zoo()  # 117 rows, 8-row chunks, 32-row shards -> 15 chunks, 4 shards
    r = open_zoo(path)
    assert r.num_rows == 117 and r.spec == SPEC
    np.testing.assert_array_equal(r.read_rows(0, 117), params)
    np.testing.assert_array_equal(r.read_rows(30, 71), params[30:71])
    ids = np.random.default_rng(1).permutation(117)
    np.testing.assert_array_equal(r.read(ids), params[ids])
    dup = np.array([116, 3, 3, 64, 0, 116, 9, 3])
    np.testing.assert_array_equal(r.read(dup), params[dup])
    np.testing.assert_array_equal(r.read(torch.tensor([5, 1])), params[[5, 1]])
    assert r.read([]).shape == (0, P)
    blocks = list(r.iter_rows(batch_rows=50))
    assert [b[0] for b in blocks] == [0, 50, 100]
    np.testing.assert_array_equal(np.concatenate([b[1] for b in blocks]), params)


def test_reader_reads_shard_files_and_falls_back_to_zarr(tiny_zoo, monkeypatch):
    """A local zoo's rows come from the shard files; on damage the call goes to zarr: same arrays, same errors."""
    from hyperforget.zoo.store.shards import ShardFiles

    path, params = tiny_zoo()
    calls = []
    real = ShardFiles.chunk
    monkeypatch.setattr(ShardFiles, "chunk", lambda self, c: calls.append(c) or real(self, c))
    ids = np.array([116, 3, 3, 64, 0, 33])

    def outcome(read):
        try:
            return read()
        except Exception as exc:
            return type(exc), str(exc)

    def same_as_zarr(case):
        fast, slow = open_zoo(path), open_zoo(path, fast_reads=False)
        for read in (lambda r: r.read_rows(0, 117), lambda r: r.read_rows(30, 71), lambda r: r.read(ids)):
            a, b = outcome(lambda: read(fast)), outcome(lambda: read(slow))
            assert type(a) is type(b) and (np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b), case
        return a

    np.testing.assert_array_equal(same_as_zarr("intact"), params[ids])
    assert sorted(set(calls)) == list(range(15))  # every chunk came from the shard files
    shard = os.path.join(path, "params.zarr", "c", "1", "0")
    data = bytearray(open(shard, "rb").read())
    data[40] ^= 0x10
    open(shard, "wb").write(bytes(data))
    assert "checksum" in same_as_zarr("one byte flipped")[1]
    os.remove(shard)
    assert not same_as_zarr("shard missing")[-1].any()  # row 33: zarr's fill value


def test_metadata_and_ids(tiny_zoo, tiny_dataset):
    path, params = tiny_zoo()
    r = open_zoo(path)
    meta = r.metadata()
    assert meta.num_rows == 117
    np.testing.assert_array_equal(meta.column("checkpoint_id").to_numpy(), np.arange(117))
    perm = meta.column("perm_index").to_numpy()
    src = meta.column("source_id").to_numpy()
    ids = np.arange(117)
    assert np.all(src[perm == 0] == ids[perm == 0])
    assert np.all(src[perm == 1] == ids[perm == 1] - 1)  # conftest copies the previous row
    # A permuted copy computes the same function as its source.
    copy = int(np.flatnonzero(perm == 1)[0])
    x = torch.as_tensor(tiny_dataset.x_test)
    out = batched_logits(SPEC, torch.as_tensor(r.read([copy, int(src[copy])])), x)
    torch.testing.assert_close(out[0], out[1], rtol=1e-5, atol=1e-5)
    # The module view agrees with batched evaluation.
    with torch.no_grad():
        torch.testing.assert_close(r.module(7)(x), batched_logits(SPEC, torch.as_tensor(params[7:8]), x)[0])
    assert meta.schema.field("undersampled").type == pa.list_(pa.int8())
    assert set(meta.column("phase").to_pylist()) == {"learning", "forgetting"}
    rel = r.duckdb()
    assert rel.aggregate("count(*), count(DISTINCT run_id)").fetchall() == [(117, 9)]
    assert len(r.meta_files()) == 9 and all(os.path.exists(f) for f in r.meta_files())


def test_commit_is_idempotent_and_reopen_continues(tmp_path):
    path = str(tmp_path / "z")
    with create_zoo(path, config()) as w:
        p0, m0 = batch(0)
        ids0 = w.commit(p0, m0, "b0")
        again = w.commit(batch(5)[0], batch(5)[1], "b0")  # same key: skipped, same ids
        np.testing.assert_array_equal(ids0, again)
        assert w.num_rows == len(p0)
    with pytest.raises(HyperForgetError, match="already exists"):
        create_zoo(path, config())
    with ZooWriter.open(path) as w:
        with pytest.raises(HyperForgetError, match="another process"):
            ZooWriter.open(path)
        ids1 = w.commit(*batch(1), key="b1")
        assert ids1[0] == len(p0) and w.committed_keys == {"b0", "b1"}
    with create_zoo(path, config(), exist_ok=True) as w:  # exist_ok reopens
        assert w.num_rows == len(p0) + len(batch(1)[0])
    r = open_zoo(path)
    np.testing.assert_array_equal(r.read_rows(0, r.num_rows), np.concatenate([p0, batch(1)[0]]))


def test_interrupted_commit_stages_are_discarded(tmp_path, monkeypatch):
    """A failure after the params (and after the Parquet part) leaves the zoo at its last commit."""
    path = str(tmp_path / "z")
    w = create_zoo(path, config())
    w.commit(*batch(0), key="b0")
    n0 = w.num_rows
    def boom(*a, **k):
        raise KeyboardInterrupt("killed")

    # Die before the Parquet part (params rows written), then before the manifest (part written).
    for stage in ("_write_part", "_write_manifest"):
        monkeypatch.setattr(ZooWriter, stage, boom)
        with pytest.raises(KeyboardInterrupt):
            w.commit(*batch(1), key="b1")
        monkeypatch.undo()
        w.close()
        assert open_zoo(path).num_rows == n0
        rep = verify_zoo(path)
        assert rep.ok, rep.problems
        w = ZooWriter.open(path)
        assert w.num_rows == n0 and w.committed_keys == {"b0"}
        if stage == "_write_manifest":
            assert w.recovered["orphan_parts"] == 1
        assert os.listdir(os.path.join(path, "meta")) == ["part-000000.parquet"]
    w.commit(*batch(1), key="b1")
    w.close()
    r = open_zoo(path)
    np.testing.assert_array_equal(r.read_rows(n0, r.num_rows), batch(1)[0])
    assert verify_zoo(path).ok


CHILD = BATCH_SRC + r'''
import sys
from hyperforget.zoo.store import ZooWriter
w = ZooWriter.open(sys.argv[1])
print("ready", flush=True)
for i in range(int(sys.argv[2])):
    fresh = f"b{i}" not in w.committed_keys
    w.commit(*batch(i), key=f"b{i}")
    if fresh:
        print("c", flush=True)
w.close()
print("done", flush=True)
'''


def _child(path: str, upto: int) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-c", CHILD, path, str(upto)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def _check_committed(path: str) -> int:
    """Every committed key holds exactly its batch; returns the number of committed batches."""
    r = open_zoo(path)
    keys = r.committed_keys
    k = len(keys)
    assert keys == {f"b{i}" for i in range(k)}  # the child commits in order
    expect = [batch(i) for i in range(k)]
    n = sum(len(p) for p, _ in expect)
    assert r.num_rows == n
    if n:
        np.testing.assert_array_equal(r.read_rows(0, n), np.concatenate([p for p, _ in expect]))
        run = r.metadata(columns=["run_id"]).column("run_id").to_numpy()
        np.testing.assert_array_equal(run, np.concatenate([np.full(len(p), i) for i, (p, _) in enumerate(expect)]))
    return k


def _forked_writer(path: str, fd: int) -> None:
    """Body of a forked writer: commit b0, b1, ... in order, write one byte per fresh commit."""
    w = ZooWriter.open(path)
    os.write(fd, b"r")
    for i in range(10_000):
        fresh = f"b{i}" not in w.committed_keys
        w.commit(*batch(i), key=f"b{i}")
        if fresh:
            os.write(fd, b"c")


def test_writer_killed_mid_commit_resumes(tmp_path):
    """SIGKILL a writer process at random instants of its commits; the zoo always verifies."""
    import multiprocessing

    path = str(tmp_path / "z")
    create_zoo(path, config()).close()
    rng = np.random.default_rng(7)
    progress = []
    # Forked writers start in milliseconds (a fresh interpreter needs seconds to import torch),
    # so the test can kill many of them; zarr and pyarrow reset their threads after a fork.
    ctx = multiprocessing.get_context("fork")
    for _ in range(10):
        rfd, wfd = os.pipe()
        child = ctx.Process(target=_forked_writer, args=(path, wfd), daemon=True)
        child.start()
        os.close(wfd)
        assert os.read(rfd, 1) == b"r"
        # Let it commit a few batches (~20 ms each: params shard, Parquet part, manifest), then
        # kill it at a random instant of the following ones.
        for _ in range(int(rng.integers(1, 4))):
            assert os.read(rfd, 1) == b"c"
        time.sleep(float(rng.uniform(0.0, 0.04)))
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        os.close(rfd)
        assert child.exitcode == -signal.SIGKILL
        rep = verify_zoo(path)
        assert rep.ok, rep.problems
        progress.append(_check_committed(path))
    assert progress[0] > 0 and progress == sorted(progress)
    # Resume to completion in a fresh interpreter: committed keys are skipped, nothing is
    # duplicated, leftovers are cleaned.
    target = _check_committed(path) + 5
    child = _child(path, target)
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0, err
    assert _check_committed(path) == target
    rep = verify_zoo(path)
    assert rep.ok and not any("uncommitted file" in n for n in rep.notes), (rep.problems, rep.notes)


# ---------------------------------------------------------------------------------------------
# Corruption detection


def test_verify_names_corrupt_shard_chunk_and_parquet(tiny_zoo):
    path, _ = tiny_zoo()
    assert verify_zoo(path).ok
    shard1 = os.path.join(path, "params.zarr", "c", "1", "0")
    with open(shard1, "wb") as f:
        f.write(b"garbage" * 50)
    # One bit flipped inside the first chunk of shard 2: crc32c names that chunk.
    shard2 = os.path.join(path, "params.zarr", "c", "2", "0")
    data = bytearray(open(shard2, "rb").read())
    data[40] ^= 0x10
    open(shard2, "wb").write(bytes(data))
    part = os.path.join(path, "meta", "part-000003.parquet")
    size = os.path.getsize(part)
    with open(part, "r+b") as f:
        f.truncate(size // 2)
    rep = verify_zoo(path)
    assert not rep.ok
    text = "\n".join(rep.problems)
    assert "params.zarr/c/1/0 (rows 32-63)" in text
    assert "params.zarr/c/2/0 chunk rows 64-71: corrupt" in text
    assert "meta/part-000003.parquet: unreadable Parquet file" in text
    assert len(rep.problems) == 3, rep.problems


def test_verify_finds_missing_shard_nan_and_bad_ids(tiny_zoo):
    import zarr

    path, _ = tiny_zoo()
    arr = zarr.open_array(os.path.join(path, "params.zarr"), mode="r+")
    row = arr[40]
    row[3] = np.nan
    arr[40] = row
    os.remove(os.path.join(path, "params.zarr", "c", "3", "0"))
    part = os.path.join(path, "meta", "part-000001.parquet")
    t = pq.read_table(part)
    ids = t.column("checkpoint_id").to_numpy().copy()
    ids[1] = ids[0]
    pq.write_table(t.set_column(0, "checkpoint_id", pa.array(ids)), part)
    rep = verify_zoo(path)
    text = "\n".join(rep.problems)
    assert "params.zarr/c/1/0 (rows 32-63): 1 rows hold NaN or inf (first: checkpoint 40)" in text
    assert "params.zarr/c/3/0 (rows 96-116): shard file missing" in text
    assert "meta/part-000001.parquet: checkpoint ids are not exactly 13..25" in text


def test_verify_and_open_report_truncated_array(tmp_path):
    path = str(tmp_path / "z")
    with create_zoo(path, config()) as w:
        w.commit(*batch(3), key="b3")
    meta = json.load(open(os.path.join(path, "manifest.json")))
    meta["num_rows"] = 10_000
    meta["parts"][0]["stop"] = 10_000
    json.dump(meta, open(os.path.join(path, "manifest.json"), "w"))
    with pytest.raises(HyperForgetError, match="truncated"):
        open_zoo(path)
    rep = verify_zoo(path)
    assert any("truncated" in p for p in rep.problems)


# ---------------------------------------------------------------------------------------------
# Errors


def test_clear_errors(tmp_path):
    with pytest.raises(HyperForgetError, match=r"no zoo at .* \(zoo.json missing\)"):
        open_zoo(tmp_path / "nothing")
    with pytest.raises(HyperForgetError, match="zoo.json missing"):
        verify_zoo(tmp_path / "nothing")
    path = str(tmp_path / "z")
    w = create_zoo(path, config())
    p, m = batch(2)
    with pytest.raises(HyperForgetError, match=r"batch 'x': parameters have shape \(\d+, 210\).*needs \(n, 211\)"):
        w.commit(p[:, :-1], m, "x")
    bad = p.copy()
    bad[1, 5] = np.inf
    with pytest.raises(HyperForgetError, match="batch 'x': 1 parameter rows hold NaN or inf"):
        w.commit(bad, m, "x")
    with pytest.raises(HyperForgetError, match="cannot be stored as float32"):
        w.commit(p.astype(object), m, "x")
    with pytest.raises(HyperForgetError, match=r"lacks columns \['acc_3'\]"):
        w.commit(p, {k: v for k, v in m.items() if k != "acc_3"}, "x")
    with pytest.raises(HyperForgetError, match=r"\['loss_4'\] are beyond the task's 4 classes"):
        w.commit(p, {**m, "loss_4": m["loss_0"]}, "x")
    with pytest.raises(HyperForgetError, match="must not carry checkpoint_id"):
        w.commit(p, {**m, "checkpoint_id": np.arange(len(p))}, "x")
    with pytest.raises(HyperForgetError, match="are not learning or forgetting"):
        w.commit(p, {**m, "phase": ["learn"] * len(p)}, "x")
    with pytest.raises(HyperForgetError, match="source_offset must index rows"):
        w.commit(p, {**m, "source_offset": np.full(len(p), len(p))}, "x")
    with pytest.raises(HyperForgetError, match="other lengths"):
        w.commit(p[:2], m, "x")
    with pytest.raises(HyperForgetError, match="column step cannot be stored"):
        w.commit(p, {**m, "step": ["a"] * len(p)}, "x")
    assert w.num_rows == 0 and not w.committed_keys
    w.commit(p, m, "ok")
    with pytest.raises(HyperForgetError, match=r"columns differ from the zoo's \(extra \['note'\]"):
        w.commit(*batch(3)[:1], {**batch(3)[1], "note": ["x"] * len(batch(3)[0])}, key="y")
    w.close()
    with pytest.raises(HyperForgetError, match="closed"):
        w.commit(p, m, "z")
    r = open_zoo(path)
    with pytest.raises(HyperForgetError, match=r"checkpoint id \d+ is outside"):
        r.read([0, r.num_rows])
    with pytest.raises(HyperForgetError, match="outside"):
        r.read_rows(0, r.num_rows + 1)
    # Wrong format version.
    zj = os.path.join(path, "zoo.json")
    d = json.load(open(zj))
    json.dump({**d, "version": 2}, open(zj, "w"))
    with pytest.raises(HyperForgetError, match="zoo format version 2 is not supported; expected 1"):
        open_zoo(path)
    # The spec no longer matches the stored rows.
    d["mlp"]["hidden"] = 4
    d["array"].pop("num_params")
    json.dump(d, open(zj, "w"))
    with pytest.raises(HyperForgetError, match=r"params.zarr has rows of 211 values .* 64-4-4 needs 280"):
        open_zoo(path)
    # Config errors.
    with pytest.raises(HyperForgetError, match="multiple of chunk_rows"):
        ZooConfig(SPEC, (0, 1, 2, 3), chunk_rows=8, shard_rows=12)
    with pytest.raises(HyperForgetError, match="one original class id per output"):
        ZooConfig(SPEC, (0, 1, 2))
    with pytest.raises(HyperForgetError, match="not empty and holds no zoo"):
        os.makedirs(tmp_path / "busy")
        (tmp_path / "busy" / "x.txt").write_text("mine")
        create_zoo(tmp_path / "busy", config())


def test_config_round_trip_and_default_chunking():
    cfg = ZooConfig(MLPSpec(784, 2, 4), (0, 1, 2, 3), (0, 1), dataset={"name": "mnist-5k"})
    assert cfg.chunk_rows == 256 and cfg.shard_rows == 4096  # 1582 floats * 256 = 1.6 MB per chunk
    back = ZooConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert back == cfg
    assert ZooConfig(MLPSpec(784, 7, 10), tuple(range(10))).chunk_rows == 64  # 5575 floats/row


@pytest.mark.parametrize("compressor", COMPRESSORS)
def test_every_compressor_round_trips_and_is_recorded(tmp_path, compressor):
    """Zoos written with any compressor, an earlier default included, read back bit for bit."""
    path = str(tmp_path / compressor)
    with create_zoo(path, config(compressor=compressor)) as w:
        for i in range(3):
            w.commit(*batch(i, p=P), key=f"b{i}")
    want = np.concatenate([batch(i, p=P)[0] for i in range(3)])
    r = open_zoo(path)
    assert r.config.compressor == compressor and np.array_equal(r.read_rows(0, len(want)), want)
    assert verify_zoo(path).ok
    names = json.dumps(json.load(open(os.path.join(path, "params.zarr", "zarr.json")))["codecs"])
    assert ("lz4" in names) == (compressor == "blosc-lz4-shuffle")
    assert ZooConfig(SPEC, (0, 1, 2, 3)).compressor == DEFAULT_COMPRESSOR == "blosc-lz4-shuffle"


# ---------------------------------------------------------------------------------------------
# fsspec, compaction, normalization, plain readers


def test_memory_url_round_trip(tiny_batches):
    url = f"memory://zoo-{uuid.uuid4().hex[:8]}"
    params, batches = tiny_batches(61)
    with create_zoo(url, config(chunk_rows=4, shard_rows=8)) as w:
        for key, p, meta in batches:
            w.commit(p, meta, key)
    r = open_zoo(url)
    assert r.num_rows == 61
    ids = np.array([60, 0, 33, 33, 7])
    np.testing.assert_array_equal(r.read(ids), params[ids])
    assert r.metadata().num_rows == 61
    assert r.duckdb().aggregate("count(*)").fetchall() == [(61,)]
    assert all(f.startswith("memory://") for f in r.meta_files())
    assert verify_zoo(url).ok
    info = zoo_info(url)
    assert info["checkpoints"] == 61 and info["params_bytes"] > 0
    assert compact(url, file_rows=1000)["parts_after"] == 1
    np.testing.assert_array_equal(open_zoo(url).metadata().column("checkpoint_id").to_numpy(), np.arange(61))
    with ZooWriter.open(url) as w:  # resume on fsspec
        w.commit(*batch(1), key="more")
    assert open_zoo(url).num_rows == 61 + len(batch(1)[0])


def test_compact_merges_parts(tiny_zoo):
    path, params = tiny_zoo()
    before = open_zoo(path).metadata()
    summary = compact(path, file_rows=60)
    assert summary == {"parts_before": 9, "parts_after": 3, "files_written": 2}
    r = open_zoo(path)
    assert r.metadata().equals(before)
    assert sorted(os.listdir(os.path.join(path, "meta"))) == sorted(os.path.basename(f) for f in r.meta_files())
    assert verify_zoo(path).ok
    with ZooWriter.open(path) as w:
        ids = w.commit(*batch(4)[:1], {**batch(4)[1], **_full_meta(len(batch(4)[0]))}, key="after")
    assert ids[0] == 117 and verify_zoo(path).ok


def _full_meta(n: int) -> dict:
    """Columns the tiny zoo carries beyond the required ones (every batch has the same columns)."""
    return {"reason": ["random"] * n, "undersampled": [[3]] * n, "undersample_rates": [[0.5]] * n,
            "deleted": [[]] * n, "deletion_step": np.full(n, -1), "seed": np.zeros(n, int),
            "lr": np.full(n, 0.01), "run_kind": ["random"] * n, "perm_index": np.zeros(n, int),
            "source_offset": np.arange(n)}


def test_normalization_matches_numpy(tiny_zoo):
    path, params = tiny_zoo()
    r = open_zoo(path)
    stats = compute_normalization(r, max_rows=10_000)  # >= rows: every row, so exact
    x = params.astype(np.float64)
    assert stats["rows"] == 117
    assert stats["mean"] == pytest.approx(x.mean(), rel=1e-9)
    assert stats["std"] == pytest.approx(x.std(ddof=1), rel=1e-9)
    assert stats["gpt_coeff"] == pytest.approx(0.538 / x.std(ddof=1), rel=1e-9)
    sl = SPEC.layout.slot("fc2.weight")
    assert stats["layers"]["fc2.weight"]["std"] == pytest.approx(x[:, sl.offset:sl.stop].std(ddof=1), rel=1e-9)
    sub = compute_normalization(r, max_rows=50, seed=3)
    assert sub["rows"] == 50 and sub == compute_normalization(r, max_rows=50, seed=3)
    with ZooWriter.open(path) as w:
        w.set_normalization(stats)
    assert open_zoo(path).config.normalization["gpt_coeff"] == pytest.approx(stats["gpt_coeff"])


def test_plain_zarr_and_pyarrow_read_the_zoo(tiny_zoo):
    """The README's promise: no HyperForget import needed to read a zoo."""
    import zarr

    path, params = tiny_zoo()
    manifest = json.load(open(os.path.join(path, "manifest.json")))
    n = manifest["num_rows"]
    arr = zarr.open_array(os.path.join(path, "params.zarr"), mode="r")
    np.testing.assert_array_equal(arr[:n], params)
    meta = pa.concat_tables([pq.read_table(os.path.join(path, p["file"])) for p in manifest["parts"]])
    np.testing.assert_array_equal(meta.column("checkpoint_id").to_numpy(), np.arange(n))
    spec = json.load(open(os.path.join(path, "zoo.json")))["mlp"]
    assert spec == SPEC.to_dict()


def test_zoo_info_counts(tiny_zoo):
    path, _ = tiny_zoo()
    info = zoo_info(path)
    meta = open_zoo(path).metadata()
    aug = int((meta.column("perm_index").to_numpy() > 0).sum())
    assert info["checkpoints"] == 117 and info["runs"] == 9
    assert info["augmented"] == aug > 0 and info["originals"] == 117 - aug
    assert info["params_raw_bytes"] == 117 * P * 4
    assert info["compression_ratio"] == pytest.approx(info["params_raw_bytes"] / info["params_bytes"])
    assert info["size_on_disk"] >= info["params_bytes"] + info["metadata_bytes"]


# ---------------------------------------------------------------------------------------------
# CLI


def test_cli_info_verify_compact(tiny_zoo):
    from typer.testing import CliRunner

    from hyperforget.pipelines.cli import app

    path, _ = tiny_zoo()
    runner = CliRunner()
    res = runner.invoke(app, ["zoo", "info", path, "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["checkpoints"] == 117
    res = runner.invoke(app, ["zoo", "info", path])
    assert res.exit_code == 0 and "117" in res.output
    res = runner.invoke(app, ["zoo", "verify", path])
    assert res.exit_code == 0 and "ok" in res.output.lower()
    res = runner.invoke(app, ["zoo", "compact", path])
    assert res.exit_code == 0 and "9 -> 1" in res.output
    res = runner.invoke(app, ["zoo", "normalize", path, "--max-rows", "40"])
    assert res.exit_code == 0 and open_zoo(path).config.normalization["rows"] == 40
    with open(os.path.join(path, "params.zarr", "c", "0", "0"), "wb") as f:
        f.write(b"\0" * 100)
    res = runner.invoke(app, ["zoo", "verify", path])
    assert res.exit_code == 1
    assert "params.zarr/c/0/0 (rows 0-31)" in res.output


def test_cli_exit_codes_through_main(tiny_zoo, tmp_path, monkeypatch, capsys):
    from hyperforget.pipelines.cli import main

    monkeypatch.setattr(sys, "argv", ["hyperforget", "zoo", "info", str(tmp_path / "none")])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 2
    assert "no zoo at" in capsys.readouterr().err
    path, _ = tiny_zoo()
    os.remove(os.path.join(path, "meta", "part-000002.parquet"))
    monkeypatch.setattr(sys, "argv", ["hyperforget", "zoo", "verify", path])
    with pytest.raises(SystemExit) as exc:
        main()
    assert exc.value.code == 1
    assert "PROBLEM meta/part-000002.parquet: missing" in capsys.readouterr().out


def test_reader_pickles_as_its_location(tiny_zoo):
    import pickle

    path, params = tiny_zoo()
    r = pickle.loads(pickle.dumps(open_zoo(path)))
    np.testing.assert_array_equal(r.read([116, 2]), params[[116, 2]])
    assert r.num_rows == 117


def test_a_full_disk_is_a_one_line_error(monkeypatch, capsys):
    import errno

    from hyperforget.pipelines import cli

    def full(*args, **kwargs):  # a command whose write meets a full disk
        raise OSError(errno.ENOSPC, "No space left on device", "params.zarr")

    monkeypatch.setattr(cli, "app", full)
    with pytest.raises(SystemExit) as exc:
        cli.main()
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: the disk is full (params.zarr)") and "Traceback" not in err
