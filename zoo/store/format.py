"""The zoo format's constants, its configuration (zoo.json) and its Parquet metadata schema.

Everything here is a pure description of the format: file names and versions, chunk sizing, the
compressors and the zarr codecs each stands for, :class:`ZooConfig` and :func:`build_metadata`.
No function touches a file.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.mlp import MLPSpec

FORMAT = "hyperforget-zoo"
FORMAT_VERSION = 1
MANIFEST_FORMAT = "hyperforget-zoo-manifest"
ZOO_JSON = "zoo.json"
MANIFEST = "manifest.json"
PARAMS = "params.zarr"
META_DIR = "meta"
LOCK = ".lock"
TMP_DIR = ".tmp"  # the writer's scratch space (e.g. collector spill files); emptied on every open
PHASES = ("learning", "forgetting")
# Chunks of 1-2 MiB uncompressed: zarr's docs advise >= 1 MB; a random-access read decodes a
# whole chunk, so much larger chunks waste work when fetching single checkpoints.
TARGET_CHUNK_BYTES = 3 << 19
CHUNKS_PER_SHARD = 16
# Parquet row groups of >= 100k rows: DuckDB parallelizes per row group and is 5-10x slower on
# groups under ~5k rows, which is what per-commit parts give; compact() merges them.
COMPACT_ROW_GROUP = 131072
COMPACT_FILE_ROWS = 1 << 20


def compressor_codecs(name: str) -> tuple:
    from zarr.codecs import BloscCodec, Crc32cCodec, ZstdCodec

    # crc32c after compression lets verify_zoo tell a damaged chunk from one that decodes to junk.
    table = {
        # Byte shuffle puts each byte position of the float32s together; on trained weights lz4
        # then finds as many repeats as zstd does after bitshuffle (more, measured) and decodes
        # several times faster.
        "blosc-lz4-shuffle": (BloscCodec(cname="lz4", clevel=5, shuffle="shuffle"), Crc32cCodec()),
        # clevel 3: on float32 weights levels 1-5 differ by <1% in size, level 5 encodes ~1.5x slower.
        "blosc-zstd-bitshuffle": (BloscCodec(cname="zstd", clevel=3, shuffle="bitshuffle"), Crc32cCodec()),
        "blosc-zstd-shuffle": (BloscCodec(cname="zstd", clevel=3, shuffle="shuffle"), Crc32cCodec()),
        "zstd": (ZstdCodec(level=3), Crc32cCodec()),
        "none": (Crc32cCodec(),),
    }
    if name not in table:
        raise HyperForgetError(f"unknown zoo compressor {name!r}: choose one of {', '.join(table)}")
    return table[name]


COMPRESSORS = ("blosc-lz4-shuffle", "blosc-zstd-bitshuffle", "blosc-zstd-shuffle", "zstd", "none")
# New zoos only: a zoo's compressor is recorded in zoo.json and zarr.json, so zoos written with an
# earlier default stay readable. On the parameters of a real MNIST-4 zoo, blosc-lz4-shuffle stores
# them smaller than the earlier default blosc-zstd-bitshuffle and decodes them several times faster
# (docs/benchmarks.md, "The loader and views"; `python benchmarks/bench_loader.py --codecs ZOO`).
DEFAULT_COMPRESSOR = "blosc-lz4-shuffle"


def default_chunk_rows(num_params: int) -> int:
    """Rows per chunk so that one chunk holds about 1.5 MiB of float32 (a power of two)."""
    rows = TARGET_CHUNK_BYTES / (4 * num_params)
    return int(max(1, 2 ** round(np.log2(max(rows, 1.0)))))


# ----------------------------------------------------------------------------------------------
# Configuration: zoo.json


@dataclass
class ZooConfig:
    """Everything zoo.json records; saved with the zoo and read back by every reader."""

    spec: MLPSpec  # the MLP every row is a checkpoint of; P = spec.num_params
    classes: tuple[int, ...]  # original dataset class ids of the task; task label k = classes[k]
    pivots: tuple[int, ...] = ()  # task labels kept high-performing while collecting
    dataset: dict = field(default_factory=dict)  # Dataset.describe(): name, sizes, scaling, source
    collection: dict = field(default_factory=dict)  # collector settings (runs, epochs, heuristics, seeds)
    normalization: dict | None = None  # compute_normalization() output, set by ZooWriter.set_normalization
    chunk_rows: int = 0  # rows per zarr chunk (unit of reading); 0 = about 1.5 MiB per chunk
    shard_rows: int = 0  # rows per shard file (unit of writing); 0 = 16 chunks
    compressor: str = DEFAULT_COMPRESSOR  # one of COMPRESSORS
    created_at: str = ""  # ISO time the zoo was created; filled by create_zoo

    def __post_init__(self) -> None:
        if not isinstance(self.spec, MLPSpec):
            raise HyperForgetError(f"ZooConfig.spec must be an MLPSpec, got {type(self.spec).__name__}")
        self.classes = tuple(int(c) for c in self.classes)
        self.pivots = tuple(int(p) for p in self.pivots)
        c = self.spec.num_classes
        if len(self.classes) != c:
            raise HyperForgetError(
                f"zoo classes {list(self.classes)} are {len(self.classes)} ids but the MLP has {c} outputs; "
                "give one original class id per output")
        if any(not 0 <= p < c for p in self.pivots):
            raise HyperForgetError(f"pivots {list(self.pivots)} must be task labels in [0, {c})")
        if self.chunk_rows == 0:
            self.chunk_rows = default_chunk_rows(self.spec.num_params)
        if self.shard_rows == 0:
            self.shard_rows = CHUNKS_PER_SHARD * self.chunk_rows
        if self.chunk_rows < 1 or self.shard_rows < 1 or self.shard_rows % self.chunk_rows:
            raise HyperForgetError(
                f"shard_rows ({self.shard_rows}) must be a positive multiple of chunk_rows ({self.chunk_rows})")
        compressor_codecs(self.compressor)

    @property
    def num_params(self) -> int:
        return self.spec.num_params

    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "version": FORMAT_VERSION,
            "dataset": self.dataset, "mlp": self.spec.to_dict(),
            "classes": list(self.classes), "pivots": list(self.pivots),
            "collection": self.collection, "normalization": self.normalization,
            "array": {"path": PARAMS, "dtype": "float32", "num_params": self.num_params,
                      "chunk_rows": self.chunk_rows, "shard_rows": self.shard_rows,
                      "compressor": self.compressor},
            "metadata": {"path": META_DIR, "manifest": MANIFEST},
            "created_at": self.created_at,
        }

    @classmethod
    def from_dict(cls, d: Mapping, source: str = ZOO_JSON) -> "ZooConfig":
        if not isinstance(d, Mapping) or d.get("format") != FORMAT:
            raise HyperForgetError(f"{source} is not a HyperForget zoo description (format {FORMAT!r} expected)")
        if d.get("version") != FORMAT_VERSION:
            raise HyperForgetError(
                f"zoo format version {d.get('version')} is not supported; expected {FORMAT_VERSION} ({source})")
        try:
            arr = d["array"]
            cfg = cls(spec=MLPSpec.from_dict(d["mlp"]), classes=tuple(d["classes"]), pivots=tuple(d["pivots"]),
                      dataset=dict(d.get("dataset") or {}), collection=dict(d.get("collection") or {}),
                      normalization=d.get("normalization"), chunk_rows=int(arr["chunk_rows"]),
                      shard_rows=int(arr["shard_rows"]), compressor=arr["compressor"],
                      created_at=d.get("created_at", ""))
        except (KeyError, TypeError, ValueError) as exc:
            raise HyperForgetError(f"{source} lacks or garbles field {exc}; the zoo description is damaged") from None
        if int(arr.get("num_params", cfg.num_params)) != cfg.num_params:
            raise HyperForgetError(f"{source}: array.num_params {arr['num_params']} does not match the MLP spec "
                                   f"({cfg.num_params}); the zoo description is damaged")
        return cfg


# ----------------------------------------------------------------------------------------------
# Metadata schema


_BASE_COLUMNS: list[tuple[str, pa.DataType]] = [
    ("checkpoint_id", pa.int64()), ("run_id", pa.int64()), ("step", pa.int32()), ("epoch", pa.int32()),
    ("phase", pa.string()), ("reason", pa.string()), ("undersampled", pa.list_(pa.int8())),
    ("undersample_rates", pa.list_(pa.float32())), ("deleted", pa.list_(pa.int8())),
    ("deletion_step", pa.int32()), ("seed", pa.int64()), ("lr", pa.float32()), ("run_kind", pa.string()),
]
_TAIL_COLUMNS: list[tuple[str, pa.DataType]] = [
    ("test_loss", pa.float32()), ("test_acc", pa.float32()), ("perm_index", pa.int16()), ("source_id", pa.int64()),
]
REQUIRED_COLUMNS = ("run_id", "step", "epoch", "phase", "test_loss", "test_acc")
_PER_CLASS = re.compile(r"^(loss|acc)_(\d+)$")


def metadata_schema(num_classes: int) -> pa.Schema:
    """The fixed columns of a zoo's Parquet metadata for a task with ``num_classes`` classes."""
    per_class = [(f"loss_{k}", pa.float32()) for k in range(num_classes)]
    per_class += [(f"acc_{k}", pa.float32()) for k in range(num_classes)]
    return pa.schema(_BASE_COLUMNS + per_class + _TAIL_COLUMNS)


