"""DuckDB over one zoo's metadata: the ``checkpoints`` and ``runs`` views, confined ad-hoc SQL.

A connection made here holds, for one zoo:

- ``checkpoints``: one row per committed checkpoint, read from the Parquet parts named by the
  manifest (columns in docs/format.md, "The zoo on disk");
- ``runs``: one row per training run (``queries/sql/runs.sql``);
- one view per materialized view in ``ZOO/views`` (``views.NAME.parquet`` → ``NAME``);
- the macro ``run_split(run_id, seed, test_fraction)`` → ``'train'``/``'test'``, the run-level
  split every parameterized view filters on.

Ad-hoc SQL (:func:`run_query`) is read-only and confined, in two layers: statements are parsed
with DuckDB's own parser and only queries (SELECT / WITH / VALUES / DESCRIBE / SHOW / SUMMARIZE,
or EXPLAIN of one) are accepted; and the connection itself, once the zoo's tables are registered,
disables file access outside the zoo's own metadata files (``allowed_paths``), extension
installation and loading, caps memory and threads, and locks its configuration so SQL cannot undo
any of it. DuckDB calls itself unsafe for untrusted SQL; the parser check keeps COPY, ATTACH,
INSTALL, LOAD, CREATE, INSERT, SET, PRAGMA and CALL out even where the settings would let one by.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any, Iterable, Mapping, Sequence

import duckdb
import pyarrow as pa

from hyperforget.zoo.errors import HyperForgetError

# Statement types an ad-hoc query may have. DESCRIBE, SHOW, SUMMARIZE, VALUES and FROM-first
# queries all parse as SELECT in DuckDB 2.0.
_QUERY_TYPES = {duckdb.StatementType.SELECT}
_EXPLAIN = duckdb.StatementType.EXPLAIN
_EXPLAIN_PREFIX = re.compile(r"^\s*explain\s+(analyze\s+)?", re.IGNORECASE)
VIEW_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,62}$")
RESERVED_NAMES = {"checkpoints", "runs"}
_PLACEHOLDER = re.compile(r"\{\{\s*([a-z_]+)\s*\}\}")

# The run-level split, shared by every view so train/test sides agree across views built with
# the same (seed, fraction). hash() is DuckDB's; materialized views store their ids, so a
# DuckDB upgrade that changed hash() would change new views, never existing ones.
RUN_SPLIT_MACRO = """
CREATE OR REPLACE MACRO run_split(run_id, seed, test_fraction) AS
    CASE WHEN hash(CAST(run_id AS BIGINT), CAST(seed AS BIGINT)) % 1000000
              < CAST(round(test_fraction * 1000000) AS UBIGINT)
         THEN 'test' ELSE 'train' END
