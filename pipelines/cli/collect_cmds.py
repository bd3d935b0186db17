"""`hyperforget zoo collect`: train many MLP runs and stream their selected checkpoints into a zoo."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from hyperforget.pipelines.cli.checks import output_dir
from hyperforget.pipelines.cli.zoo_cmds import zoo_app
from hyperforget.zoo.holdout import FORGET_ACC, RETAIN_ACC


@zoo_app.command("collect")
def collect_cmd(
    out: Annotated[str, typer.Option("--out", help="zoo directory to create or resume")],
    preset: Annotated[str, typer.Option(help="task preset: mnist4 or mnist10")] = "mnist4",
    dataset: Annotated[str, typer.Option(help="mnist-5k, mnist, fashion-mnist, digits, idx:DIR")] = "mnist-5k",
    data_root: Annotated[Optional[str], typer.Option(help="directory of the IDX files")] = None,
    runs: Annotated[int, typer.Option(help="training runs")] = 64,
    augment: Annotated[int, typer.Option(help="permuted copies per checkpoint")] = 0,
    workers: Annotated[Optional[int], typer.Option(help="LocalCluster worker processes (default: CPUs)")] = None,
    scheduler: Annotated[Optional[str], typer.Option(help="address of a running dask scheduler")] = None,
    runs_per_group: Annotated[int, typer.Option(help="runs trained in lockstep per task")] = 128,
    seed: Annotated[int, typer.Option(help="master seed; run r derives from (seed, r)")] = 0,
    epochs: Annotated[Optional[int], typer.Option(help="epochs per run (default: the preset's)")] = None,
    max_per_run: Annotated[Optional[int], typer.Option(help="checkpoints per run (default: the preset's)")] = None,
    deletion_share: Annotated[float, typer.Option(help="share of runs that delete classes mid-training")] = 0.4,
    deletion_window: Annotated[str, typer.Option(help="deletion step as fractions A,B of a run's steps")] = "0.3,0.6",
    forgetting_lr: Annotated[float, typer.Option(
        help="> 0: a deletion restarts the run's cosine lr at this multiple of its base lr")] = 0.0,
    deletion_undersample: Annotated[bool, typer.Option(
        help="deletion runs may undersample classes too (--no-deletion-undersample: they learn all first)")] = True,
    branches: Annotated[int, typer.Option(
        help="> 1: families of this many runs that share everything up to the deletion step and then delete "
             "nothing or distinct sets (replaces --deletion-share)")] = 1,
    branch_steps: Annotated[int, typer.Option(
        help="with --branches: each deleted set is deleted at this many different steps of the family")] = 1,
    branch_from_start: Annotated[bool, typer.Option(
        help="with --branches: the earliest deletion step is 0, so each set has a branch retrained without it "
             "from the family's initialization")] = False,
    holdout: Annotated[Optional[list[str]], typer.Option(
        help="a forget set kept out of the zoo, e.g. 2,3 (repeatable): no run lowers all its classes and no "
             "checkpoint that forgot it is saved")] = None,
    holdout_forget_acc: Annotated[float, typer.Option(
        help="a checkpoint forgot a held-out set when each of its classes is at most this accurate ...")] = FORGET_ACC,
    holdout_retain_acc: Annotated[float, typer.Option(help="... and every other class at least this")] = RETAIN_ACC,
    no_dask: Annotated[bool, typer.Option("--no-dask", help="train groups in this process, one by one")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="print the summary as JSON")] = False,
) -> None:
    """Collect a checkpoint zoo (re-run the same command to resume an interrupted one)."""
    from hyperforget.zoo.collect import CollectConfig, collect
    from hyperforget.zoo.selection import SelectionConfig

    from hyperforget.zoo.errors import HyperForgetError

    # Check every argument before creating anything.
    if "://" not in out:
        output_dir(out, zoo_ok=True)
    try:
        window = tuple(float(v) for v in deletion_window.split(","))
    except ValueError:
        raise HyperForgetError(f"--deletion-window must be two fractions A,B, got {deletion_window!r}") from None
    try:
        holdout_sets = [[int(k) for k in h.split(",")] for h in holdout or []]
    except ValueError:
        raise HyperForgetError(f"--holdout takes comma-separated class labels such as 2,3, got {holdout}") from None
    cfg = CollectConfig(preset=preset, dataset=dataset, data_root=data_root, runs=runs, augment=augment,
                        runs_per_group=runs_per_group, seed=seed, epochs=epochs, deletion_share=deletion_share,
                        deletion_window=window, forgetting_lr=forgetting_lr, deletion_undersample=deletion_undersample,
                        branches=branches, branch_steps=branch_steps,
                        branch_from_start=branch_from_start, holdout=holdout_sets, holdout_forget_acc=holdout_forget_acc,
                        holdout_retain_acc=holdout_retain_acc, selection=SelectionConfig(max_per_run=max_per_run))
    summary = collect(cfg, out, use_dask=not no_dask, workers=workers, scheduler=scheduler, progress=True)
    if as_json:
        typer.echo(json.dumps(summary.to_dict(), indent=1))
        return
    typer.echo(f"{summary.path}: {summary.checkpoints:,} checkpoints ({summary.originals:,} originals) "
               f"from {summary.runs} of {summary.runs_requested} runs (a run that never met the selection rules "
               "keeps none)")
    typer.echo(f"this call: {summary.groups_committed} groups trained, {summary.groups_skipped} already there, "
               f"{summary.checkpoints_added:,} checkpoints in {summary.seconds:.1f} s "
               f"({summary.rate:,.0f} checkpoints/s, {summary.run_steps:,} run-steps)")
    if summary.groups_empty:
        typer.echo(f"  {summary.groups_empty} groups kept no checkpoint (their runs never met the selection rules)")
    for name, counts in (("reason", summary.per_reason), ("phase", summary.per_phase),
                         ("run kind", summary.per_kind)):
        typer.echo(f"  by {name}: " + ", ".join(f"{k} {v:,}" for k, v in counts.items()))


def register(app: typer.Typer) -> None:
    """The command lives in the `zoo` group, which zoo_cmds registers."""