def _to_arrow(value: Any, typ: pa.DataType, what: str) -> pa.Array:
    try:
        if isinstance(value, (pa.Array, pa.ChunkedArray)):
            arr = value.cast(typ)
            return arr.combine_chunks() if isinstance(arr, pa.ChunkedArray) else arr
        if isinstance(value, np.ndarray) and value.ndim == 2:
            value = list(value)  # (n, k) rows for a list column
        elif hasattr(value, "detach"):  # torch tensor
            value = value.detach().cpu().numpy()
        return pa.array(value, type=typ, from_pandas=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError, ValueError,
            OverflowError) as exc:
        raise HyperForgetError(f"{what} cannot be stored as {typ}: {str(exc).splitlines()[0]}") from None


def _columns_of(meta: Any, what: str) -> dict[str, Any]:
    if isinstance(meta, pa.RecordBatch):
        meta = pa.Table.from_batches([meta])
    if isinstance(meta, pa.Table):
        return {name: meta.column(name) for name in meta.column_names}
    if hasattr(meta, "to_dict") and hasattr(meta, "columns") and not isinstance(meta, Mapping):  # pandas
        return {str(c): meta[c].to_numpy() for c in meta.columns}
    if isinstance(meta, Mapping):
        return dict(meta)
    raise HyperForgetError(f"{what}: metadata must be a pyarrow Table or a dict of columns, got {type(meta).__name__}")


