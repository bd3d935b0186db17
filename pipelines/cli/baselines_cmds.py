"""`hyperforget compare-baselines`: every baseline against models retrained from scratch, one table."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer


def compare_baselines_cmd(
    dataset: Annotated[str, typer.Option(help="mnist-5k, fashion-mnist, digits, idx:DIR")] = "mnist-5k",
    classes: Annotated[str, typer.Option(help="original class ids of the task")] = "0,1,2,3",
    hidden: Annotated[int, typer.Option(help="hidden units (2: MNIST-4, 7: MNIST-10)")] = 2,
    forget: Annotated[str, typer.Option(help="task labels to forget, e.g. 2 or 2,3")] = "2",
    epochs: Annotated[Optional[int], typer.Option(
        help="epochs of the original and retrained models (default: a run's)")] = None,
    retrained: Annotated[int, typer.Option(help="models retrained without the forget set")] = 3,
    seed: Annotated[int, typer.Option(help="seed of the original; retrained seeds follow it")] = 0,
    lr: Annotated[Optional[float], typer.Option(help="SGD learning rate (default: a run's)")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="minibatch (default: a run's)")] = None,
    threads: Annotated[int, typer.Option(help="torch CPU threads (tiny MLPs gain nothing from more)")] = 1,
    json_out: Annotated[Optional[Path], typer.Option("--json", help="also write the records and the table here")
                        ] = None,
    force: Annotated[bool, typer.Option(help="overwrite an existing --json file")] = False,
) -> None:
    """Train an original and retrained MLPs, apply every baseline, print the comparison table."""
    import torch

    from hyperforget.pipelines.cli.checks import output_file, positive
    from hyperforget.pipelines.compare_baselines import ComparisonConfig, run_comparison
    from hyperforget.pipelines.report import render_comparison
    from hyperforget.pipelines.rundir import parse_classes
    from hyperforget.zoo.errors import HyperForgetError
    from hyperforget.zoo.files import write_json

    # Check every argument before any work.
    positive(threads, "--threads")
    if json_out is not None:
        output_file(json_out, force=force, option="--json")
    try:
        class_ids = tuple(int(c) for c in classes.split(","))
    except ValueError:
        raise HyperForgetError(f"--classes takes comma-separated class ids such as 0,1,2,3, got {classes!r}") from None
    given = {k: v for k, v in dict(epochs=epochs, lr=lr, batch_size=batch_size).items() if v is not None}
    cfg = ComparisonConfig(dataset=dataset, classes=class_ids, hidden=hidden, forget=tuple(parse_classes(forget)),
                           retrained=retrained, seed=seed, **given)
    torch.set_num_threads(threads)
    entry = run_comparison(cfg)
    table, text = render_comparison(entry)
    typer.echo(text)
    dropped = entry["dropped_seeds"]
    if dropped["original"] or dropped["retrain"]:
        typer.echo(f"\nfailed trainings replaced by spare seeds: original {dropped['original']}, "
                   f"retrained {dropped['retrain']}")
    if json_out is not None:
        write_json(json_out, {**entry, "table": table})


def register(app: typer.Typer) -> None:
    app.command("compare-baselines")(compare_baselines_cmd)
