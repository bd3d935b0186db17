"""Reading a local zoo's zarr v3 shard files directly: chunk decoding (ShardFiles) and mapping (MappedShards).

A shard file of ``params.zarr`` (zarr's ``sharding_indexed`` codec) holds ``shard_rows /
chunk_rows`` chunks followed by its index: per chunk an (offset, nbytes) pair of little-endian
uint64 (both 2**64 - 1 for a chunk not stored), then the index's crc32c. Each chunk is its
float32 bytes, Blosc-compressed or raw, followed by their crc32c. :meth:`ShardFiles.open`
checks that a zoo's ``zarr.json`` describes exactly this layout and returns None otherwise; the
caller then reads through zarr.
"""

from __future__ import annotations

import json
import mmap
import os
import sys
import threading
from collections import OrderedDict

import numpy as np

from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.store.format import PARAMS

# Linux mmap/madvise values Python's mmap module does not export (or exports only as methods)
_MAP_FIXED, _MAP_NORESERVE, _MADV_DONTNEED = 0x10, 0x4000, 4


class ShardFiles:
    """Whole-chunk reads straight from a local zoo's zarr v3 shard files, checksums verified.

    zarr-python's read path costs more than the bytes for chunk-sized reads (asyncio, codec
    pipeline); this reads a shard's index, then ``pread``s one chunk, checks its crc32c and
    decodes it (Blosc via numcodecs, the same codec zarr uses, or raw bytes). It understands
    exactly the layout ``create_zoo`` writes (sharding_indexed, index at the end, inner codecs
    bytes(little) [+ blosc] + crc32c); :meth:`open` returns None for anything else, and the
    caller then reads through zarr.

    With ``cache`` (the loader), a shard's index is kept and a chunk's checksum is checked the
    first time this object reads it: chunks are written once (a writer that rewrites a shard
    makes a new file, with a new identity), and at ~3 GB/s the check would otherwise cost a third
    of a Blosc decode on every epoch. Without (ZooReader), every read parses the shard's index and
    checks the index's and the chunk's crc32c, as zarr does.
    """

    def __init__(self, root: str, chunk_rows: int, shard_rows: int, num_params: int, blosc: bool, sep: str,
                 cache: bool = True):
        self.root, self.chunk_rows, self.num_params = root, chunk_rows, num_params
        self.per_shard = shard_rows // chunk_rows
        self.blosc, self.sep, self.cache = blosc, sep, cache
        self._index: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._verified: set[tuple] = set()  # (chunk, file identity) whose crc32c matched
        self._lock = threading.Lock()  # the loader's prefetch thread reads chunks too

    @classmethod
    def open(cls, zoo_path: str, chunk_rows: int, shard_rows: int, num_params: int,
             cache: bool = True) -> "ShardFiles | None":
        """The reader of a local zoo's shard files, or None for a layout it does not read."""
        if sys.byteorder != "little":  # chunks are viewed as native float32
            return None
        root = os.path.join(zoo_path, PARAMS)
        try:
            with open(os.path.join(root, "zarr.json")) as f:
                meta = json.load(f)
            (shard_codec,) = meta["codecs"]
            conf = shard_codec["configuration"]
            names = [c["name"] for c in conf["codecs"]]
            ok = (shard_codec["name"] == "sharding_indexed" and meta["data_type"] == "float32"
                  and conf.get("index_location", "end") == "end"
                  and list(conf["chunk_shape"]) == [chunk_rows, num_params]
                  and list(meta["chunk_grid"]["configuration"]["chunk_shape"]) == [shard_rows, num_params]
                  and names in (["bytes", "crc32c"], ["bytes", "blosc", "crc32c"])
                  and conf["codecs"][0].get("configuration", {}).get("endian", "little") == "little"
                  and [c["name"] for c in conf["index_codecs"]] == ["bytes", "crc32c"]
                  and meta["chunk_key_encoding"]["name"] == "default")
            sep = meta["chunk_key_encoding"].get("configuration", {}).get("separator", "/")
        except (OSError, KeyError, ValueError, TypeError):
            return None
        return cls(root, chunk_rows, shard_rows, num_params, "blosc" in names, sep, cache) if ok else None

    def shard_path(self, shard: int) -> str:
        return os.path.join(self.root, "c", f"{shard}{self.sep}0") if self.sep == "/" else \
            os.path.join(self.root, f"c{self.sep}{shard}{self.sep}0")

    def parse_index(self, shard: int, tail) -> np.ndarray:
        """(chunks per shard, 2) uint64 (offset, nbytes) from a shard's last bytes (index + crc32c)."""
        import google_crc32c

        n = self.per_shard * 16
        tail = np.frombuffer(tail, np.uint8)
        if len(tail) != n + 4 or google_crc32c.value(tail[:n]) != int.from_bytes(tail[n:].tobytes(), "little"):
            raise HyperForgetError(f"shard {shard} of {self.root}: index checksum mismatch; "
                                   "run `hyperforget zoo verify`")
        return tail[:n].view("<u8").reshape(self.per_shard, 2).copy()

    def verify(self, c: int, raw: np.ndarray, identity: tuple) -> None:
        """Check chunk ``c``'s stored bytes (body + crc32c); with ``cache``, once per file identity."""
        import google_crc32c

        key = (c,) + identity
        if key in self._verified:
            return
        if google_crc32c.value(raw[:-4]) != int.from_bytes(raw[-4:].tobytes(), "little"):
            raise HyperForgetError(f"chunk {c} of {self.root}: checksum mismatch, the zoo is damaged; "
                                   "run `hyperforget zoo verify`")
        if self.cache:
            self._verified.add(key)

    def _shard_index(self, shard: int, fd: int, st: os.stat_result) -> np.ndarray:
        n = self.per_shard * 16
        if not self.cache:  # no shared state at all (nor a lock a fork could copy while held)
            return self.parse_index(shard, os.pread(fd, n + 4, st.st_size - n - 4))
        # Keyed by the file's identity: a writer that rewrites a shard (temp + rename) makes a new one.
        key = (shard, st.st_ino, st.st_mtime_ns, st.st_size)
        with self._lock:
            idx = self._index.get(key)
        if idx is None:
            idx = self.parse_index(shard, os.pread(fd, n + 4, st.st_size - n - 4))
            with self._lock:
                self._index[key] = idx
                if len(self._index) > 256:
                    self._index.popitem(last=False)
        return idx

    def chunk(self, c: int) -> np.ndarray | None:
        """(chunk_rows, P) float32 of chunk ``c``, or None when it is not stored (fill value)."""
        shard, inner = divmod(c, self.per_shard)
        try:
            fd = os.open(self.shard_path(shard), os.O_RDONLY)
        except FileNotFoundError:
            return None
        try:
            st = os.fstat(fd)
            off, nbytes = (int(v) for v in self._shard_index(shard, fd, st)[inner])
            if off == 2**64 - 1:
                return None
            raw = np.empty(nbytes, np.uint8)  # read straight into numpy: no bytes objects to copy
            got = os.preadv(fd, [raw], off)
        finally:
            os.close(fd)
        if got != nbytes:
            raise HyperForgetError(f"chunk {c} of {self.root}: short read ({got} of {nbytes} bytes), the zoo "
                                   "is damaged; run `hyperforget zoo verify`")
        self.verify(c, raw, (st.st_ino, st.st_mtime_ns))
        if self.blosc:
            from numcodecs import Blosc

            out = np.empty((self.chunk_rows, self.num_params), np.float32)
            Blosc().decode(raw[:-4], out=out)
            return out
        return raw[:-4].view(np.float32).reshape(self.chunk_rows, self.num_params)


