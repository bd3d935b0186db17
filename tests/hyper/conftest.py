"""A tiny in-memory checkpoint zoo for the hypernetwork tests.

sklearn digits, classes 0-3, MLP 64-3-4 (211 parameters). 37 runs trained in lockstep; each run
leaves out or undersamples random classes, some delete a class halfway (loss goes up), and 9
checkpoints per run are kept with their per-class test losses: 333 checkpoints, odd on purpose.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hyperforget.zoo.datasets import load_dataset
from hyperforget.zoo.lockstep import LockstepSGD, epoch_batches
from hyperforget.zoo.mlp import MLPSpec, evaluate_per_class, init_params

SPEC = MLPSpec(64, 3, 4)


def build_ckpt_zoo(runs: int = 37, epochs: int = 8, keep: int = 9, seed: int = 0) -> dict:
    torch.manual_seed(seed)
    ds = load_dataset("digits", classes=(0, 1, 2, 3))
    x, y = torch.as_tensor(ds.x_train), torch.as_tensor(ds.y_train)
    rng = np.random.default_rng(seed)
    # Class weights per run: 1 (full), 0.05 (undersampled) or 0 (left out), at least one class kept.
    w = rng.choice([1.0, 1.0, 0.05, 0.0], size=(runs, 4)).astype(np.float32)
    w[np.arange(runs), rng.integers(0, 4, runs)] = 1.0
    w_before = w.copy()
    deleting = rng.random(runs) < 0.4  # these runs delete one kept class halfway
    deleted = rng.integers(0, 4, runs)
    w_after = w.copy()
    for r in np.flatnonzero(deleting):
        w_after[r, deleted[r]] = 0.0
        if w_after[r].sum() == 0:
            w_after[r, (deleted[r] + 1) % 4] = 1.0
    gen = torch.Generator().manual_seed(seed)
    steps_per_epoch = len(y) // 64 + (len(y) % 64 > 0)
    total = epochs * steps_per_epoch
    opt = LockstepSGD(SPEC, init_params(SPEC, range(runs)), torch.as_tensor(rng.uniform(0.05, 0.3, runs)), total)
    save_at = set(np.linspace(0, total, keep).round().astype(int).tolist())
    params, run_ids, steps = [], [], []
    step = 0
    if 0 in save_at:
        params.append(opt.params.clone()), run_ids.append(np.arange(runs)), steps.append(np.zeros(runs, int))
    for _ in range(epochs):
        for idx in epoch_batches(len(y), 64, gen):
            cw = torch.as_tensor(w_before if step < total // 2 else w_after)
            opt.step(x[idx], y[idx], cw[:, y[idx]])
            step += 1
            if step in save_at:
                params.append(opt.params.clone()), run_ids.append(np.arange(runs)), steps.append(np.full(runs, step))
    params = torch.cat(params)
    losses = torch.as_tensor(evaluate_per_class(SPEC, params, ds.x_test, ds.y_test).loss)
    return {"spec": SPEC, "params": params, "losses": losses, "run_ids": np.concatenate(run_ids),
            "steps": np.concatenate(steps), "x_test": torch.as_tensor(ds.x_test), "y_test": torch.as_tensor(ds.y_test),
            "dataset": {"name": "digits", "classes": [0, 1, 2, 3]}}


@pytest.fixture(scope="session")
def ckpt_zoo() -> dict:
    torch.set_num_threads(1)
    return build_ckpt_zoo()
