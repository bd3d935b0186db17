"""Loader throughput: a shuffled epoch of CheckpointStream vs a raw numpy.memmap and a naive zarr loop.

One run builds a zoo of --rows random checkpoints of the MNIST-4 MLP (784-2-4, P = 1,582) with
the store writer (plus an identical raw float32 file for the memmap baseline), builds a view of
every row, then times:

- loader: two shuffled epochs of CheckpointStream (batch 256, shuffle buffer 16,384), in this
  process (--workers 0) or with DataLoader workers; both are timed, the second is the headline
  (the first pays one-off costs: opening the zoo, first page faults, checksums); its peak RSS
  is printed; an uncompressed zoo is also read with release_pages=True (bounded RSS);
- memmap: the same rows in the same order as each loader epoch, batch by batch, gathered from
  np.memmap (the limit: no decoding, the file in the page cache);
- naive: one zarr read per row (``zarr_array[i]``), timed on the first --naive-rows rows of the
  same order and extrapolated to the epoch.

Both stores were just written, so both sit in the page cache: the comparison is CPU cost, not
disk. With --compressor both, the zoo is built twice (uncompressed, which the loader gathers
straight from the mapped shard files, and the store's default compressor); decoding bounds the
compressed loader, and the decode-only rate is printed. Peak RSS is the kernel's high-water
mark over the two loader epochs; with workers, a 5 ms sampler over the process and its workers.

--codecs ZOO instead compares every store compressor (size, encode and decode rates) on the
parameters of an existing zoo: random parameters compress unlike trained ones.

    python benchmarks/bench_loader.py                      # 200k rows, both compressors
    python benchmarks/bench_loader.py --rows 20000 --compressor none   # quick
    python benchmarks/bench_loader.py --codecs ZOO          # compressors on a real zoo
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import numpy as np
import psutil
import torch

from process_rss import TreePeakRSS
from hyperforget.queries.loader import CheckpointStream, make_loader
from hyperforget.queries.views import build_view
from hyperforget.zoo.mlp import TASK_PRESETS
from hyperforget.zoo.store import COMPRESSORS, DEFAULT_COMPRESSOR, ZooConfig, create_zoo, open_zoo

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


def proc_status() -> dict[str, float]:
    """This process's memory lines from /proc/self/status, in MB (Linux)."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(value.split()[0]) * 1024 / MB
    return out


class PeakRSS:
    """Highest RSS while active: the kernel's own high-water mark, reset on entry (Linux >= 4.0).

    No sampling thread competes with the loader for the GIL. ru_maxrss would report the
    process's lifetime peak, which includes building the zoo.
    """

    def __enter__(self) -> "PeakRSS":
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # 5: reset the peak RSS to the current RSS
        return self

    def __exit__(self, *exc) -> None:
        self.after = proc_status()
        self.peak = self.after["VmHWM"]


def run_loader(path: str, rows: int, args, **kw) -> tuple[list[float], list[np.ndarray], Any]:
    """Two shuffled epochs of a fresh CheckpointStream: (seconds, checkpoint order, RSS meter) of each."""
    stream = CheckpointStream(path, "bench_all", batch_size=args.batch_size, shuffle_buffer=args.buffer, seed=0,
                              **kw)
    loader = make_loader(stream, num_workers=args.workers, pin_memory=False)
    times, orders = [], []
    with TreePeakRSS(interval=0.005, scale=MB) if args.workers else PeakRSS() as meter:
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
    return times, orders, meter


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
    (t_first, t_loader), orders, sampler = run_loader(path, rows, args)
    order = orders[1]
    peak = sampler.peak
    released = None
    if compressor == "none":  # the same epochs with mapped pages dropped as chunks are done
        released = run_loader(path, rows, args, release_pages=True)
        assert all(np.array_equal(a, b) for a, b in zip(orders, released[1]))

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
    from hyperforget.zoo.store.shards import ShardFiles

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
    for name, t in [("loader, 1st epoch", t_first), ("memmap, 1st epoch order", t_mm_first),
                    (f"loader (workers={args.workers})", t_loader), ("memmap, same order", t_mm),
                    (f"naive zarr (extrap. {k:,})", t_naive), ("decode only, in order", t_decode)]:
        print(f"{name:<26} {t:>8.2f} {rows / t:>10,.0f} {nbytes / t / MB:>8,.0f}")
    print(f"2nd epoch: loader / memmap = {t_mm / t_loader:.2f}x (target >= 0.5x); "
          f"loader / naive = {t_naive / t_loader:.1f}x (target >= 20x); "
          f"1st epoch: loader / memmap = {t_mm_first / t_first:.2f}x")
    print(f"peak RSS during the loader epochs (process + workers): {peak:,.0f} MB, {peak - rss0:+,.0f} MB over "
          f"the {rss0:,.0f} MB before them; the zoo holds {nbytes / MB:,.0f} MB")
    if not args.workers:
        after = sampler.after
        print(f"RSS after the epochs: {after['VmRSS']:,.0f} MB = {after['RssAnon']:,.0f} MB anonymous (the "
              f"process's own) + {after['RssFile']:,.0f} MB mapped files (page cache, shared, reclaimable)")
        res.update(rss_anon_after_mb=after["RssAnon"], rss_file_after_mb=after["RssFile"])
    if released is not None:
        (k_first, k_loader), _, k_meter = released
        print(f"with release_pages=True (RSS bounded): 1st epoch {k_first:.2f} s, 2nd {k_loader:.2f} s = "
              f"{rows / k_loader:,.0f} ckpt/s, {nbytes / k_loader / MB:,.0f} MB/s; loader / memmap = "
              f"{t_mm / k_loader:.2f}x; peak RSS {k_meter.peak:,.0f} MB")
        res.update(released_loader_s=k_loader, released_first_s=k_first, released_peak_rss_mb=k_meter.peak)
    shutil.rmtree(path, ignore_errors=True)
    os.remove(raw_path)
    return res


