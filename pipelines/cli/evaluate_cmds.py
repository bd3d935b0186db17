"""`hyperforget evaluate RUN_DIR`: a thin shell over pipelines.evaluate.evaluate."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer


def register(app: typer.Typer) -> None:
    @app.command("evaluate")
    def evaluate_cmd(
        run_dir: Annotated[Path, typer.Argument(help="unlearning run directory (holds run.json)")],
        forget: Annotated[Optional[list[str]], typer.Option(
            help="forget set to evaluate, e.g. --forget 2 --forget 2,3 (default: every set in run.json)")] = None,
        retrained: Annotated[int, typer.Option(
            help="models retrained per forget set (½ reference, ½ evaluation)")] = 128,
        baseline_seeds: Annotated[int, typer.Option(help="models per baseline (saved repeats, topped up)")] = 3,
        nearest: Annotated[bool, typer.Option(
            help="search the zoo for the checkpoint nearest each DiHyFo model")] = True,
        max_zoo_rows: Annotated[Optional[int], typer.Option(help="scan at most this many zoo rows")] = None,
        progress: Annotated[bool, typer.Option(help="show progress bars")] = True,
    ) -> None:
        """Score every method of a run against populations of retrained models (tables + plots)."""
        from hyperforget.pipelines.cli.checks import input_dir, positive
        from hyperforget.pipelines.evaluate import EvalConfig, evaluate
        from hyperforget.pipelines.rundir import open_run, parse_classes

        # Check every argument before any work.
        input_dir(run_dir, option="RUN_DIR", what="run")
        positive(baseline_seeds, "--baseline-seeds")
        positive(max_zoo_rows, "--max-zoo-rows")
        run = open_run(run_dir)
        if nearest and run.config.zoo and ("://" in run.config.zoo or os.path.exists(run.config.zoo)):
            from hyperforget.zoo.store import require_sound_zoo

            require_sound_zoo(run.config.zoo)

        # Set up the configuration; the library validates it.
        config = EvalConfig(n_retrained=retrained, baseline_seeds=baseline_seeds, nearest_checkpoint=nearest,
                            max_zoo_rows=max_zoo_rows, progress=progress)
        sets = [parse_classes(f) for f in forget] if forget else None
        # Evaluate and point at the outputs.
        results = evaluate(run_dir, sets, config=config)
        for name, result in results.items():
            typer.echo(f"{name}: {len(result['rows'])} rows in {result['wall_seconds']:.1f} s -> "
                       f"{run_dir / 'evaluation' / (name + '.md')}")
