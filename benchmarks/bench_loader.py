"""Loader throughput: a shuffled epoch of CheckpointStream vs a raw numpy.memmap and a naive zarr loop.

One run builds a zoo of --rows random checkpoints of the MNIST-4 MLP (784-2-4, P = 1,582) with
the store writer (plus an identical raw float32 file for the memmap baseline), builds a view of
every row, then times:

- loader: two shuffled epochs of CheckpointStream (batch 256, shuffle buffer 16,384), in this
  process (--workers 0) or with DataLoader workers; both are timed, the second is the headline
  (the first pays one-off costs: opening the zoo, first page faults); its peak RSS is printed;
- memmap: the same rows in the same order as each loader epoch, batch by batch, gathered from
  np.memmap (the limit: no decoding, the file in the page cache);
- naive: one zarr read per row (``zarr_array[i]``), timed on the first --naive-rows rows of the
  same order and extrapolated to the epoch.

Both stores were just written, so both sit in the page cache: the comparison is CPU cost, not
disk. With --compressor both, the zoo is built twice (uncompressed and the store's default
Blosc-zstd); decoding bounds the compressed loader, and the decode-only rate is printed.

    python benchmarks/bench_loader.py                      # 200k rows, both compressors
    python benchmarks/bench_loader.py --rows 20000 --compressor none   # quick
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

import numpy as np
import psutil
import torch

from queries.loader import CheckpointStream, make_loader
from queries.views import build_view
from zoo.mlp import TASK_PRESETS
from zoo.store import ZooConfig, create_zoo, open_zoo

MB = 1e6


def build(path: str, raw_path: str, rows: int, compressor: str, run_len: int = 150, batch: int = 9000) -> float:
    """Zoo of ``rows`` random checkpoints + the same rows as raw float32; returns seconds taken."""
    spec = TASK_PRESETS["mnist4"].spec
    cfg = ZooConfig(spec, (0, 1, 2, 3), pivots=(0, 1), compressor=compressor,
                    collection={"generator": "benchmarks/bench_loader.py"})
    rng = np.random.default_rng(0)
    t0 = time.perf_counter()
    with create_zoo(path, cfg) as w, open(raw_path, "wb") as raw:
        for start in range(0, rows, batch):
            n = min(batch, rows - start)
            params = rng.normal(0, 0.1, (n, spec.num_params)).astype(np.float32)
            ids = np.arange(start, start + n)
            meta = {"run_id": ids // run_len, "step": (ids % run_len) * 10, "epoch": (ids % run_len) // 10,
                    "phase": ["learning"] * n, "test_loss": rng.random(n), "test_acc": rng.random(n)}
            for k in range(4):
                meta[f"loss_{k}"], meta[f"acc_{k}"] = np.exp(rng.normal(-1, 1, n)), rng.random(n)
            w.commit(params, meta, key=f"b{start}")
            raw.write(params.tobytes())
        w.compact()
    return time.perf_counter() - t0


def rss_mb() -> float:
    return psutil.Process().memory_info().rss / MB


class RSSSampler:
    """Highest RSS (this process plus its children) seen while active, sampled every 5 ms.

    ru_maxrss would report the process's lifetime peak, which includes building the zoo and the
    memmap baseline (its mapped pages count as resident).
    """

    def __init__(self):
        import threading

        self.peak, self._stop = 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            try:
                total = me.memory_info().rss + sum(c.memory_info().rss for c in me.children(recursive=True))
            except psutil.Error:
                continue
            self.peak = max(self.peak, total / MB)
            self._stop.wait(0.005)

    def __enter__(self) -> "RSSSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


def bench(work: str, rows: int, compressor: str, args) -> dict:
    path, raw_path = os.path.join(work, f"zoo-{compressor}"), os.path.join(work, f"raw-{compressor}.f32")
    shutil.rmtree(path, ignore_errors=True)
    t_build = build(path, raw_path, rows, compressor)
    build_view(path, "split", "bench_all")
    p = open_zoo(path).config.num_params
    nbytes = rows * p * 4
    print(f"\n[{compressor}] built {rows:,} checkpoints ({nbytes / MB:,.0f} MB raw) in {t_build:.1f} s; "
          f"chunk rows {open_zoo(path).config.chunk_rows}")

    # Loader: a first (cold) shuffled epoch, then a second, timed separately.
    rss0 = rss_mb()
    stream = CheckpointStream(path, "bench_all", batch_size=args.batch_size, shuffle_buffer=args.buffer, seed=0)
    loader = make_loader(stream, num_workers=args.workers, pin_memory=False)
    times, orders = [], []
    sampler = RSSSampler().__enter__()
    for epoch in range(2):
        stream.set_epoch(epoch)
        order, n = [], 0
        t0 = time.perf_counter()
        for batch in loader:
            order.append(batch["ids"].numpy())
            n += len(batch["ids"])
        times.append(time.perf_counter() - t0)
        orders.append(np.concatenate(order))
        assert n == rows and len(np.unique(orders[-1])) == rows
    sampler.__exit__()
    t_first, t_loader = times
    order = orders[1]
    peak = sampler.peak

    # Memmap: the same rows in the same order (a first pass on the first epoch's order warms it).
    mm = np.memmap(raw_path, dtype=np.float32, mode="r", shape=(rows, p))
    t_mm_first = 0.0
    for o in orders:
        t0 = time.perf_counter()
        for i in range(0, rows, args.batch_size):
            b = torch.from_numpy(mm[o[i:i + args.batch_size]])
        t_mm, t_mm_first = time.perf_counter() - t0, t_mm_first or time.perf_counter() - t0
    del mm, b

    # Naive: one zarr read per row, on a prefix of the order, extrapolated.
    arr = open_zoo(path).params_array
    k = min(args.naive_rows, rows)
    t0 = time.perf_counter()
    for i in order[:k]:
        np.asarray(arr[int(i)])
    t_naive = (time.perf_counter() - t0) * rows / k

    # Decode-only: every chunk once through the loader's reader, no shuffling or batching.
    from queries.loader import ShardFiles

    cfg = open_zoo(path).config
    files = ShardFiles.open(path, cfg.chunk_rows, cfg.shard_rows, p)
    t0 = time.perf_counter()
    for c in range(-(-rows // cfg.chunk_rows)):
        files.chunk(c)
    t_decode = time.perf_counter() - t0

    res = {"compressor": compressor, "rows": rows, "loader_s": t_loader, "memmap_s": t_mm, "naive_s": t_naive,
           "loader_first_s": t_first, "memmap_first_s": t_mm_first,
           "decode_s": t_decode, "peak_rss_mb": peak, "rss_before_mb": rss0, "naive_rows": k}
    print(f"{'reader':<26} {'seconds':>8} {'ckpt/s':>10} {'MB/s':>8}")
    for name, t in [(f"loader, 1st epoch", t_first), ("memmap, 1st epoch order", t_mm_first),
                    (f"loader (workers={args.workers})", t_loader), ("memmap, same order", t_mm),
                    (f"naive zarr (extrap. {k:,})", t_naive), ("decode only, in order", t_decode)]:
        print(f"{name:<26} {t:>8.2f} {rows / t:>10,.0f} {nbytes / t / MB:>8,.0f}")
    print(f"2nd epoch: loader / memmap = {t_mm / t_loader:.2f}x (target >= 0.5x); "
          f"loader / naive = {t_naive / t_loader:.1f}x (target >= 20x); "
          f"1st epoch: loader / memmap = {t_mm_first / t_first:.2f}x")
    print(f"peak RSS during the loader epochs (process + workers): {peak:,.0f} MB, {peak - rss0:+,.0f} MB over "
          f"the {rss0:,.0f} MB before them; the zoo holds {nbytes / MB:,.0f} MB")
    shutil.rmtree(path, ignore_errors=True)
    os.remove(raw_path)
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000, help="checkpoints in the zoo")
    ap.add_argument("--compressor", default="both", choices=["none", "blosc-zstd-bitshuffle", "both"])
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--buffer", type=int, default=16384, help="shuffle buffer rows")
    ap.add_argument("--naive-rows", type=int, default=3000, help="rows the naive loader reads (extrapolated)")
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir, removed)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = args.dir or tempfile.mkdtemp(prefix="bench-loader-")
    os.makedirs(work, exist_ok=True)
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    try:
        for comp in (["none", "blosc-zstd-bitshuffle"] if args.compressor == "both" else [args.compressor]):
            bench(work, args.rows, comp, args)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
