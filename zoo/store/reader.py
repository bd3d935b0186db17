"""Reading a zoo: :func:`open_zoo` and :class:`ZooReader` (committed rows and their metadata)."""

from __future__ import annotations

import asyncio
import os
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa

from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.mlp import MLP, MLPSpec
from hyperforget.zoo.store.format import metadata_schema
from hyperforget.zoo.store.location import Location, check_params_array, load_config, load_manifest, open_params
from hyperforget.zoo.store.shards import ShardFiles


class ZooReader:
    """Read-only view of a zoo's committed checkpoints (a snapshot of the manifest at open time).

    Parameters of a local zoo are read straight from its shard files (``ShardFiles``, the
    loader's decoder, here checking the shard index's and each chunk's crc32c on every read, as
    zarr does) when its zarr.json describes the layout that decoder reads (Blosc or no
    compression): up to three times faster than zarr-python's read path (docs/benchmarks.md,
    "The zoo store"). The shard files answer a call whole or not at all: if any chunk it needs
    is not stored, fails a checksum or cannot be read, the whole call is read through zarr as
    before, so the arrays and the errors are zarr's (zarr's own outcome on a damaged shard can
    depend on the slice asked for). Zoos at fsspec URLs, other layouts (zstd) and
    ``fast_reads=False`` read through zarr only.
    """

    def __init__(self, path: str | os.PathLike, *, fast_reads: bool = True):
        self._loc = Location(path)
        self.config = load_config(self._loc)
        self.fast_reads = bool(fast_reads)
        self.refresh()

    def refresh(self) -> None:
        """Re-read the manifest to see commits made since opening."""
        self._manifest = load_manifest(self._loc)
        self._arr = open_params(self._loc, "r")
        check_params_array(self._arr, self.config, self.num_rows, self._loc.display)
        self._files = self._shard_files()

    def _shard_files(self) -> ShardFiles | None:
        if not (self.fast_reads and self._loc.local):
            return None
        c = self.config
        return ShardFiles.open(self._loc.root, c.chunk_rows, c.shard_rows, c.num_params, cache=False)

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
            raise HyperForgetError(f"checkpoint id {int(bad)} is outside the zoo's committed range "
                                   f"[0, {self.num_rows})")
        return ids

    def read(self, ids: Any, *, max_run_chunks: int = 64) -> np.ndarray:
        """Parameters of the given checkpoints, in the given order (duplicates allowed).

        Reads each touched chunk once: ids are sorted and deduplicated, the chunks are read one by
        one from the shard files (or, through zarr, runs of consecutive chunks as slices of up to
        ``max_run_chunks``, concurrently), rows are picked in numpy, and the requested order is
        restored.
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
        out = self._shard_rows(uniq, touched) if self._files is not None else None
        if out is not None:
            return out[inverse.reshape(-1)]
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

    def _shard_chunk(self, c: int) -> np.ndarray | None:
        """(chunk_rows, P) of chunk ``c`` from its shard file, or None: not stored, damaged, unreadable."""
        try:
            return self._files.chunk(c)
        except Exception:  # the caller reads through zarr, which raises what it always did
            return None

    def _shard_rows(self, uniq: np.ndarray, touched: np.ndarray) -> np.ndarray | None:
        """Rows of the sorted unique ids ``uniq`` (in ``touched`` chunks) from the shard files, or None."""
        cr = self.config.chunk_rows
        out = np.empty((len(uniq), self.config.num_params), np.float32)
        lo = np.searchsorted(uniq, touched * cr)  # each chunk's first position in uniq
        for c, a, b in zip(touched.tolist(), lo.tolist(), [*lo[1:].tolist(), len(uniq)]):
            block = self._shard_chunk(c)
            if block is None:
                return None
            out[a:b] = block[uniq[a:b] - c * cr]
        return out

    def _shard_range(self, start: int, stop: int) -> np.ndarray | None:
        """Rows [start, stop) from the shard files, or None."""
        cr = self.config.chunk_rows
        out = np.empty((stop - start, self.config.num_params), np.float32)
        for c in range(start // cr, -(-stop // cr)):
            block = self._shard_chunk(c)
            if block is None:
                return None
            a, b = max(start, c * cr), min(stop, (c + 1) * cr)
            out[a - start:b - start] = block[a - c * cr:b - c * cr]
        return out

    def read_rows(self, start: int, stop: int) -> np.ndarray:
        """(stop - start, P) float32 parameters of a contiguous id range."""
        if not 0 <= start <= stop <= self.num_rows:
            raise HyperForgetError(f"row range [{start}, {stop}) is outside the zoo's committed range "
                                   f"[0, {self.num_rows})")
        # An empty range goes to zarr too: it still decodes a chunk there, and may raise.
        out = self._shard_range(start, stop) if self._files is not None and start < stop else None
        return out if out is not None else np.asarray(self._arr[start:stop], dtype=np.float32)

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
        return {"path": self._loc.display if self._loc.local else self._loc.url, "manifest": self._manifest,
                "fast_reads": self.fast_reads}

    def __setstate__(self, state: dict) -> None:
        self._loc = Location(state["path"])
        self.config = load_config(self._loc)
        self.fast_reads = state.get("fast_reads", True)
        self._manifest = state["manifest"]
        self._arr = open_params(self._loc, "r")
        self._files = self._shard_files()

    def __repr__(self) -> str:
        return f"ZooReader({self.path!r}, rows={self.num_rows}, spec={self.spec})"


def open_zoo(path: str | os.PathLike, *, fast_reads: bool = True) -> ZooReader:
    """Open a zoo (local directory or fsspec URL) for reading; ``fast_reads=False`` reads through zarr only."""
    return ZooReader(path, fast_reads=fast_reads)
