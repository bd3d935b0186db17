"""Benchmark the diffusion hypernetwork: training throughput, and sampling vs retraining time.

    python benchmarks/bench_hyper.py                  # tiny, cpu-small, cpu-mlp, cpu-mlp2(-fn): minutes on 2 cores
    python benchmarks/bench_hyper.py --full           # adds cpu-base (and paper on a GPU)
    python benchmarks/bench_hyper.py --threads 2 --train-steps 20
    python benchmarks/bench_hyper.py --probe MODEL    # unlearning quality of a trained MNIST-4 DiHyFo

1. Training throughput (samples/s, both variants) of each preset on the MNIST-4 MLP (784-2-4,
   1,582 parameters) with random batches: forward, Eq. 5 loss, backward, AdamW step. On a CUDA
   device the paper presets (hidden 1536, 12 layers) run too, in bf16, with their model FLOPs
   utilization (3 × forward matmul FLOPs × samples/s / --peak-tflops). On the CPU the same
   utilization is printed against the float32 torch.mm rate of this machine, measured in the
   same run with the same thread count on the models' own product shapes (the baseline).
2. Generating one unlearned model: DDPM (1,000 steps) and DDIM (--ddim-steps) with the cpu-mlp
   DiHyFo-1, against the baseline measured in the same run: retraining the MLP from scratch
   (25 epochs on mnist-5k's 4 classes, zoo.lockstep.train_models, one model). Ratios < 1 mean the
   hypernetwork is faster than retraining.
"""

from __future__ import annotations

import argparse
import time

import torch

from hyperforget.hyper.diffusion import GaussianDiffusion
from hyperforget.hyper.model import get_preset
from hyperforget.hyper.tokenizer import compute_coordinate_normalization, compute_normalization
from hyperforget.hyper.denoise import build, make_model_fn, sample_params
from hyperforget.hyper.function_match import FunctionMatch
from hyperforget.hyper.train import TrainConfig, make_optimizer, resolve_configs
from hyperforget.zoo.lockstep import matmul_gflops
from hyperforget.zoo.mlp import MLPSpec, init_params

SPEC = MLPSpec(784, 2, 4)


def _setup(preset: str, variant: str, device: str):
    model_cfg, tok_cfg, diff_cfg, train_cfg = resolve_configs(preset, variant)
    starts = init_params(SPEC, range(64))
    stats = compute_normalization(SPEC, starts)
    if tok_cfg.normalization == "coordinate":
        stats["coordinate"] = compute_coordinate_normalization(SPEC, starts, tok_cfg.canonical)
    model, tok = build(variant, SPEC, stats, model_cfg, tok_cfg)
    return model.to(device), tok, GaussianDiffusion(diff_cfg), train_cfg


def train_throughput(preset: str, variant: str, steps: int, batch: int, device: str, amp: bool) -> dict:
    model, tok, diffusion, train_cfg = _setup(preset, variant, device)
    opt = make_optimizer(model, TrainConfig(steps=steps))
    g = torch.Generator().manual_seed(0)
    # The function- and class-loss-matching terms of the -fn presets, on random images (their cost does
    # not depend on them).
    matching = train_cfg.function_loss > 0 or train_cfg.class_loss_match > 0
    matcher = FunctionMatch(SPEC, torch.rand(1000, SPEC.input_size, generator=g), torch.arange(1000) % SPEC.num_classes,
                            train_cfg.function_probes) if matching else None
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
        loss = terms["loss"]
        if matcher is not None:
            loss = loss + matcher.diffusion_terms(tok, diffusion, t, terms["x0_hat"], x0, g, train_cfg.function_loss,
                                                  train_cfg.class_loss_match)["loss"]
        opt.zero_grad(set_to_none=True)
        loss.backward()
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
    from hyperforget.zoo.datasets import load_dataset
    from hyperforget.zoo.lockstep import train_models

    ds = load_dataset("mnist-5k", classes=(0, 1, 2, 3))
    t0 = time.perf_counter()
    original = train_models(SPEC, ds.x_train, ds.y_train, [0], epochs=25, lr=0.1)
    retrain_s = time.perf_counter() - t0
    model, tok, diffusion, _ = _setup("cpu-mlp", "dihyfo1", device)
    targets = torch.tensor([[0.05, 0.05, 5.0, 0.05]])
    losses = torch.tensor([[0.05, 0.05, 0.1, 0.05]])
    out = {"retrain_s": retrain_s}
    for method, steps in (("ddim", ddim_steps), ("ddpm", 1000)):
        t0 = time.perf_counter()
        sample_params(model, tok, diffusion, targets, original, losses, method=method, steps=steps, device=device)
        out[f"{method}_s"] = time.perf_counter() - t0
    return out