"""


@dataclass(frozen=True)
class SQLLimits:
    """Resource limits of a connection (DuckDB settings)."""

    memory_limit: str = "2GB"  # DuckDB memory_limit; queries past it spill or fail
    threads: int = 2  # DuckDB worker threads
    max_temp_directory_size: str = "0B"  # spilling to disk is writing files: off when confined
    temp_directory: str = ""  # where unconfined builds spill; "" = the system temp dir


def sql_template(name: str) -> str:
    """The text of ``queries/sql/NAME.sql`` (package data)."""
    path = resources.files(__package__) / "sql" / f"{name}.sql"
    if not path.is_file():
        known = sorted(p.name[:-4] for p in (resources.files(__package__) / "sql").iterdir()
                       if p.name.endswith(".sql"))
        raise HyperForgetError(f"no SQL template {name!r}: choose one of {', '.join(known)}")
    return path.read_text()


def render(template: str, fragments: Mapping[str, str]) -> str:
    """Fill ``{{name}}`` placeholders with generated SQL fragments (column lists, file lists)."""

    def fill(m: re.Match) -> str:
        if m.group(1) not in fragments:
            raise HyperForgetError(f"SQL template needs fragment {m.group(1)!r}; this is a bug in queries/")
        return fragments[m.group(1)]

    return _PLACEHOLDER.sub(fill, template)


def sql_string(s: str) -> str:
    """A SQL string literal."""
    return "'" + str(s).replace("'", "''") + "'"


def column_fragments(num_classes: int, pivots: Iterable[int] = ()) -> dict[str, str]:
    """Per-class column lists for the templates, generated for a zoo with ``num_classes`` classes.

    ``nonpivot_losses`` is absent when every class is a pivot.
    """
    pivots = set(int(p) for p in pivots)
    classes = range(num_classes)
    non_pivot = [k for k in classes if k not in pivots]
    out = {
        "losses": ", ".join(f"loss_{k}" for k in classes),
        "c_losses": ", ".join(f"c.loss_{k}" for k in classes),
        "nonpivot_losses": ", ".join(f"loss_{k}" for k in non_pivot),
        "final_losses": ", ".join(f"arg_max(loss_{k}, step) FILTER (WHERE perm_index = 0) AS final_loss_{k}"
                                  for k in classes),
        # Each class's accuracy, or 1 for a class the checkpoint's run deleted: least() over them is the
        # lowest accuracy over the classes the run kept.
        "retained_accs": ", ".join(f"CASE WHEN list_contains(deleted, {k}) THEN 1.0 ELSE acc_{k} END"
                                   for k in classes),
        "pair_losses": ", ".join([f"a.loss_{k} AS loss_{k}" for k in classes]
                                 + [f"b.loss_{k} AS target_loss_{k}" for k in classes]
                                 + [f"CAST(b.loss_{k} - a.loss_{k} AS FLOAT) AS delta_{k}" for k in classes]),
    }
    if not non_pivot:  # only the balanced view needs it; it checks first
        del out["nonpivot_losses"]
    return out


def one_line(exc: BaseException) -> str:
    """DuckDB's message on one line (it spreads context over several)."""
    return " ".join(str(exc).split())


def connect_files(meta_files: Sequence[str] | pa.Table, *, num_classes: int,
                  views: Mapping[str, str] | None = None, confined: bool = True,
                  limits: SQLLimits = SQLLimits()) -> duckdb.DuckDBPyConnection:
    """A connection with ``checkpoints`` over the given metadata and ``runs``, views, macros.

    Args:
        meta_files: Parquet paths (local) or an Arrow table holding the metadata.
        num_classes: C, for the per-class columns of ``runs``.
        views: materialized views to expose, name -> local Parquet path.
        confined: lock the connection down for untrusted SQL (see the module docstring).
        limits: memory and threads.
    """
    views = dict(views or {})
    config = {"threads": limits.threads, "memory_limit": limits.memory_limit}
    if not confined:  # DuckDB's default spill directory is ./.tmp under the caller's working directory
        import tempfile

        config["temp_directory"] = limits.temp_directory or os.path.join(tempfile.gettempdir(), "hyperforget-duckdb")
    con = duckdb.connect(":memory:", config=config)
    try:
        allowed: list[str] = []
        if isinstance(meta_files, pa.Table):
            con.register("_checkpoints_arrow", meta_files)
            con.execute("CREATE VIEW checkpoints AS SELECT * FROM _checkpoints_arrow")
        else:
            files = [os.path.abspath(f) for f in meta_files]
            if not files:
                raise HyperForgetError("the zoo has no committed metadata yet; commit checkpoints first")
            allowed += files
            listing = "[" + ", ".join(sql_string(f) for f in files) + "]"
            con.execute("CREATE VIEW checkpoints AS " + render(sql_template("checkpoints"), {"files": listing}))
        con.execute("CREATE VIEW runs AS " + render(sql_template("runs"), column_fragments(num_classes)))
        con.execute(RUN_SPLIT_MACRO)
        for name, path in sorted(views.items()):
            if not VIEW_NAME.match(name) or name in RESERVED_NAMES:
                continue  # not addressable as a table; load_view() still reads it
            path = os.path.abspath(path)
            allowed.append(path)
            con.execute(f'CREATE VIEW "{name}" AS SELECT * FROM read_parquet({sql_string(path)})')
        if confined:
            # Order matters: allowed_paths before enable_external_access, lock last.
            con.execute("SET allowed_paths = [" + ", ".join(sql_string(p) for p in allowed) + "]")
            for setting in ("SET enable_external_access = false",
                            "SET autoinstall_known_extensions = false",
                            "SET autoload_known_extensions = false",
                            "SET allow_community_extensions = false",
                            f"SET max_temp_directory_size = {sql_string(limits.max_temp_directory_size)}",
                            "SET lock_configuration = true"):
                con.execute(setting)
        return con
    except duckdb.Error as exc:
        con.close()
        raise HyperForgetError(f"cannot open the zoo metadata in DuckDB: {one_line(exc)}") from None


