"""A streaming loader of zoo checkpoints over a materialized view, for training hypernetworks.

Usage from any project (DiHyFo-2 style, one checkpoint and its losses per sample)::

    from hyperforget.queries.loader import CheckpointStream, make_loader
    stream = CheckpointStream("ZOO", "dihyfo2_train_1234abcd", batch_size=256, normalize="layer")
    for batch in make_loader(stream, num_workers=2):  # batch["params"] (B, P), batch["losses"] (B, C)
        ...

How an epoch is ordered (all of it a pure function of seed, epoch, world size and workers):

1. Block shuffle. View rows are grouped by the zarr chunk that holds their checkpoint (θ in pair
   mode); the groups are put in a random order (seed, epoch). This is the epoch sequence.
2. Rank split. Rank r takes the r-th contiguous slice of the sequence (sizes differ by at most
   one). With ``even_ranks="pad"`` (or True) every rank gets ceil(N/W) rows, the sequence
   wrapping around to pad, as torch's DistributedSampler does; ``"trim"`` gives floor(N/W) and
   drops the tail. Use one of them under DDP: ranks with unequal batch counts hang collectives.
3. Worker split. A rank's rows are cut into batches of ``batch_size``; DataLoader worker w gets
   a contiguous range of those batches, so only the rank's last batch can be short, and the
   number of batches per rank does not depend on the number of workers.
4. Buffer shuffle. Each worker reads its rows group by group (one whole-chunk read per group,
   through a small chunk cache) into a buffer of ``shuffle_buffer`` rows; once it is full, each
   arriving row displaces (emits) a held row picked uniformly at random.

Within an epoch every view row is yielded exactly once over all ranks and workers (unless
``even_ranks`` pads or trims). Steps 1 and 4 are planned on row indices before any data is read,
so resuming mid-epoch (:meth:`CheckpointStream.state_dict`) replays the plan, skips the samples
already consumed without reading chunks that only held those, and yields exactly the rest.

Reading: an uncompressed zoo's shard files are mapped into one address range (MappedShards, in
``zoo.store.shards``); the buffer then holds only row positions and each batch is one gather from
the page cache. A compressed zoo's chunks are read and decoded (ShardFiles, same module) and
their rows copied into the buffer.

Memory: compressed, the shuffle buffer (``shuffle_buffer + 1024 + batch_size`` rows of P floats,
twice in pair mode), a few cached chunks, and the batches in flight (``prefetch_factor x
num_workers``). Uncompressed, no buffer of rows: the pages read stay mapped, so RSS grows to
the zoo's size in page-cache pages (shared, clean, reclaimable: not memory the process owns).
With ``release_pages=True`` a chunk's pages leave the mapping once its last row is emitted; a
chunk keeps some row for about ln(chunk_rows) + 1 buffer turnovers, so RSS then stays at several
times the buffer's size, independent of the zoo's. The view's ids and losses (a few numbers per
row) stay in memory, the parameters never do.

Fork safety: the zoo's zarr array is opened lazily in the process that reads (each DataLoader
worker opens its own), never pickled or shared.
"""

from __future__ import annotations

import json
import os
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterator

import numpy as np
import pyarrow.parquet as pq
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from hyperforget.zoo.augment import permutation_index
from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.seeds import LOADER_EPOCH_STRIDE
from hyperforget.zoo.store.shards import MappedShards, ShardFiles

STATE_VERSION = 2  # 2: the buffer shuffle displaces one held row per arrival (version 1 orders differ)
PIECE_ROWS = 1024  # rows read and placed in the buffer at once (bounds the buffer's overflow)
NORMALIZE = (None, "global", "layer")


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64 finalizer on uint64 arrays: a fixed, version-independent hash."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def hidden_permutations(keys: np.ndarray, hidden: int) -> np.ndarray:
    """(B,) uint64 keys -> (B, H) permutations of the hidden units, one per key."""
    b = keys.shape[0]
    grid = keys[:, None].astype(np.uint64) * np.uint64(hidden + 1) + np.arange(1, hidden + 1, dtype=np.uint64)
    return np.argsort(_mix64(grid.reshape(-1)).reshape(b, hidden), axis=1, kind="stable")


