"""Named, parameterized views over a zoo, materialized to ``ZOO/views/NAME.parquet``.

Three kinds, each one SQL template in ``queries/sql`` (see the comments there for the maths):

- ``split``: the checkpoints of one side of a train/test split by run (or all, labelled).
- ``balanced``: checkpoints re-sampled so each non-pivot class's loss covers its range evenly
  (loss bins with a cap per bin, or inverse-frequency weights) — DiHyFo-2's training set.
- ``pairs``: run-grouped (θ, θ*) pairs, θ earlier than θ*, with both loss vectors and their
  differences — DiHyFo-1's training set.

Every view takes ``split`` ("train" | "test" | "all"), ``split_seed`` and ``test_fraction``, so
the balanced or pairs view of each side of one split is built from disjoint runs.

A materialized view is two files: ``NAME.parquet`` (checkpoint ids, or id pairs, with their
losses: all a loader needs) and ``NAME.json`` (kind, full parameters, row count, the zoo's
committed rows when built, time). Both are written to a temporary name and renamed; the JSON
goes last, so a view without its JSON is incomplete and ignored.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from hyperforget.queries import engine
from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.files import atomic_path, write_json

VIEW_FORMAT = "hyperforget-view"
VIEW_VERSION = 1
RESOLVED_KEY = "hyperforget_resolved"  # Arrow metadata: what a view's parameters resolved to on its zoo
SPLITS = ("train", "test", "all")

# Parameters every kind takes, with defaults.
COMMON_DEFAULTS: dict[str, Any] = {
    "split": "all",  # which side of the run split: train, test or all
    "split_seed": 0,  # seed of the run-level split hash
    "test_fraction": 0.2,  # fraction of runs on the test side
    "include_augmented": True,  # keep permuted copies (perm_index > 0)
    "seed": 0,  # seed of the deterministic sampling hash
}


@dataclass(frozen=True)
class ViewKind:
    """One kind of view: its SQL template, what its rows are, and its parameters."""

    name: str  # template queries/sql/NAME.sql
    mode: str  # "single" (checkpoint_id rows) or "pairs" (checkpoint_id, target_id rows)
    defaults: dict = field(default_factory=dict)  # kind-specific parameters and their defaults
    help: str = ""  # one line for `hyperforget view build --help`


VIEW_KINDS: dict[str, ViewKind] = {
    "split": ViewKind("split", "single", {}, "checkpoints of one side of a train/test split by run"),
    "balanced": ViewKind("balanced", "single", {
        "n_bins": 20,  # loss bins per non-pivot class
        "cap": 200,  # checkpoints kept per (class, bin) in mode "cap"
        "scale": "log",  # bin on ln(loss + offset) ("log") or on the loss itself ("linear")
        "offset": 1e-3,  # keeps ln finite at zero loss
        # "cap": re-sample; "weights": keep all, add inverse-frequency weights; "resample": draw as many
        # rows as candidates with replacement, with probability proportional to those weights (each
        # row then weighs the same: no high-variance weighted loss)
        "mode": "cap",
    }, "checkpoints re-sampled so each non-pivot class's loss covers its range evenly"),
    "pairs": ViewKind("pairs", "pairs", {
        "cap": 256,  # pairs kept per run
        "max_gap": -1,  # largest target_step - step; -1 = any
        # θ's largest class test loss at most this (-1 = any θ): pairs that start from a model that knows
        # every class, the start unlearning hands DiHyFo-1; a zoo's early checkpoints then take no part
        "start_max_loss": -1.0,
        # The same bound relative to the task (-1 = off): at most this many times the median largest
        # class loss of the zoo's plainly trained runs (queries/sql/trained_level.sql), so that starts
        # look like a trained model of this task, whatever its classes and data. With both set, the
        # lower bound holds.
        "start_loss_factor": -1.0,
        # θ*'s lowest accuracy over the classes its run kept at least this (-1 = any θ*): targets that
        # forgot only what their run deleted, not a retained class a small network failed to learn
        "target_min_retain_acc": -1.0,
        # Originals only by default: the collector draws each checkpoint's copies independently
        # (zoo/augment.py), so copy j of θ and copy j of θ* are in general permuted differently
        # when H > 2. Augment pairs with the loader's permute=True (one permutation for both).
        "include_augmented": False,
        # Pairs kept per start θ before the run's cap (-1 = any; sql/pairs_spread_starts.sql): spreads the
        # cap over a run's starts instead of over its pairs, which come almost all from early starts
        "start_cap": -1,
        # "none": the pairs as drawn; "delta": re-drawn with replacement so that each non-pivot class's
        # loss change (θ* − θ) covers its range evenly (n_bins bins): the rare pairs that move from
        # "knows the class" to "forgot it" weigh as much as the common small steps
        "balance": "none",
        "n_bins": 20,  # bins per non-pivot class for balance "delta"
        # Runs per family (a zoo collected with --branches K): > 1 pairs θ with θ* from any run of its
        # family, at the same step or later, and splits train/test by family. Branches share θ up to
        # their deletion, so θ* is also "this model had those classes been deleted at the deletion step"
        "family": 1,
    }, "run-grouped (θ, θ*) pairs, θ from an earlier step of the same run (or family)"),
}


# Pairs parameters that drop rows (each -1 when off): what describe_filters names.
PAIR_FILTERS = ("max_gap", "start_max_loss", "start_loss_factor", "target_min_retain_acc")


def describe_filters(record: Mapping[str, Any]) -> str:
    """The row filters a view record has on, and the bounds they resolved to, in words."""
    said = [f"{k} {v}" for k, v in record["params"].items() if k in PAIR_FILTERS and v != -1]
    said += [f"resolved {k} {v}" for k, v in record.get("resolved", {}).items()]
    return ", ".join(said) or "no filters"


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _coerce(key: str, value: Any, default: Any) -> Any:
    """A parameter given as text (CLI) or value, converted to its default's type."""
    try:
        if isinstance(default, bool):
            if isinstance(value, str):
                low = value.strip().lower()
                if low not in ("true", "false", "1", "0", "yes", "no"):
                    raise ValueError(value)
                return low in ("true", "1", "yes")
            return bool(value)
        if isinstance(default, int):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError(value)
            return int(value)
        if isinstance(default, float):
            return float(value)
        return str(value)
    except (TypeError, ValueError):
        raise HyperForgetError(f"view parameter {key}={value!r} is not a valid {type(default).__name__}") from None