def _zoo_parts(zoo: Any) -> tuple[Any, str]:
    """(ZooReader, zoo root path) for a path or an open reader."""
    from hyperforget.zoo.store import open_zoo

    if isinstance(zoo, (str, os.PathLike)):
        return open_zoo(os.fspath(zoo)), os.fspath(zoo)
    root = getattr(zoo, "path", None) or getattr(zoo, "root", None)
    if root is None:
        raise HyperForgetError(f"expected a zoo path or ZooReader, got {type(zoo).__name__}")
    return zoo, os.fspath(root)


def views_dir(zoo_root: str) -> str:
    return os.path.join(zoo_root, "views")


def materialized_views(zoo_root: str) -> dict[str, str]:
    """name -> Parquet path of every complete materialized view (its JSON record written last)."""
    d = views_dir(zoo_root)
    if not os.path.isdir(d):
        return {}
    out = {}
    for f in sorted(os.listdir(d)):
        if f.endswith(".json") and not f.startswith("."):
            name = f[:-5]
            pq_path = os.path.join(d, name + ".parquet")
            if os.path.exists(pq_path):
                out[name] = pq_path
    return out


def connect(zoo: Any, *, confined: bool = True, limits: SQLLimits = SQLLimits()) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection over one zoo (path or ZooReader): checkpoints, runs, views, run_split.

    Local zoos are read through their Parquet parts; a zoo on another filesystem (fsspec URL) is
    read once into Arrow, since a confined connection has no network access.
    """
    reader, root = _zoo_parts(zoo)
    files = list(reader.meta_files())
    local = all("://" not in f and os.path.exists(f) for f in files)
    source: Sequence[str] | pa.Table = files if local else reader.metadata()
    views = materialized_views(root) if "://" not in root else {}
    return connect_files(source, num_classes=reader.config.spec.num_classes, views=views,
                         confined=confined, limits=limits)


def check_sql(sql: str) -> list[str]:
    """Split ad-hoc SQL into statements and refuse anything that is not a read-only query.

    Returns the statements' text. Raises HyperForgetError naming the refused statement type.
    """
    if not sql or not sql.strip():
        raise HyperForgetError("empty SQL: pass a query such as \"SELECT count(*) FROM checkpoints\"")
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as exc:
        raise HyperForgetError(f"bad SQL: {one_line(exc)}") from None
    if not statements:
        raise HyperForgetError("no SQL statement found: pass a query such as \"SELECT count(*) FROM checkpoints\"")
    out = []
    for st in statements:
        text = st.query.strip().rstrip(";")
        kind = st.type
        if kind == _EXPLAIN:
            # EXPLAIN ANALYZE runs its statement: check what it explains.
            inner = _EXPLAIN_PREFIX.sub("", text, count=1)
            try:
                inner_sts = duckdb.extract_statements(inner)
            except duckdb.Error as exc:
                raise HyperForgetError(f"bad SQL: {one_line(exc)}") from None
            if len(inner_sts) != 1 or inner_sts[0].type not in _QUERY_TYPES:
                name = inner_sts[0].type.name if inner_sts else "?"
                raise HyperForgetError(f"EXPLAIN of a {name} statement is refused: ad-hoc SQL is read-only, "
                                       f"explain a SELECT instead")
        elif kind not in _QUERY_TYPES:
            word = (text.split(None, 1) or [kind.name])[0].upper()
            raise HyperForgetError(
                f"{word} statements are refused: ad-hoc SQL is read-only and confined to the zoo "
                f"(use SELECT/WITH/DESCRIBE/SHOW; build views with `hyperforget view build`)")
        out.append(text)
    return out


DEFAULT_TIMEOUT = 60.0  # seconds an ad-hoc query may run
MAX_LIMIT = 1 << 62  # past int64 DuckDB and Arrow cannot count rows


def run_query(zoo: Any, sql: str, *, limit: int | None = None, params: Mapping[str, Any] | None = None,
              limits: SQLLimits = SQLLimits(), con: duckdb.DuckDBPyConnection | None = None,
              timeout: float | None = DEFAULT_TIMEOUT) -> pa.Table:
    """Run confined, read-only ad-hoc SQL over a zoo; the last statement's result as Arrow.

    Args:
        zoo: zoo path or ZooReader (ignored when ``con`` is given).
        sql: one or more query statements (see :func:`check_sql`).
        limit: keep at most this many rows of the result.
        params: values for ``$name`` parameters.
        limits: memory and threads of a new connection; past ``memory_limit`` a query fails
            (confined connections do not spill to disk).
        con: an existing connection from :func:`connect` to reuse.
        timeout: seconds all statements together may run before they are interrupted (None: no
            limit); a recursive CTE without an end or a large cross join stops here.
    """
    statements = check_sql(sql)
    if limit is not None and not 0 <= limit <= MAX_LIMIT:
        raise HyperForgetError(f"--limit must be between 0 and {MAX_LIMIT}, got {limit}")
    if timeout is not None and not (timeout > 0 and timeout < 1e7):
        raise HyperForgetError(f"--timeout must be a positive number of seconds, got {timeout}")
    own = con is None
    con = con if con is not None else connect(zoo, confined=True, limits=limits)
    timer = None
    if timeout is not None:
        import threading

        timer = threading.Timer(timeout, con.interrupt)
        timer.daemon = True
        timer.start()
    try:
        result = None
        for text in statements:
            try:
                rel = con.sql(text, params=dict(params)) if params else con.sql(text)
                if rel is None:  # not a query; check_sql lets none through
                    raise HyperForgetError(f"statement returned no rows: {text[:60]}")
                result = rel.to_arrow_table() if limit is None else _fetch_limited(rel, limit)
            except duckdb.InterruptException:
                raise HyperForgetError(f"query stopped after the {timeout:g} s time limit; narrow it (a LIMIT, a "
                                       "WHERE, no unbounded recursion) or raise --timeout") from None
            except duckdb.OutOfMemoryException as exc:
                raise HyperForgetError(f"query needed more than the {limits.memory_limit} memory limit "
                                       f"({one_line(exc)[:120]}); narrow it or raise --memory-limit") from None
            except duckdb.Error as exc:
                raise HyperForgetError(f"query failed: {one_line(exc)}") from None
        assert result is not None
        return result
    finally:
        if timer is not None:
            timer.cancel()
        if own:
            con.close()


def _fetch_limited(rel: duckdb.DuckDBPyRelation, limit: int) -> pa.Table:
    reader = rel.to_arrow_reader(max(1, min(limit, 65536)))
    batches, n = [], 0
    for batch in reader:
        if n >= limit:
            break
        batches.append(batch.slice(0, limit - n))
        n += batches[-1].num_rows
    return pa.Table.from_batches(batches, schema=reader.schema)