class MappedShards:
    """Every shard file of an uncompressed zoo mapped read-only into ONE address range (Linux).

    With all chunks in one range, a checkpoint is a float32 offset into it, so the shuffle
    buffer can hold offsets instead of copied rows and a batch is one numpy gather straight from
    the page cache into a fresh array: the same single copy a raw ``numpy.memmap`` gather makes.
    Python's mmap cannot place a mapping at a chosen address, so this reserves the range with
    libc ``mmap`` (anonymous, read-only, zero pages) and maps each shard file over its slot
    (``MAP_FIXED``); chunks not stored (fill value) point at a zero area past the last shard.
    Shards are mapped as they are at :meth:`open`; a writer replaces shard files by rename, so
    a mapping keeps showing the file it was made from, consistent with the index read from it.

    Mapped pages are page cache, shared with every reader of the files and reclaimable by the
    kernel; the process's own (anonymous) memory does not grow with the zoo.
    """

    def __init__(self, files: ShardFiles, num_chunks: int):
        import ctypes
        import weakref

        self.files = files
        p, cr, per = files.num_params, files.chunk_rows, files.per_shard
        self.chunk_bytes = cr * p * 4
        shards = -(-num_chunks // per)
        stride = -(-(per * (self.chunk_bytes + 4) + per * 16 + 4) // mmap.PAGESIZE) * mmap.PAGESIZE
        self.size = shards * stride + self.chunk_bytes
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long)
        libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
        libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        base = libc.mmap(None, self.size, mmap.PROT_READ, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | _MAP_NORESERVE, -1, 0)
        if base in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "mmap: cannot reserve the address range")
        weakref.finalize(self, libc.munmap, base, self.size)
        self._libc, self._base = libc, base
        region = np.frombuffer((ctypes.c_char * self.size).from_address(base), np.uint8)
        zero = (shards * stride) // 4
        self.start = np.full(num_chunks, zero, np.int64)  # float32 offset of each chunk's first row
        self.identity: list[tuple] = []  # file identity of each shard, for the verified set
        for s in range(shards):
            self.identity.append(self._map_shard(libc, base, s, stride, region))
        self._region = region
        flat = region.view(np.float32)
        # Row "i" of this view starts at float i: any chunk row is rows[start + r * P].
        self.rows = np.lib.stride_tricks.as_strided(flat, (len(flat) - p + 1, p), (4, 4), writeable=False)
        self._verified = np.zeros(num_chunks, bool)
        self._unverified = num_chunks

    def _map_shard(self, libc, base: int, s: int, stride: int, region: np.ndarray) -> tuple:
        f = self.files
        try:
            fd = os.open(f.shard_path(s), os.O_RDONLY)
        except FileNotFoundError:
            return ()
        try:
            st = os.fstat(fd)
            if st.st_size > stride:
                raise HyperForgetError(f"shard {s} of {f.root} is {st.st_size} bytes, more than {stride} expected "
                                       "for its chunks; run `hyperforget zoo verify`")
            got = libc.mmap(base + s * stride, st.st_size, mmap.PROT_READ, mmap.MAP_SHARED | _MAP_FIXED, fd, 0)
            if got != base + s * stride:
                raise OSError("mmap: cannot map a shard file into the reserved range")
        finally:
            os.close(fd)
        n = f.per_shard * 16
        at = s * stride
        index = f.parse_index(s, region[at + st.st_size - n - 4:at + st.st_size])
        for inner, (off, nbytes) in enumerate(index.tolist()):
            c = s * f.per_shard + inner
            if c >= len(self.start) or off == 2**64 - 1:
                continue
            if nbytes != self.chunk_bytes + 4 or off % 4 or off + nbytes > st.st_size - n - 4:
                raise HyperForgetError(f"chunk {c} of {f.root}: index entry ({off}, {nbytes}) does not fit its "
                                       "shard, the zoo is damaged; run `hyperforget zoo verify`")
            self.start[c] = (at + off) // 4
        return (st.st_ino, st.st_mtime_ns)

    @classmethod
    def open(cls, files: ShardFiles | None, num_chunks: int) -> "MappedShards | None":
        """The mapping, or None where it does not apply (compressed zoo, not Linux, no address space)."""
        if files is None or files.blosc or not sys.platform.startswith("linux") or num_chunks == 0:
            return None
        try:
            return cls(files, num_chunks)
        except OSError:
            return None

    def verify(self, chunks: np.ndarray) -> None:
        """Check the crc32c of the given chunks (each once per mapping)."""
        for c in chunks[~self._verified[chunks]].tolist():
            a = int(self.start[c]) * 4
            if a < len(self._region) - self.chunk_bytes:  # stored, not the zero area
                shard = c // self.files.per_shard
                self.files.verify(c, self._region[a:a + self.chunk_bytes + 4], self.identity[shard])
            self._verified[c] = True
            self._unverified -= 1

    def release(self, chunks: np.ndarray) -> None:
        """Drop the given chunks' pages from this process's mapping (they stay in the page cache).

        Otherwise every page an epoch touched would stay resident in the process, and its RSS
        would grow to the size of the zoo; a later read maps a page again (a minor fault).
        """
        page = mmap.PAGESIZE
        for c in chunks.tolist():
            a = int(self.start[c]) * 4
            lo, hi = -(-a // page) * page, (a + self.chunk_bytes) // page * page
            if hi > lo:
                self._libc.madvise(self._base + lo, hi - lo, _MADV_DONTNEED)

    @property
    def all_verified(self) -> bool:
        return self._unverified == 0

    def offsets(self, ids: np.ndarray) -> np.ndarray:
        """Float32 offsets of checkpoints ``ids``: ``rows[offsets]`` gathers their parameters."""
        cr, p = self.files.chunk_rows, self.files.num_params
        return self.start[ids // cr] + (ids % cr) * p
