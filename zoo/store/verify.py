"""Checking a zoo end to end: :func:`verify_zoo`, its :class:`VerifyReport`, :func:`require_sound_zoo`."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.store.format import MANIFEST, META_DIR, PARAMS, ZooConfig, metadata_schema
from hyperforget.zoo.store.location import Location, load_config, load_manifest, open_params, short_error
from hyperforget.zoo.store.progress import progress_bar
from hyperforget.zoo.store.reader import ZooReader, open_zoo


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


def verify_zoo(path: str | os.PathLike, *, check_params: bool = True, progress: bool = False) -> VerifyReport:
    """Check a zoo end to end and name every damaged file.

    Checks: zoo.json and manifest.json parse; params.zarr rows >= committed rows and rows of P
    values; the Parquet parts cover [0, N) contiguously, each is readable, has its range's row
    count and checkpoint ids exactly start..stop-1 (so ids are unique and contiguous), and valid
    source ids; every shard holding committed rows exists, decodes (crc32c per chunk) and holds
    only finite values.
    """
    t0 = time.perf_counter()
    loc = Location(path)
    report = VerifyReport(loc.display)
    config = load_config(loc)  # a missing zoo or unknown version is an error, not a finding
    try:
        manifest = load_manifest(loc)
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
    with progress_bar(progress, "checking metadata", len(parts)) as advance:
        for p in parts:
            name = p["file"]
            try:
                t = loc.read_parquet(name)
            except FileNotFoundError:
                report.problems.append(f"{name}: missing")
                continue
            except Exception as exc:  # truncated or garbled files raise ArrowInvalid/OSError
                report.problems.append(f"{name}: unreadable Parquet file ({short_error(exc)}), truncated or corrupt")
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
        arr = open_params(loc, "r")
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
    where = zoo.path if isinstance(zoo, ZooReader) else os.fspath(zoo)  # a reader's path: as given, or its URL
    rep = verify_zoo(where, check_params=check_params)
    if not rep.ok:
        more = f" (and {len(rep.problems) - 1} more)" if len(rep.problems) > 1 else ""
        raise HyperForgetError(f"zoo {rep.path} is damaged: {rep.problems[0]}{more}; "
                               f"run `hyperforget zoo verify {rep.path}` for the full list")
    return open_zoo(where)


def _verify_params(loc: Location, arr, config: ZooConfig, n: int, report: VerifyReport, progress: bool) -> None:
    sr, cr = config.shard_rows, config.chunk_rows
    aarr = arr.async_array
    num_shards = -(-n // sr)
    with progress_bar(progress, "decoding shards", num_shards) as advance:
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
                                           f"({short_error(bad[0][2])})")
                else:
                    for c0, c1, exc in bad:
                        report.problems.append(f"{key} chunk rows {c0}-{c1 - 1}: corrupt, fails to decode "
                                               f"({short_error(exc)})")
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