def resolve_params(kind: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """Full, checked parameters of a view kind (defaults filled in, types converted)."""
    if kind not in VIEW_KINDS:
        raise HyperForgetError(f"unknown view kind {kind!r}: choose one of {', '.join(VIEW_KINDS)}")
    vk = VIEW_KINDS[kind]
    defaults = {**COMMON_DEFAULTS, **vk.defaults}
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        raise HyperForgetError(f"view kind {kind!r} has no parameter(s) {unknown}; it takes {', '.join(defaults)}")
    p = {k: _coerce(k, params[k], d) if k in params and params[k] is not None else d for k, d in defaults.items()}
    if p["split"] not in SPLITS:
        raise HyperForgetError(f"split must be one of {', '.join(SPLITS)}, got {p['split']!r}")
    if not 0.0 <= p["test_fraction"] <= 1.0:
        raise HyperForgetError(f"test_fraction must be in [0, 1], got {p['test_fraction']}")
    if kind == "balanced":
        if p["n_bins"] < 1 or p["cap"] < 1:
            raise HyperForgetError(f"balanced views need n_bins >= 1 and cap >= 1, got {p['n_bins']}, {p['cap']}")
        if p["scale"] not in ("log", "linear"):
            raise HyperForgetError(f"scale must be 'log' or 'linear', got {p['scale']!r}")
        if p["mode"] not in ("cap", "weights", "resample"):
            raise HyperForgetError(f"mode must be 'cap', 'weights' or 'resample', got {p['mode']!r}")
        if p["offset"] <= 0:
            raise HyperForgetError(f"offset must be > 0 so that ln(loss + offset) is finite, got {p['offset']}")
    if kind == "pairs":
        if p["cap"] < 1:
            raise HyperForgetError(f"pairs views need cap >= 1 pairs per run, got {p['cap']}")
        if p["max_gap"] < -1 or p["max_gap"] == 0:
            raise HyperForgetError(f"max_gap must be -1 (any) or a positive number of steps, got {p['max_gap']}")
        if p["start_max_loss"] < 0 and p["start_max_loss"] != -1:
            raise HyperForgetError(f"start_max_loss must be -1 (any) or a loss >= 0, got {p['start_max_loss']}")
        if p["start_loss_factor"] <= 0 and p["start_loss_factor"] != -1:
            raise HyperForgetError(f"start_loss_factor must be -1 (off) or > 0, got {p['start_loss_factor']}")
        if not (p["target_min_retain_acc"] == -1 or 0 <= p["target_min_retain_acc"] <= 1):
            raise HyperForgetError(f"target_min_retain_acc must be -1 (any) or an accuracy in [0, 1], "
                                   f"got {p['target_min_retain_acc']}")
        if p["start_cap"] < 1 and p["start_cap"] != -1:
            raise HyperForgetError(f"start_cap must be -1 (any) or >= 1 pairs per start, got {p['start_cap']}")
        if p["balance"] not in ("none", "delta"):
            raise HyperForgetError(f"balance must be 'none' or 'delta', got {p['balance']!r}")
        if p["n_bins"] < 1:
            raise HyperForgetError(f"pairs views need n_bins >= 1, got {p['n_bins']}")
        if p["family"] < 1:
            raise HyperForgetError(f"family must be >= 1 runs (the zoo's --branches), got {p['family']}")
    return p


def view_sql(kind: str, num_classes: int, pivots: tuple[int, ...], params: Mapping[str, Any]) -> tuple[str, dict]:
    """(SQL text, DuckDB named parameters) of a view kind for a zoo with C classes and pivots."""
    p = resolve_params(kind, params)
    if kind == "balanced" and set(range(num_classes)) <= set(pivots):
        raise HyperForgetError(f"every class is a pivot ({sorted(pivots)}); a balanced view needs a non-pivot class")
    fragments = engine.column_fragments(num_classes, pivots)
    if kind == "pairs":
        fragments["spread_starts"] = (engine.sql_template("pairs_spread_starts") if p["start_cap"] > 0
                                      else "spread AS (SELECT * FROM candidates),")
    sql = engine.render(engine.sql_template(VIEW_KINDS[kind].name), fragments)
    values = dict(p)
    if kind == "balanced":
        values["log_scale"] = values.pop("scale") == "log"
    needed = set()
    for st in duckdb.extract_statements(sql):
        needed |= set(st.named_parameters)
    missing = needed - set(values)
    assert not missing, f"template {kind} needs {missing}"
    return sql, {k: values[k] for k in needed}


def compute_view(con: duckdb.DuckDBPyConnection, kind: str, num_classes: int, pivots: tuple[int, ...],
                 params: Mapping[str, Any], name: str = "") -> pa.Table:
    """Run a view's SQL on a connection from queries.engine (which has ``checkpoints``) -> Arrow."""
    resample = kind == "balanced" and params["mode"] == "resample"
    resolved = {}
    if kind == "pairs" and params["start_loss_factor"] > 0:
        resolved = start_threshold(con, num_classes, params)
        params = {**params, "start_max_loss": resolved["start_max_loss"]}
    sql, values = view_sql(kind, num_classes, pivots, {**params, "mode": "weights"} if resample else params)
    try:
        table = con.sql(sql, params=values).to_arrow_table()
    except duckdb.Error as exc:
        raise HyperForgetError(f"building view {name or kind!r} ({kind}) failed: {engine.one_line(exc)}") from None
    if resample:
        weights = table.column("weight").to_numpy()
        table = resample_rows(table.drop_columns(["weight"]), weights, params["seed"], ["checkpoint_id"])
    if kind == "pairs" and params["balance"] == "delta":
        nonpivot = [k for k in range(num_classes) if k not in set(pivots)]
        weights = inverse_frequency_weights([table.column(f"delta_{k}").to_numpy() for k in nonpivot],
                                            params["n_bins"])
        table = resample_rows(table, weights, params["seed"], ["checkpoint_id", "target_id"])
    # What the parameters resolved to on this zoo travels with the rows (build_view records it).
    return table.replace_schema_metadata({RESOLVED_KEY: json.dumps(resolved)}) if resolved else table


def start_threshold(con: duckdb.DuckDBPyConnection, num_classes: int, params: Mapping[str, Any]) -> dict:
    """{"start_max_loss": the absolute bound start_loss_factor gives on this zoo, "trained_level",
    "trained_runs"} (the level is queries/sql/trained_level.sql's median; a given start_max_loss
    still caps the bound)."""
    sql = engine.render(engine.sql_template("trained_level"), engine.column_fragments(num_classes))
    try:
        ((runs, level),) = con.sql(sql).fetchall()
    except duckdb.Error as exc:
        raise HyperForgetError(f"measuring the zoo's trained loss level failed: {engine.one_line(exc)}") from None
    if not runs or level is None or not np.isfinite(level):
        raise HyperForgetError("start_loss_factor needs runs that train on every class (nothing undersampled or "
                               "deleted), and this zoo has none: set start_max_loss instead")
    bound = params["start_loss_factor"] * float(level)
    if params["start_max_loss"] >= 0:
        bound = min(bound, params["start_max_loss"])
    return {"start_max_loss": round(bound, 6), "trained_level": float(level), "trained_runs": int(runs)}


def inverse_frequency_weights(columns: list[np.ndarray], n_bins: int) -> np.ndarray:
    """Weights (N,) = mean over columns of 1 / (B · n_bin): each column's histogram flattened in expectation.

    Each column is cut into ``n_bins`` equal-width bins between its 0.5 % and 99.5 % quantiles (the
    tails go to the end bins, so one outlier does not empty the others); B counts non-empty bins.
    Non-finite values take no part in their column.
    """
    n = len(columns[0]) if columns else 0
    w = np.zeros(n, dtype=np.float64)
    for col in columns:
        col = np.asarray(col, dtype=np.float64)
        ok = np.isfinite(col)
        if not ok.any():
            continue
        lo, hi = np.quantile(col[ok], [0.005, 0.995])
        b = np.clip(np.floor((col[ok] - lo) / max(hi - lo, 1e-12) * n_bins), 0, n_bins - 1).astype(np.int64)
        counts = np.bincount(b, minlength=n_bins)
        w[ok] += 1.0 / (counts[b] * np.count_nonzero(counts))
    return w / max(len(columns), 1)


def resample_rows(table: pa.Table, weights: np.ndarray, seed: int, order_by: list[str]) -> pa.Table:
    """As many rows as ``table`` drawn with replacement, P(row) ∝ weight, seeded; sorted by ``order_by``.

    The sort keeps rows of one zarr chunk together, as the loader's block shuffle expects.
    """
    w = np.asarray(weights, dtype=np.float64)
    w = np.where(np.isfinite(w) & (w > 0), w, 0.0)
    if table.num_rows == 0 or w.sum() <= 0:
        return table
    rng = np.random.default_rng([int(seed), 0x5EED])
    picked = rng.choice(table.num_rows, size=table.num_rows, replace=True, p=w / w.sum())
    keys = [table.column(c).to_numpy()[picked] for c in reversed(order_by)]
    return table.take(pa.array(picked[np.lexsort(keys)]))


def _check_name(name: str) -> None:
    if not engine.VIEW_NAME.match(name) or name in engine.RESERVED_NAMES:
        raise HyperForgetError(f"view name {name!r} must be letters, digits and _ (not starting with a digit, "
                               f"at most 63 characters, not {' or '.join(sorted(engine.RESERVED_NAMES))})")


def _local_root(zoo: Any) -> str:
    root = os.fspath(zoo) if isinstance(zoo, (str, os.PathLike)) else os.fspath(zoo.path)
    if "://" in root and not root.startswith("file://"):
        raise HyperForgetError(f"materialized views need a local zoo directory, got {root}; copy the zoo locally")
    return root[len("file://"):] if root.startswith("file://") else root


def params_digest(kind: str, params: Mapping[str, Any]) -> str:
    """8 hex characters identifying (kind, full parameters)."""
    blob = json.dumps({"kind": kind, "params": resolve_params(kind, params)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:8]


def build_view(zoo: Any, kind: str, name: str | None = None, *, overwrite: bool = True,
               memory_limit: str = "8GB", threads: int | None = None, **params: Any) -> dict:
    """Materialize a view to ``ZOO/views/NAME.parquet`` (+ ``NAME.json``) and return its record.

    Args:
        zoo: zoo directory (or open ZooReader of one).
        kind: "split", "balanced" or "pairs" (see VIEW_KINDS for their parameters).
        name: view name; default ``KIND_<digest of the parameters>``.
        overwrite: replace an existing view of that name (else raise).
        memory_limit, threads: DuckDB limits for the build (past the memory limit it spills to the
            system temp directory).
        **params: the kind's parameters; missing ones take their defaults.
    Returns:
        the JSON record: format, version, name, kind, mode, params, rows, zoo_rows, num_classes,
        pivots, columns, created_at, seconds, duckdb.
    """
    from hyperforget.zoo.store import open_zoo

    t0 = time.perf_counter()
    root = _local_root(zoo)
    full = resolve_params(kind, params)
    name = name or f"{kind}_{params_digest(kind, full)}"
    _check_name(name)
    vdir = engine.views_dir(root)
    pq_path, js_path = os.path.join(vdir, name + ".parquet"), os.path.join(vdir, name + ".json")
    if not overwrite and os.path.exists(js_path):
        raise HyperForgetError(f"view {name!r} already exists in {root}; choose another --name or pass overwrite")
    reader = open_zoo(root) if isinstance(zoo, (str, os.PathLike)) else zoo
    cfg = reader.config
    if kind == "pairs" and full["family"] > 1:
        branches = int(((cfg.collection or {}).get("config") or {}).get("branches", 1))
        if branches != full["family"]:
            raise HyperForgetError(f"family={full['family']} pairs runs in families of {full['family']}, but zoo "
                                   f"{root} was collected with --branches {branches}: use family={branches}")
    limits = engine.SQLLimits(memory_limit=memory_limit, threads=threads or min(4, os.cpu_count() or 1))
    con = engine.connect(reader, confined=False, limits=limits)
    try:
        table = compute_view(con, kind, cfg.spec.num_classes, cfg.pivots, full, name=name)
    finally:
        con.close()
    resolved = json.loads((table.schema.metadata or {}).get(RESOLVED_KEY.encode(), b"{}"))
    table = table.replace_schema_metadata({"hyperforget_view": json.dumps({"kind": kind, "params": full})})
    os.makedirs(vdir, exist_ok=True)
    record = {
        "format": VIEW_FORMAT, "version": VIEW_VERSION, "name": name, "kind": kind,
        "mode": VIEW_KINDS[kind].mode, "params": full, "rows": table.num_rows,
        "zoo_rows": reader.num_rows, "num_classes": cfg.spec.num_classes, "pivots": list(cfg.pivots),
        "columns": table.column_names, "created_at": _now(), "seconds": round(time.perf_counter() - t0, 3),
        "duckdb": duckdb.__version__,
    }
    if resolved:
        record["resolved"] = resolved
    # JSON out first when overwriting, so a crash between the two renames leaves no stale record.
    try:
        os.remove(js_path)
    except FileNotFoundError:
        pass
    with atomic_path(pq_path) as tmp:
        pq.write_table(table, tmp, row_group_size=1 << 17)
    write_json(js_path, record, indent=2)
    return record


def view_record(zoo: Any, name: str) -> dict:
    """The JSON record of a materialized view (raises if missing or of another version)."""
    root = _local_root(zoo)
    path = os.path.join(engine.views_dir(root), name + ".json")
    if not os.path.exists(path):
        have = ", ".join(sorted(engine.materialized_views(root))) or "none"
        raise HyperForgetError(f"no view {name!r} in {root} (views: {have}); build it with `hyperforget view build`")
    with open(path) as f:
        try:
            rec = json.load(f)
        except json.JSONDecodeError as exc:
            raise HyperForgetError(f"{path} is not valid JSON ({exc}); rebuild the view") from None
    if rec.get("format") != VIEW_FORMAT or rec.get("version") != VIEW_VERSION:
        raise HyperForgetError(f"{path}: view format {rec.get('format')!r} version {rec.get('version')} "
                               f"is not supported; expected {VIEW_FORMAT!r} version {VIEW_VERSION}")
    return rec


def load_view(zoo: Any, name: str, columns: list[str] | None = None) -> tuple[pa.Table, dict]:
    """(rows of the view, its record)."""
    rec = view_record(zoo, name)
    path = os.path.join(engine.views_dir(_local_root(zoo)), name + ".parquet")
    try:
        table = pq.read_table(path, columns=columns)
    except (OSError, pa.ArrowInvalid) as exc:
        raise HyperForgetError(f"cannot read view {path}: {exc}; rebuild it") from None
    if table.num_rows != rec["rows"]:
        raise HyperForgetError(f"view {name!r} has {table.num_rows} rows, its record says {rec['rows']}; rebuild it")
    return table, rec


def list_views(zoo: Any) -> list[dict]:
    """Records of every materialized view of a zoo, by name."""
    root = _local_root(zoo)
    out = []
    for name in engine.materialized_views(root):
        try:
            out.append(view_record(root, name))
        except HyperForgetError:
            continue
    return out


@contextlib.contextmanager
def _views_lock(root: str):
    """An exclusive lock on ZOO/views/.lock (released by the kernel if the holder dies)."""
    import fcntl

    fd = os.open(os.path.join(engine.views_dir(root), ".lock"), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


# The trainer's entry point: which view kind feeds which DiHyFo variant.
VARIANT_KINDS = {"dihyfo1": "pairs", "dihyfo2": "balanced"}


def ensure_training_views(zoo: Any, variant: str, seed: int = 0, **params: Any) -> tuple[str, str]:
    """(train view name, test view name) for a DiHyFo variant, built only if missing.

    dihyfo1 gets ``pairs`` views, dihyfo2 ``balanced`` views, both split by run with
    ``split_seed = seed``. Names carry a digest of the parameters, so other parameters give other
    views and an existing view is reused only when its parameters match.
    """
    if variant not in VARIANT_KINDS:
        raise HyperForgetError(f"unknown variant {variant!r}: choose one of {', '.join(VARIANT_KINDS)}")
    from hyperforget.zoo.store import open_zoo

    kind = VARIANT_KINDS[variant]
    root = _local_root(zoo)
    zoo_rows = open_zoo(root).num_rows
    base = {"seed": seed, "split_seed": seed, **params}
    names = []
    os.makedirs(engine.views_dir(root), exist_ok=True)
    with _views_lock(root):  # DDP ranks may all call this at once: one builds, the others reuse
        for side in ("train", "test"):
            p = resolve_params(kind, {**base, "split": side})
            name = f"{variant}_{side}_{params_digest(kind, p)}"
            try:
                rec = view_record(root, name)
                # A zoo that grew since the build makes the view stale.
                fresh = rec["params"] == p and rec["kind"] == kind and rec["zoo_rows"] == zoo_rows
            except HyperForgetError:
                fresh = False
            if not fresh:
                build_view(root, kind, name, **p)
            names.append(name)
    return names[0], names[1]
