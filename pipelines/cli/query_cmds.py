"""`hyperforget query` (confined ad-hoc SQL) and `hyperforget view build|list` (materialized views)."""

from __future__ import annotations

import json
import os
import re
from typing import Annotated, Optional

import typer

from hyperforget.pipelines.cli.checks import output_file
from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.files import atomic_path

view_app = typer.Typer(no_args_is_help=True, help="Materialized views of a zoo (balanced, pairs, split).")


def _write_table(table, out: str) -> None:
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    ext = os.path.splitext(out)[1].lower()
    if ext not in (".csv", ".parquet", ".json"):
        raise HyperForgetError(f"--out {out}: the file must end in .csv, .parquet or .json")
    try:
        with atomic_path(out) as tmp:
            if ext == ".parquet":
                pq.write_table(table, tmp)
            elif ext == ".csv":
                pcsv.write_csv(table, tmp)
            else:
                with open(tmp, "w") as f:
                    json.dump(table.to_pylist(), f, default=str)
    except OSError as exc:
        raise HyperForgetError(f"cannot write --out {out}: {exc.strerror or exc}; choose a writable path") from None


def _print_table(table, title: str) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, show_lines=False)
    for name in table.column_names:
        t.add_column(name, overflow="fold")
    for row in table.to_pylist():
        t.add_row(*(_cell(v) for v in row.values()))
    Console().print(t)


def _cell(v) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    return "NULL" if v is None else str(v)


def query(zoo: Annotated[str, typer.Argument(help="zoo directory")],
          sql: Annotated[str, typer.Argument(help="read-only SQL over checkpoints, runs and the zoo's views")],
          out: Annotated[Optional[str], typer.Option("--out", "-o", help="write the result to FILE.csv|.parquet|.json")] = None,
          limit: Annotated[Optional[int], typer.Option("--limit", "-n", help="keep at most N rows")] = None,
          timeout: Annotated[float, typer.Option(help="seconds the query may run")] = 60.0,
          memory_limit: Annotated[str, typer.Option(help="DuckDB memory limit, e.g. 2GB")] = "2GB",
          force: Annotated[bool, typer.Option("--force", help="overwrite an existing --out file")] = False,
          ) -> None:
    """Run confined, read-only ad-hoc SQL over a zoo's metadata and print (or save) the result."""
    from hyperforget.queries.engine import MAX_LIMIT, SQLLimits, run_query

    # Check every argument before running anything.
    if out:
        output_file(out, force=force)
        if os.path.splitext(out)[1].lower() not in (".csv", ".parquet", ".json"):
            raise HyperForgetError(f"--out {out}: the file must end in .csv, .parquet or .json")
    if limit is not None and not 0 <= limit <= MAX_LIMIT:
        raise HyperForgetError(f"--limit must be between 0 and {MAX_LIMIT}, got {limit}")
    if not (timeout > 0 and timeout < 1e7):
        raise HyperForgetError(f"--timeout must be a positive number of seconds, got {timeout}")
    if not _MEMORY.match(memory_limit):
        raise HyperForgetError(f"--memory-limit {memory_limit!r} is not a size such as 512MB or 2GB")
    table = run_query(zoo, sql, limit=limit if out else (50 if limit is None else limit), timeout=timeout,
                      limits=SQLLimits(memory_limit=memory_limit.replace(" ", "")))
    if out:
        _write_table(table, out)
        typer.echo(f"wrote {table.num_rows} rows to {out}")
    else:
        _print_table(table, f"{table.num_rows} rows" + (" (first 50; use --limit or --out)"
                                                      if limit is None and table.num_rows == 50 else ""))


_MEMORY = re.compile(r"^\s*\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)\s*$", re.IGNORECASE)


def _parse_params(pairs: list[str]) -> dict[str, str]:
    out = {}
    for p in pairs:
        if "=" not in p:
            raise HyperForgetError(f"--param {p!r}: expected key=value, e.g. --param cap=100")
        k, v = p.split("=", 1)
        out[k.strip()] = v.strip()
    return out


@view_app.command("build")
def view_build(zoo: Annotated[str, typer.Argument(help="zoo directory")],
               kind: Annotated[str, typer.Argument(help="split | balanced | pairs")],
               name: Annotated[Optional[str], typer.Option(help="view name (default KIND_<param digest>)")] = None,
               param: Annotated[Optional[list[str]], typer.Option("--param", "-p",
                                help="key=value, repeatable (e.g. -p split=train -p cap=100)")] = None,
               ) -> None:
    """Materialize a view to ZOO/views/NAME.parquet with its parameters in NAME.json."""
    from hyperforget.queries.views import build_view

    rec = build_view(zoo, kind, name, **_parse_params(param or []))
    typer.echo(f"view {rec['name']}: {rec['rows']} rows ({rec['kind']}, {rec['mode']}) in {rec['seconds']} s")
    typer.echo("params: " + json.dumps(rec["params"], sort_keys=True))


@view_app.command("list")
def view_list(zoo: Annotated[str, typer.Argument(help="zoo directory")]) -> None:
    """List a zoo's materialized views."""
    import pyarrow as pa

    from hyperforget.queries.views import list_views

    recs = list_views(zoo)
    if not recs:
        typer.echo("no views; build one with `hyperforget view build ZOO KIND`")
        return
    rows = [{"name": r["name"], "kind": r["kind"], "rows": r["rows"], "zoo_rows": r["zoo_rows"],
             "created_at": r["created_at"], "params": json.dumps(r["params"], sort_keys=True)} for r in recs]
    _print_table(pa.Table.from_pylist(rows), f"{len(rows)} views")


@view_app.command("kinds")
def view_kinds() -> None:
    """List view kinds and their parameters with defaults."""
    from hyperforget.queries.views import COMMON_DEFAULTS, VIEW_KINDS

    for k, vk in VIEW_KINDS.items():
        typer.echo(f"{k} ({vk.mode}): {vk.help}")
        typer.echo("    " + ", ".join(f"{p}={v}" for p, v in {**COMMON_DEFAULTS, **vk.defaults}.items()))


def register(app: typer.Typer) -> None:
    app.command("query")(query)
    app.add_typer(view_app, name="view")
