"""One group's task: its runs trained in lockstep, candidates evaluated and selected, rows augmented.

:func:`train_group` is what a dask worker runs (by this module path) and what a collection
without dask calls in process; it returns a :class:`GroupResult` for the committer.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import torch

from hyperforget.zoo.augment import augment as permute_augment
from hyperforget.zoo.collect.config import CollectConfig, group_key
from hyperforget.zoo.collect.plan import plan_run, resolve_task
from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.files import atomic_path
from hyperforget.zoo.holdout import forgets_any
from hyperforget.zoo.lockstep import LockstepSGD, epoch_batches, flush_denormals, matmul_gflops, step_product_shapes
from hyperforget.zoo.mlp import PerClassEvaluator, concat_models, flat_from_hidden_major, init_params, take_models
from hyperforget.zoo.selection import PHASES, REASONS, Selector, consider_mask


@dataclass
class GroupResult:
    """What a group task returns: rows to commit and counters."""

    group: int
    params: np.ndarray  # (n·(K+1), P) float32, originals each followed by their K copies
    meta: pa.Table  # n·(K+1) rows of zoo metadata (without checkpoint_id), source_offset for copies
    runs: int  # runs trained
    steps: int  # optimizer steps of all runs together (run-steps)
    evaluated: int  # candidate checkpoints evaluated
    seconds: float  # wall time of the task
    train_seconds: float  # of which in optimizer steps
    train_cpu_seconds: float = 0.0  # CPU time of this thread in optimizer steps (robust to a busy machine)
    cpu_seconds: float = 0.0  # CPU time of this thread for the whole task
    matmul_gflops: float = 0.0  # this thread's torch.mm rate on the steps' products (when probed), see train_group
    params_file: str | None = None  # where params were written instead (spill_dir of train_group); params is empty

    def load_params(self) -> np.ndarray:
        """The rows to commit: ``params``, or the .npy file they were spilled to (memory-mapped)."""
        return self.params if self.params_file is None else np.load(self.params_file, mmap_mode="r")


def train_group(cfg: CollectConfig, g: int, *, probe_seconds: float = 0.0,
                spill_dir: str | None = None) -> GroupResult:
    """Train the runs of group g in lockstep and return their selected checkpoints.

    The group trains and evaluates on one torch thread whatever the caller's setting (restored
    afterwards): torch splits a product's reductions by thread count, so another count changes
    the float rounding. One thread is what each dask worker has anyway, so on one machine the
    same group gives the same bits in a worker, in this process, or under any thread count.
    ``probe_seconds`` > 0: also time torch.mm on the steps' two products on this thread, half
    before and half after training, and report the higher rate as ``matmul_gflops``: the compute
    limit where and when the steps ran (a shared machine's rate swings by 2× within minutes).
    ``spill_dir``: write the parameters to a .npy file there and return its path instead of the
    array (workers on the committer's machine: the rows then skip the network transfer).
    """
    t_start, c_start = time.perf_counter(), time.thread_time()
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with flush_denormals():
            probe = _probe_matmul(cfg, g, probe_seconds / 2)
            res = _train_group(cfg, g, t_start)
            res.matmul_gflops = max(probe, _probe_matmul(cfg, g, probe_seconds / 2))
    finally:
        torch.set_num_threads(old_threads)
    if spill_dir is not None and len(res.params):
        res.params_file = _spill(res.params, spill_dir, g)
        res.params = res.params[:0]
    res.cpu_seconds = time.thread_time() - c_start
    return res


def _spill(params: np.ndarray, spill_dir: str, g: int) -> str:
    path = os.path.join(spill_dir, f"{group_key(g)}.npy")
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a retried task never leaves half a file
        np.save(f, params)
    return path


def _probe_matmul(cfg: CollectConfig, g: int, seconds: float) -> float:
    if seconds <= 0:
        return 0.0
    task = resolve_task(cfg)
    return matmul_gflops(step_product_shapes(task.spec, len(cfg.group_runs(g)), task.batch_size), seconds)


# Checkpoint candidates evaluated together (measured: 1 per step 1.87 s of task CPU, 512 1.66 s,
# 2048 1.64 s for a group of 128 MNIST-4 runs); their copies are held until then.
EVAL_MODELS = 1024


def _train_group(cfg: CollectConfig, g: int, t_start: float) -> GroupResult:
    task = resolve_task(cfg)
    spec, data = task.spec, task.data
    run_ids = list(cfg.group_runs(g))
    if not run_ids:
        raise HyperForgetError(f"group {g} is beyond the {cfg.num_groups} groups of {cfg.runs} runs")
    plans = [plan_run(cfg, task, r) for r in run_ids]
    r_, c, T = len(plans), spec.num_classes, task.total_steps
    x = torch.as_tensor(data.x_train)
    y = torch.as_tensor(data.y_train)
    evaluate = PerClassEvaluator(spec, data.x_test, data.y_test)

    # Per-run example weights: undersampling keeps a fixed random subset of each chosen class;
    # a deletion zeroes the run's deleted classes once past its deletion step.
    keep = torch.ones(len(y), r_)  # (N, R): a minibatch's weights are then one contiguous (B, R) block
    consider = np.zeros((r_, T + 1), dtype=bool)
    for i, p in enumerate(plans):
        rng = np.random.default_rng([p.seed, 1])
        for k, rate in zip(p.undersampled, p.undersample_rates):
            members = np.flatnonzero(data.y_train == k)
            dropped = members[rng.random(len(members)) >= rate]
            keep[torch.as_tensor(dropped), i] = 0.0
        consider[i] = consider_mask(cfg.selection, p.kind, T, p.deletion_step, task.max_per_run,
                                    np.random.default_rng([p.seed, 2]))
    deletion_step = np.array([p.deletion_step for p in plans])
    deleted_mask = torch.zeros(r_, c, dtype=torch.bool)  # (R, C) classes deleted by each run
    for i, p in enumerate(plans):
        deleted_mask[i, list(p.deleted)] = True
    in_deleted = deleted_mask.T[y]  # (N, R) True where an example belongs to a run's deleted class

    selector = Selector(cfg.selection, [p.kind for p in plans], deletion_step, T, task.max_per_run,
                        tuple(task.preset.pivots), c, consider)
    opt = LockstepSGD(spec, init_params(spec, [p.seed for p in plans]), torch.tensor([p.lr for p in plans]), T,
                      momentum=cfg.momentum, nesterov=True, weight_decay=cfg.weight_decay)
    kept_params: list[torch.Tensor] = []
    kept_rows: list[tuple[np.ndarray, int, np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
    evaluated = 0
    # Candidates are evaluated in batches of several steps, not after each step: the steps then run
    # back to back with their data in cache, and the evaluation is one larger product. Decisions
    # stay in step order, so the kept checkpoints are those step-by-step evaluation keeps.
    snapshots: list[tuple[int, np.ndarray, list[torch.Tensor]]] = []  # (step, runs, their layers)

    def snapshot(t: int) -> None:
        # Run states only fill up, so the candidates now are a superset of those at decision time.
        runs = selector.candidates(t)
        if len(runs):
            snapshots.append((t, runs, opt.select(runs)))
        if sum(len(r) for _, r, _ in snapshots) >= EVAL_MODELS:
            decide()

    def decide() -> None:
        nonlocal evaluated
        if not snapshots:
            return
        layers = concat_models(spec, [lay for _, _, lay in snapshots])
        metrics = evaluate.stacked(layers)
        valid_all = (_max_abs(spec, layers) <= cfg.max_param_abs).numpy() & np.isfinite(metrics.total_loss)
        offset = 0
        for t, snapped, lay in snapshots:
            runs = selector.candidates(t)
            cols = np.searchsorted(snapped, runs)  # both sorted; runs ⊆ snapped
            at = offset + cols
            offset += len(snapped)
            if not len(runs):
                continue
            evaluated += len(runs)
            loss, acc = metrics.loss[at], metrics.acc[at]
            valid = valid_all[at]
            if cfg.holdout:  # never save a model that forgot a held-out set
                valid = valid & ~forgets_any(acc, cfg.holdout, cfg.holdout_forget_acc, cfg.holdout_retain_acc)
            keep_, reason = selector.select(t, runs, loss, acc, valid)  # False for NaN / inf too
            if keep_.any():
                kept_params.append(flat_from_hidden_major(spec, take_models(spec, lay, cols[keep_])))
                totals = np.stack([metrics.total_loss[at][keep_], metrics.total_acc[at][keep_]], 1)
                kept_rows.append((runs[keep_], t, selector.phase(t, runs[keep_]), reason[keep_], loss[keep_],
                                  acc[keep_], totals))
        snapshots.clear()

    def lr_factors(s: int) -> torch.Tensor | None:
        """Per-run lr factors of step s (0-based): a deletion run past its deletion restarts its cosine."""
        restarted = (deletion_step >= 0) & (s >= deletion_step) if cfg.forgetting_lr > 0 else None
        if restarted is None or not restarted.any():
            return None
        factors = np.full(r_, opt.lr_factor(s), dtype=np.float32)
        d = deletion_step[restarted]
        factors[restarted] = cfg.forgetting_lr * 0.5 * (1.0 + np.cos(np.pi * (s - d) / (T - d)))
        return torch.from_numpy(factors)

    # Train: all runs step together on the group's minibatch sequence.
    gen = torch.Generator().manual_seed(_mix(cfg.seed, 3, g))
    train_seconds = train_cpu = 0.0
    snapshot(0)
    t = 0
    for _ in range(task.epochs):
        for idx in epoch_batches(len(y), task.batch_size, gen):
            t += 1
            started = deletion_step == t - 1  # step t is the first one without the deleted classes
            if started.any():
                rows = torch.as_tensor(np.flatnonzero(started))
                keep[:, rows] = keep[:, rows].masked_fill(in_deleted[:, rows], 0.0)
            factors = lr_factors(t - 1)
            t0, c0 = time.perf_counter(), time.thread_time()
            opt.step(x.index_select(0, idx), y.index_select(0, idx), keep.index_select(0, idx).T, factors)
            train_seconds += time.perf_counter() - t0
            train_cpu += time.thread_time() - c0
            snapshot(t)
    decide()
    assert t == T

    n = sum(len(r[0]) for r in kept_rows)
    if n == 0:
        params = torch.zeros(0, spec.num_params)
    else:
        params = torch.cat(kept_params)
    run_idx = np.concatenate([r[0] for r in kept_rows]) if n else np.zeros(0, np.int64)
    step = np.concatenate([np.full(len(r[0]), r[1]) for r in kept_rows]) if n else np.zeros(0, np.int64)
    order = np.lexsort((step, run_idx))  # by run, then step
    params = params[torch.as_tensor(order)] if n else params

    def cat(j: int, shape: tuple) -> np.ndarray:
        return np.concatenate([r[j] for r in kept_rows])[order] if n else np.zeros(shape)

    phase, reason = cat(2, (0,)).astype(np.int64), cat(3, (0,)).astype(np.int64)
    loss, acc, totals = cat(4, (0, c)), cat(5, (0, c)), cat(6, (0, 2))
    run_idx, step = run_idx[order], step[order]
    spe = task.steps_per_epoch

    def per_run(values: list, typ: pa.DataType) -> pa.Array:
        return pa.array(values, typ).take(pa.array(run_idx))  # one value per run, repeated for its rows

    cols: dict[str, object] = {
        "run_id": per_run([p.run_id for p in plans], pa.int64()),
        "step": step.astype(np.int32),
        "epoch": np.maximum(step - 1, 0).astype(np.int32) // spe,
        "phase": np.array(PHASES, dtype=object)[phase],
        "reason": np.array(REASONS, dtype=object)[reason],
        "undersampled": per_run([list(p.undersampled) for p in plans], pa.list_(pa.int8())),
        "undersample_rates": per_run([list(p.undersample_rates) for p in plans], pa.list_(pa.float32())),
        "deleted": per_run([list(p.deleted) for p in plans], pa.list_(pa.int8())),
        "deletion_step": deletion_step[run_idx].astype(np.int32),
        "seed": per_run([p.seed for p in plans], pa.int64()),
        "lr": per_run([p.lr for p in plans], pa.float32()),
        "run_kind": per_run([p.kind for p in plans], pa.string()),
    }
    for k in range(c):
        cols[f"loss_{k}"] = loss[:, k].astype(np.float32)
    for k in range(c):
        cols[f"acc_{k}"] = acc[:, k].astype(np.float32)
    cols["test_loss"] = totals[:, 0].astype(np.float32)
    cols["test_acc"] = totals[:, 1].astype(np.float32)
    params_out, meta = _augment_rows(spec, params, cols, cfg.augment, _mix(cfg.seed, 4, g))
    return GroupResult(g, params_out.numpy(), meta, len(plans), len(plans) * T, evaluated,
                       time.perf_counter() - t_start, train_seconds, train_cpu)


def _max_abs(spec, layers: list[torch.Tensor]) -> torch.Tensor:
    """(m,) largest |parameter| of each model of hidden-major layers (NaN where a model has NaN)."""
    w1, b1, w2, b2 = layers
    h, m = spec.hidden, b2.shape[1]
    small = torch.cat([b1.view(h, m), w2.view(-1, m), b2]).abs().amax(0)  # (m,)
    return torch.maximum(w1.view(h, m, -1).abs().amax((0, 2)), small)


def _augment_rows(spec, params: torch.Tensor, cols: dict, k: int, seed: int) -> tuple[torch.Tensor, pa.Table]:
    """Interleave K permuted copies after each original; copies repeat its metadata, reason "augment"."""
    n = params.shape[0]
    rows, perm_index = permute_augment(spec, params, k, seed)
    src = np.repeat(np.arange(n, dtype=np.int64) * (k + 1), k + 1)  # batch offset of each row's original
    arrays = {}
    for name, col in cols.items():
        arr = col if isinstance(col, pa.Array) else pa.array(col)
        arrays[name] = arr.take(pa.array(np.repeat(np.arange(n), k + 1)))
    reason = np.array(arrays["reason"].to_pylist(), dtype=object)
    reason[perm_index > 0] = "augment"
    arrays["reason"] = pa.array(reason, pa.string())
    arrays["perm_index"] = pa.array(perm_index)
    arrays["source_offset"] = pa.array(src)
    return rows, pa.table(arrays)


def _mix(*values: int) -> int:
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(1, np.uint64)[0] >> 1)
