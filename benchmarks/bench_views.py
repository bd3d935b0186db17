"""Time to build each view kind over synthetic metadata of 1M and 10M checkpoints.

Metadata rows are generated with numpy/pyarrow in the zoo's schema (runs of --run-len
checkpoints, per-class losses log-normal, a third of runs deleting a class halfway) and written
as Parquet files of 1M rows (compacted zoo layout); each view's SQL then runs through DuckDB
exactly as `hyperforget view build` runs it (queries.views.compute_view), and its result is
written to Parquet. The baseline, measured in the same run, is a plain full scan
(SELECT count(*), sum(loss_0) FROM checkpoints): the ratio says how many scans a view costs.

    python benchmarks/bench_views.py                 # 1M and 10M rows
    python benchmarks/bench_views.py --sizes 1000000 # quicker
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hyperforget.queries import engine, views


def synthetic_metadata(rows: int, out_dir: str, num_classes: int = 4, run_len: int = 150, file_rows: int = 1 << 20,
                       seed: int = 0) -> list[str]:
    """Write ``rows`` metadata rows as Parquet files of ``file_rows``; returns their paths."""
    rng = np.random.default_rng(seed)
    files = []
    for start in range(0, rows, file_rows):
        n = min(file_rows, rows - start)
        ids = np.arange(start, start + n, dtype=np.int64)
        run = ids // run_len
        step = ((ids % run_len) * 10).astype(np.int32)
        deletes = run % 3 == 0
        deletion = np.where(deletes, run_len * 5, -1).astype(np.int32)
        cols = {
            "checkpoint_id": ids, "run_id": run, "step": step, "epoch": (step // 100).astype(np.int32),
            "phase": pa.array(np.where(deletes & (step >= deletion), "forgetting", "learning")),
            "reason": pa.array(np.full(n, "random")),
            "deletion_step": deletion, "seed": run, "lr": np.full(n, 0.01, np.float32),
            "run_kind": pa.array(np.full(n, "random")),
        }
        for k in range(num_classes):
            cols[f"loss_{k}"] = np.exp(rng.normal(-1.5, 1.5, n)).astype(np.float32)
        for k in range(num_classes):
            cols[f"acc_{k}"] = rng.random(n, dtype=np.float32)
        one = pa.array(np.arange(n + 1, dtype=np.int32))  # one entry per row
        cols["undersampled"] = pa.ListArray.from_arrays(one, pa.array(np.full(n, 3, np.int8)))
        cols["undersample_rates"] = pa.ListArray.from_arrays(one, pa.array(np.full(n, 0.5, np.float32)))
        del_off = pa.array(np.r_[0, np.cumsum(deletes)].astype(np.int32))
        cols["deleted"] = pa.ListArray.from_arrays(del_off, pa.array(np.full(int(deletes.sum()), 2, np.int8)))
        cols.update({"test_loss": rng.random(n, dtype=np.float32), "test_acc": rng.random(n, dtype=np.float32),
                     "perm_index": np.zeros(n, np.int16), "source_id": ids})
        path = os.path.join(out_dir, f"part-{start // file_rows:06d}.parquet")
        pq.write_table(pa.table(cols), path, row_group_size=131072)
        files.append(path)
    return files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000], help="metadata rows")
    ap.add_argument("--classes", type=int, default=4, help="classes C (pivots 0 and 1)")
    ap.add_argument("--run-len", type=int, default=150, help="checkpoints per run")
    ap.add_argument("--threads", type=int, default=2, help="DuckDB threads")
    ap.add_argument("--memory-limit", default="8GB", help="DuckDB memory limit")
    ap.add_argument("--dir", default=None, help="work directory (default: a temp dir, removed)")
    args = ap.parse_args()

    work = args.dir or tempfile.mkdtemp(prefix="bench-views-")
    os.makedirs(work, exist_ok=True)
    kinds = [("split", {"split": "train"}), ("balanced", {"split": "train"}),
             ("balanced", {"split": "train", "mode": "weights"}), ("pairs", {"split": "train"})]
    print(f"DuckDB {engine.duckdb.__version__}, {args.threads} threads, C={args.classes}, runs of {args.run_len}")
    print(f"{'rows':>11} {'view':<18} {'out rows':>11} {'seconds':>8} {'x scan':>7}")
    try:
        for rows in args.sizes:
            d = os.path.join(work, f"meta-{rows}")
            os.makedirs(d, exist_ok=True)
            t0 = time.perf_counter()
            files = synthetic_metadata(rows, d, args.classes, args.run_len)
            gen = time.perf_counter() - t0
            con = engine.connect_files(files, num_classes=args.classes, confined=False,
                                       limits=engine.SQLLimits(memory_limit=args.memory_limit, threads=args.threads))
            t0 = time.perf_counter()
            con.execute("SELECT count(*), sum(loss_0) FROM checkpoints").fetchall()
            scan = time.perf_counter() - t0
            print(f"{rows:>11,} {'(generate)':<18} {rows:>11,} {gen:>8.2f}")
            print(f"{rows:>11,} {'(scan baseline)':<18} {rows:>11,} {scan:>8.2f} {1.0:>7.1f}")
            for kind, params in kinds:
                label = kind + ("/weights" if params.get("mode") == "weights" else "")
                t0 = time.perf_counter()
                table = views.compute_view(con, kind, args.classes, (0, 1), params)
                pq.write_table(table, os.path.join(work, "view.parquet"))
                dt = time.perf_counter() - t0
                print(f"{rows:>11,} {label:<18} {table.num_rows:>11,} {dt:>8.2f} {dt / scan:>7.1f}", flush=True)
                del table
            con.close()
            shutil.rmtree(d)
    finally:
        if args.dir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