def _resolve_dist(rank: int | None, world_size: int | None) -> tuple[int, int]:
    if rank is not None or world_size is not None:
        if rank is None or world_size is None:
            raise HyperForgetError("give both rank and world_size, or neither (then torch.distributed decides)")
        if world_size < 1 or not 0 <= rank < world_size:
            raise HyperForgetError(f"rank {rank} is not in [0, world_size={world_size})")
        return int(rank), int(world_size)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class _BufferPlan:
    """The buffer shuffle of one worker's rows, planned on indices before reading any data.

    Rows arrive in pieces (rows of one chunk, at most PIECE_ROWS) and go to free slots of a
    store. The buffer holds up to ``capacity`` rows; once it is full, each arriving row takes
    the place of a held row picked uniformly at random, which is emitted (the shuffle buffer of
    tf.data and webdataset); at the end the rest are emitted in random order. The emission order
    is drawn for all rows at once (:func:`_replace`), whatever the capacity. Emitted rows form
    batches of ``batch_size`` in emission order; a batch's slots are freed only once the whole
    batch is emitted, so each batch is one gather from the store (no copy per emission), and
    the store needs ``capacity + PIECE_ROWS + batch_size`` slots. Without an rng (or with
    capacity 0) rows are emitted in arrival order.
    """

    def __init__(self, piece_bounds: np.ndarray, n: int, capacity: int, rng: np.random.Generator | None,
                 batch_size: int):
        shuffle = rng is not None and capacity > 0
        self.store_rows = min(n, (capacity if shuffle else 0) + PIECE_ROWS + batch_size)
        self.slots = np.empty(n, np.int64)  # slot of each arriving row (by position in the worker's rows)
        # after piece s has been placed (and, last, after the final flush): batches completed,
        # each as (slots, row positions) in output order
        self.ready: list[list[tuple[np.ndarray, np.ndarray]]] = []
        free = np.arange(self.store_rows - 1, -1, -1, dtype=np.int64)  # stack of free slots, top at the end
        top = self.store_rows
        if shuffle:
            # Row positions are arrival order: the first `fill` rows fill the buffer, and each
            # later row displaces (emits) one, so the whole emission order is drawn at once.
            fill = min(capacity, n)
            held = np.arange(fill, dtype=np.int64)
            displaced = _replace(held, np.arange(fill, n, dtype=np.int64), rng)  # by rows fill, fill + 1, ...
            tail = held[rng.permutation(fill)]
        content = np.full(self.store_rows, -1, np.int64)  # slot -> row position
        pending: list[np.ndarray] = []  # emitted slots of the batch being formed
        pending_n = 0

        def emit(out: np.ndarray) -> list[tuple[np.ndarray, np.ndarray]]:
            nonlocal pending_n, top
            done = []
            pending.append(out)
            pending_n += len(out)
            while pending_n >= batch_size:
                allp = np.concatenate(pending)
                take, rest = allp[:batch_size], allp[batch_size:]
                done.append((take, content[take]))
                free[top:top + len(take)] = take[::-1]
                top += len(take)
                pending[:] = [rest]
                pending_n = len(rest)
            return done

        for s in range(len(piece_bounds) - 1):
            a, b = int(piece_bounds[s]), int(piece_bounds[s + 1])
            # Ascending slots: the piece's copy into the store then walks memory forwards.
            got = np.sort(free[top - (b - a):top])
            top -= b - a
            self.slots[a:b] = got
            content[got] = np.arange(a, b)
            out = self.slots[displaced[max(a - fill, 0):max(b - fill, 0)]] if shuffle else got
            self.ready.append(emit(out))
        done = emit(self.slots[tail] if shuffle else np.empty(0, np.int64))
        if pending_n:  # the short last batch
            allp = np.concatenate(pending)
            done.append((allp, content[allp]))
        self.ready.append(done)
        order = np.concatenate([r for step in self.ready for _, r in step]) if n else np.empty(0, np.int64)
        assert len(order) == n
        self.out_pos = np.empty(n, np.int64)  # row position -> output index
        self.out_pos[order] = np.arange(n)