def unlearning_probe(model_dir: str, per_scale: int, scales: list[float], steps: int, seeds: int = 3) -> None:
    """Best-of-K unlearning on MNIST-4 (mnist-5k) against models retrained without the forget set.

    An original model (all 4 classes) and retrained models (without {2} and without {2, 3}) are
    trained here with zoo.lockstep.train_models (25 epochs, lr 0.1). Prompts: forget classes at the
    zoo's 95th-percentile loss, retain classes at its 5th. K = per_scale × len(scales) candidates,
    one guidance scale per group; the best candidate has the lowest forget accuracy, then the
    highest retain accuracy. Parameters are used exactly as sampled.
    """
    import numpy as np

    from hyperforget.hyper.sample import load_hypernetwork
    from hyperforget.zoo.datasets import load_dataset
    from hyperforget.zoo.lockstep import train_models
    from hyperforget.zoo.mlp import batched_logits, evaluate_per_class

    ds = load_dataset("mnist-5k", classes=(0, 1, 2, 3))
    x, y = torch.as_tensor(ds.x_test), ds.y_test

    def accs(p, forget):
        pred = batched_logits(SPEC, torch.as_tensor(p), x).argmax(-1).numpy()
        fm = np.isin(y, forget)
        return (pred[:, fm] == y[fm]).mean(1), (pred[:, ~fm] == y[~fm]).mean(1)

    net = load_hypernetwork(model_dir)
    st = net.loss_stats
    originals = train_models(SPEC, ds.x_train, ds.y_train, [100 + i for i in range(seeds)], epochs=25, lr=0.1)
    g = torch.tensor(scales, dtype=torch.float32).repeat_interleave(per_scale)
    k = len(g)
    print(f"\n{net.variant} {model_dir}: K = {k} candidates, guidance {scales}, DDIM-{steps}")
    for forget in ([2], [2, 3]):
        weights = [0.0 if c in forget else 1.0 for c in range(4)]
        retrained = train_models(SPEC, ds.x_train, ds.y_train, [200 + i for i in range(seeds)], epochs=25, lr=0.1,
                                 class_weights=weights)
        rfa, rra = accs(retrained, forget)
        tgt = torch.tensor(np.where(np.isin(range(4), forget), st["q95"], st["q05"]), dtype=torch.float32)
        for i in range(seeds):
            o = originals[i:i + 1]
            f0, r0 = accs(o, forget)
            kw = {}
            if net.variant == "dihyfo1":
                ol = torch.as_tensor(evaluate_per_class(SPEC, o, x, y).loss)
                kw = dict(current_params=o.expand(k, -1), current_losses=ol.expand(k, -1))
            t0 = time.perf_counter()
            cand = net.sample(tgt.expand(k, -1), steps=steps, seed=i, guidance=g, **kw)
            dt = time.perf_counter() - t0
            fa, ra = accs(cand, forget)
            best = np.lexsort((-ra, fa))[0]
            print(f"  forget {forget} original #{i} (forget acc {f0[0]:.3f}, retain {r0[0]:.3f}) -> best forget acc "
                  f"{fa[best]:.3f}, retain {ra[best]:.3f} (g={float(g[best]):g}); {int((fa <= 0.02).sum())}/{k} "
                  f"candidates with forget acc <= 0.02; sampling {dt:.1f} s")
        print(f"  retrained without {forget}: retain acc {np.round(rra, 3).tolist()} (median {np.median(rra):.3f}), "
              f"forget acc {np.round(rfa, 3).tolist()}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--full", action="store_true", help="also cpu-base (and the paper preset on a GPU)")
    ap.add_argument("--train-steps", type=int, default=10, help="timed steps per preset and variant")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--ddim-steps", type=int, default=50)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="device bf16 dense peak for MFU (H100/H200)")
    ap.add_argument("--probe", nargs="*", default=None, metavar="MODEL",
                    help="only measure best-of-K unlearning of these trained MNIST-4 hypernetworks")
    ap.add_argument("--per-scale", type=int, default=16, help="probe: candidates per guidance scale")
    ap.add_argument("--scales", default="1,4,8,16,24", help="probe: guidance scales")
    ap.add_argument("--probe-steps", type=int, default=10, help="probe: DDIM steps")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.probe is not None:
        for model_dir in args.probe:
            unlearning_probe(model_dir, args.per_scale, [float(v) for v in args.scales.split(",")], args.probe_steps)
        return
    cuda = torch.cuda.is_available()

    # Training throughput on the CPU presets, then the paper preset on a GPU.
    presets = ["tiny", "cpu-small", "cpu-mlp", "cpu-mlp2", "cpu-mlp2-fn", "cpu-mlp2-fn-cl"] + \
        (["cpu-base"] if args.full else [])
    rows = []
    for preset in presets:
        batch = get_preset(preset)["train"]["batch_size"]
        for variant in ("dihyfo1", "dihyfo2"):
            rows.append(train_throughput(preset, variant, args.train_steps, batch, "cpu", False))
    if cuda:
        for preset in ["cpu-mlp", "paper", "paper-adaln"]:
            batch = get_preset(preset)["train"]["batch_size"] if not preset.startswith("paper") else 256
            for variant in ("dihyfo1", "dihyfo2"):
                r = train_throughput(preset, variant, args.train_steps, batch, "cuda", True)
                r["mfu"] = r["tflops_achieved"] / args.peak_tflops
                r["device"] = "cuda"
                rows.append(r)
    # The CPU baseline, measured now: torch.mm on the products of a cpu-mlp step (batch 256, width 512,
    # the 1,582-value encoder and decoder), with the same threads and, like the steps, by the wall clock.
    cpu_peak = matmul_gflops([(256, 512, 512, False), (256, SPEC.num_params, 512, False),
                              (256, 512, SPEC.num_params, False)], seconds=2.0, threads=args.threads, wall=True)
    for r in rows:
        if r.get("device", "cpu") == "cpu":
            r["mfu"] = r["tflops_achieved"] * 1e3 / cpu_peak
    print(f"CPU baseline: torch.mm float32 at {cpu_peak:.1f} GFLOP/s on {args.threads} thread(s) (measured now); "
          f"GPU MFU against --peak-tflops {args.peak_tflops:g}")
    print(f"{'preset':14} {'variant':8} {'device':6} {'batch':>5} {'params(M)':>9} {'samples/s':>10} "
          f"{'s/step':>7} {'TFLOP/s':>8} {'MFU':>6}")
    for r in rows:
        print(f"{r['preset']:14} {r['variant']:8} {r.get('device', 'cpu'):6} {r['batch']:5d} {r['params_M']:9.2f} "
              f"{r['samples_per_s']:10.0f} {r['s_per_step']:7.3f} {r['tflops_achieved']:8.3f} "
              f"{r.get('mfu', float('nan')):6.3f}")

    step_s = {(r["preset"], r["variant"]): r["s_per_step"] for r in rows if r.get("device", "cpu") == "cpu"}
    for variant in ("dihyfo1", "dihyfo2"):
        if ("cpu-mlp2-fn", variant) in step_s:
            print(f"function-matching term, {variant}: cpu-mlp2-fn step / cpu-mlp2 step = "
                  f"{step_s[('cpu-mlp2-fn', variant)] / step_s[('cpu-mlp2', variant)]:.2f}")
        if ("cpu-mlp2-fn-cl", variant) in step_s:
            print(f"class-loss matching, {variant}: cpu-mlp2-fn-cl step / cpu-mlp2-fn step = "
                  f"{step_s[('cpu-mlp2-fn-cl', variant)] / step_s[('cpu-mlp2-fn', variant)]:.2f}")

    # One unlearned model by sampling, against retraining from scratch in this run.
    s = sampling_vs_retraining(args.ddim_steps, "cpu")
    print(f"\nretrain MLP from scratch (25 epochs, mnist-5k 4 classes): {s['retrain_s']:.2f} s  (baseline)")
    print(f"DDIM-{args.ddim_steps} sample, cpu-mlp DiHyFo-1: {s['ddim_s']:.2f} s  "
          f"ratio vs retrain {s['ddim_s'] / s['retrain_s']:.2f}")
    print(f"DDPM-1000 sample, cpu-mlp DiHyFo-1: {s['ddpm_s']:.2f} s  "
          f"ratio vs retrain {s['ddpm_s'] / s['retrain_s']:.2f}")


if __name__ == "__main__":
    main()
