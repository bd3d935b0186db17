"""Benchmark the diffusion hypernetwork: training throughput, and sampling vs retraining time.

    python benchmarks/bench_hyper.py                  # tiny + cpu-small, a few minutes on 2 cores
    python benchmarks/bench_hyper.py --full           # adds cpu-base (and paper on a GPU)
    python benchmarks/bench_hyper.py --threads 2 --train-steps 20

1. Training throughput (samples/s, both variants) of each preset on the MNIST-4 MLP (784-2-4,
   1,582 parameters) with random batches: forward, Eq. 5 loss, backward, AdamW step. On a CUDA
   device the paper preset (hidden 1536, 12 layers) runs too, in bf16, with its model FLOPs
   utilization (3 × forward matmul FLOPs × samples/s / --peak-tflops).
2. Generating one unlearned model: DDPM (1,000 steps) and DDIM (--ddim-steps) with the cpu-small
   DiHyFo-1, against the baseline measured in the same run: retraining the MLP from scratch
   (25 epochs on mnist-5k's 4 classes, zoo.lockstep.train_models, one model). Ratios < 1 mean the
   hypernetwork is faster than retraining.
"""

from __future__ import annotations

import argparse
import time

import torch

from hyper.diffusion import GaussianDiffusion
from hyper.model import get_preset
from hyper.tokenizer import TokenizerConfig, compute_normalization
from hyper.train import TrainConfig, build, make_model_fn, make_optimizer, resolve_configs, sample_params
from zoo.mlp import MLPSpec, init_params

SPEC = MLPSpec(784, 2, 4)


def _setup(preset: str, variant: str, device: str):
    model_cfg, tok_cfg, diff_cfg, _ = resolve_configs(preset, variant)
    stats = compute_normalization(SPEC, init_params(SPEC, range(64)))
    model, tok = build(variant, SPEC, stats, model_cfg, tok_cfg)
    return model.to(device), tok, GaussianDiffusion(diff_cfg)


def train_throughput(preset: str, variant: str, steps: int, batch: int, device: str, amp: bool) -> dict:
    model, tok, diffusion = _setup(preset, variant, device)
    opt = make_optimizer(model, TrainConfig(steps=steps))
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(batch, SPEC.num_params, generator=g).to(device) * 0.3
    theta_star = theta + 0.05 * torch.randn(batch, SPEC.num_params, generator=g).to(device)
    losses = torch.rand(batch, SPEC.num_classes, generator=g).to(device) * 3
    targets = torch.rand(batch, SPEC.num_classes, generator=g).to(device) * 3

    def one_step():
        x0 = tok.normalize(theta_star)
        t = diffusion.sample_timesteps(batch, g, device)
        cur = tok.normalize(theta) if variant == "dihyfo1" else None
        fn = make_model_fn(model, tok, targets, cur, losses if cur is not None else None)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=amp):
            terms = diffusion.training_losses(fn, x0, t)
        opt.zero_grad(set_to_none=True)
        terms["loss"].backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.75)
        opt.step()

    for _ in range(2):  # warm-up: allocator, kernels
        one_step()
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        one_step()
    if device == "cuda":
        torch.cuda.synchronize()
    dt = time.perf_counter() - t0
    sps = steps * batch / dt
    return {"preset": preset, "variant": variant, "batch": batch, "samples_per_s": sps, "s_per_step": dt / steps,
            "params_M": model.num_parameters() / 1e6, "tflops_achieved": 3 * model.flops_per_sample() * sps / 1e12}


def sampling_vs_retraining(ddim_steps: int, device: str) -> dict:
    from zoo.datasets import load_dataset
    from zoo.lockstep import train_models

    ds = load_dataset("mnist-5k", classes=(0, 1, 2, 3))
    t0 = time.perf_counter()
    original = train_models(SPEC, ds.x_train, ds.y_train, [0], epochs=25, lr=0.1)
    retrain_s = time.perf_counter() - t0
    model, tok, diffusion = _setup("cpu-small", "dihyfo1", device)
    targets = torch.tensor([[0.05, 0.05, 5.0, 0.05]])
    losses = torch.tensor([[0.05, 0.05, 0.1, 0.05]])
    out = {"retrain_s": retrain_s}
    for method, steps in (("ddim", ddim_steps), ("ddpm", 1000)):
        t0 = time.perf_counter()
        sample_params(model, tok, diffusion, targets, original, losses, method=method, steps=steps, device=device)
        out[f"{method}_s"] = time.perf_counter() - t0
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="also cpu-base (and the paper preset on a GPU)")
    ap.add_argument("--train-steps", type=int, default=10, help="timed steps per preset and variant")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--ddim-steps", type=int, default=50)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="device bf16 dense peak for MFU (H100/H200)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    cuda = torch.cuda.is_available()

    # Training throughput on the CPU presets, then the paper preset on a GPU.
    presets = ["tiny", "cpu-small"] + (["cpu-base"] if args.full else [])
    rows = []
    for preset in presets:
        batch = get_preset(preset)["train"]["batch_size"]
        for variant in ("dihyfo1", "dihyfo2"):
            rows.append(train_throughput(preset, variant, args.train_steps, batch, "cpu", False))
    if cuda:
        for preset in ["cpu-small", "paper"]:
            batch = get_preset(preset)["train"]["batch_size"] if preset != "paper" else 256
            for variant in ("dihyfo1", "dihyfo2"):
                r = train_throughput(preset, variant, args.train_steps, batch, "cuda", True)
                r["mfu"] = r["tflops_achieved"] / args.peak_tflops
                r["device"] = "cuda"
                rows.append(r)
    print(f"{'preset':10} {'variant':8} {'device':6} {'batch':>5} {'params(M)':>9} {'samples/s':>10} "
          f"{'s/step':>7} {'TFLOP/s':>8} {'MFU':>6}")
    for r in rows:
        print(f"{r['preset']:10} {r['variant']:8} {r.get('device', 'cpu'):6} {r['batch']:5d} {r['params_M']:9.2f} "
              f"{r['samples_per_s']:10.0f} {r['s_per_step']:7.3f} {r['tflops_achieved']:8.3f} "
              f"{r.get('mfu', float('nan')):6.3f}")

    # One unlearned model by sampling, against retraining from scratch in this run.
    s = sampling_vs_retraining(args.ddim_steps, "cpu")
    print(f"\nretrain MLP from scratch (25 epochs, mnist-5k 4 classes): {s['retrain_s']:.2f} s  (baseline)")
    print(f"DDIM-{args.ddim_steps} sample, cpu-small DiHyFo-1: {s['ddim_s']:.2f} s  "
          f"ratio vs retrain {s['ddim_s'] / s['retrain_s']:.2f}")
    print(f"DDPM-1000 sample, cpu-small DiHyFo-1: {s['ddpm_s']:.2f} s  "
          f"ratio vs retrain {s['ddpm_s'] / s['retrain_s']:.2f}")


if __name__ == "__main__":
    main()
