"""`hyperforget train` and `hyperforget sample`: thin typer shells over hyper.train / hyper.sample."""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Annotated, Optional

import typer

from hyperforget.pipelines.cli.checks import at_most, input_dir, output_dir, output_file, positive
from hyperforget.zoo.errors import HyperForgetError

# Sampled models held in memory at once (their parameters, the sampler's tokens, their metrics).
MAX_SAMPLES = 100_000


def _parse_losses(text: str, num_classes: int) -> list[float]:
    try:
        values = [float(v) for v in text.replace(" ", "").split(",") if v != ""]
    except ValueError:
        raise HyperForgetError(f"--targets {text!r} is not a comma-separated list of numbers, e.g. 0.05,0.05,3,0.05") \
            from None
    if not all(math.isfinite(v) and v >= 0 for v in values):
        raise HyperForgetError(f"--targets {text!r}: losses must be finite and >= 0, e.g. 0.05,0.05,3,0.05")
    if len(values) != num_classes:
        raise HyperForgetError(f"--targets gives {len(values)} losses; the model's MLP has {num_classes} classes")
    return values


def train_cmd(
    variant: Annotated[str, typer.Option(help="dihyfo1 (θ, losses, targets -> θ*) or dihyfo2 (targets -> θ*)")],
    zoo: Annotated[Optional[str], typer.Option(help="zoo directory or URL to train on")] = None,
    out: Annotated[Path, typer.Option(help="model directory to write")] = Path("model"),
    preset: Annotated[str, typer.Option(help="hypernetwork preset (hyper/model.py), e.g. tiny, cpu-mlp2-fn-cl, "
                                            "cpu-mlp3-fn, cpu-small, paper, paper-adaln")] = "cpu-small",
    steps: Annotated[Optional[int], typer.Option(help="optimizer steps (preset default if omitted)")] = None,
    batch_size: Annotated[Optional[int], typer.Option(help="global batch size")] = None,
    lr: Annotated[Optional[float], typer.Option(help="peak learning rate")] = None,
    eval_every: Annotated[Optional[int], typer.Option(help="steps between prompt-alignment evaluations")] = None,
    token_size: Annotated[Optional[int], typer.Option(help="values per parameter token")] = None,
    normalization: Annotated[Optional[str], typer.Option(help="global or layer")] = None,
    loss_weighting: Annotated[Optional[str], typer.Option(help="layer, layer_sqrt or uniform")] = None,
    cond_dropout: Annotated[Optional[float], typer.Option(help="condition dropout for guidance")] = None,
    noise_start_share: Annotated[Optional[float], typer.Option(
        help="DiHyFo-1: share of pairs whose θ is a fresh random init (teaches the noise start)")] = None,
    seed: Annotated[Optional[int], typer.Option(help="seed of init, data order, noise")] = None,
    resume: Annotated[bool, typer.Option("--resume", help="continue from OUT/checkpoints")] = False,
    force: Annotated[bool, typer.Option("--force", help="train into a non-empty OUT that holds no run")] = False,
    device: Annotated[Optional[str], typer.Option(help="cpu or cuda (default: cuda if present)")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", help="no progress bar")] = False,
    threads: Annotated[Optional[int], typer.Option(help="torch CPU threads (1 is fastest on a busy machine)")] = None,
    set_: Annotated[Optional[list[str]], typer.Option(
        "--set", help="any model/tokenizer/diffusion/train field as KEY=VALUE (JSON value), repeatable, e.g. "
                      "--set canonical=false --set 'view={\"balanced\": {\"mode\": \"cap\"}}'")] = None,
) -> None:
    """Train a diffusion hypernetwork (DiHyFo-1 or DiHyFo-2) on a zoo; works under torchrun."""
    from rich.console import Console
    from rich.table import Table

    from hyperforget.hyper.train import train

    # Check every argument before any work.
    if variant not in ("dihyfo1", "dihyfo2"):
        raise HyperForgetError(f"unknown --variant {variant!r}: choose dihyfo1 or dihyfo2")
    for value, option in ((steps, "--steps"), (batch_size, "--batch-size"), (lr, "--lr"),
                          (token_size, "--token-size"), (threads, "--threads")):
        positive(value, option)
    if eval_every is not None and eval_every < -1:
        raise HyperForgetError(f"--eval-every must be a step count, 0 (only at the end) or -1 (never), got {eval_every}")
    for value, option in ((cond_dropout, "--cond-dropout"), (noise_start_share, "--noise-start-share")):
        if value is not None and not 0.0 <= value <= 1.0:
            raise HyperForgetError(f"{option} must be a share in [0, 1], got {value}")
    extra = _parse_settings(set_ or [])
    _check_train_out(out, resume=resume, force=force)
    _check_device(device)
    if zoo is not None:
        from hyperforget.zoo.store import require_sound_zoo

        require_sound_zoo(zoo)
    if threads is not None:
        import torch

        torch.set_num_threads(threads)
    overrides = {"steps": steps, "batch_size": batch_size, "lr": lr, "eval_every": eval_every,
                 "token_size": token_size, "normalization": normalization, "loss_weighting": loss_weighting,
                 "cond_dropout": cond_dropout, "noise_start_share": noise_start_share, "seed": seed, **extra}
    if not resume:
        from hyperforget.hyper.train import resolve_configs

        resolve_configs(preset, variant, overrides)  # unknown keys and bad values fail before any work
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


def _parse_settings(items: list[str]) -> dict:
    """--set KEY=VALUE items -> {KEY: value}; VALUE is JSON (true, 3, 1e-3, {...}) or else a string."""
    import json

    out = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key.strip():
            raise HyperForgetError(f"--set {item!r} is not KEY=VALUE, e.g. --set canonical=false")
        try:
            out[key.strip()] = json.loads(text)
        except json.JSONDecodeError:
            out[key.strip()] = text
    return out


def _check_train_out(out: Path, *, resume: bool, force: bool) -> None:
    output_dir(out)
    has_run = (out / "checkpoints" / "latest.json").exists() or (out / "config.json").exists()
    if resume and not has_run:
        raise HyperForgetError(f"--resume: {out} holds no training run to continue (no config.json or "
                               "checkpoints/latest.json); drop --resume to start a new one")
    if not resume and not has_run and out.is_dir() and any(out.iterdir()) and not force:
        raise HyperForgetError(f"--out {out} is a non-empty directory that holds no training run; choose a new "
                               "directory or pass --force to train into it")


def _check_device(device: str | None) -> None:
    if device is None:
        return
    import torch

    try:
        dev = torch.device(device)
    except (RuntimeError, ValueError):
        raise HyperForgetError(f"--device {device!r} is not a torch device; use cpu or cuda") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise HyperForgetError(f"--device {device}: CUDA is not available on this machine; use --device cpu")
    if dev.type not in ("cpu", "cuda"):
        raise HyperForgetError(f"--device {device!r}: use cpu or cuda")


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
    force: Annotated[bool, typer.Option("--force", help="overwrite an existing --out file")] = False,
) -> None:
    """Sample MLP parameters with chosen per-class losses; writes them and their measured losses."""
    import numpy as np
    import torch
    from rich.console import Console
    from rich.table import Table

    from hyperforget.hyper.sample import load_hypernetwork
    from hyperforget.zoo.mlp import load_mlps, save_mlps

    # Check every argument before any work.
    input_dir(model, option="MODEL", what="hypernetwork")
    output_file(out, force=force)
    positive(n, "--n")
    at_most(n, "--n", MAX_SAMPLES, "models sampled at once are held in memory")
    positive(steps, "--steps")
    if guidance is not None and not (math.isfinite(guidance) and guidance >= 0):
        raise HyperForgetError(f"--guidance must be a finite scale >= 0, got {guidance}")
    if from_params is not None and from_checkpoint is not None:
        raise HyperForgetError("give --from or --from-checkpoint, not both")
    if from_params is not None and not from_params.is_file():
        raise HyperForgetError(f"--from {from_params} is not a file; give an MLP safetensors file")
    net = load_hypernetwork(model)
    target = _parse_losses(targets, net.spec.num_classes)
    current = None
    if from_params is not None:
        spec, current, _ = load_mlps(str(from_params))
        if spec != net.spec:
            raise HyperForgetError(f"{from_params} holds {spec} MLPs, the hypernetwork generates {net.spec}")
        current = current[:1]
    elif from_checkpoint is not None:
        if not net.zoo:
            raise HyperForgetError("the model records no zoo; use --from PARAMS.safetensors instead")
        from hyperforget.zoo.store import require_sound_zoo

        current = torch.as_tensor(require_sound_zoo(net.zoo).read([from_checkpoint]))
    if current is not None and net.variant != "dihyfo1":
        raise HyperForgetError("--from/--from-checkpoint apply to DiHyFo-1; DiHyFo-2 samples from targets only")
    rec = net.sampling
    method = method or rec["method"]
    steps = rec["steps"] if steps is None else steps
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
