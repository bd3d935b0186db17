"""Probe how a DiHyFo-1 model responds to unlearning prompts, from a run's original model.

Usage: python benchmarks/probe_dihyfo1.py MODEL_DIR FORGET RUN_DIR   (e.g. runs/demo/models/dihyfo1 2 runs/demo/run)

For retain targets equal to the original's losses ("current"), the zoo's best (0.02) or half the
original's, forget targets 3 or 6 and guidance none/2/4/8, it samples 48 candidates (DDIM-10) and
prints the share with validation forget accuracy <= 0.02, the best retain accuracy among those, and
the median forget / retain accuracies. A diagnostic for the open DiHyFo-1 work, not a test.
"""
import sys

import numpy as np
import torch

torch.set_num_threads(1)
from hyperforget.hyper.sample import load_hypernetwork
from hyperforget.pipelines.unlearn import open_run, eval_split, split_accuracy
model_dir = sys.argv[1]; forget = [int(c) for c in sys.argv[2].split(",")]
run = open_run(sys.argv[3] if len(sys.argv) > 3 else "runs/demo/run")
net = load_hypernetwork(model_dir)
orig = run.original_params()
ol = torch.as_tensor(eval_split(run, orig[None], "test").loss)[0]
C = ol.shape[0]
K = 48
rng = np.random.default_rng(0)
for retain_mode in ["current", "best", "half"]:
    for forget_level in [3.0, 6.0]:
        for g in [None, 2.0, 4.0, 8.0]:
            t = ol.clone().expand(K, -1).contiguous()
            for c in range(C):
                if c in forget:
                    t[:, c] = forget_level
                elif retain_mode == "best":
                    t[:, c] = 0.02
                elif retain_mode == "half":
                    t[:, c] = ol[c] * 0.5
            cand = net.sample(t, orig[None].expand(K, -1).contiguous(), ol[None].expand(K, -1).contiguous(),
                              method="ddim", steps=10, seed=0, guidance=g)
            val = eval_split(run, torch.nan_to_num(cand), "val")
            f, r = split_accuracy(val.acc, forget)
            ok = f <= 0.02
            best_r = r[ok].max() if ok.any() else float("nan")
            print(f"{retain_mode:8s} fl={forget_level} g={g}: frac forget<=.02 {ok.mean():.2f}  best retain {best_r:.3f}  "
                  f"median f {np.median(f):.2f} median r {np.median(r):.2f}", flush=True)
