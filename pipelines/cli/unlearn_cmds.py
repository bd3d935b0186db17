"""`hyperforget unlearn | retrain | report | demo | benchmark-unlearning`: thin shells over pipelines.*."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from hyperforget.pipelines.cli.checks import input_dir, output_dir, positive
from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.seeds import RETRAIN_SEED_BASE


def _parse_sets(values: list[str]) -> list[tuple[int, ...]]:
    from hyperforget.pipelines.rundir import parse_classes

    return [parse_classes(v) for v in values]


def _parse_guidance(text: str):
    text = text.strip().lower()
    if text in ("auto", "none"):
        return None if text == "none" else "auto"
    try:
        return [float(v) for v in text.split(",")]
    except ValueError:
        raise HyperForgetError(f"--guidance {text!r}: give auto, none or comma-separated scales such as 1,2,4") from None


def _parse_overrides(values: list[str]) -> dict:
    import json

    out = {}
    for item in values:
        if "=" not in item:
            raise HyperForgetError(f"--set {item!r} is not KEY=VALUE, e.g. --set epochs=3")
        key, value = item.split("=", 1)
        try:
            out[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            out[key.strip()] = value
    return out


def register(app: typer.Typer) -> None:
    @app.command("unlearn")
    def unlearn_cmd(
        forget: Annotated[str, typer.Option(help="task labels to forget, e.g. 2 or 2,3")],
        run: Annotated[Path, typer.Option(help="run directory (created with --zoo when missing)")],
        model: Annotated[Optional[Path], typer.Option(help="DiHyFo model directory (from `hyperforget train`)")] = None,
        method: Annotated[Optional[str], typer.Option(help="dihyfo1, dihyfo2, zoo_retrieval or a baseline name")] = None,
        zoo: Annotated[Optional[Path], typer.Option(help="zoo for prompts and the task (new runs)")] = None,
        preset: Annotated[str, typer.Option(help="task preset for a new run without a zoo")] = "mnist4",
        dataset: Annotated[str, typer.Option(help="dataset for a new run without a zoo")] = "mnist-5k",
        candidates: Annotated[int, typer.Option(help="DiHyFo candidates sampled per selected model")] = 32,
        repeats: Annotated[int, typer.Option(help="unlearned models per method (averaged in metrics)")] = 5,
        start: Annotated[str, typer.Option(help="DiHyFo-1 start point: model or noise")] = "model",
        guidance: Annotated[str, typer.Option(
            help="classifier-free guidance: auto (the model's default), none, or scales cycled over candidates, e.g. 1,2,4")] = "auto",
        steps: Annotated[int, typer.Option(help="sampler denoising steps")] = 50,
        sampler: Annotated[str, typer.Option(help="sampler method, e.g. ddim or ddpm")] = "ddim",
        forget_mode: Annotated[str, typer.Option(help="forget prompt: quantile, max or fixed")] = "quantile",
        retain_mode: Annotated[str, typer.Option(
            help="retain prompt: joint (the zoo's best on the retain classes together), quantile, min or fixed")] = "joint",
        retain_scale: Annotated[float, typer.Option(help="scale retain targets (G.pt: slightly above/below best)")] = 1.0,
        seed: Annotated[int, typer.Option(help="sampling / baseline seed")] = 0,
        set_: Annotated[list[str], typer.Option("--set", help="baseline hyper-parameter KEY=VALUE")] = [],
        out: Annotated[Optional[Path], typer.Option(help="write the method folder here instead of the run")] = None,
    ) -> None:
        """Unlearn classes from the run's original model with a DiHyFo model or a baseline."""
        from hyperforget.pipelines.retrain import init_run
        from hyperforget.pipelines.rundir import RunConfig
        from hyperforget.pipelines.unlearn import PromptConfig, UnlearnConfig, refresh_metrics, unlearn

        # Check every argument before any work.
        if model is None and method is None:
            raise HyperForgetError("give --model MODEL_DIR (DiHyFo) or --method NAME (dihyfo1, dihyfo2, zoo_retrieval or a baseline)")
        from hyperforget.pipelines.rundir import DIHYFO_METHODS, RETRIEVAL_METHOD, parse_classes

        parse_classes(forget)
        output_dir(run, option="--run")
        if out is not None:
            output_dir(out, option="--out")
        if model is not None:
            input_dir(model, option="--model", what="hypernetwork")
        for value, option in ((candidates, "--candidates"), (repeats, "--repeats"), (steps, "--steps")):
            positive(value, option)
        positive(retain_scale, "--retain-scale")
        overrides = _parse_overrides(set_)
        if model is None and method not in (*DIHYFO_METHODS, RETRIEVAL_METHOD):
            from hyperforget.pipelines.baselines import check_overrides

            check_overrides(method, overrides)
        elif overrides:
            raise HyperForgetError("--set applies to baselines; DiHyFo and zoo_retrieval take --candidates, --repeats "
                                   "(DiHyFo also --steps, --guidance)")
        parsed_guidance = _parse_guidance(guidance)
        if zoo is not None:
            from hyperforget.zoo.store import require_sound_zoo

            require_sound_zoo(str(zoo))
        if model is not None and zoo is None:
            from hyperforget.pipelines.rundir import hypernetwork_zoo

            zoo_path = hypernetwork_zoo(str(model))
            zoo = Path(zoo_path) if zoo_path else None
            if zoo is not None and "://" not in str(zoo):
                from hyperforget.zoo.store import require_sound_zoo

                require_sound_zoo(str(zoo))
        cfg = RunConfig(preset=preset, dataset=dataset, zoo=str(zoo) if zoo else None)
        r = init_run(run, cfg)
        ucfg = UnlearnConfig(method=method or "dihyfo", candidates=candidates, repeats=repeats, start=start,
                             guidance=parsed_guidance, sampler=sampler, steps=steps, seed=seed, overrides=overrides,
                             prompts=PromptConfig(forget_mode=forget_mode, retain_mode=retain_mode,
                                                  retain_scale=retain_scale))
        record = unlearn(r, forget, ucfg, model_dir=str(model) if model else None, out=out)
        metrics = refresh_metrics(r, record["forget"]) if out is None else None
        typer.echo(f"{record['method']}: forget {record['forget']} -> "
                   f"{out or r.forget_dir(record['forget']) / record['method']}")
        if metrics:
            m = metrics["methods"][record["method"]]
            typer.echo(f"  acc D_r {m['acc_retain']['mean']:.4f}  acc D_f {m['acc_forget']['mean']:.4f}  "
                       f"MIA {m['mia']['mean']:.4f}  phi {m['phi']['mean']:.4f}  "
                       f"(retrained: acc D_r {metrics['methods']['retrain']['acc_retain']['mean']:.4f})")

    @app.command("retrain")
    def retrain_cmd(
        run: Annotated[Path, typer.Option(help="run directory")],
        forget: Annotated[str, typer.Option(help="task labels to forget, e.g. 2,3")],
        seeds: Annotated[int, typer.Option(help="number of retrained models (seeds)")] = 5,
        zoo: Annotated[Optional[Path], typer.Option(help="zoo giving the task (new runs)")] = None,
        preset: Annotated[str, typer.Option(help="task preset for a new run without a zoo")] = "mnist4",
        dataset: Annotated[str, typer.Option(help="dataset for a new run without a zoo")] = "mnist-5k",
    ) -> None:
        """Retrain the run's MLP from scratch without the forget classes (the gold standard)."""
        from hyperforget.pipelines.retrain import retrain_into
        from hyperforget.pipelines.retrain import init_run
        from hyperforget.pipelines.rundir import RunConfig
        from hyperforget.pipelines.unlearn import refresh_metrics

        if seeds < 1:
            raise HyperForgetError(f"--seeds must be >= 1, got {seeds}")
        fs = _parse_sets([forget])[0]
        output_dir(run, option="--run")
        r = init_run(run, RunConfig(preset=preset, dataset=dataset, zoo=str(zoo) if zoo else None))
        base = r.config.retrain_seeds[0] if r.config.retrain_seeds else RETRAIN_SEED_BASE
        params = retrain_into(r, fs, seeds=[base + i for i in range(seeds)])
        refresh_metrics(r, fs)
        typer.echo(f"retrained {params.shape[0]} models -> {r.forget_dir(fs) / 'retrain'}")

    @app.command("report")
    def report_cmd(
        run_dir: Annotated[Path, typer.Argument(help="run directory")],
        out: Annotated[Optional[Path], typer.Option(help="report directory (default RUN/report)")] = None,
        figures: Annotated[bool, typer.Option(help="draw the PNG figures")] = True,
    ) -> None:
        """Write report.md, report.json and figures for a run directory."""
        from hyperforget.pipelines.report import write_report

        input_dir(run_dir, option="RUN_DIR", what="run")
        if out is not None:
            output_dir(out, option="--out")
        path = write_report(run_dir, out, figures=figures)
        typer.echo(f"report -> {path}")

    @app.command("demo")
    def demo_cmd(
        out: Annotated[Path, typer.Option(help="demo directory (zoo, models, run, report)")] = Path("runs/demo"),
        preset: Annotated[str, typer.Option(help="task preset: mnist4 or mnist10")] = "mnist4",
        dataset: Annotated[str, typer.Option(help="mnist-5k, fashion-mnist, digits, idx:DIR")] = "mnist-5k",
        quick: Annotated[bool, typer.Option(help="tiny sizes (tests, smoke runs)")] = False,
        runs: Annotated[Optional[int], typer.Option(help="zoo training runs (default by preset/mode)")] = None,
        train_steps: Annotated[Optional[int], typer.Option(help="hypernetwork training steps per variant")] = None,
        methods: Annotated[Optional[str], typer.Option(help="comma-separated baselines (default: all)")] = None,
        dihyfo1_start: Annotated[str, typer.Option(help="DiHyFo-1 unlearns from: model or noise")] = "model",
        family_runs: Annotated[Optional[int], typer.Option(
            help="runs of the branch-family zoo DiHyFo-1 learns from (0: DiHyFo-1 uses the main zoo)")] = None,
        holdout: Annotated[Optional[list[str]], typer.Option(
            help="a forget set the zoo never shows forgotten, e.g. 2,3 (repeatable; see `zoo collect --holdout`)")] = None,
    ) -> None:
        """Run the whole pipeline: zoo, views, both DiHyFo variants, unlearning, baselines, report."""
        from hyperforget.pipelines.demo import DemoConfig, run_demo
        from hyperforget.pipelines.rundir import parse_classes

        if dihyfo1_start not in ("noise", "model"):
            raise HyperForgetError(f"unknown --dihyfo1-start {dihyfo1_start!r}: use noise or model")
        output_dir(out, option="--out")
        cfg = DemoConfig.for_mode(out=str(out), preset=preset, dataset=dataset, quick=quick, runs=runs,
                                  train_steps=train_steps, dihyfo1_start=dihyfo1_start, family_runs=family_runs,
                                  holdout=[list(parse_classes(h)) for h in holdout or []],
                                  methods=[m.strip() for m in methods.split(",") if m.strip()] if methods else None)
        from hyperforget.pipelines.demo import check_demo

        check_demo(cfg)
        report = run_demo(cfg)
        typer.echo(f"report -> {report}")

    @app.command("compare")
    def compare_cmd(
        run_a: Annotated[Path, typer.Argument(help="a run directory (e.g. runs/demo/run)")],
        run_b: Annotated[Path, typer.Argument(help="another run of the same command")],
        tolerance: Annotated[float, typer.Option(help="largest accepted difference of any metric")] = 0.05,
    ) -> None:
        """Check that two runs of the same command agree within a tolerance (exit 1 if not)."""
        from hyperforget.pipelines.demo import compare_runs

        input_dir(run_a, option="RUN_A", what="run")
        input_dir(run_b, option="RUN_B", what="run")
        compared, diffs = compare_runs(run_a, run_b, tolerance)
        for line in diffs:
            typer.echo(f"DIFFERS {line}")
        typer.echo(f"{compared - len(diffs)} of {compared} metrics agree within {tolerance:g}")
        if diffs:
            raise typer.Exit(1)

    @app.command("benchmark-unlearning")
    def bench_cmd(
        forget: Annotated[list[str], typer.Option(help="forget set, repeatable: --forget 2 --forget 2,3")] = [],
        preset: Annotated[str, typer.Option(help="task preset: mnist4 or mnist10")] = "mnist4",
        dataset: Annotated[str, typer.Option(help="dataset when no zoo is given")] = "mnist-5k",
        zoo: Annotated[Optional[Path], typer.Option(help="zoo of the DiHyFo models (their task wins)")] = None,
        models: Annotated[list[Path], typer.Option(help="DiHyFo model directories, repeatable")] = [],
        methods: Annotated[Optional[str], typer.Option(help="comma-separated baselines (default: all)")] = None,
        seeds: Annotated[int, typer.Option(help="retrained models per forget set")] = 5,
        repeats: Annotated[int, typer.Option(help="models per method")] = 3,
        out: Annotated[Optional[Path], typer.Option(help="run directory")] = None,
    ) -> None:
        """Run every unlearning method on the same original model and print the comparison tables."""
        from hyperforget.pipelines.demo import benchmark_unlearning

        if out is not None:
            output_dir(out, option="--out")
        positive(seeds, "--seeds")
        positive(repeats, "--repeats")

        path = benchmark_unlearning(out=str(out) if out else None, preset=preset, dataset=dataset,
                                    forget_sets=_parse_sets(forget) if forget else None,
                                    zoo=str(zoo) if zoo else None, models=[str(m) for m in models],
                                    methods=[m.strip() for m in methods.split(",") if m.strip()] if methods else None,
                                    seeds=seeds, repeats=repeats)
        typer.echo(path.read_text())
