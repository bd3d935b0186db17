"""The checkpoint zoo on disk (format version 1): Zarr v3 parameters, Parquet metadata, a manifest.

A zoo is a directory (or an fsspec URL such as ``memory://zoo`` or ``s3://bucket/zoo``)::

    ZOO/
      zoo.json          format "hyperforget-zoo", version 1: dataset, MLP spec, classes, pivots,
                        collection settings, normalization statistics, array settings
      params.zarr/      Zarr v3 array (rows, P) float32, chunks (chunk_rows, P) inside shards
                        (shard_rows, P), Blosc lz4 + shuffle (zoo.json names the compressor),
                        crc32c per chunk
      meta/part-NNNNNN.parquet   one row per checkpoint (see ``metadata_schema``)
      manifest.json     the commit point: committed row count, parts with their row ranges,
                        commit keys with their row ranges

Rows of ``params.zarr`` at or beyond ``manifest.json``'s ``num_rows`` are uncommitted (left by a
writer that died mid-commit) and are overwritten by the next commit; readers never return them.

Commits are atomic against a process dying at any instant: the writer (1) writes the new
parameter rows (zarr's LocalStore replaces each shard file by temp + rename, so a shard that also
holds committed rows is either the old or the new file, both with those rows intact), (2) writes
the batch's Parquet part by temp + rename, (3) replaces ``manifest.json`` by temp + rename. Only
step 3 publishes the batch. Reopening a zoo deletes parts that the manifest does not list and
temp files, and continues at the last commit.

One process commits to a zoo at a time. Locally this is enforced with ``fcntl.flock`` on
``ZOO/.lock`` (released by the kernel if the writer dies). For fsspec URLs there is no lock: the
caller must make sure a single process commits (the dask collector returns finished batches to
its client, which is the only committer). Each object store PUT is atomic, which is all the
commit protocol needs there.

Another project reads a zoo with plain ``zarr.open_array(ZOO + "/params.zarr")`` and
``pyarrow.parquet.read_table`` over the files listed in ``manifest.json``.
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as _dt
import json
import os
import re
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.mlp import MLP, MLPSpec
from hyperforget.zoo.normalization import MomentSums, layer_normalization

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


def _compressor_codecs(name: str) -> tuple:
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
        _compressor_codecs(self.compressor)

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
        raise HyperForgetError(f"{what}: metadata must not carry checkpoint_id; the writer assigns ids (drop the column)")
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


# ----------------------------------------------------------------------------------------------
# Where the zoo lives: a local directory or an fsspec URL


class _Location:
    """File operations relative to a zoo root, local (os) or remote (fsspec)."""

    def __init__(self, path: str | os.PathLike):
        s = os.fspath(path)
        if s.startswith("file://"):
            s = s[len("file://"):]
        self.local = "://" not in s
        if self.local:
            import fsspec

            self.root = os.path.abspath(s)
            self.fs = fsspec.filesystem("file")
            self.display = s
        else:
            import fsspec

            try:
                self.fs, self.root = fsspec.core.url_to_fs(s)
            except ImportError as exc:
                raise HyperForgetError(f"cannot open {s}: {str(exc).splitlines()[0]}; install the filesystem's "
                                       "package (e.g. `pip install s3fs` for s3://) or use a local path") from None
            except ValueError as exc:
                raise HyperForgetError(f"cannot open {s}: {str(exc).splitlines()[0]}; "
                                       "give a local directory or a supported fsspec URL") from None
            self.root = self.root.rstrip("/")
            self.url = s.rstrip("/")
            self.display = self.url

    def path(self, name: str) -> str:
        """Path for self.fs (or os) of a file under the zoo."""
        return os.path.join(self.root, name) if self.local else f"{self.root}/{name}" if name else self.root

    def url_of(self, name: str) -> str:
        """What zarr, DuckDB or a user opens: a local path or a full URL."""
        return self.path(name) if self.local else f"{self.url}/{name}"

    def exists(self, name: str) -> bool:
        return os.path.exists(self.path(name)) if self.local else self.fs.exists(self.path(name))

    def read_bytes(self, name: str) -> bytes:
        if self.local:
            with open(self.path(name), "rb") as f:
                return f.read()
        return self.fs.cat_file(self.path(name))

    def write_atomic(self, name: str, data: bytes) -> None:
        """Readers see the old file or the new one, never a part (temp + rename; one PUT remotely)."""
        if self.local:
            final = self.path(name)
            tmp = f"{final}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, final)
        else:
            self.fs.pipe_file(self.path(name), data)

    def makedirs(self, name: str) -> None:
        if self.local:
            os.makedirs(self.path(name), exist_ok=True)
        else:
            self.fs.makedirs(self.path(name), exist_ok=True)

    def listdir(self, name: str) -> list[str]:
        """Base names in a folder ([] if it does not exist)."""
        if self.local:
            p = self.path(name)
            return sorted(os.listdir(p)) if os.path.isdir(p) else []
        p = self.path(name)
        if not self.fs.exists(p):
            return []
        return sorted(os.path.basename(x.rstrip("/")) for x in self.fs.ls(p, detail=False))

    def remove(self, name: str) -> None:
        if self.local:
            with contextlib.suppress(FileNotFoundError):
                os.remove(self.path(name))
        else:
            with contextlib.suppress(FileNotFoundError):
                self.fs.rm_file(self.path(name))

    def size(self, name: str) -> int:
        """Bytes under a file or folder."""
        p = self.path(name)
        if self.local:
            if os.path.isfile(p):
                return os.path.getsize(p)
            return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(p) for f in fs)
        if not self.fs.exists(p):
            return 0
        return int(self.fs.du(p)) if self.fs.isdir(p) else int(self.fs.size(p))

    def files_under(self, name: str) -> list[str]:
        """Relative paths of every file under a folder."""
        p = self.path(name)
        if self.local:
            return [os.path.relpath(os.path.join(d, f), self.root) for d, _, fs in os.walk(p) for f in fs]
        return [x[len(self.root) + 1:] for x in self.fs.find(p)] if self.fs.exists(p) else []

    def write_parquet(self, name: str, table: pa.Table, row_group_size: int | None = None) -> int:
        """Atomically write a Parquet file; returns its size in bytes."""
        if self.local:
            final = self.path(name)
            tmp = f"{final}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            pq.write_table(table, tmp, compression="zstd", row_group_size=row_group_size)
            size = os.path.getsize(tmp)
            os.replace(tmp, final)
            return size
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd", row_group_size=row_group_size)
        data = sink.getvalue().to_pybytes()
        self.fs.pipe_file(self.path(name), data)
        return len(data)

    def read_parquet(self, name: str, columns: Sequence[str] | None = None) -> pa.Table:
        if self.local:
            return pq.read_table(self.path(name), columns=columns)
        with self.fs.open(self.path(name), "rb") as f:
            return pq.read_table(f, columns=columns)


def _read_json(loc: _Location, name: str) -> dict:
    try:
        return json.loads(loc.read_bytes(name))
    except FileNotFoundError:
        raise
    except NotADirectoryError:
        raise HyperForgetError(f"{loc.display} is a file, not a zoo directory; pass the zoo's directory") from None
    except OSError as exc:
        raise HyperForgetError(f"cannot read {loc.display}/{name}: {exc.strerror or _short(exc)}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise HyperForgetError(f"{loc.display}/{name} is not valid JSON ({exc}); the zoo is damaged") from None


def _json_bytes(d: dict) -> bytes:
    return (json.dumps(d, indent=1, sort_keys=False) + "\n").encode()


def _load_config(loc: _Location) -> ZooConfig:
    try:
        d = _read_json(loc, ZOO_JSON)
    except FileNotFoundError:
        raise HyperForgetError(f"no zoo at {loc.display} ({ZOO_JSON} missing); create one with "
                               "`hyperforget zoo collect` or zoo.store.create_zoo") from None
    return ZooConfig.from_dict(d, f"{loc.display}/{ZOO_JSON}")


def _empty_manifest() -> dict:
    return {"format": MANIFEST_FORMAT, "version": FORMAT_VERSION, "num_rows": 0, "next_part": 0,
            "parts": [], "commits": {}, "updated_at": _now()}


def _load_manifest(loc: _Location) -> dict:
    try:
        m = _read_json(loc, MANIFEST)
    except FileNotFoundError:
        raise HyperForgetError(f"zoo {loc.display} lacks {MANIFEST}; it was never committed to or is damaged "
                               "(run `hyperforget zoo verify`)") from None
    where = f"{loc.display}/{MANIFEST}"
    if not isinstance(m, dict) or m.get("format") != MANIFEST_FORMAT:
        raise HyperForgetError(f"{where} is not a HyperForget zoo manifest (format {MANIFEST_FORMAT!r} expected); "
                               "the zoo is damaged (run `hyperforget zoo verify`)")
    if m.get("version") != FORMAT_VERSION:
        raise HyperForgetError(f"{where}: manifest version {m.get('version')} is not supported; "
                               f"expected {FORMAT_VERSION}")
    problem = _manifest_shape_problem(m)
    if problem:
        raise HyperForgetError(f"{where}: {problem}; the zoo is damaged (run `hyperforget zoo verify`)")
    return m


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def _manifest_shape_problem(m: dict) -> str | None:
    """What is malformed in a parsed manifest (types of its fields), or None."""
    if not _is_count(m.get("num_rows")):
        return f"num_rows {m.get('num_rows')!r} is not a row count"
    if not _is_count(m.get("next_part", 0)):
        return f"next_part {m.get('next_part')!r} is not a count"
    parts = m.get("parts")
    if not isinstance(parts, list):
        return f"parts is {type(parts).__name__}, not a list"
    for i, p in enumerate(parts):
        if (not isinstance(p, dict) or not isinstance(p.get("file"), str) or not _is_count(p.get("start"))
                or not _is_count(p.get("stop")) or p["stop"] < p["start"]):
            return f"parts[{i}] is not {{file, start, stop}} with 0 <= start <= stop"
        f = p["file"]
        if not f.startswith(f"{META_DIR}/") or ".." in f.split("/") or f.count("/") != 1:
            return f"parts[{i}] names {f!r}, not a file in {META_DIR}/"
    commits = m.get("commits")
    if not isinstance(commits, dict) or not all(
            isinstance(v, list) and len(v) == 2 and all(_is_count(x) for x in v) for v in commits.values()):
        return "commits is not a map of key -> [start, stop]"
    return None


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _open_params(loc: _Location, mode: str = "r"):
    import zarr

    try:
        return zarr.open_array(loc.url_of(PARAMS), mode=mode, zarr_format=3)
    except Exception as exc:  # zarr raises several kinds for missing or unreadable metadata
        raise HyperForgetError(f"cannot open {loc.display}/{PARAMS}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}; "
                               "the zoo is damaged") from None


def _check_params_array(arr, cfg: ZooConfig, num_rows: int, display: str) -> None:
    if len(arr.shape) != 2 or arr.shape[1] != cfg.num_params:
        raise HyperForgetError(
            f"{display}/{PARAMS} has rows of {arr.shape[1] if len(arr.shape) == 2 else arr.shape} values but the zoo's MLP spec "
            f"{cfg.spec.input_size}-{cfg.spec.hidden}-{cfg.spec.num_classes} needs {cfg.num_params}; "
            "the zoo is damaged or was written for another spec")
    if arr.shape[0] < num_rows:
        raise HyperForgetError(f"{display}/{PARAMS} holds {arr.shape[0]} rows but {MANIFEST} commits {num_rows}; "
                               "the parameter array was truncated")


# ----------------------------------------------------------------------------------------------
# Writer


class ZooWriter:
    """Appends batches of checkpoints to a zoo with atomic, idempotent commits.

    Use :func:`create_zoo` for a new zoo and :meth:`ZooWriter.open` to continue one.
    """

    def __init__(self, loc: _Location, config: ZooConfig, manifest: dict, lock_fd: int | None):
        self._loc = loc
        self.config = config
        self._manifest = manifest
        self._lock_fd = lock_fd
        self._arr = _open_params(loc, "r+").with_config({"write_empty_chunks": True})
        _check_params_array(self._arr, config, manifest["num_rows"], loc.display)
        self._schema: pa.Schema | None = None
        self.recovered: dict[str, int] = {}  # what reopening discarded: orphan parts, temp files
        self.closed = False

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike) -> "ZooWriter":
        """Open an existing zoo for appending; discards leftovers of an interrupted commit."""
        loc = _Location(path)
        config = _load_config(loc)
        lock_fd = _acquire_lock(loc)
        try:
            manifest = _load_manifest(loc)
            w = cls(loc, config, manifest, lock_fd)
            w._clean_leftovers()
        except BaseException:
            _release_lock(lock_fd)
            raise
        return w

    def _clean_leftovers(self) -> None:
        listed = {os.path.basename(p["file"]) for p in self._manifest["parts"]}
        orphans = [f for f in self._loc.listdir(META_DIR) if f not in listed]
        for f in orphans:
            self._loc.remove(f"{META_DIR}/{f}")
        temps = [f for f in self._loc.listdir("") if ".tmp-" in f]
        for f in temps:
            self._loc.remove(f)
        partial = [f for f in self._loc.files_under(PARAMS) if f.endswith(".partial")] if self._loc.local else []
        for f in partial:
            self._loc.remove(f)
        scratch = self._loc.files_under(TMP_DIR) if self._loc.local else []
        if self._loc.local:
            import shutil

            shutil.rmtree(self._loc.path(TMP_DIR), ignore_errors=True)
        self.recovered = {"orphan_parts": sum(".tmp-" not in f for f in orphans),
                          "temp_files": len(temps) + len(partial) + len(scratch) + sum(".tmp-" in f for f in orphans)}

    def temp_dir(self, name: str) -> str | None:
        """A fresh local scratch directory ZOO/.tmp/NAME, removed when the writer is next opened.

        None for a zoo on another filesystem. Only the lock holder uses it, so reopening can
        delete whatever a killed writer left there.
        """
        self._check_open()
        if not self._loc.local:
            return None
        import shutil

        path = self._loc.path(f"{TMP_DIR}/{name}")
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
        return path

    # -- state ---------------------------------------------------------------------------------

    @property
    def path(self) -> str:
        return self._loc.display

    @property
    def num_rows(self) -> int:
        """Committed checkpoints; the next commit's first id."""
        return int(self._manifest["num_rows"])

    @property
    def committed_keys(self) -> set[str]:
        return set(self._manifest["commits"])

    def ids_of(self, key: str) -> np.ndarray:
        """Checkpoint ids a committed key received."""
        start, stop = self._manifest["commits"][key]
        return np.arange(start, stop, dtype=np.int64)

    # -- committing ----------------------------------------------------------------------------

    def commit(self, params: Any, meta: Any, key: str) -> np.ndarray:
        """Append one batch atomically.

        Args:
            params: (n, P) parameters (numpy or torch), castable to float32, all finite.
            meta: pa.Table or dict of n-row columns (see ``build_metadata``), without checkpoint_id.
            key: unique name of the batch (e.g. "run-17/steps-0-400"); a key already committed is
                skipped, so re-running an interrupted job commits each batch exactly once.
        Returns:
            (n,) int64 checkpoint ids of the batch (those it got the first time, for a repeated key).
        """
        self._check_open()
        if not isinstance(key, str) or not key:
            raise HyperForgetError("commit key must be a non-empty string naming the batch")
        if key in self._manifest["commits"]:
            return self.ids_of(key)
        what = f"batch {key!r}"
        x = _check_params(params, self.config, what)
        n = x.shape[0]
        if n == 0:
            raise HyperForgetError(f"{what} has no rows; commit at least one checkpoint")
        start = self.num_rows
        table = build_metadata(meta, n, start, self.config.spec.num_classes, what)
        table = self._match_schema(table, what)

        # 1. parameters (rows beyond num_rows are invisible until the manifest says otherwise)
        self._grow(start + n)
        self._arr[start:start + n] = x
        # 2. metadata part
        seq = int(self._manifest["next_part"])
        name = f"{META_DIR}/part-{seq:06d}.parquet"
        self._write_part(name, table)
        # 3. the commit point
        m = dict(self._manifest)
        m["parts"] = [*self._manifest["parts"], {"file": name, "start": start, "stop": start + n}]
        m["commits"] = {**self._manifest["commits"], key: [start, start + n]}
        m["num_rows"] = start + n
        m["next_part"] = seq + 1
        m["updated_at"] = _now()
        self._write_manifest(m)
        self._manifest = m
        return np.arange(start, start + n, dtype=np.int64)

    def _write_part(self, name: str, table: pa.Table) -> None:
        self._loc.write_parquet(name, table)

    def _write_manifest(self, m: dict) -> None:
        self._loc.write_atomic(MANIFEST, _json_bytes(m))

    def _grow(self, rows: int) -> None:
        cur = self._arr.shape[0]
        if rows <= cur:
            return
        # Grow in large, shard-aligned steps: resize rewrites zarr.json only, and doubling keeps
        # that rare; rows past the committed count cost nothing on disk until written.
        shard = self.config.shard_rows
        new = max(rows, 2 * cur, shard)
        new = -(-new // shard) * shard
        self._arr.resize((new, self.config.num_params))

    def _match_schema(self, table: pa.Table, what: str) -> pa.Table:
        if self._schema is None and self._manifest["parts"]:
            first = self._manifest["parts"][0]["file"]
            try:
                if self._loc.local:
                    self._schema = pq.read_schema(self._loc.path(first))
                else:
                    with self._loc.fs.open(self._loc.path(first), "rb") as f:
                        self._schema = pq.read_schema(f)
            except (OSError, pa.ArrowInvalid) as exc:
                raise HyperForgetError(f"cannot read {self.path}/{first} ({exc}); run `hyperforget zoo verify`") from None
            self._schema = self._schema.remove_metadata()
        if self._schema is None:
            self._schema = table.schema
            return table
        if table.schema.names != self._schema.names:
            extra = sorted(set(table.schema.names) - set(self._schema.names))
            lack = sorted(set(self._schema.names) - set(table.schema.names))
            raise HyperForgetError(f"{what}: metadata columns differ from the zoo's (extra {extra}, missing {lack}); "
                                   "every batch of a zoo carries the same columns")
        try:
            return table.cast(self._schema)
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
            raise HyperForgetError(f"{what}: metadata types differ from the zoo's: {exc}") from None

    # -- maintenance ---------------------------------------------------------------------------

    def set_normalization(self, stats: dict) -> None:
        """Store normalization statistics (``compute_normalization``) in zoo.json."""
        self._check_open()
        if not isinstance(stats, Mapping) or "std" not in stats:
            raise HyperForgetError("normalization stats must be a dict from compute_normalization (with 'std')")
        self.config.normalization = json.loads(json.dumps(dict(stats)))
        self._loc.write_atomic(ZOO_JSON, _json_bytes(self.config.to_dict()))

    def compact(self, *, file_rows: int = COMPACT_FILE_ROWS, row_group_rows: int = COMPACT_ROW_GROUP,
                progress: bool = False) -> dict:
        """Merge consecutive small Parquet parts into files of up to ``file_rows`` rows.

        The merged files replace the parts in one atomic manifest write; the old files are
        deleted afterwards (a crash in between leaves orphans that the next open removes).
        Readers holding the old manifest must reopen after a compaction.
        Returns {"parts_before", "parts_after", "files_written"}.
        """
        self._check_open()
        parts = self._manifest["parts"]
        groups: list[list[dict]] = []
        for p in parts:
            rows = p["stop"] - p["start"]
            if groups and sum(q["stop"] - q["start"] for q in groups[-1]) + rows <= file_rows:
                groups[-1].append(p)
            else:
                groups.append([p])
        todo = [g for g in groups if len(g) > 1]
        seq = int(self._manifest["next_part"])
        new_parts, replaced = [], []
        with _progress(progress, "compacting", len(todo)) as advance:
            for g in groups:
                if len(g) == 1:
                    new_parts.append(g[0])
                    continue
                table = pa.concat_tables([self._loc.read_parquet(p["file"]) for p in g])
                name = f"{META_DIR}/part-{seq:06d}.parquet"
                seq += 1
                self._loc.write_parquet(name, table, row_group_size=row_group_rows)
                new_parts.append({"file": name, "start": g[0]["start"], "stop": g[-1]["stop"]})
                replaced += [p["file"] for p in g]
                advance()
        if not replaced:
            return {"parts_before": len(parts), "parts_after": len(parts), "files_written": 0}
        m = {**self._manifest, "parts": new_parts, "next_part": seq, "updated_at": _now()}
        self._write_manifest(m)
        self._manifest = m
        for f in replaced:
            self._loc.remove(f)
        return {"parts_before": len(parts), "parts_after": len(new_parts), "files_written": len(todo)}

    def reader(self) -> "ZooReader":
        """A reader of what is committed now."""
        return open_zoo(self._loc.display if self._loc.local else self._loc.url)

    # -- closing -------------------------------------------------------------------------------

    def close(self) -> None:
        if not self.closed:
            _release_lock(self._lock_fd)
            self._lock_fd = None
            self.closed = True

    def _check_open(self) -> None:
        if self.closed:
            raise HyperForgetError(f"the writer of {self.path} is closed; reopen it with ZooWriter.open")

    def __enter__(self) -> "ZooWriter":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()

    def __repr__(self) -> str:
        return f"ZooWriter({self.path!r}, rows={self.num_rows})"


def _check_params(params: Any, config: ZooConfig, what: str) -> np.ndarray:
    """(n, P) numpy/torch -> C-contiguous float32, or HyperForgetError naming the batch."""
    if hasattr(params, "detach"):
        params = params.detach().cpu().numpy()
    x = np.asarray(params)
    if x.dtype.kind not in "fiub":
        raise HyperForgetError(f"{what}: parameters of dtype {x.dtype} cannot be stored as float32")
    if x.ndim != 2 or x.shape[1] != config.num_params:
        s = config.spec
        raise HyperForgetError(
            f"{what}: parameters have shape {x.shape}, the zoo's MLP spec {s.input_size}-{s.hidden}-{s.num_classes} "
            f"needs (n, {config.num_params})")
    with np.errstate(over="ignore"):
        x = np.ascontiguousarray(x, dtype=np.float32)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise HyperForgetError(f"{what}: {rows.size} parameter rows hold NaN or inf (first: row {int(rows[0])}); "
                               "drop diverged checkpoints before committing")
    return x


def _acquire_lock(loc: _Location) -> int | None:
    if not loc.local:
        return None  # fsspec stores: the caller guarantees one committer (see module docstring)
    import fcntl

    fd = os.open(loc.path(LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise HyperForgetError(f"zoo {loc.display} is being written by another process (lock {LOCK} held); "
                               "one process commits at a time: wait for it or send its batches to it") from None
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


def _release_lock(fd: int | None) -> None:
    if fd is not None:
        with contextlib.suppress(OSError):
            os.close(fd)  # closing the descriptor drops the flock


def create_zoo(path: str | os.PathLike, config: ZooConfig, *, exist_ok: bool = False) -> ZooWriter:
    """Create an empty zoo at a directory or fsspec URL and return its writer.

    With ``exist_ok`` an existing zoo of the same MLP spec and classes is reopened instead.
    """
    loc = _Location(path)
    if loc.exists(ZOO_JSON):
        if not exist_ok:
            raise HyperForgetError(f"a zoo already exists at {loc.display}; append with ZooWriter.open "
                                   "(exist_ok=True) or choose another path")
        w = ZooWriter.open(path)
        if w.config.spec != config.spec or w.config.classes != config.classes:
            w.close()
            raise HyperForgetError(
                f"the zoo at {loc.display} holds {w.config.spec} for classes {list(w.config.classes)}, not "
                f"{config.spec} for {list(config.classes)}; choose another path")
        return w
    ours = {PARAMS, META_DIR, MANIFEST, LOCK, TMP_DIR}
    others = [f for f in loc.listdir("") if f not in ours and ".tmp-" not in f]
    if others:
        raise HyperForgetError(f"{loc.display} is not empty and holds no zoo ({others[:3]}...); "
                               "choose a new or empty directory")
    import zarr

    loc.makedirs("")
    lock_fd = _acquire_lock(loc)
    try:
        if not config.created_at:
            config.created_at = _now()
        p = config.num_params
        # Start at zero rows; commits grow the array (see ZooWriter._grow).
        zarr.create_array(loc.url_of(PARAMS), shape=(0, p), dtype="float32", chunks=(config.chunk_rows, p),
                          shards=(config.shard_rows, p), compressors=_compressor_codecs(config.compressor),
                          fill_value=0.0, zarr_format=3, overwrite=True, dimension_names=("checkpoint", "param"),
                          attributes={"hyperforget": "checkpoint parameters; rows >= manifest.json num_rows "
                                                     "are uncommitted"})
        loc.makedirs(META_DIR)
        for f in loc.listdir(META_DIR):
            loc.remove(f"{META_DIR}/{f}")
        manifest = _empty_manifest()
        loc.write_atomic(MANIFEST, _json_bytes(manifest))
        # zoo.json last: its presence is what makes the directory a zoo.
        loc.write_atomic(ZOO_JSON, _json_bytes(config.to_dict()))
        return ZooWriter(loc, config, manifest, lock_fd)
    except BaseException:
        _release_lock(lock_fd)
        raise


# ----------------------------------------------------------------------------------------------
# Reader


class ZooReader:
    """Read-only view of a zoo's committed checkpoints (a snapshot of the manifest at open time)."""

    def __init__(self, path: str | os.PathLike):
        self._loc = _Location(path)
        self.config = _load_config(self._loc)
        self.refresh()

    def refresh(self) -> None:
        """Re-read the manifest to see commits made since opening."""
        self._manifest = _load_manifest(self._loc)
        self._arr = _open_params(self._loc, "r")
        _check_params_array(self._arr, self.config, self.num_rows, self._loc.display)

    @property
    def path(self) -> str:
        return self._loc.display

    @property
    def spec(self) -> MLPSpec:
        return self.config.spec

    @property
    def num_rows(self) -> int:
        return int(self._manifest["num_rows"])

    def __len__(self) -> int:
        return self.num_rows

    @property
    def params_array(self):
        """The underlying zarr array (rows beyond num_rows are uncommitted)."""
        return self._arr

    @property
    def committed_keys(self) -> set[str]:
        return set(self._manifest["commits"])

    @property
    def parts(self) -> list[dict]:
        return [dict(p) for p in self._manifest["parts"]]

    def _check_ids(self, ids: Any) -> np.ndarray:
        if hasattr(ids, "detach"):
            ids = ids.detach().cpu().numpy()
        ids = np.asarray(ids)
        if ids.ndim != 1 or (ids.size and ids.dtype.kind not in "iu"):
            raise HyperForgetError(f"checkpoint ids must be a 1-D integer array, got shape {ids.shape} {ids.dtype}")
        ids = ids.astype(np.int64, copy=False)
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_rows):
            bad = ids[(ids < 0) | (ids >= self.num_rows)][0]
            raise HyperForgetError(f"checkpoint id {int(bad)} is outside the zoo's committed range [0, {self.num_rows})")
        return ids

    def read(self, ids: Any, *, max_run_chunks: int = 64) -> np.ndarray:
        """Parameters of the given checkpoints, in the given order (duplicates allowed).

        Reads each touched chunk once: ids are sorted and deduplicated, runs of consecutive
        chunks are fetched as slices (concurrently), rows are picked in numpy, and the
        requested order is restored.
        Args:
            ids: (K,) int checkpoint ids in [0, num_rows).
        Returns:
            (K, P) float32.
        """
        ids = self._check_ids(ids)
        p = self.config.num_params
        if ids.size == 0:
            return np.empty((0, p), np.float32)
        uniq, inverse = np.unique(ids, return_inverse=True)
        cr = self.config.chunk_rows
        touched = np.unique(uniq // cr)
        breaks = np.flatnonzero((np.diff(touched) != 1)) + 1
        slices = []
        for run in np.split(touched, breaks):
            for k in range(0, len(run), max_run_chunks):
                sub = run[k:k + max_run_chunks]
                slices.append((int(sub[0]) * cr, min((int(sub[-1]) + 1) * cr, self.num_rows)))
        out = np.empty((len(uniq), p), np.float32)
        for (start, stop), block in zip(slices, self._read_slices(slices)):
            lo, hi = np.searchsorted(uniq, [start, stop])
            out[lo:hi] = block[uniq[lo:hi] - start]
        return out[inverse.reshape(-1)]

    def _read_slices(self, slices: list[tuple[int, int]], concurrency: int = 16) -> Iterator[np.ndarray]:
        from zarr.core.sync import sync

        aarr = self._arr.async_array

        async def fetch(batch):
            return await asyncio.gather(*(aarr.getitem((slice(a, b), slice(None))) for a, b in batch))

        for i in range(0, len(slices), concurrency):
            yield from sync(fetch(slices[i:i + concurrency]))

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """(stop - start, P) float32 parameters of a contiguous id range."""
        if not 0 <= start <= stop <= self.num_rows:
            raise HyperForgetError(f"row range [{start}, {stop}) is outside the zoo's committed range "
                                   f"[0, {self.num_rows})")
        return np.asarray(self._arr[start:stop], dtype=np.float32)

    def iter_rows(self, batch_rows: int | None = None, start: int = 0,
                  stop: int | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """Yield (first_id, (b, P) block) over [start, stop) in chunk-aligned blocks."""
        stop = self.num_rows if stop is None else stop
        step = batch_rows or self.config.shard_rows
        pos = start
        while pos < stop:
            end = min(stop, (pos // step + 1) * step)
            yield pos, self.read_rows(pos, end)
            pos = end

    def meta_files(self) -> list[str]:
        """Paths (local) or URLs of the committed Parquet parts, in id order."""
        return [self._loc.url_of(p["file"]) for p in self._manifest["parts"]]

    def metadata(self, columns: Sequence[str] | None = None) -> pa.Table:
        """One row per committed checkpoint, ordered by checkpoint_id."""
        parts = self._manifest["parts"]
        if not parts:
            schema = metadata_schema(self.config.spec.num_classes)
            if columns is not None:
                schema = pa.schema([schema.field(c) for c in columns])
            return schema.empty_table()
        tables = []
        for p in parts:
            try:
                tables.append(self._loc.read_parquet(p["file"], columns=columns))
            except (OSError, pa.ArrowInvalid) as exc:
                raise HyperForgetError(f"cannot read {self.path}/{p['file']}: {str(exc).splitlines()[0]}; if the zoo "
                                       "was compacted since this reader opened, call refresh(); else run "
                                       "`hyperforget zoo verify`") from None
        return pa.concat_tables(tables)

    def duckdb(self, con=None):
        """A DuckDB relation over the metadata (Parquet files locally, Arrow otherwise)."""
        import duckdb

        con = con or duckdb.connect()
        files = self.meta_files()
        if self._loc.local and files:
            return con.read_parquet(files)
        return con.from_arrow(self.metadata())

    def module(self, checkpoint_id: int) -> MLP:
        """The checkpoint as a torch module."""
        return MLP.from_flat(self.spec, self.read([int(checkpoint_id)])[0])

    def __getstate__(self) -> dict:
        # Pickles as its location and snapshot (for dask tasks, spawned DataLoader workers); the
        # zarr array is reopened on the other side instead of sharing zarr's event loop state.
        return {"path": self._loc.display if self._loc.local else self._loc.url, "manifest": self._manifest}

    def __setstate__(self, state: dict) -> None:
        self._loc = _Location(state["path"])
        self.config = _load_config(self._loc)
        self._manifest = state["manifest"]
        self._arr = _open_params(self._loc, "r")

    def __repr__(self) -> str:
        return f"ZooReader({self.path!r}, rows={self.num_rows}, spec={self.spec})"


def open_zoo(path: str | os.PathLike) -> ZooReader:
    """Open a zoo (local directory or fsspec URL) for reading."""
    return ZooReader(path)


# ----------------------------------------------------------------------------------------------
# Normalization, compaction


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


def compact(path: str | os.PathLike, **kwargs) -> dict:
    """Merge a zoo's small Parquet parts (see ZooWriter.compact)."""
    with ZooWriter.open(path) as w:
        return w.compact(**kwargs)


@contextlib.contextmanager
def _progress(enabled: bool, what: str, total: int):
    if not enabled:
        yield lambda k=1: None
        return
    from rich.progress import Progress

    with Progress(transient=True) as prog:
        task = prog.add_task(what, total=total)
        yield lambda k=1: prog.advance(task, k)


# ----------------------------------------------------------------------------------------------
# Verification and summary


@dataclass
class VerifyReport:
    """What verify_zoo found; ``ok`` when ``problems`` is empty."""

    path: str  # the zoo checked
    committed_rows: int = 0  # num_rows in manifest.json
    params_rows: int = 0  # rows allocated in params.zarr (>= committed)
    parquet_rows: int = 0  # rows in the committed Parquet parts
    shards_checked: int = 0  # shard files decoded
    parts_checked: int = 0  # Parquet parts read
    problems: list[str] = field(default_factory=list)  # one line each, naming the file
    notes: list[str] = field(default_factory=list)  # harmless findings (leftovers a reopen removes)
    seconds: float = 0.0  # time taken

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict:
        return {"path": self.path, "ok": self.ok, "committed_rows": self.committed_rows,
                "params_rows": self.params_rows, "parquet_rows": self.parquet_rows,
                "shards_checked": self.shards_checked, "parts_checked": self.parts_checked,
                "problems": list(self.problems), "notes": list(self.notes), "seconds": round(self.seconds, 3)}


def _short(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:200]


def verify_zoo(path: str | os.PathLike, *, check_params: bool = True, progress: bool = False) -> VerifyReport:
    """Check a zoo end to end and name every damaged file.

    Checks: zoo.json and manifest.json parse; params.zarr rows >= committed rows and rows of P
    values; the Parquet parts cover [0, N) contiguously, each is readable, has its range's row
    count and checkpoint ids exactly start..stop-1 (so ids are unique and contiguous), and valid
    source ids; every shard holding committed rows exists, decodes (crc32c per chunk) and holds
    only finite values.
    """
    t0 = time.perf_counter()
    loc = _Location(path)
    report = VerifyReport(loc.display)
    config = _load_config(loc)  # a missing zoo or unknown version is an error, not a finding
    try:
        manifest = _load_manifest(loc)
    except HyperForgetError as exc:
        report.problems.append(f"{MANIFEST}: {exc}")
        report.seconds = time.perf_counter() - t0
        return report
    n = int(manifest.get("num_rows", -1))
    report.committed_rows = n

    # Parquet parts
    parts = sorted(manifest.get("parts", []), key=lambda p: p["start"])
    pos = 0
    listed = set()
    for p in parts:
        listed.add(os.path.basename(p["file"]))
        if p["start"] != pos:
            report.problems.append(f"{MANIFEST}: part {p['file']} starts at row {p['start']}, expected {pos}")
        pos = p["stop"]
    if pos != n:
        report.problems.append(f"{MANIFEST}: parts cover rows [0, {pos}) but {n} rows are committed")
    required = set(metadata_schema(config.spec.num_classes).names)
    with _progress(progress, "checking metadata", len(parts)) as advance:
        for p in parts:
            name = p["file"]
            try:
                t = loc.read_parquet(name)
            except FileNotFoundError:
                report.problems.append(f"{name}: missing")
                continue
            except Exception as exc:  # truncated or garbled files raise ArrowInvalid/OSError
                report.problems.append(f"{name}: unreadable Parquet file ({_short(exc)}), truncated or corrupt")
                continue
            report.parts_checked += 1
            report.parquet_rows += t.num_rows
            advance()
            if t.num_rows != p["stop"] - p["start"]:
                report.problems.append(f"{name}: {t.num_rows} rows, the manifest says {p['stop'] - p['start']}")
                continue
            lack = sorted(required - set(t.column_names))
            if lack:
                report.problems.append(f"{name}: lacks columns {lack}")
                continue
            ids = t.column("checkpoint_id").to_numpy()
            if not np.array_equal(ids, np.arange(p["start"], p["stop"])):
                report.problems.append(f"{name}: checkpoint ids are not exactly {p['start']}..{p['stop'] - 1} "
                                       "(duplicated or missing ids)")
            src = t.column("source_id").to_numpy()
            perm = t.column("perm_index").to_numpy()
            if src.size and (src.min() < 0 or src.max() >= n or np.any((perm == 0) & (src != ids))):
                report.problems.append(f"{name}: source_id values outside [0, {n}) or originals not their own source")
    orphans = [f for f in loc.listdir(META_DIR) if f not in listed]
    if orphans:
        report.notes.append(f"{len(orphans)} uncommitted file(s) in {META_DIR}/ ({orphans[0]}, ...); "
                            "reopening the writer removes them")

    # Parameters
    try:
        arr = _open_params(loc, "r")
    except HyperForgetError as exc:
        report.problems.append(f"{PARAMS}: {exc}")
        report.seconds = time.perf_counter() - t0
        return report
    report.params_rows = int(arr.shape[0])
    if arr.ndim != 2 or arr.shape[1] != config.num_params:
        report.problems.append(f"{PARAMS}: rows of {arr.shape[1:]} values, the MLP spec needs {config.num_params}")
    elif arr.shape[0] < n:
        report.problems.append(f"{PARAMS}: holds {arr.shape[0]} rows, {n} are committed (truncated)")
    elif check_params and n > 0:
        _verify_params(loc, arr, config, n, report, progress)
    if arr.shape[0] > n:
        report.notes.append(f"{arr.shape[0] - n} uncommitted rows allocated in {PARAMS} (space for future commits)")
    report.seconds = time.perf_counter() - t0
    return report


def require_sound_zoo(zoo: "str | os.PathLike | ZooReader", *, check_params: bool = True) -> "ZooReader":
    """Refuse a zoo whose committed rows fail :func:`verify_zoo`'s checks; return a reader of it.

    For anything that trains or evaluates on a zoo: a missing or corrupt shard, NaN or inf rows,
    parts that do not cover the committed row count, or unreadable metadata raise
    HyperForgetError naming the first problem and the verify command, instead of training on
    zero-filled, NaN or phantom rows.

    Args:
        zoo: zoo directory, fsspec URL or an open ZooReader (its location is checked).
        check_params: also decode every shard holding committed rows (what training reads).
    Returns:
        A ZooReader of the zoo as checked.
    """
    if isinstance(zoo, ZooReader):
        where = zoo.path if zoo._loc.local else zoo._loc.url
    else:
        where = os.fspath(zoo)
    rep = verify_zoo(where, check_params=check_params)
    if not rep.ok:
        more = f" (and {len(rep.problems) - 1} more)" if len(rep.problems) > 1 else ""
        raise HyperForgetError(f"zoo {rep.path} is damaged: {rep.problems[0]}{more}; "
                               f"run `hyperforget zoo verify {rep.path}` for the full list")
    return open_zoo(where)


def _verify_params(loc: _Location, arr, config: ZooConfig, n: int, report: VerifyReport, progress: bool) -> None:
    sr, cr = config.shard_rows, config.chunk_rows
    aarr = arr.async_array
    num_shards = -(-n // sr)
    with _progress(progress, "decoding shards", num_shards) as advance:
        for s in range(num_shards):
            a, b = s * sr, min((s + 1) * sr, n)
            key = f"{PARAMS}/{aarr.metadata.encode_chunk_key((s, 0))}"
            advance()
            if not loc.exists(key):
                report.problems.append(f"{key} (rows {a}-{b - 1}): shard file missing")
                continue
            try:
                block = np.asarray(arr[a:b])
            except Exception:
                # Narrow the failure down to the chunks inside the shard.
                bad = []
                for c0 in range(a, b, cr):
                    try:
                        arr[c0:min(c0 + cr, b)]
                    except Exception as exc:
                        bad.append((c0, min(c0 + cr, b), exc))
                if not bad:
                    report.problems.append(f"{key} (rows {a}-{b - 1}): fails to decode as a whole")
                elif len(bad) == len(range(a, b, cr)):
                    report.problems.append(f"{key} (rows {a}-{b - 1}): corrupt shard, no chunk decodes "
                                           f"({_short(bad[0][2])})")
                else:
                    for c0, c1, exc in bad:
                        report.problems.append(f"{key} chunk rows {c0}-{c1 - 1}: corrupt, fails to decode "
                                               f"({_short(exc)})")
                continue
            report.shards_checked += 1
            finite = np.isfinite(block).all(axis=1)
            if not finite.all():
                rows = a + np.flatnonzero(~finite)
                report.problems.append(f"{key} (rows {a}-{b - 1}): {rows.size} rows hold NaN or inf "
                                       f"(first: checkpoint {int(rows[0])})")
    if loc.local:
        partial = [f for f in loc.files_under(PARAMS) if f.endswith(".partial")]
        if partial:
            report.notes.append(f"{len(partial)} temp file(s) from an interrupted write in {PARAMS}/; "
                                "reopening the writer removes them")


def zoo_info(path: str | os.PathLike) -> dict:
    """Counts, sizes and settings of a zoo, JSON-ready."""
    r = open_zoo(path)
    cfg = r.config
    n = r.num_rows
    meta = r.metadata(columns=["run_id", "perm_index", "phase"])
    originals = int(pc.sum(pc.equal(meta.column("perm_index"), 0)).as_py() or 0)
    augmented = int(pc.sum(pc.greater(meta.column("perm_index"), 0)).as_py() or 0)
    phases = {str(k): int(v) for k, v in zip(*_value_counts(meta.column("phase")))}
    params_bytes = r._loc.size(PARAMS)
    meta_bytes = r._loc.size(META_DIR)
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
        "metadata_bytes": meta_bytes, "size_on_disk": r._loc.size(""),
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
