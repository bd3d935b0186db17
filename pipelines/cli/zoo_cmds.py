"""`hyperforget zoo ...`: inspect, check and maintain a checkpoint zoo.

Other stage modules add commands to the same group with
``from pipelines.cli.zoo_cmds import zoo_app`` (e.g. ``zoo collect``).
"""

from __future__ import annotations

import json
from typing import Annotated

import typer

zoo_app = typer.Typer(no_args_is_help=True, help="Checkpoint zoos: collect, inspect, verify, compact.")

PathArg = Annotated[str, typer.Argument(help="zoo directory or fsspec URL (e.g. memory://zoo)")]


def _size(n: int | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@zoo_app.command("info")
def info(path: PathArg, as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False) -> None:
    """Counts, sizes, compression ratio and settings of a zoo."""
    from hyperforget.zoo.store import zoo_info

    d = zoo_info(path)
    if as_json:
        typer.echo(json.dumps(d, indent=1))
        return
    from rich.console import Console
    from rich.table import Table

    t = Table(show_header=False, title=f"zoo {d['path']}")
    ratio = d["compression_ratio"]
    rows = [
        ("checkpoints", f"{d['checkpoints']:,} ({d['originals']:,} original, {d['augmented']:,} augmented)"),
        ("runs", f"{d['runs']:,}"),
        ("phases", ", ".join(f"{k} {v:,}" for k, v in sorted(d["phases"].items())) or "-"),
        ("MLP", f"{d['spec_str']} ({d['num_params']:,} parameters)"),
        ("classes / pivots", f"{d['classes']} / {d['pivots']}"),
        ("dataset", d["dataset"] or "-"),
        ("size on disk", _size(d["size_on_disk"])),
        ("parameters", f"{_size(d['params_bytes'])} stored, {_size(d['params_raw_bytes'])} raw, "
                       f"ratio {ratio:.2f}" if ratio else _size(d["params_bytes"])),
        ("metadata", f"{_size(d['metadata_bytes'])} in {d['parts']} Parquet file(s), {d['commits']} commits"),
        ("chunks / shards", f"{d['chunk_rows']} / {d['shard_rows']} rows, {d['compressor']}"),
        ("normalization", f"gpt_coeff {d['normalization']['gpt_coeff']:.4g}" if d["normalization"] else "none"),
    ]
    if d.get("holdout"):
        h = d["holdout"]
        rows.append(("held-out forget sets", "; ".join(
            f"{{{','.join(map(str, s))}}}: {h['forgetting']['-'.join(map(str, s))]:,} checkpoints forget it"
            for s in h["sets"]) + f" (forget acc ≤ {h['forget_acc']}, others ≥ {h['retain_acc']})"))
    if d["metadata_rows"] != d["checkpoints"]:
        rows.insert(1, ("DAMAGED", f"the manifest commits {d['checkpoints']:,} rows but its parts hold "
                                   f"{d['metadata_rows']:,}; run `hyperforget zoo verify {path}`"))
    for k, v in rows:
        t.add_row(k, v)
    Console().print(t)


@zoo_app.command("verify")
def verify(path: PathArg,
           as_json: Annotated[bool, typer.Option("--json", help="print JSON")] = False,
           skip_params: Annotated[bool, typer.Option("--skip-params", help="check metadata only")] = False) -> None:
    """Check that rows agree, ids are unique, no NaNs, every chunk decodes; exit 1 on problems."""
    from hyperforget.zoo.store import verify_zoo

    rep = verify_zoo(path, check_params=not skip_params, progress=not as_json)
    if as_json:
        typer.echo(json.dumps(rep.to_dict(), indent=1))
    else:
        for p in rep.problems:
            typer.echo(f"PROBLEM {p}")
        for n in rep.notes:
            typer.echo(f"note    {n}")
        verdict = "ok" if rep.ok else f"{len(rep.problems)} problem(s)"
        typer.echo(f"{rep.path}: {verdict}: {rep.committed_rows:,} committed rows, {rep.shards_checked} shards "
                   f"decoded, {rep.parts_checked} Parquet parts read in {rep.seconds:.2f} s")
    if not rep.ok:
        # SystemExit rather than typer.Exit: main() runs click with standalone_mode=False, which
        # turns typer.Exit into a return value that would be lost.
        raise SystemExit(1)


@zoo_app.command("compact")
def compact_cmd(path: PathArg,
                file_rows: Annotated[int, typer.Option(help="most rows per merged Parquet file")] = 1 << 20,
                row_group_rows: Annotated[int, typer.Option(help="rows per Parquet row group")] = 131072) -> None:
    """Merge the small per-commit Parquet parts into large files (atomic manifest swap)."""
    from hyperforget.zoo.errors import HyperForgetError
    from hyperforget.zoo.store import compact

    if file_rows < 1 or row_group_rows < 1:
        raise HyperForgetError("--file-rows and --row-group-rows must be positive")
    s = compact(path, file_rows=file_rows, row_group_rows=row_group_rows, progress=True)
    typer.echo(f"{path}: Parquet parts {s['parts_before']} -> {s['parts_after']} ({s['files_written']} written)")


@zoo_app.command("normalize")
def normalize(path: PathArg,
              max_rows: Annotated[int, typer.Option(help="random checkpoints to sample")] = 25000,
              seed: Annotated[int, typer.Option(help="sampling seed")] = 0) -> None:
    """Compute parameter normalization statistics (G.pt's 0.538/std, per layer) into zoo.json."""
    from hyperforget.zoo.store import ZooWriter, compute_normalization, open_zoo

    stats = compute_normalization(open_zoo(path), max_rows=max_rows, seed=seed)
    with ZooWriter.open(path) as w:
        w.set_normalization(stats)
    typer.echo(f"{path}: mean {stats['mean']:.4g}, std {stats['std']:.4g}, gpt_coeff {stats['gpt_coeff']:.4g} "
               f"over {stats['rows']:,} checkpoints")


def register(app: typer.Typer) -> None:
    app.add_typer(zoo_app, name="zoo")
