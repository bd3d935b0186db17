"""Zoo write/read throughput against a raw numpy.memmap of the same data, measured in one run.

    python benchmarks/bench_store.py                  # 100k rows of P=1582 (MNIST-4), ~0.6 GB
    python benchmarks/bench_store.py --rows 1000000   # full size, ~6.3 GB raw
    python benchmarks/bench_store.py --rows 20000     # quick

Prints MB/s (raw float32 bytes per second) for: writing (zoo: atomic commits of ``--batch-rows``
checkpoints with their metadata; memmap: the same batches then flush), a sequential scan, and a
random read of ``--random`` ids (zoo: chunk-grouped read; memmap: fancy indexing), a read of
random whole chunks (what a block-shuffling loader does), and the ratio
zoo / memmap. Both files live in the same directory; the memmap's reads come from the page cache
as soon as it was written, so its numbers are an upper bound.
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np


def synthetic_params(rows: int, p: int, seed: int = 0) -> np.ndarray:
    """Weights that look trained-ish: per-run init scale plus a smooth walk (compress like real ones)."""
    rng = np.random.default_rng(seed)
    out = np.empty((rows, p), np.float32)
    run_len = 150
    for start in range(0, rows, run_len):
        n = min(run_len, rows - start)
        theta = rng.uniform(-0.036, 0.036, size=p).astype(np.float32)
        walk = np.cumsum(rng.normal(0, 0.002, size=(n, p)).astype(np.float32), axis=0)
        out[start:start + n] = theta + walk
    return out


def batch_meta(first: int, n: int, c: int = 4) -> dict:
    steps = np.arange(first, first + n)
    meta = {"run_id": steps // 150, "step": steps % 150, "epoch": (steps % 150) // 6,
            "phase": ["learning"] * n, "test_loss": np.full(n, 0.3), "test_acc": np.full(n, 0.9)}
    for k in range(c):
        meta[f"loss_{k}"] = np.full(n, 0.3)
        meta[f"acc_{k}"] = np.full(n, 0.9)
    return meta


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=100_000, help="checkpoints")
    ap.add_argument("--params", type=int, default=1582, help="P, values per checkpoint (MNIST-4: 1582)")
    ap.add_argument("--batch-rows", type=int, default=4096, help="rows per commit / memmap write")
    ap.add_argument("--random", type=int, default=10_000, help="random ids to read")
    ap.add_argument("--dir", default=None, help="where to write (default: a temp dir, removed afterwards)")
    ap.add_argument("--compressor", default="blosc-zstd-bitshuffle")
    args = ap.parse_args()

    from hyperforget.zoo.mlp import MLPSpec
    from hyperforget.zoo.store import ZooConfig, create_zoo, open_zoo

    # The MLP whose P is closest to --params (784-h-4); the benchmark needs exactly P columns.
    h = max(1, round((args.params - 4) / (784 + 1 + 4)))
    spec = MLPSpec(784, h, 4) if MLPSpec(784, h, 4).num_params == args.params else MLPSpec(args.params - 4 - 1 - 4, 1, 4)
    p = spec.num_params
    assert p == args.params, (p, args.params)
    base = args.dir or tempfile.mkdtemp(prefix="bench-store-")
    os.makedirs(base, exist_ok=True)
    zoo_path, mm_path = os.path.join(base, "zoo"), os.path.join(base, "raw.f32")
    shutil.rmtree(zoo_path, ignore_errors=True)
    data = synthetic_params(args.rows, p)
    mb = data.nbytes / 1e6
    cfg = ZooConfig(spec, (0, 1, 2, 3), compressor=args.compressor)
    print(f"{args.rows:,} rows x {p} float32 = {mb:,.0f} MB; chunks {cfg.chunk_rows} rows, shards {cfg.shard_rows} "
          f"rows, {args.compressor}; commits of {args.batch_rows} rows")
    metas = [batch_meta(s, min(args.batch_rows, args.rows - s)) for s in range(0, args.rows, args.batch_rows)]

    results = []
    # Write
    t = time.perf_counter()
    with create_zoo(zoo_path, cfg) as w:
        for i, s in enumerate(range(0, args.rows, args.batch_rows)):
            w.commit(data[s:s + args.batch_rows], metas[i], key=f"b{i}")
    t_zoo = time.perf_counter() - t
    t = time.perf_counter()
    mm = np.memmap(mm_path, dtype=np.float32, mode="w+", shape=data.shape)
    for s in range(0, args.rows, args.batch_rows):
        mm[s:s + args.batch_rows] = data[s:s + args.batch_rows]
    mm.flush()
    del mm
    t_mm = time.perf_counter() - t
    results.append(("write", t_zoo, t_mm, mb))

    # Sequential scan
    r = open_zoo(zoo_path)
    t = time.perf_counter()
    for _, block in r.iter_rows():
        pass
    t_zoo = time.perf_counter() - t
    mm = np.memmap(mm_path, dtype=np.float32, mode="r", shape=data.shape)
    t = time.perf_counter()
    for s in range(0, args.rows, cfg.shard_rows):
        np.array(mm[s:s + cfg.shard_rows])
    t_mm = time.perf_counter() - t
    results.append(("sequential read", t_zoo, t_mm, mb))

    # Random ids
    ids = np.random.default_rng(1).integers(0, args.rows, args.random)
    t = time.perf_counter()
    got = r.read(ids)
    t_zoo = time.perf_counter() - t
    t = time.perf_counter()
    ref = np.asarray(mm[ids])
    t_mm = time.perf_counter() - t
    assert np.array_equal(got, ref), "zoo and memmap disagree"
    results.append((f"random ids ({args.random:,})", t_zoo, t_mm, got.nbytes / 1e6))

    # Random whole chunks (what a block-shuffling loader reads)
    cr = cfg.chunk_rows
    n_chunks = -(-args.rows // cr)
    picks = np.random.default_rng(2).permutation(n_chunks)[:max(1, min(n_chunks, args.random // cr))]
    t = time.perf_counter()
    got = [r.read_rows(int(c) * cr, min((int(c) + 1) * cr, args.rows)) for c in picks]
    t_zoo = time.perf_counter() - t
    t = time.perf_counter()
    ref = [np.array(mm[int(c) * cr:(int(c) + 1) * cr]) for c in picks]
    t_mm = time.perf_counter() - t
    assert all(np.array_equal(a, b) for a, b in zip(got, ref))
    results.append((f"random chunks ({len(picks)} x {cr} rows)", t_zoo, t_mm, sum(g.nbytes for g in got) / 1e6))

    stored = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(zoo_path, "params.zarr"))
                 for f in fs)
    print(f"params.zarr {stored / 1e6:,.0f} MB on disk (compression ratio {data.nbytes / stored:.2f}); "
          f"memmap {os.path.getsize(mm_path) / 1e6:,.0f} MB")
    print(f"{'operation':<32}{'zoo MB/s':>10}{'memmap MB/s':>13}{'zoo/memmap':>12}")
    for name, tz, tm, size in results:
        print(f"{name:<32}{size / tz:>10,.0f}{size / tm:>13,.0f}{(size / tz) / (size / tm):>12.2f}")
    if args.dir is None:
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
