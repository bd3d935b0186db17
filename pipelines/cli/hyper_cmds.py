"""`hyperforget train` and `hyperforget sample`: thin typer shells over hyper.train / hyper.sample."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from zoo.errors import HyperForgetError


def _parse_losses(text: str, num_classes: int) -> list[float]:
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise HyperForgetError(f"--targets {text!r} is not a comma-separated list of numbers, e.g. 0.05,0.05,3,0.05") \
            from None
    if len(values) != num_classes:
        raise HyperForgetError(f"--targets gives {len(values)} losses; the model's MLP has {num_classes} classes")
    return values


def train_cmd(
    variant: Annotated[str, typer.Option(help="dihyfo1 (θ, losses, targets -> θ*) or dihyfo2 (targets -> θ*)")],
    zoo: Annotated[Optional[str], typer.Option(help="zoo directory or URL to train on")] = None,
    out: Annotated[Path, typer.Option(help="model directory to write")] = Path("model"),
    preset: Annotated[str, typer.Option(help="tiny, cpu-small, cpu-base or paper")] = "cpu-small",
    steps: Annotated[Optional[int], typer.Option(help="optimizer steps (preset default if omitted)")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="global batch size")] = None,
    lr: Annotated[Optional[float], typer.Option(help="peak learning rate")] = None,
    eval_every: Annotated[Optional[int], typer.Option(help="steps between prompt-alignment evaluations")] = None,
    token_size: Annotated[Optional[int], typer.Option(help="values per parameter token")] = None,
    normalization: Annotated[Optional[str], typer.Option(help="global or layer")] = None,
    loss_weighting: Annotated[Optional[str], typer.Option(help="layer or uniform")] = None,
    cond_dropout: Annotated[Optional[float], typer.Option(help="condition dropout for guidance")] = None,
    noise_start_share: Annotated[Optional[float], typer.Option(
        help="DiHyFo-1: share of pairs whose θ is a fresh random init (teaches the noise start)")] = None,
    seed: Annotated[Optional[int], typer.Option(help="seed of init, data order, noise")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from OUT/checkpoints")] = False,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda (default: cuda if present)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bar")] = False,
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads (1 is fastest on a busy machine)")] = None,
) -> None:
    """Train a diffusion hypernetwork (DiHyFo-1 or DiHyFo-2) on a zoo; works under torchrun."""
    from rich.console import Console
    from rich.table import Table

    from hyper.train import train

    if variant not in ("dihyfo1", "dihyfo2"):
        raise HyperForgetError(f"unknown --variant {variant!r}: choose dihyfo1 or dihyfo2")
    if threads is not None:
        if threads < 1:
            raise HyperForgetError(f"--threads must be ≥ 1, got {threads}")
        import torch

        torch.set_num_threads(threads)
    overrides = {"steps": steps, "batch_size": batch_size, "lr": lr, "eval_every": eval_every,
                 "token_size": token_size, "normalization": normalization, "loss_weighting": loss_weighting,
                 "cond_dropout": cond_dropout, "noise_start_share": noise_start_share, "seed": seed}
    result = train(variant=variant, out=out, preset=preset, zoo=zoo, overrides=overrides, resume=resume,
                   progress=not quiet, device=device)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun only rank 0 reports
    table = Table(title=f"{variant} → {result.out}")
    table.add_column("measure"), table.add_column("value", justify="right")
    table.add_row("steps", str(result.steps))
    table.add_row("train MSE", f"{result.train_mse:.4f}")
    table.add_row("test MSE", "-" if result.test_mse is None else f"{result.test_mse:.4f}")
    if result.alignment:
        table.add_row("prompt alignment R² per class", " ".join(f"{v:.2f}" for v in result.alignment["r2"]))
        table.add_row("Pearson r per class", " ".join(f"{v:.2f}" for v in result.alignment["pearson"]))
    table.add_row("wall time", f"{result.seconds:.1f} s")
    table.add_row("throughput", f"{result.samples_per_second:.0f} samples/s")
    Console(stderr=True).print(table)


def sample_cmd(
    model: Annotated[Path, typer.Argument(help="trained hypernetwork directory")],
    targets: Annotated[str, typer.Option(help="target loss per class, e.g. 0.05,0.05,3.0,0.05")],
    out: Annotated[Path, typer.Option(help="safetensors file for the sampled parameters")],
    from_params: Annotated[Optional[Path], typer.Option("--from", help="DiHyFo-1 start: MLP safetensors")] = None,
    from_checkpoint: Annotated[Optional[int], typer.Option(help="DiHyFo-1 start: checkpoint id in the zoo")] = None,
    n: Annotated[int, typer.Option(help="models to sample")] = 8,
    method: Annotated[Optional[str], typer.Option(help="ddim or ddpm (default: the model's preset)")] = None,
    steps: Annotated[Optional[int], typer.Option(help="DDIM steps (default: the model's preset)")] = None,
    seed: Annotated[int, typer.Option(help="sampling seed")] = 0,
    guidance: Annotated[Optional[float], typer.Option(
        help="classifier-free guidance scale (default: the model's preset; 1 turns it off)")] = None,
) -> None:
    """Sample MLP parameters with chosen per-class losses; writes them and their measured losses."""
    import numpy as np
    import torch
    from rich.console import Console
    from rich.table import Table

    from hyper.sample import load_hypernetwork
    from zoo.mlp import load_mlps, save_mlps

    net = load_hypernetwork(model)
    target = _parse_losses(targets, net.spec.num_classes)
    if n < 1:
        raise HyperForgetError(f"--n must be ≥ 1, got {n}")
    if from_params is not None and from_checkpoint is not None:
        raise HyperForgetError("give --from or --from-checkpoint, not both")
    current = None
    if from_params is not None:
        spec, current, _ = load_mlps(str(from_params))
        if spec != net.spec:
            raise HyperForgetError(f"{from_params} holds {spec} MLPs, the hypernetwork generates {net.spec}")
        current = current[:1]
    elif from_checkpoint is not None:
        if not net.config.get("zoo"):
            raise HyperForgetError("the model records no zoo; use --from PARAMS.safetensors instead")
        from zoo.store import open_zoo

        current = torch.as_tensor(open_zoo(net.config["zoo"]).read([from_checkpoint]))
    if current is not None and net.variant != "dihyfo1":
        raise HyperForgetError("--from/--from-checkpoint apply to DiHyFo-1; DiHyFo-2 samples from targets only")
    rec = net.sampling
    method = method or rec["method"]
    steps = steps or rec["steps"]
    scales = net.auto_guidance(n) if guidance is None else (None if guidance == 1.0 else guidance)
    params = net.sample(torch.tensor([target] * n), current_params=current, method=method, steps=steps, seed=seed,
                        guidance=scales)
    guidance = None if scales is None else torch.as_tensor(scales).tolist()
    metrics = net.evaluate(params)
    meta = {"targets": target, "method": method, "steps": steps, "seed": seed, "guidance": guidance,
            "hypernetwork": str(model),
            "variant": net.variant, "losses": metrics.loss.tolist(), "accuracies": metrics.acc.tolist()}
    save_mlps(str(out), net.spec, params, meta)
    table = Table(title=f"{n} models from {model} → {out}")
    table.add_column("class"), table.add_column("target", justify="right")
    table.add_column("loss (mean)", justify="right"), table.add_column("acc (mean)", justify="right")
    for k in range(net.spec.num_classes):
        table.add_row(str(net.classes[k]), f"{target[k]:.3f}", f"{np.nanmean(metrics.loss[:, k]):.3f}",
                      f"{np.nanmean(metrics.acc[:, k]):.3f}")
    Console(stderr=True).print(table)


def register(app: typer.Typer) -> None:
    app.command("train")(train_cmd)
    app.command("sample")(sample_cmd)
