"""Figures about a zoo: parameter normalization statistics and :func:`zoo_info`'s counts and sizes."""

from __future__ import annotations

import os

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.normalization import MomentSums, layer_normalization
from hyperforget.zoo.store.format import FORMAT_VERSION, META_DIR, PARAMS
from hyperforget.zoo.store.location import Location
from hyperforget.zoo.store.reader import ZooReader, open_zoo


def compute_normalization(reader: ZooReader, max_rows: int = 25000, seed: int = 0,
                          batch_rows: int = 4096) -> dict:
    """Parameter statistics over up to ``max_rows`` random committed checkpoints.

    Returns a JSON-ready dict: ``mean``, ``std`` (all parameters), ``gpt_coeff`` = 0.538 / std
    (G.pt's single scale), ``layers`` {name: {mean, std}} in the spec's layout, ``rows``, ``seed``
    (the estimator: ``zoo.normalization``).
    """
    n = reader.num_rows
    if n == 0:
        raise HyperForgetError(f"zoo {reader.path} is empty; commit checkpoints before computing normalization")
    rng = np.random.default_rng(seed)
    ids = np.sort(rng.choice(n, size=min(n, max_rows), replace=False))
    layout = reader.spec.layout
    sums = MomentSums(layout.num_params)
    for i in range(0, len(ids), batch_rows):
        sums.add(reader.read(ids[i:i + batch_rows]))
    try:
        stats = layer_normalization(layout, sums)
    except HyperForgetError as e:
        raise HyperForgetError(f"zoo {reader.path}: {e}") from None
    return {**stats, "rows": int(len(ids)), "seed": int(seed)}


def zoo_info(path: str | os.PathLike) -> dict:
    """Counts, sizes and settings of a zoo, JSON-ready."""
    r = open_zoo(path)
    loc = Location(path)
    cfg = r.config
    n = r.num_rows
    meta = r.metadata(columns=["run_id", "perm_index", "phase"])
    originals = int(pc.sum(pc.equal(meta.column("perm_index"), 0)).as_py() or 0)
    augmented = int(pc.sum(pc.greater(meta.column("perm_index"), 0)).as_py() or 0)
    phases = {str(k): int(v) for k, v in zip(*_value_counts(meta.column("phase")))}
    params_bytes = loc.size(PARAMS)
    meta_bytes = loc.size(META_DIR)
    raw = n * cfg.num_params * 4
    s = cfg.spec
    return {
        "path": r.path, "format_version": FORMAT_VERSION,
        "checkpoints": n, "runs": int(pc.count_distinct(meta.column("run_id")).as_py()) if n else 0,
        "originals": originals, "augmented": augmented, "phases": phases,
        "metadata_rows": meta.num_rows,
        "parts": len(r.parts), "commits": len(r.committed_keys),
        "spec": s.to_dict(), "spec_str": f"{s.input_size}-{s.hidden}-{s.num_classes} {s.activation}",
        "num_params": cfg.num_params, "classes": list(cfg.classes), "pivots": list(cfg.pivots),
        "dataset": cfg.dataset.get("name", ""),
        "chunk_rows": cfg.chunk_rows, "shard_rows": cfg.shard_rows, "compressor": cfg.compressor,
        "allocated_rows": int(r.params_array.shape[0]),
        "params_bytes": params_bytes, "params_raw_bytes": raw,
        "compression_ratio": (raw / params_bytes) if params_bytes else None,
        "metadata_bytes": meta_bytes, "size_on_disk": loc.size(""),
        "normalization": cfg.normalization, "created_at": cfg.created_at,
        "holdout": _holdout_info(r),
    }


def _holdout_info(r: "ZooReader") -> dict | None:
    """The held-out forget sets of a holdout collection and how many checkpoints forget each (0 expected)."""
    from hyperforget.zoo.holdout import FORGET_ACC, RETAIN_ACC, holdout_counts

    col = r.config.collection.get("config") or {}
    sets = col.get("holdout") or []
    if not sets:
        return None
    fa = float(col.get("holdout_forget_acc", FORGET_ACC))
    ra = float(col.get("holdout_retain_acc", RETAIN_ACC))
    c = r.config.spec.num_classes
    acc = r.metadata(columns=[f"acc_{k}" for k in range(c)])
    acc = np.stack([acc.column(f"acc_{k}").to_numpy() for k in range(c)], 1) if acc.num_rows else np.zeros((0, c))
    return {"sets": sets, "forget_acc": fa, "retain_acc": ra, "forgetting": holdout_counts(acc, sets, fa, ra)}


def _value_counts(col: pa.ChunkedArray) -> tuple[list, list]:
    vc = pc.value_counts(col)
    return vc.field("values").to_pylist(), vc.field("counts").to_pylist()