def build_metadata(meta: Any, n: int, first_id: int, num_classes: int, what: str = "batch") -> pa.Table:
    """Check a batch's metadata and turn it into the zoo schema with global ids.

    Args:
        meta: pa.Table / dict of columns (n rows each), without ``checkpoint_id``. Augmented copies
            name their original either by ``source_offset`` (row within this batch) or by a global
            ``source_id``; rows with neither are originals (``source_id`` = own id).
        n: rows in the batch; first_id: checkpoint id of its first row.
    Returns:
        pa.Table with ``metadata_schema(num_classes)`` columns first, then any extra columns.
    """
    cols = _columns_of(meta, what)
    if "checkpoint_id" in cols:
        raise HyperForgetError(f"{what}: metadata must not carry checkpoint_id; the writer assigns ids "
                               "(drop the column)")
    if "source_offset" in cols and "source_id" in cols:
        raise HyperForgetError(f"{what}: give either source_offset (within the batch) or source_id (global), not both")
    lengths = {name: len(v) for name, v in cols.items()}
    bad = {name: k for name, k in lengths.items() if k != n}
    if bad:
        raise HyperForgetError(f"{what}: metadata columns {bad} have other lengths than the {n} parameter rows")
    per_class = [f"loss_{k}" for k in range(num_classes)] + [f"acc_{k}" for k in range(num_classes)]
    missing = [c for c in (*REQUIRED_COLUMNS, *per_class) if c not in cols]
    if missing:
        raise HyperForgetError(
            f"{what}: metadata lacks columns {missing}; every checkpoint needs {', '.join(REQUIRED_COLUMNS)} "
            f"and loss_k/acc_k for k < {num_classes}")
    beyond = sorted(c for c in cols if (m := _PER_CLASS.match(c)) and int(m.group(2)) >= num_classes)
    if beyond:
        raise HyperForgetError(f"{what}: columns {beyond} are beyond the task's {num_classes} classes")

    ids = np.arange(first_id, first_id + n, dtype=np.int64)
    schema = metadata_schema(num_classes)
    out: dict[str, pa.Array] = {"checkpoint_id": pa.array(ids)}
    defaults = {"reason": pa.nulls(n, pa.string()), "run_kind": pa.nulls(n, pa.string()),
                "undersampled": pa.array([[]] * n, pa.list_(pa.int8())),
                "undersample_rates": pa.array([[]] * n, pa.list_(pa.float32())),
                "deleted": pa.array([[]] * n, pa.list_(pa.int8())),
                "deletion_step": pa.array(np.full(n, -1, np.int32)), "seed": pa.nulls(n, pa.int64()),
                "lr": pa.nulls(n, pa.float32()), "perm_index": pa.array(np.zeros(n, np.int16))}
    for f in schema:
        if f.name in ("checkpoint_id", "source_id"):
            continue
        if f.name in cols:
            out[f.name] = _to_arrow(cols[f.name], f.type, f"{what}: column {f.name}")
        else:
            out[f.name] = defaults[f.name]

    if "source_offset" in cols:
        off = np.asarray(_to_arrow(cols["source_offset"], pa.int64(), f"{what}: column source_offset")
                         .fill_null(-1).to_numpy(zero_copy_only=False))
        if n and (off.min() < 0 or off.max() >= n):
            raise HyperForgetError(f"{what}: source_offset must index rows of the batch, in [0, {n})")
        source = first_id + off
    elif "source_id" in cols:
        source = np.asarray(_to_arrow(cols["source_id"], pa.int64(), f"{what}: column source_id")
                            .fill_null(-1).to_numpy(zero_copy_only=False))
        if n and (source.min() < 0 or source.max() >= first_id + n):
            raise HyperForgetError(f"{what}: source_id must name an existing checkpoint, in [0, {first_id + n})")
    else:
        source = ids
    perm = out["perm_index"].fill_null(0).to_numpy(zero_copy_only=False)
    if np.any(perm < 0):
        raise HyperForgetError(f"{what}: perm_index must be >= 0 (0 = original, k = k-th permuted copy)")
    wrong = np.flatnonzero((perm == 0) & (source != ids))
    if wrong.size:
        raise HyperForgetError(f"{what}: original checkpoints (perm_index 0) must be their own source; "
                               f"row {int(wrong[0])} names another")
    out["perm_index"] = pa.array(perm.astype(np.int16))
    out["source_id"] = pa.array(source.astype(np.int64))
    phases = set(pc.unique(out["phase"]).to_pylist())
    if not phases <= set(PHASES):
        raise HyperForgetError(f"{what}: phase values {sorted(map(str, phases - set(PHASES)))} are not "
                               f"{' or '.join(PHASES)}")

    arrays = [out[f.name] for f in schema]
    fields = list(schema)
    for name, value in cols.items():
        if name in out or name == "source_offset":
            continue
        arr = _to_arrow(value, None, f"{what}: column {name}") if not isinstance(value, (pa.Array, pa.ChunkedArray)) \
            else (value.combine_chunks() if isinstance(value, pa.ChunkedArray) else value)
        arrays.append(arr)
        fields.append(pa.field(name, arr.type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))
