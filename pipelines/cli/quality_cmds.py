"""`hyperforget quality`: what single samples of a hypernetwork do against their prompts."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from hyperforget.pipelines.cli.checks import input_dir, output_dir, positive
from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.files import write_json


def quality_cmd(
    model: Annotated[Path, typer.Argument(help="trained hypernetwork directory (hyperforget train --out)")],
    out: Annotated[Optional[Path], typer.Option(help="directory for quality.json and quality.png "
                                                     "(default: MODEL/quality)")] = None,
    start: Annotated[Optional[Path], typer.Option(
        help="DiHyFo-1: the model to unlearn (an MLP .safetensors file, e.g. RUN/original/model.safetensors); "
             "default: fresh random initializations")] = None,
    forget: Annotated[Optional[list[str]], typer.Option(
        help="forget set for the clean single-sample share, e.g. 2 or 2,3 (repeatable; default: the paper's "
             "for the task, {2} and {2,3} for MNIST-4)")] = None,
    targets: Annotated[int, typer.Option(help="target losses per swept class (zoo q05..q95)")] = 8,
    samples: Annotated[int, typer.Option(help="samples per target and per forget set")] = 16,
    steps: Annotated[int, typer.Option(help="DDIM steps")] = 50,
    guidance: Annotated[Optional[float], typer.Option(help="classifier-free guidance scale (default: none)")] = None,
    hold: Annotated[str, typer.Option(help="loss asked of the other classes: joint (the zoo's best 1 % on those "
                                           "classes together, as unlearning asks), a zoo loss quantile such as q10, "
                                           "or known_median (median loss of the zoo's checkpoints that know every class)")
                    ] = "joint",
    seed: Annotated[int, typer.Option(help="offset of the sampling seeds (disjoint from training and selection)")] = 0,
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads")] = None,
) -> None:
    """Prompt alignment (Eq. 6 R², Pearson) per non-pivot class and the clean single-sample share."""
    from rich.console import Console
    from rich.table import Table

    from hyperforget.hyper.quality import QualityConfig, generation_quality, plot_quality
    from hyperforget.pipelines.rundir import parse_classes

    # Check every argument before any work.
    input_dir(model, option="MODEL", what="hypernetwork")
    positive(targets, "--targets")
    positive(samples, "--samples")
    positive(steps, "--steps")
    if threads is not None:
        positive(threads, "--threads")
    sets = [list(parse_classes(f)) for f in forget] if forget else None
    out_path = output_dir(out or model / "quality", option="--out")
    if start is not None and not start.is_file():
        raise HyperForgetError(f"--start {start} is not a file; give an MLP .safetensors file such as "
                               "RUN/original/model.safetensors")
    cfg = QualityConfig(targets=targets, samples=samples, steps=steps, guidance=guidance, seed=seed, forget_sets=sets,
                        hold=hold)

    import torch

    from hyperforget.hyper.sample import load_hypernetwork
    from hyperforget.zoo.mlp import load_mlps

    if threads is not None:
        torch.set_num_threads(threads)
    net = load_hypernetwork(model)
    start_params = None
    if start is not None:
        spec, params, _ = load_mlps(str(start))
        if spec != net.spec:
            raise HyperForgetError(f"--start {start} holds {spec} MLPs, the hypernetwork makes {net.spec}")
        start_params = params[0]
    report = generation_quality(net, cfg, start_params)
    if start is not None:
        report["start_file"] = str(start)

    # Write and show.
    out_path.mkdir(parents=True, exist_ok=True)
    write_json(out_path / "quality.json", report)
    plot_quality(report, out_path / "quality.png")
    table = Table(title=f"generation quality of {model} ({report['variant']}, start: {report['start']})")
    for col in ("measure", "value"):
        table.add_column(col)
    for k, rec in report["classes"].items():
        table.add_row(f"class {k}: R² (Eq. 6) / Pearson", f"{rec['r2']:.3f} / {rec['pearson']:.3f}")
    for name, rec in report["forget_sets"].items():
        table.add_row(f"forget {{{name.replace('-', ',')}}}: clean single samples", f"{rec['clean']}/{rec['samples']} ({rec['share']:.0%})")
    Console().print(table)
    Console().print(f"wrote {out_path / 'quality.json'} and {out_path / 'quality.png'}")


def register(app: typer.Typer) -> None:
    app.command("quality")(quality_cmd)