def codecs(zoo: str, work: str) -> None:
    """Size and speed of every store compressor on the parameters of an existing (real) zoo.

    Each compressor's array is written with the store's own codecs and shard layout; decoding
    goes through the loader's reader (ShardFiles, which also checks each chunk's crc32c once).
    """
    import zarr

    from hyperforget.zoo.store import compressor_codecs
    from hyperforget.zoo.store.shards import ShardFiles

    r = open_zoo(zoo)
    cfg = r.config
    rows = r.num_rows // cfg.chunk_rows * cfg.chunk_rows  # whole chunks only
    x = r.read_rows(0, rows)
    print(f"\n{zoo}: {rows:,} checkpoints ({x.nbytes / MB:,.1f} MB raw), chunks of {cfg.chunk_rows} rows; "
          f"the zoo itself is stored as {cfg.compressor}")
    print(f"{'compressor':<24} {'ratio':>6} {'encode MB/s':>12} {'decode MB/s':>12}")
    for name in COMPRESSORS:
        path = os.path.join(work, f"codec-{name}", "params.zarr")
        arr = zarr.create_array(path, shape=x.shape, dtype="float32", chunks=(cfg.chunk_rows, x.shape[1]),
                                shards=(cfg.shard_rows, x.shape[1]), compressors=compressor_codecs(name),
                                fill_value=0.0, zarr_format=3, overwrite=True)
        t0 = time.perf_counter()
        arr[:] = x
        t_enc = time.perf_counter() - t0
        stored = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(os.path.join(path, "c")) for f in fs)
        files = ShardFiles.open(os.path.dirname(path), cfg.chunk_rows, cfg.shard_rows, x.shape[1])
        read = (lambda c: files.chunk(c)) if files else \
            (lambda c: arr[c * cfg.chunk_rows:(c + 1) * cfg.chunk_rows])  # a layout only zarr reads
        for c in range(rows // cfg.chunk_rows):  # first pass: checksums, page cache
            read(c)
        t0 = time.perf_counter()
        for c in range(rows // cfg.chunk_rows):
            read(c)
        t_dec = time.perf_counter() - t0
        print(f"{name:<24} {x.nbytes / stored:>6.3f} {x.nbytes / t_enc / MB:>12,.0f} {x.nbytes / t_dec / MB:>12,.0f}"
              f"{'' if files else '  (through zarr)'}")
        shutil.rmtree(os.path.dirname(path), ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=200_000, help="checkpoints in the zoo")
    ap.add_argument("--compressor", default="both", choices=["both", *COMPRESSORS],
                    help=f"zoo compressor; both: none and the store's default ({DEFAULT_COMPRESSOR})")
    ap.add_argument("--workers", type=int, default=0, help="DataLoader workers")
    ap.add_argument("--batch-size", type=int, default=256)
    ap.add_argument("--buffer", type=int, default=16384, help="shuffle buffer rows")
    ap.add_argument("--naive-rows", type=int, default=3000, help="rows the naive loader reads (extrapolated)")
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir, removed)")
    ap.add_argument("--codecs", metavar="ZOO", default=None,
                    help="instead: compare every store compressor on the parameters of this zoo")
    args = ap.parse_args()
    torch.set_num_threads(1)
    work = args.dir or tempfile.mkdtemp(prefix="bench-loader-")
    os.makedirs(work, exist_ok=True)
    print(f"python {sys.version.split()[0]}, torch {torch.__version__}, {os.cpu_count()} CPUs, "
          f"load average {os.getloadavg()[0]:.1f}")
    try:
        if args.codecs:
            codecs(args.codecs, work)
            return
        for comp in (["none", DEFAULT_COMPRESSOR] if args.compressor == "both" else [args.compressor]):
            bench(work, args.rows, comp, args)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
