"""Where a zoo lives (a local directory or an fsspec URL) and its JSON files: zoo.json, manifest.json.

:class:`Location` does the file operations relative to a zoo's root; the functions read and
check zoo.json and the manifest, and open the parameter array.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
import os
import uuid
from typing import Any, Sequence

import pyarrow as pa
import pyarrow.parquet as pq

from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.store.format import (FORMAT_VERSION, MANIFEST, MANIFEST_FORMAT, META_DIR, PARAMS, ZOO_JSON,
                                          ZooConfig)


class Location:
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


def _read_json(loc: Location, name: str) -> dict:
    try:
        return json.loads(loc.read_bytes(name))
    except FileNotFoundError:
        raise
    except NotADirectoryError:
        raise HyperForgetError(f"{loc.display} is a file, not a zoo directory; pass the zoo's directory") from None
    except OSError as exc:
        raise HyperForgetError(f"cannot read {loc.display}/{name}: {exc.strerror or short_error(exc)}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise HyperForgetError(f"{loc.display}/{name} is not valid JSON ({exc}); the zoo is damaged") from None


def json_bytes(d: dict) -> bytes:
    return (json.dumps(d, indent=1, sort_keys=False) + "\n").encode()


def load_config(loc: Location) -> ZooConfig:
    try:
        d = _read_json(loc, ZOO_JSON)
    except FileNotFoundError:
        raise HyperForgetError(f"no zoo at {loc.display} ({ZOO_JSON} missing); create one with "
                               "`hyperforget zoo collect` or zoo.store.create_zoo") from None
    return ZooConfig.from_dict(d, f"{loc.display}/{ZOO_JSON}")


def empty_manifest() -> dict:
    return {"format": MANIFEST_FORMAT, "version": FORMAT_VERSION, "num_rows": 0, "next_part": 0,
            "parts": [], "commits": {}, "updated_at": utc_now()}


def load_manifest(loc: Location) -> dict:
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


def utc_now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def open_params(loc: Location, mode: str = "r"):
    import zarr

    try:
        return zarr.open_array(loc.url_of(PARAMS), mode=mode, zarr_format=3)
    except Exception as exc:  # zarr raises several kinds for missing or unreadable metadata
        why = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise HyperForgetError(f"cannot open {loc.display}/{PARAMS}: {why}; the zoo is damaged") from None


def check_params_array(arr, cfg: ZooConfig, num_rows: int, display: str) -> None:
    if len(arr.shape) != 2 or arr.shape[1] != cfg.num_params:
        raise HyperForgetError(
            f"{display}/{PARAMS} has rows of {arr.shape[1] if len(arr.shape) == 2 else arr.shape} values but the zoo's "
            f"MLP spec {cfg.spec.input_size}-{cfg.spec.hidden}-{cfg.spec.num_classes} needs {cfg.num_params}; "
            "the zoo is damaged or was written for another spec")
    if arr.shape[0] < num_rows:
        raise HyperForgetError(f"{display}/{PARAMS} holds {arr.shape[0]} rows but {MANIFEST} commits {num_rows}; "
                               "the parameter array was truncated")


def short_error(exc: BaseException) -> str:
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {text}"[:200]
