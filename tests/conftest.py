"""Shared fixtures: a tiny task (sklearn digits, 64-3-4 MLP) and a factory of small, valid zoos.

``tiny_zoo(...)`` writes a zoo whose rows are real parameter vectors (nn.Linear init plus a
random walk per run) and whose metadata are those vectors' actual per-class test metrics on the
digits task, so downstream code (queries, loader, trainer) can rely on them being consistent.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hyperforget.zoo.datasets import load_dataset
from hyperforget.zoo.mlp import MLPSpec, evaluate_per_class, init_params

TINY_CLASSES = (0, 1, 2, 3)
TINY_SPEC = MLPSpec(input_size=64, hidden=3, num_classes=4)  # P = 211


@pytest.fixture(scope="session")
def tiny_dataset():
    """Digits 8x8, classes 0-3 (labels 0..3), pixels in [0, 1]."""
    return load_dataset("digits", classes=TINY_CLASSES)


@pytest.fixture(scope="session")
def tiny_spec() -> MLPSpec:
    return TINY_SPEC


def make_tiny_batches(dataset, rows: int = 117, run_len: int = 13, copies_every: int = 5, seed: int = 0,
                      spec: MLPSpec = TINY_SPEC):
    """(params (rows, P) float32, list of (key, params, meta-dict)) for a plausible small zoo.

    Runs of ``run_len`` checkpoints walk away from their init; every other run deletes class 2
    halfway (later rows are phase "forgetting"); in each run, every ``copies_every``-th
    checkpoint is followed by a hidden-unit-permuted copy (perm_index 1, source_offset).
    One batch per run, so batches have odd sizes; the total is exactly ``rows``.
    """
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    batches, all_params, run, done = [], [], 0, 0
    while done < rows:
        n = min(run_len, rows - done)
        theta = init_params(spec, [seed * 1000 + run])[0].numpy()
        walk = np.cumsum(rng.normal(0, 0.05, size=(n, spec.num_params)), axis=0).astype(np.float32)
        params = theta + walk
        perm_index = np.zeros(n, np.int16)
        source = np.arange(n)
        for i in range(1, n):
            if i % copies_every == 0:  # a function-preserving permutation of row i-1
                params[i] = permute_hidden(spec, params[i - 1], rng.permutation(spec.hidden))
                perm_index[i], source[i] = 1, i - 1
        deletes = run % 2 == 1
        deletion_step = 10 * (n // 2) if deletes else -1
        steps = 10 * np.arange(n)
        m = evaluate_per_class(spec, params, dataset.x_test, dataset.y_test)
        meta = {
            "run_id": np.full(n, run), "step": steps, "epoch": steps // 40,
            "phase": ["forgetting" if deletes and s >= deletion_step else "learning" for s in steps],
            "reason": ["augment" if p else "random" for p in perm_index],
            "undersampled": [[3]] * n, "undersample_rates": [[0.5]] * n,
            "deleted": [[2] if deletes else []] * n, "deletion_step": np.full(n, deletion_step),
            "seed": np.full(n, seed * 1000 + run), "lr": np.full(n, 0.01), "run_kind": ["random"] * n,
            "test_loss": m.total_loss, "test_acc": m.total_acc,
            "perm_index": perm_index, "source_offset": source,
        }
        for k in range(spec.num_classes):
            meta[f"loss_{k}"], meta[f"acc_{k}"] = m.loss[:, k], m.acc[:, k]
        batches.append((f"run-{run}", params, meta))
        all_params.append(params)
        done += n
        run += 1
    return np.concatenate(all_params), batches


def permute_hidden(spec: MLPSpec, flat: np.ndarray, perm: np.ndarray) -> np.ndarray:
    """(P,) -> (P,) the same function with hidden units reordered by ``perm``."""
    w = {k: v.clone() for k, v in spec.layout.unflatten(torch.as_tensor(flat)).items()}
    w["fc1.weight"], w["fc1.bias"] = w["fc1.weight"][perm], w["fc1.bias"][perm]
    w["fc2.weight"] = w["fc2.weight"][:, perm]
    return spec.layout.flatten(w).numpy()


@pytest.fixture(scope="session")
def tiny_batches(tiny_dataset):
    """Factory: ``tiny_batches(rows=117, seed=0)`` -> (params (rows, P), [(key, params, meta)])."""

    def make(rows: int = 117, seed: int = 0):
        return make_tiny_batches(tiny_dataset, rows, seed=seed)

    return make


@pytest.fixture
def tiny_zoo(tmp_path, tiny_dataset):
    """Factory: ``tiny_zoo(rows=117, chunk_rows=8, shard_rows=32, path=None)`` -> (path, params).

    Writes a zoo of ``rows`` checkpoints of the 64-3-4 MLP (chunks of 8 rows, shards of 32 so a
    117-row zoo spans several of both) and returns its path and the (rows, P) parameters written.
    """
    from hyperforget.zoo.store import ZooConfig, create_zoo

    def make(rows: int = 117, chunk_rows: int = 8, shard_rows: int = 32, path=None, seed: int = 0):
        path = str(path or tmp_path / f"zoo-{rows}-{seed}")
        params, batches = make_tiny_batches(tiny_dataset, rows, seed=seed)
        config = ZooConfig(TINY_SPEC, TINY_CLASSES, pivots=(0, 1), dataset=tiny_dataset.describe(),
                           collection={"generator": "tests/conftest.py", "seed": seed},
                           chunk_rows=chunk_rows, shard_rows=shard_rows)
        with create_zoo(path, config) as w:
            for key, p, meta in batches:
                w.commit(p, meta, key)
        return path, params

    return make


@pytest.fixture
def normalized_zoo(tiny_zoo):
    """Path of a 117-row zoo of the 64-3-4 MLP (pivots 0, 1) with normalization statistics."""
    from hyperforget.zoo.store import ZooWriter, compute_normalization, open_zoo

    path, _ = tiny_zoo(rows=117, chunk_rows=8, shard_rows=32)
    with ZooWriter.open(path) as w:
        w.set_normalization(compute_normalization(open_zoo(path)))
    return path


@pytest.fixture(autouse=True)
def _one_torch_thread():
    # Two CPU cores shared by test sessions and dask workers: keep torch from oversubscribing them.
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
