"""Writing a zoo: :func:`create_zoo`, :class:`ZooWriter` (atomic, idempotent commits), :func:`compact`.

The commit protocol and the single-committer lock are described in ``hyperforget.zoo.store``.
"""

from __future__ import annotations

import contextlib
import json
import os
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.store.format import (COMPACT_FILE_ROWS, COMPACT_ROW_GROUP, LOCK, MANIFEST, META_DIR, PARAMS,
                                          TMP_DIR, ZOO_JSON, ZooConfig, build_metadata, compressor_codecs)
from hyperforget.zoo.store.location import (Location, check_params_array, empty_manifest, json_bytes, load_config,
                                            load_manifest, open_params, utc_now)
from hyperforget.zoo.store.progress import progress_bar
from hyperforget.zoo.store.reader import ZooReader, open_zoo


class ZooWriter:
    """Appends batches of checkpoints to a zoo with atomic, idempotent commits.

    Use :func:`create_zoo` for a new zoo and :meth:`ZooWriter.open` to continue one.
    """

    def __init__(self, loc: Location, config: ZooConfig, manifest: dict, lock_fd: int | None):
        self._loc = loc
        self.config = config
        self._manifest = manifest
        self._lock_fd = lock_fd
        self._arr = open_params(loc, "r+").with_config({"write_empty_chunks": True})
        check_params_array(self._arr, config, manifest["num_rows"], loc.display)
        self._schema: pa.Schema | None = None
        self.recovered: dict[str, int] = {}  # what reopening discarded: orphan parts, temp files
        self.closed = False

    # -- opening -------------------------------------------------------------------------------

    @classmethod
    def open(cls, path: str | os.PathLike) -> "ZooWriter":
        """Open an existing zoo for appending; discards leftovers of an interrupted commit."""
        loc = Location(path)
        config = load_config(loc)
        lock_fd = _acquire_lock(loc)
        try:
            manifest = load_manifest(loc)
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
        m["updated_at"] = utc_now()
        self._write_manifest(m)
        self._manifest = m
        return np.arange(start, start + n, dtype=np.int64)

    def _write_part(self, name: str, table: pa.Table) -> None:
        self._loc.write_parquet(name, table)

    def _write_manifest(self, m: dict) -> None:
        self._loc.write_atomic(MANIFEST, json_bytes(m))

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
                raise HyperForgetError(f"cannot read {self.path}/{first} ({exc}); "
                                       "run `hyperforget zoo verify`") from None
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
        self._loc.write_atomic(ZOO_JSON, json_bytes(self.config.to_dict()))

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
        with progress_bar(progress, "compacting", len(todo)) as advance:
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
        m = {**self._manifest, "parts": new_parts, "next_part": seq, "updated_at": utc_now()}
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


def _acquire_lock(loc: Location) -> int | None:
    if not loc.local:
        return None  # fsspec stores: the caller guarantees one committer (see the package docstring)
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
    loc = Location(path)
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
            config.created_at = utc_now()
        p = config.num_params
        # Start at zero rows; commits grow the array (see ZooWriter._grow).
        zarr.create_array(loc.url_of(PARAMS), shape=(0, p), dtype="float32", chunks=(config.chunk_rows, p),
                          shards=(config.shard_rows, p), compressors=compressor_codecs(config.compressor),
                          fill_value=0.0, zarr_format=3, overwrite=True, dimension_names=("checkpoint", "param"),
                          attributes={"hyperforget": "checkpoint parameters; rows >= manifest.json num_rows "
                                                     "are uncommitted"})
        loc.makedirs(META_DIR)
        for f in loc.listdir(META_DIR):
            loc.remove(f"{META_DIR}/{f}")
        manifest = empty_manifest()
        loc.write_atomic(MANIFEST, json_bytes(manifest))
        # zoo.json last: its presence is what makes the directory a zoo.
        loc.write_atomic(ZOO_JSON, json_bytes(config.to_dict()))
        return ZooWriter(loc, config, manifest, lock_fd)
    except BaseException:
        _release_lock(lock_fd)
        raise


def compact(path: str | os.PathLike, **kwargs) -> dict:
    """Merge a zoo's small Parquet parts (see ZooWriter.compact)."""
    with ZooWriter.open(path) as w:
        return w.compact(**kwargs)