def _replace(held: np.ndarray, new: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Put ``new`` into ``held`` one by one, each over a uniformly random place; return what
    they displaced, in order.

    Done sequentially, a place drawn twice displaces the row the earlier draw put there: sorting
    the draws by place (stably) lines up each place's draws, so one pass of numpy does it all.
    """
    m = len(new)
    if m == 0:
        return new
    place = rng.integers(0, len(held), m)
    # Stable order by place; unique keys let the default sort do it, ~4x faster than kind="stable".
    order = np.argsort(place * m + np.arange(m))
    sorted_place = place[order]
    first = np.empty(m, bool)  # the first draw of its place
    first[0], first[1:] = True, sorted_place[1:] != sorted_place[:-1]
    last = np.empty(m, bool)  # the last draw of its place
    last[:-1], last[-1] = first[1:], True
    previous = new[order[np.maximum(np.arange(m) - 1, 0)]]  # what the draw before (same place) put there
    out = np.empty(m, np.int64)
    out[order] = np.where(first, held[sorted_place], previous)
    held[sorted_place[last]] = new[order[last]]
    return out


class CheckpointStream(IterableDataset):
    """Batches of checkpoints (and their losses) streamed from a zoo over a materialized view.

    Args:
        zoo: zoo directory.
        view: name of a view in ``ZOO/views`` or a path to a view's Parquet file.
        batch_size: samples per batch.
        shuffle: shuffle chunk order and through the buffer; False keeps view order.
        seed: base seed; an epoch's order depends on (seed, epoch, world size, workers).
        shuffle_buffer: rows held by each worker's shuffle buffer.
        normalize: None, "global" (one mean/std) or "layer" (per tensor), using zoo.json's
            normalization statistics; :meth:`denormalize` inverts it.
        permute: apply a random hidden-unit permutation to each sample (the same to θ and θ*).
        drop_last: drop the rank's last short batch.
        rank, world_size: the DDP position; default torch.distributed's when initialized, else 0/1.
        even_ranks: False (ranks differ by at most one sample), True or "pad" (equal counts by
            repeating the epoch's first rows), or "trim" (equal counts by dropping the tail).
        chunk_cache: whole zarr chunks kept decoded per worker (pair targets often share chunks).
        fast_reads: read chunks straight from the shard files (MappedShards when uncompressed,
            else ShardFiles); False goes through zarr (ZooReader.read_rows) for every chunk.
        prefetch: chunks a background thread reads and decodes ahead (Blosc and pread release
            the GIL, so decoding overlaps the copies); 0 reads in the iterating thread only.
        release_pages: uncompressed zoos. False keeps the pages an epoch touched mapped, like a
            ``numpy.memmap``: RSS then grows to the size of the zoo in page-cache pages (shared
            with other readers, clean, reclaimed by the kernel under memory pressure), while the
            process's own memory stays small. True drops a chunk's pages from the process once
            its last row of the epoch is emitted, so RSS stays bounded by the buffer, at the cost
            of mapping every page again each epoch (minor faults; epochs 15-35% slower here).

    Batches (dicts of tensors):
        single mode: params (B, P) float32, losses (B, C) float32, ids (B,) int64,
            rows (B,) int64 view row indices, weights (B,) float32 if the view has weights.
        pair mode: also target_params (B, P), target_losses (B, C), target_ids (B,).
    """

    def __init__(self, zoo: str | os.PathLike, view: str | os.PathLike, *, batch_size: int = 256,
                 shuffle: bool = True, seed: int = 0, shuffle_buffer: int = 16384, normalize: str | None = None,
                 permute: bool = False, drop_last: bool = False, rank: int | None = None,
                 world_size: int | None = None, even_ranks: bool | str = False, chunk_cache: int = 4,
                 fast_reads: bool = True, prefetch: int = 2, release_pages: bool = False):
        from hyperforget.zoo.store import open_zoo

        super().__init__()
        if batch_size < 1:
            raise HyperForgetError(f"batch_size must be >= 1, got {batch_size}")
        if shuffle_buffer < 0:
            raise HyperForgetError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
        if normalize not in NORMALIZE:
            raise HyperForgetError(f"normalize must be one of {NORMALIZE}, got {normalize!r}")
        if even_ranks not in (False, True, "pad", "trim"):
            raise HyperForgetError(f"even_ranks must be False, True/'pad' or 'trim', got {even_ranks!r}")
        self.zoo_path = os.fspath(zoo)
        reader = open_zoo(self.zoo_path)  # config only; data is read in the iterating process
        self.config = reader.config
        self.spec = reader.config.spec
        self.chunk_rows = int(reader.config.chunk_rows)
        zoo_rows = reader.num_rows
        del reader

        self.view_path, self.record = self._find_view(self.zoo_path, os.fspath(view))
        self.view_name = self.record.get("name", os.path.basename(self.view_path)[:-8])
        table = pq.read_table(self.view_path)
        cols = set(table.column_names)
        self.pairs = "target_id" in cols
        c = self.spec.num_classes
        need = ["checkpoint_id"] + [f"loss_{k}" for k in range(c)]
        if self.pairs:
            need += ["target_id"] + [f"target_loss_{k}" for k in range(c)]
        missing = [n for n in need if n not in cols]
        if missing:
            raise HyperForgetError(f"view {self.view_path} lacks columns {missing}; rebuild it for this zoo")

        def col(name, dtype, table=table):
            return table.column(name).to_numpy(zero_copy_only=False).astype(dtype, copy=False)

        self.ids = col("checkpoint_id", np.int64)  # (N,)
        self.losses = np.stack([col(f"loss_{k}", np.float32) for k in range(c)], 1)  # (N, C)
        self.target_ids = col("target_id", np.int64) if self.pairs else None  # (N,)
        self.target_losses = (np.stack([col(f"target_loss_{k}", np.float32) for k in range(c)], 1)
                              if self.pairs else None)  # (N, C)
        self.weights = col("weight", np.float32) if "weight" in cols else None  # (N,)
        del table
        top = max(self.ids.max(initial=-1), self.target_ids.max(initial=-1) if self.pairs else -1)
        if top >= zoo_rows or self.ids.min(initial=0) < 0:
            raise HyperForgetError(f"view {self.view_name!r} names checkpoint {top} but the zoo has {zoo_rows} "
                                   "committed rows; rebuild the view for this zoo")

        self.batch_size = int(batch_size)
        self.shuffle = bool(shuffle)
        self.seed = int(seed)
        self.shuffle_buffer = int(shuffle_buffer)
        self.normalize = normalize
        self.permute = bool(permute)
        self.drop_last = bool(drop_last)
        self.even_ranks = "pad" if even_ranks is True else even_ranks
        self.chunk_cache = max(1, int(chunk_cache))
        self.fast_reads = bool(fast_reads)
        self.prefetch = max(0, int(prefetch))
        self.release_pages = bool(release_pages)
        self._given_rank, self._given_world = rank, world_size
        self.rank, self.world_size = _resolve_dist(rank, world_size)
        self.epoch = 0
        self.num_workers = 0  # set by make_loader; needed to map consumed samples to workers
        self._consumed = 0  # samples this rank has handed out this epoch (main process view)
        self._resume: int | None = None  # samples to skip at the next iteration
        self._resume_workers = 0  # DataLoader workers of the run that saved the resume point
        self._norm = self._normalization() if normalize else None

        # Rows grouped by the chunk of their (θ) checkpoint, ids ascending within a group.
        self._by_chunk = np.lexsort((self.ids, self.ids // self.chunk_rows))
        chunks = self.ids[self._by_chunk] // self.chunk_rows
        starts = np.flatnonzero(np.r_[True, chunks[1:] != chunks[:-1]]) if len(chunks) else np.empty(0, np.int64)
        self._group_start = starts.astype(np.int64)
        self._group_len = np.diff(np.r_[starts, len(chunks)]).astype(np.int64)
        self.shard_rows = int(self.config.shard_rows)
        self._reader = None
        self._reader_pid = None
        self._files: ShardFiles | None = None
        self._mapped: MappedShards | None = None  # uncompressed zoos: batches gather straight from the files
        self._store_arrays: tuple[np.ndarray, np.ndarray | None] | None = None
        self._cache: OrderedDict[int, np.ndarray] = OrderedDict()
        self._store_busy = False  # an iteration is using _store_arrays

    # ------------------------------------------------------------------------------------------
    # Setup helpers

    @staticmethod
    def _find_view(zoo_path: str, view: str) -> tuple[str, dict]:
        if view.endswith(".parquet") or os.sep in view:
            path = view if view.endswith(".parquet") else view + ".parquet"
        else:
            path = os.path.join(zoo_path, "views", view + ".parquet")
        if not os.path.exists(path):
            from hyperforget.queries.engine import materialized_views

            have = ", ".join(sorted(materialized_views(zoo_path))) or "none"
            raise HyperForgetError(f"no view {view!r} ({path}); views of this zoo: {have}. "
                                   "Build one with `hyperforget view build`")
        record: dict = {}
        js = path[:-8] + ".json"
        if os.path.exists(js):
            with open(js) as f:
                record = json.load(f)
        return path, record

    def _normalization(self) -> tuple[np.ndarray, np.ndarray]:
        """(mean (P,), 1/std (P,)) float32 from zoo.json's normalization statistics."""
        stats = self.config.normalization
        if not stats:
            raise HyperForgetError(f"zoo {self.zoo_path} has no normalization statistics; compute them with "
                                   "hyperforget.zoo.store.compute_normalization and ZooWriter.set_normalization, "
                                   "or use normalize=None")
        p = self.spec.num_params
        mean, std = np.zeros(p, np.float32), np.ones(p, np.float32)
        if self.normalize == "global":
            mean[:], std[:] = stats["mean"], stats["std"]
        else:
            layers = stats.get("layers") or {}
            for s in self.spec.layout.slots:
                if s.name not in layers:
                    raise HyperForgetError(f"zoo normalization lacks layer {s.name}; recompute it or use 'global'")
                mean[s.offset:s.stop], std[s.offset:s.stop] = layers[s.name]["mean"], layers[s.name]["std"]
        std[std == 0] = 1.0  # a constant tensor is only centred
        return mean, (1.0 / std).astype(np.float32)

    def denormalize(self, params: torch.Tensor) -> torch.Tensor:
        """Undo ``normalize`` on (..., P) parameters (identity when normalize is None)."""
        if self._norm is None:
            return params
        mean, inv = (torch.as_tensor(a, device=params.device) for a in self._norm)
        return params / inv + mean

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_reader"], state["_reader_pid"], state["_cache"], state["_files"] = None, None, OrderedDict(), None
        state["_mapped"] = None
        state["_store_arrays"], state["_store_busy"] = None, False
        return state

    # ------------------------------------------------------------------------------------------
    # Epoch plan

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose order the next iteration yields (call before each epoch)."""
        self.epoch = int(epoch)
        self._consumed = 0
        self._resume = None

    def _rank_rows(self, rank: int, world: int) -> np.ndarray:
        """View row indices of this rank for the current epoch, in block-shuffled order."""
        n = len(self.ids)
        if self.shuffle:
            rng = np.random.default_rng([self.seed, self.epoch, 0xB10C])
            order = rng.permutation(len(self._group_start))
            lens = self._group_len[order]
            first = np.repeat(self._group_start[order] - np.r_[0, np.cumsum(lens)[:-1]], lens)
            seq = self._by_chunk[first + np.arange(n)]
        else:
            seq = np.arange(n)
        if self.even_ranks == "pad" and n:
            per = -(-n // world)
            return np.resize(seq, per * world)[rank * per:(rank + 1) * per]
        if self.even_ranks == "trim":
            per = n // world
            return seq[rank * per:(rank + 1) * per]
        return seq[rank * n // world:(rank + 1) * n // world]

    def _num_batches(self, rows: int) -> int:
        return rows // self.batch_size if self.drop_last else -(-rows // self.batch_size)

    def _worker_batches(self, rank_rows: int, workers: int) -> list[tuple[int, int]]:
        """[first batch, end batch) of each worker within its rank."""
        nb = self._num_batches(rank_rows)
        return [(w * nb // workers, (w + 1) * nb // workers) for w in range(workers)]

    def _skips(self, consumed: int, rank_rows: int, workers: int) -> tuple[list[int], int]:
        """(samples each worker had delivered, worker of the next batch) after ``consumed`` samples.

        DataLoader delivers worker batches round robin (worker 0, 1, ..., skipping exhausted
        workers), so a count of consumed samples splits into workers in one way only. A resumed
        DataLoader starts its round at worker 0 again: the caller rotates worker roles so that
        the worker owning the next batch is the first asked.
        """
        spans = self._worker_batches(rank_rows, workers)
        sizes = [[min(self.batch_size, rank_rows - b * self.batch_size) for b in range(lo, hi)] for lo, hi in spans]
        skips, left = [0] * workers, consumed
        for t in range(max((len(z) for z in sizes), default=0)):
            for w in range(workers):
                if t >= len(sizes[w]):
                    continue
                if left == 0:
                    return skips, w
                take = min(left, sizes[w][t])
                skips[w] += take
                left -= take
                if take < sizes[w][t]:
                    return skips, w
        if left > 0:
            raise HyperForgetError(f"state says {consumed} samples were consumed but this rank has only "
                                   f"{consumed - left} in the epoch; was it saved for another view or world size?")
        return skips, 0

    def _check_workers(self, workers: int) -> None:
        # The order of an epoch depends on how its rows were split among workers.
        if self._resume and self._resume_workers != workers:
            raise HyperForgetError(f"cannot resume: the state was saved with {self._resume_workers} DataLoader "
                                   f"workers, this loader has {workers}; resume with the same num_workers")

    def _update_dist(self) -> None:
        """Re-read the DDP position (torch.distributed may be initialized after construction)."""
        if self._given_rank is None and self._given_world is None:
            self.rank, self.world_size = _resolve_dist(None, None)

    def __len__(self) -> int:
        """Batches this rank yields per epoch (independent of the number of workers)."""
        self._update_dist()
        return self._num_batches(len(self._rank_rows(self.rank, self.world_size)))

    @property
    def num_samples(self) -> int:
        """Samples this rank yields per epoch."""
        return min(len(self._rank_rows(self.rank, self.world_size)), len(self) * self.batch_size)

    # ------------------------------------------------------------------------------------------
    # Reading

    def _zoo(self):
        if self._reader is None or self._reader_pid != os.getpid():
            from hyperforget.zoo.store import open_zoo

            self._reader = open_zoo(self.zoo_path, fast_reads=self.fast_reads)
            self._reader_pid, self._cache = os.getpid(), OrderedDict()
            self._files = ShardFiles.open(self.zoo_path, self.chunk_rows, self.shard_rows, self.spec.num_params) \
                if self.fast_reads and "://" not in self.zoo_path else None
            self._mapped = MappedShards.open(self._files, -(-self._reader.num_rows // self.chunk_rows))
        return self._reader

    def _chunk(self, c: int, prefetched: dict[int, Future] | None = None) -> np.ndarray:
        block = self._cache.get(c)
        if block is None:
            r = self._zoo()
            pending = prefetched.pop(c, None) if prefetched else None
            block = pending.result() if pending is not None else \
                self._files.chunk(c) if self._files is not None else None
            if block is None:  # not a layout ShardFiles reads, or a chunk left at its fill value
                block = r.read_rows(c * self.chunk_rows, min((c + 1) * self.chunk_rows, r.num_rows))
            self._cache[c] = block
            if len(self._cache) > self.chunk_cache:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(c)
        return block

    def _gather(self, ids: np.ndarray, out: np.ndarray, slots: np.ndarray,
                prefetched: dict[int, Future] | None = None) -> None:
        """out[slots[i]] = params of checkpoint ids[i], reading whole chunks."""
        chunks = ids // self.chunk_rows
        first = int(chunks[0])
        if (chunks == first).all():  # the usual piece: one chunk
            local = ids - first * self.chunk_rows
            block = self._chunk(first, prefetched)
            if local[-1] - local[0] == len(local) - 1 and (np.diff(local) == 1).all():
                out[slots] = block[local[0]:local[-1] + 1]  # consecutive rows: one copy, no temp
            else:
                out[slots] = block[local]
            return
        for c in np.unique(chunks):
            sel = np.flatnonzero(chunks == c)
            out[slots[sel]] = self._chunk(int(c), prefetched)[ids[sel] - int(c) * self.chunk_rows]

    # ------------------------------------------------------------------------------------------
    # Iteration

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        resume = self._resume
        if info is None:
            self._update_dist()
            self._check_workers(0)
            self._consumed = resume or 0
            self._resume = None
        rank_rows = self._rank_rows(self.rank, self.world_size)
        skip = 0
        if resume:
            skips, first = self._skips(resume, len(rank_rows), workers)
            worker = (worker + first) % workers  # the DataLoader asks worker 0 first: give it the next batch
            skip = skips[worker]
        lo, hi = self._worker_batches(len(rank_rows), workers)[worker]
        a, b = lo * self.batch_size, min(hi * self.batch_size, len(rank_rows))
        rows = rank_rows[a:b]
        for batch in self._stream(rows, worker, skip):
            if info is None:
                self._consumed += len(batch["ids"])
            yield batch

    def _stream(self, rows: np.ndarray, worker: int, skip: int) -> Iterator[dict[str, torch.Tensor]]:
        """Batches of this worker's rows (view row indices, block-shuffled), the first ``skip`` left out."""
        n = len(rows)
        if n == 0 or skip >= n:
            return
        # Pieces: consecutive rows on one chunk, at most PIECE_ROWS.
        chunk = self.ids[rows] // self.chunk_rows
        cuts = np.flatnonzero(chunk[1:] != chunk[:-1]) + 1
        bounds = [0]
        for s, e in zip(np.r_[0, cuts], np.r_[cuts, n]):
            bounds.extend(range(int(s) + PIECE_ROWS, int(e), PIECE_ROWS))
            bounds.append(int(e))
        bounds = np.asarray(bounds, np.int64)
        rng = np.random.default_rng([self.seed, self.epoch, self.rank, worker, 0x5B0F]) if self.shuffle else None
        plan = _BufferPlan(bounds, n, self.shuffle_buffer, rng, self.batch_size)

        # Rows still to be yielded (None: all of them), and the pieces that hold any.
        need = plan.out_pos >= skip if skip else None
        piece_need = np.logical_or.reduceat(need, bounds[:-1]) if skip else np.ones(len(bounds) - 1, bool)
        self._zoo()
        if self._mapped is not None:
            yield from self._emit_mapped(rows, bounds, plan, need, piece_need)
            return
        # Chunks to read, in order; a thread decodes the next few while this one copies.
        wanted = [int(c) for c in chunk[bounds[:-1][piece_need]]]
        pool = ThreadPoolExecutor(1) if self.prefetch and self._files is not None else None
        own = not self._store_busy  # the kept buffer, unless another iteration holds it
        store, tstore = self._stores(plan.store_rows, reuse=own)
        self._store_busy = True
        try:
            yield from self._emit(rows, bounds, plan, need, piece_need, store, tstore, wanted, pool)
        finally:
            if pool is not None:
                pool.shutdown(wait=True, cancel_futures=True)
            if own:
                self._store_busy = False

    def _emit(self, rows, bounds, plan, need, piece_need, store, tstore, wanted,
              pool) -> Iterator[dict[str, torch.Tensor]]:
        """Place pieces in the store in plan order and yield the plan's batches as they complete."""
        prefetched: dict[int, Future] = {}
        nxt = 0  # next entry of `wanted` to hand to the prefetch thread
        done = 0  # entries of `wanted` consumed
        for s, batches in enumerate(plan.ready):
            if pool is not None:
                while nxt < len(wanted) and nxt <= done + self.prefetch:
                    c = wanted[nxt]
                    if c not in prefetched and c not in self._cache:
                        prefetched[c] = pool.submit(self._files.chunk, c)
                    nxt += 1
            if s < len(bounds) - 1:
                a, e = bounds[s], bounds[s + 1]
                if piece_need[s]:  # on resume, chunks holding only consumed rows are not read
                    done += 1
                    self._gather(self.ids[rows[a:e]], store, plan.slots[a:e], prefetched)
                    if self.pairs:
                        self._gather(self.target_ids[rows[a:e]], tstore, plan.slots[a:e], prefetched)
            for slots, pos in self._wanted(batches, need):
                yield self._finish(rows[pos], store[slots], tstore[slots] if self.pairs else None)

    def _emit_mapped(self, rows, bounds, plan, need, piece_need) -> Iterator[dict[str, torch.Tensor]]:
        """The plan's batches, each gathered in one step from the mapped shards (the buffer holds no data).

        Placing a piece in the buffer only checks its chunk, so every row is verified before it is
        emitted; the order is the same as the copying path's.
        """
        m, cr = self._mapped, self.chunk_rows
        done_at = self._chunks_done_at(rows, plan) if self.release_pages else None
        # Offsets of every row's parameters, computed once per epoch rather than per batch.
        ids = self.ids[rows]
        offsets = m.offsets(ids)
        toffsets = m.offsets(self.target_ids[rows]) if self.pairs else None
        for s, batches in enumerate(plan.ready):
            if s < len(bounds) - 1 and piece_need[s] and not m.all_verified:
                a, e = bounds[s], bounds[s + 1]
                m.verify(ids[a:a + 1] // cr)  # a piece lies in one chunk
                if self.pairs:
                    m.verify(np.unique(self.target_ids[rows[a:e]] // cr))
            for _, pos in self._wanted(batches, need):
                yield self._finish(rows[pos], m.rows[offsets[pos]], m.rows[toffsets[pos]] if self.pairs else None)
            if done_at is not None:
                m.release(done_at[s])

    def _chunks_done_at(self, rows: np.ndarray, plan: _BufferPlan) -> list[np.ndarray]:
        """For each plan step, the chunks this worker reads for the last time at that step."""
        steps = len(plan.ready)
        when = np.empty(len(rows), np.int64)  # step at which each row position is emitted
        for t, batches in enumerate(plan.ready):
            for _, pos in batches:
                when[pos] = t
        last = np.full(len(self._mapped.start), -1, np.int64)
        np.maximum.at(last, self.ids[rows] // self.chunk_rows, when)
        if self.pairs:
            np.maximum.at(last, self.target_ids[rows] // self.chunk_rows, when)
        used = np.flatnonzero(last >= 0)
        used = used[np.argsort(last[used], kind="stable")]
        cuts = np.searchsorted(last[used], np.arange(steps + 1))
        return [used[cuts[t]:cuts[t + 1]] for t in range(steps)]

    def _wanted(self, batches, need: np.ndarray | None) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """(slots, row positions) of the batches to yield: drop_last applied, consumed rows left out."""
        for slots, pos in batches:
            if len(slots) < self.batch_size and self.drop_last:
                continue
            if need is None:
                yield slots, pos
                continue
            keep = need[pos]
            if not keep.any():
                continue
            if not keep.all():
                slots, pos = slots[keep], pos[keep]
            yield slots, pos

    def _stores(self, rows: int, reuse: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """Shuffle-buffer arrays, kept between epochs (fresh pages cost a fault and zeroing each).

        ``reuse=False`` (another iteration of this stream is still running) gives private ones.
        """
        p = self.spec.num_params
        have = self._store_arrays if reuse else None
        if have is None or have[0].shape[0] < rows:
            have = (np.empty((rows, p), np.float32), np.empty((rows, p), np.float32) if self.pairs else None)
            if reuse:
                self._store_arrays = have
        return have

    def _finish(self, vrows: np.ndarray, params: np.ndarray, tparams: np.ndarray | None) -> dict[str, torch.Tensor]:
        """Augment, normalize and wrap one batch."""
        if self.permute:
            # Keyed by (seed, epoch, view row): the same permutation whatever the ranks, workers or resume point.
            salt = _mix64(np.array([(self.seed * LOADER_EPOCH_STRIDE + self.epoch) % (1 << 64)], np.uint64))
            keys = _mix64(vrows.astype(np.uint64) ^ salt)
            idx = permutation_index(self.spec, hidden_permutations(keys, self.spec.hidden))
            params = np.take_along_axis(params, idx, axis=1)
            if tparams is not None:
                tparams = np.take_along_axis(tparams, idx, axis=1)
        if self._norm is not None:
            mean, inv = self._norm
            params -= mean
            params *= inv
            if tparams is not None:
                tparams -= mean
                tparams *= inv
        batch = {"params": torch.from_numpy(params), "losses": torch.from_numpy(self.losses[vrows]),
                 "ids": torch.from_numpy(self.ids[vrows]), "rows": torch.from_numpy(vrows)}
        if self.pairs:
            batch["target_params"] = torch.from_numpy(tparams)
            batch["target_losses"] = torch.from_numpy(self.target_losses[vrows])
            batch["target_ids"] = torch.from_numpy(self.target_ids[vrows])
        if self.weights is not None:
            batch["weights"] = torch.from_numpy(self.weights[vrows])
        return batch

    # ------------------------------------------------------------------------------------------
    # Resumption

    def state_dict(self) -> dict:
        """Position in the epoch: restore it with load_state_dict to yield exactly the rest."""
        return {"version": STATE_VERSION, "epoch": self.epoch, "seed": self.seed, "consumed": int(self._consumed),
                "batch_size": self.batch_size, "num_workers": self.num_workers, "rank": self.rank,
                "world_size": self.world_size, "view": self.view_name, "view_rows": len(self.ids),
                "shuffle": self.shuffle, "shuffle_buffer": self.shuffle_buffer, "even_ranks": self.even_ranks,
                "drop_last": self.drop_last}

    def load_state_dict(self, state: dict) -> None:
        """Continue the saved epoch at its saved position (the next iteration yields the rest)."""
        if state.get("version") != STATE_VERSION:
            raise HyperForgetError(f"loader state version {state.get('version')} is not supported; "
                                   f"expected {STATE_VERSION}")
        now = self.state_dict()
        fixed = ("seed", "batch_size", "world_size", "view_rows", "shuffle", "shuffle_buffer",
                 "even_ranks", "drop_last")
        differ = [f"{k}: saved {state.get(k)!r}, now {now[k]!r}" for k in fixed if state.get(k) != now[k]]
        if differ:
            raise HyperForgetError(f"cannot resume: the loader differs from the saved one ({'; '.join(differ)}); "
                                   "resume with the same view, seed, batch size, workers and world size")
        self._resume_workers = int(state["num_workers"])  # checked when iteration starts
        self.epoch = int(state["epoch"])
        self._consumed = int(state["consumed"])
        self._resume = int(state["consumed"]) or None


class StreamLoader(DataLoader):
    """A DataLoader over a CheckpointStream that counts consumed samples for state_dict()."""

    def __iter__(self):
        stream: CheckpointStream = self.dataset
        if self.num_workers == 0:
            return super().__iter__()  # the stream counts itself in this process
        return self._counted(stream)

    def _counted(self, stream: CheckpointStream):
        stream._update_dist()  # before the workers copy the stream
        stream._check_workers(self.num_workers)
        it = super().__iter__()  # workers start here, each with a copy of the stream (and its resume point)
        stream._consumed, stream._resume = stream._resume or 0, None
        for batch in it:
            stream._consumed += len(batch["ids"])
            yield batch


def make_loader(stream: CheckpointStream, num_workers: int = 0, pin_memory: bool | None = None,
                prefetch_factor: int | None = 2, multiprocessing_context: Any = None) -> StreamLoader:
    """A DataLoader that passes the stream's batches through (batch_size=None).

    Args:
        num_workers: reading processes; each opens the zoo itself.
        pin_memory: page-locked batches for fast, non-blocking copies; default: when CUDA is available.
        prefetch_factor: batches each worker keeps ready.
        multiprocessing_context: e.g. "forkserver"; default the platform's.
    Workers are not persistent, so each epoch's workers see set_epoch() and resume points.
    """
    if num_workers < 0:
        raise HyperForgetError(f"num_workers must be >= 0, got {num_workers}")
    stream.num_workers = int(num_workers)
    if pin_memory is None:
        pin_memory = torch.cuda.is_available()
    return StreamLoader(stream, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                        prefetch_factor=prefetch_factor if num_workers else None, persistent_workers=False,
                        multiprocessing_context=multiprocessing_context if num_workers else None)


def to_device(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    """Move a batch to ``device`` with non-blocking copies (overlap with compute when pinned)."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items()}
