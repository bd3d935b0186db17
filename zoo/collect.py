"""The collector: many MLP training runs, selected checkpoints, streamed into a zoo.

Runs are numbered 0..runs−1 and run r's configuration (seed, learning rate, undersampled
classes and rates, run kind, deleted classes and deletion step) is drawn from (seed, r) alone.
Consecutive runs form groups of ``runs_per_group``; a group is trained in lockstep
(:mod:`hyperforget.zoo.lockstep`) on one minibatch sequence drawn from (seed, group), its candidate
checkpoints evaluated per class in one vectorized pass and filtered by the Appendix A.5
heuristics (:mod:`hyperforget.zoo.selection`), then augmented with permuted copies (:mod:`hyperforget.zoo.augment`).

Groups are dask tasks (a LocalCluster by default, or an existing cluster). The client is the
zoo's single committer: it commits each group under the key ``group-NNNNNN`` in group order,
so checkpoint ids do not depend on the number of workers or the order tasks finish in. A task
that fails is retried; a re-run of an interrupted collection skips committed groups and ends
with exactly the requested runs. At most ``max_in_flight`` group results are held at once,
so memory stays bounded whatever the zoo size.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import logging
import math
import os
import shutil
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import torch

from hyperforget.zoo.augment import augment as permute_augment
from hyperforget.zoo.datasets import Dataset, load_dataset
from hyperforget.zoo.errors import HyperForgetError, from_settings
from hyperforget.zoo.holdout import FORGET_ACC, RETAIN_ACC, check_holdout, forgets_any, restrict_plan
from hyperforget.zoo.lockstep import (LockstepSGD, epoch_batches, flush_denormals, matmul_gflops, step_product_shapes,
                                      steps_per_epoch)
from hyperforget.zoo.mlp import (PerClassEvaluator, TaskPreset, concat_models, flat_from_hidden_major, get_preset,
                                 init_params, take_models)
from hyperforget.zoo.selection import PHASES, REASONS, SelectionConfig, Selector, consider_mask
from hyperforget.zoo.files import atomic_path

COLLECTION_FORMAT = 1  # version of the "collection" block this module writes into zoo.json


# Upper bounds that keep a mistyped count from planning billions of groups or one task's memory.
MAX_RUNS = 10_000_000
MAX_RUNS_PER_GROUP = 65_536


@dataclass
class CollectConfig:
    """What a collection builds; saved in zoo.json ("collection") and checked when resuming."""

    preset: str = "mnist4"  # TASK_PRESETS name: MLP, classes, pivots, budget per run, epochs
    dataset: str = "mnist-5k"  # zoo.datasets.load_dataset name (mnist-5k, mnist, fashion-mnist, digits, idx:DIR)
    data_root: str | None = None  # directory of the IDX files for "mnist" / "idx" datasets
    scaling: str = "unit"  # pixel scaling: "unit" (x/255) or "standard"
    runs: int = 64  # training runs, numbered 0..runs-1
    runs_per_group: int = 128  # runs trained in lockstep by one task (one commit)
    augment: int = 0  # K permuted copies stored after each checkpoint
    seed: int = 0  # master seed; run r's configuration derives from (seed, r)
    epochs: int | None = None  # epochs per run; None: the preset's (25)
    batch_size: int = 128  # minibatch shared by the runs of a group
    lr_min: float = 0.05  # per-run base learning rate, log-uniform in [lr_min, lr_max]
    lr_max: float = 0.2  # (G.pt used 0.1, cosine-annealed per step to 0)
    momentum: float = 0.9  # SGD momentum (Nesterov)
    weight_decay: float = 5e-4  # SGD weight decay
    undersample_rate_min: float = 0.005  # kept fraction of an undersampled class, log-uniform in [min, max]
    undersample_rate_max: float = 0.5
    undersample_pivots: bool = False  # may pivot classes be undersampled too
    deletion_share: float = 0.4  # share of runs that delete non-pivot classes mid-training
    deletion_window: tuple[float, float] = (0.3, 0.6)  # deletion step as a fraction of the run's steps
    forgetting_lr: float = 0.0  # > 0: a deletion restarts the run's cosine lr at this multiple of its base lr
    deletion_undersample: bool = True  # may deletion runs undersample classes too (False: they learn all first)
    # > 1: runs come in families of this many branches that share initialization, learning rate,
    # undersampling, minibatch order and deletion step, and differ only in what they delete: branch 0
    # nothing, the others distinct non-empty sets of non-pivots. From one checkpoint before the
    # deletion, the family's futures then differ only by their class losses, which is what DiHyFo-1
    # must learn to read (deletion_share is not used).
    branches: int = 1
    # Forget sets kept out of the zoo (zoo/holdout.py): no run lowers all of a set's classes, and no
    # checkpoint with every class of a set at accuracy <= holdout_forget_acc and every other class
    # >= holdout_retain_acc is saved.
    holdout: list = field(default_factory=list)
    holdout_forget_acc: float = FORGET_ACC
    holdout_retain_acc: float = RETAIN_ACC
    max_param_abs: float = 10.0  # checkpoints with a larger |parameter| are not kept (G.pt drops them)
    selection: SelectionConfig = field(default_factory=SelectionConfig)  # Appendix A.5 heuristics

    def __post_init__(self) -> None:
        if isinstance(self.selection, dict):
            self.selection = SelectionConfig.from_dict(self.selection)
        self.deletion_window = tuple(float(v) for v in self.deletion_window)
        preset = get_preset(self.preset)
        self.holdout = check_holdout(self.holdout, preset.spec.num_classes, preset.pivots)
        checks = [
            (self.runs >= 1, f"runs must be ≥ 1, got {self.runs}"),
            (self.runs <= MAX_RUNS, f"runs must be ≤ {MAX_RUNS:,} (one zoo's collection), got {self.runs:,}; "
                                    "collect fewer runs"),
            (self.runs_per_group >= 1, f"runs_per_group must be ≥ 1, got {self.runs_per_group}"),
            (self.runs_per_group <= MAX_RUNS_PER_GROUP,
             f"runs_per_group must be ≤ {MAX_RUNS_PER_GROUP:,} (a group's runs train in one task's memory), "
             f"got {self.runs_per_group:,}"),
            (self.augment >= 0, f"augment (permuted copies) must be ≥ 0, got {self.augment}"),
            (self.epochs is None or self.epochs >= 1, f"epochs must be ≥ 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be ≥ 1, got {self.batch_size}"),
            (0 < self.lr_min <= self.lr_max, f"need 0 < lr_min ≤ lr_max, got {self.lr_min}, {self.lr_max}"),
            (0 < self.undersample_rate_min <= self.undersample_rate_max <= 1,
             "need 0 < undersample_rate_min ≤ undersample_rate_max ≤ 1"),
            (0 <= self.deletion_share <= 1, f"deletion_share is a share in [0, 1], got {self.deletion_share}"),
            (len(self.deletion_window) == 2 and 0 < self.deletion_window[0] <= self.deletion_window[1] < 1,
             f"deletion_window must be two fractions 0 < a ≤ b < 1, got {self.deletion_window}"),
            (self.max_param_abs > 0, "max_param_abs must be > 0"),
            (self.forgetting_lr >= 0, f"forgetting_lr must be ≥ 0, got {self.forgetting_lr}"),
            (self.branches >= 1, f"branches must be ≥ 1, got {self.branches}"),
            (self.branches == 1 or self.runs_per_group % self.branches == 0,
             f"runs_per_group ({self.runs_per_group}) must be a multiple of branches ({self.branches}) so that "
             "a family trains in one group, on one minibatch order"),
            (0 <= self.holdout_forget_acc < self.holdout_retain_acc <= 1,
             f"need 0 ≤ holdout_forget_acc < holdout_retain_acc ≤ 1, got {self.holdout_forget_acc}, "
             f"{self.holdout_retain_acc}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise HyperForgetError(msg)

    @property
    def num_groups(self) -> int:
        return math.ceil(self.runs / self.runs_per_group)

    def group_runs(self, g: int) -> range:
        return range(g * self.runs_per_group, min((g + 1) * self.runs_per_group, self.runs))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["deletion_window"] = list(self.deletion_window)
        d["selection"] = self.selection.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CollectConfig":
        return from_settings(cls, d, "collection")


def group_key(g: int) -> str:
    return f"group-{g:06d}"


# ----------------------------------------------------------------------------------------------
# Task and run plans


@dataclass(frozen=True)
class Task:
    """The resolved task a collection trains on: preset adapted to the dataset, and the data."""

    preset: TaskPreset  # the preset, its MLP input size matched to the dataset
    data: Dataset  # train/test splits of the preset's classes, labels 0..C-1
    epochs: int  # epochs per run
    max_per_run: int  # checkpoint budget per run
    batch_size: int  # minibatch size

    @property
    def spec(self):
        return self.preset.spec

    @property
    def steps_per_epoch(self) -> int:
        return steps_per_epoch(len(self.data.y_train), self.batch_size)

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch


@functools.lru_cache(maxsize=4)
def _load(dataset: str, root: str | None, classes: tuple[int, ...], scaling: str) -> Dataset:
    # Cached per process: a dask worker loads the data once for all the groups it trains.
    return load_dataset(dataset, root=root, classes=classes, scaling=scaling)


def resolve_task(cfg: CollectConfig) -> Task:
    preset = get_preset(cfg.preset)
    data = _load(cfg.dataset, cfg.data_root, tuple(preset.classes), cfg.scaling)
    if data.input_size != preset.spec.input_size:
        preset = preset.with_input_size(data.input_size)
    if len(data.y_train) == 0:
        raise HyperForgetError(f"dataset {cfg.dataset!r} has no training examples of classes {list(preset.classes)}")
    max_per_run = cfg.selection.max_per_run or preset.checkpoints_per_run
    return Task(preset, data, cfg.epochs or preset.epochs, int(max_per_run), cfg.batch_size)


@dataclass(frozen=True)
class RunPlan:
    """One training run's configuration, a pure function of (collection seed, run id)."""

    run_id: int  # unique in the zoo
    seed: int  # initialization and per-run randomness
    lr: float  # base learning rate
    kind: str  # run_kind: binned, relaxed, random
    undersampled: tuple[int, ...]  # task labels undersampled in this run
    undersample_rates: tuple[float, ...]  # kept fraction of each
    deleted: tuple[int, ...]  # task labels deleted mid-training (empty: none)
    deletion_step: int  # last optimizer step with the deleted classes; −1 if none


def plan_run(cfg: CollectConfig, task: Task, run_id: int) -> RunPlan:
    if cfg.branches > 1:
        return plan_branch(cfg, task, run_id)
    return plan_single(cfg, task, run_id)


def plan_single(cfg: CollectConfig, task: Task, run_id: int) -> RunPlan:
    rng = np.random.default_rng([cfg.seed, 0, run_id])
    c = task.spec.num_classes
    pivots = set(task.preset.pivots)
    nonpivots = [k for k in range(c) if k not in pivots]
    seed = int(rng.integers(0, 2**31 - 1))
    lr = float(np.exp(rng.uniform(np.log(cfg.lr_min), np.log(cfg.lr_max))))
    kind = "random" if rng.random() < cfg.selection.random_share else cfg.selection.mode
    pool = list(range(c)) if cfg.undersample_pivots else nonpivots
    n_under = int(rng.integers(0, len(pool) + 1))
    under = tuple(sorted(int(k) for k in rng.choice(pool, size=n_under, replace=False))) if n_under else ()
    lo, hi = np.log(cfg.undersample_rate_min), np.log(cfg.undersample_rate_max)
    rates = tuple(float(np.float32(np.exp(rng.uniform(lo, hi)))) for _ in under)
    deleted: tuple[int, ...] = ()
    deletion_step = -1
    if nonpivots and rng.random() < cfg.deletion_share:
        size = int(rng.integers(1, len(nonpivots) + 1))
        deleted = tuple(sorted(int(k) for k in rng.choice(nonpivots, size=size, replace=False)))
        a, b = cfg.deletion_window
        deletion_step = int(round(rng.uniform(a, b) * task.total_steps))
        deletion_step = min(max(deletion_step, 1), task.total_steps - 1)
        if not cfg.deletion_undersample:
            under, rates = (), ()
    if cfg.holdout:  # a separate stream: zoos without a holdout keep their plans
        under, rates, deleted = restrict_plan(cfg.holdout, under, rates, deleted,
                                              np.random.default_rng([cfg.seed, 5, run_id]))
        if not deleted:
            deletion_step = -1
    return RunPlan(run_id, seed, lr, kind, under, rates, deleted, deletion_step)


def deletion_sets(nonpivots: Sequence[int]) -> list[tuple[int, ...]]:
    """Every non-empty subset of the non-pivot classes, smallest first."""
    return [tuple(int(k) for k in c) for r in range(1, len(nonpivots) + 1)
            for c in itertools.combinations(sorted(nonpivots), r)]


def plan_branch(cfg: CollectConfig, task: Task, run_id: int) -> RunPlan:
    """Branch ``run_id % branches`` of family ``run_id // branches`` (CollectConfig.branches)."""
    family, branch = divmod(run_id, cfg.branches)
    rng = np.random.default_rng([cfg.seed, 6, family])  # one stream per family: its branches agree
    c = task.spec.num_classes
    pivots = set(task.preset.pivots)
    nonpivots = [k for k in range(c) if k not in pivots]
    if not nonpivots:
        raise HyperForgetError(f"branches need non-pivot classes to delete; preset {cfg.preset} has none")
    seed = int(rng.integers(0, 2**31 - 1))
    lr = float(np.exp(rng.uniform(np.log(cfg.lr_min), np.log(cfg.lr_max))))
    kind = "random" if rng.random() < cfg.selection.random_share else cfg.selection.mode
    under: tuple[int, ...] = ()
    rates: tuple[float, ...] = ()
    if cfg.deletion_undersample:
        pool = list(range(c)) if cfg.undersample_pivots else nonpivots
        n_under = int(rng.integers(0, len(pool) + 1))
        under = tuple(sorted(int(k) for k in rng.choice(pool, size=n_under, replace=False))) if n_under else ()
        lo, hi = np.log(cfg.undersample_rate_min), np.log(cfg.undersample_rate_max)
        rates = tuple(float(np.float32(np.exp(rng.uniform(lo, hi)))) for _ in under)
        if cfg.holdout:
            under, rates, _ = restrict_plan(cfg.holdout, under, rates, (), rng)
    a, b = cfg.deletion_window
    deletion_step = min(max(int(round(rng.uniform(a, b) * task.total_steps)), 1), task.total_steps - 1)
    # Sets that would lower a held-out set together with the family's undersampling are never deleted.
    allowed = [d for d in deletion_sets(nonpivots)
               if not any(set(h) <= set(d) | set(under) for h in cfg.holdout)]
    order = [allowed[i] for i in rng.permutation(len(allowed))] if allowed else []
    deleted = order[(branch - 1) % len(order)] if branch > 0 and order else ()
    return RunPlan(run_id, seed, lr, kind, under, rates, deleted, deletion_step if deleted else -1)


# ----------------------------------------------------------------------------------------------
# Training one group


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


# ----------------------------------------------------------------------------------------------
# Orchestration


@dataclass
class CollectSummary:
    """What a collection did (this call) and what the zoo holds now."""

    path: str  # the zoo
    checkpoints: int  # rows in the zoo (originals + permuted copies)
    originals: int  # rows with perm_index 0
    runs: int  # distinct run ids in the zoo (a run that never met the selection rules keeps nothing)
    runs_requested: int  # runs of the collection (0..runs-1)
    groups_committed: int  # groups trained and committed by this call
    groups_skipped: int  # groups already in the zoo (resumed)
    groups_empty: int  # groups trained by this call whose runs all kept nothing (nothing committed)
    run_steps: int  # optimizer steps of all runs trained by this call
    seconds: float  # wall time of this call
    train_seconds: float  # summed task time spent in optimizer steps
    per_reason: dict = field(default_factory=dict)  # rows per reason
    per_phase: dict = field(default_factory=dict)  # rows per phase
    per_kind: dict = field(default_factory=dict)  # rows per run kind
    checkpoints_added: int = 0  # rows committed by this call

    @property
    def rate(self) -> float:
        """Checkpoints committed per second by this call."""
        return self.checkpoints_added / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        return {**asdict(self), "checkpoints_per_s": round(self.rate, 1)}


def _zoo_config(cfg: CollectConfig, task: Task):
    from hyperforget.zoo.store import ZooConfig

    return ZooConfig(spec=task.spec, classes=tuple(task.preset.classes), pivots=tuple(task.preset.pivots),
                     dataset=task.data.describe(),
                     collection={"format": COLLECTION_FORMAT, "collector": "hyperforget.zoo.collect",
                                 "config": cfg.to_dict(), "epochs": task.epochs, "max_per_run": task.max_per_run,
                                 "steps_per_run": task.total_steps})


def _open_or_create(cfg: CollectConfig, task: Task, out: str):
    from hyperforget.zoo.store import create_zoo

    w = create_zoo(out, _zoo_config(cfg, task), exist_ok=True)  # a new zoo, or the one to resume
    try:
        _check_resume(w.config.collection.get("config"), cfg, w)
    except BaseException:
        w.close()
        raise
    return w


def _check_resume(stored: dict | None, cfg: CollectConfig, w) -> None:
    if stored is None:
        raise HyperForgetError(f"the zoo at {w.path} was not built by the collector; choose another --out")
    old = CollectConfig.from_dict(stored)
    a, b = old.to_dict(), cfg.to_dict()
    differ = sorted(k for k in a if k != "runs" and a[k] != b[k])
    if differ:
        raise HyperForgetError(
            f"the zoo at {w.path} was collected with other settings ({', '.join(f'{k}={a[k]!r}' for k in differ)}); "
            "re-run with the same settings to resume, or choose another --out")
    if cfg.runs != old.runs:
        done = [int(k.split("-")[1]) for k in w.committed_keys if k.startswith("group-")]
        last = max(done, default=-1)
        if last >= 0 and (cfg.group_runs(last) != old.group_runs(last) or cfg.runs < old.runs):
            raise HyperForgetError(
                f"the zoo at {w.path} holds runs of a collection of {old.runs} runs; resume with --runs {old.runs}"
                + (" or grow it by a multiple of runs_per_group" if old.runs % old.runs_per_group == 0 else ""))
        w.config.collection["config"] = cfg.to_dict()  # persisted by set_normalization at the end


def collect(cfg: CollectConfig, out: str, *, use_dask: bool = True, workers: int | None = None,
            scheduler: str | None = None, max_in_flight: int | None = None, progress: bool = True,
            normalize: bool = True, compact: bool = True, probe_seconds: float = 0.0,
            on_commit: Callable[[GroupResult, np.ndarray], None] | None = None) -> CollectSummary:
    """Collect a zoo at ``out`` (created, or resumed if it holds a collection of the same settings).

    Args:
        use_dask: train groups as dask tasks (False: one after another in this process).
        workers: LocalCluster worker processes (default: CPU count); ignored with ``scheduler``.
        scheduler: address of an existing dask.distributed scheduler ("tcp://host:8786").
        max_in_flight: group results held at once (submitted, running or awaiting their turn to
            commit); bounds memory. Default: 2 × workers.
        normalize, compact: finish with compute_normalization + set_normalization and compact().
        probe_seconds: passed to :func:`train_group` (benchmarks: the compute limit inside each task).
        on_commit: called after each commit with the group's result and its checkpoint ids.
    """
    from hyperforget.zoo.store import compute_normalization

    if max_in_flight is not None and max_in_flight < 1:
        raise HyperForgetError(f"max_in_flight must be ≥ 1, got {max_in_flight}")
    if workers is not None and workers < 1:
        raise HyperForgetError(f"workers must be ≥ 1, got {workers}")
    started = time.perf_counter()
    task = resolve_task(cfg)
    w = _open_or_create(cfg, task, out)
    # Workers of a LocalCluster share this machine's disk: they write their rows into the zoo's
    # scratch space (ZOO/.tmp/spill, emptied whenever the zoo is reopened) and send only the path,
    # which spares the committer the transfer (a third of its CPU time).
    spill_dir = w.temp_dir("spill") if use_dask and scheduler is None else None
    try:
        done = w.committed_keys
        todo = [g for g in range(cfg.num_groups) if group_key(g) not in done]
        skipped = cfg.num_groups - len(todo)
        stats = Counter()
        with _Progress(progress, cfg, todo) as bar:
            for res in _results_in_order(cfg, todo, use_dask, workers, scheduler, max_in_flight, probe_seconds,
                                         spill_dir):
                if res.meta.num_rows == 0:
                    # Nothing to commit (every run missed the rules); a re-run retrains it, to the same end.
                    stats.update(empty_groups=1, steps=res.steps)
                    bar.advance(res.runs, 0)
                    continue
                ids = w.commit(res.load_params(), res.meta, group_key(res.group))
                if res.params_file is not None:
                    os.remove(res.params_file)
                stats.update(rows=len(ids), steps=res.steps, train=res.train_seconds, groups=1)
                bar.advance(res.runs, len(ids))
                if on_commit is not None:
                    on_commit(res, ids)
        if normalize and w.num_rows:
            w.set_normalization(compute_normalization(w.reader()))
        if compact:
            w.compact()
        summary = _summarize(w, cfg, stats, skipped, time.perf_counter() - started)
    finally:
        w.close()
        if spill_dir is not None:
            shutil.rmtree(spill_dir, ignore_errors=True)
    return summary


def _summarize(w, cfg: CollectConfig, stats: Counter, skipped: int, seconds: float) -> CollectSummary:
    cols = ["run_id", "phase", "reason", "run_kind", "perm_index"]
    meta = w.reader().metadata(columns=cols) if w.num_rows else pa.table({c: pa.array([], pa.int64()) for c in cols})

    def counts(name: str) -> dict:
        return dict(sorted(Counter(meta.column(name).to_pylist()).items()))

    import pyarrow.compute as pc

    return CollectSummary(
        path=w.path, checkpoints=meta.num_rows,
        originals=int(pc.sum(pc.equal(meta.column("perm_index"), 0)).as_py() or 0),
        runs=len(pc.unique(meta.column("run_id"))), runs_requested=cfg.runs, groups_committed=int(stats["groups"]),
        groups_skipped=skipped, groups_empty=int(stats["empty_groups"]), run_steps=int(stats["steps"]), seconds=seconds,
        train_seconds=float(stats["train"]), per_reason=counts("reason"), per_phase=counts("phase"),
        per_kind=counts("run_kind"), checkpoints_added=int(stats["rows"]))


def _results_in_order(cfg: CollectConfig, todo: list[int], use_dask: bool, workers: int | None,
                      scheduler: str | None, max_in_flight: int | None, probe_seconds: float = 0.0,
                      spill_dir: str | None = None) -> Iterator[GroupResult]:
    """Group results in group order, whatever order the tasks finish in."""
    if not todo:
        return
    if not use_dask:
        for g in todo:
            yield train_group(cfg, g, probe_seconds=probe_seconds)
        return
    from distributed import Client, LocalCluster, as_completed

    cluster = None
    if scheduler:
        try:
            client = Client(scheduler, timeout="20s")
        except (OSError, TimeoutError) as exc:
            raise HyperForgetError(f"cannot reach the dask scheduler at {scheduler} ({exc}); "
                                   "check the address or drop --scheduler to use a local cluster") from None
    else:
        import dask

        n = workers or os.cpu_count() or 1
        # dask gives its workers MALLOC_TRIM_THRESHOLD_=65536. Any explicit trim threshold turns off
        # glibc's dynamic mmap threshold, so every step's tensors above 128 KiB are mapped and
        # page-faulted anew (a lockstep step measured 42 % instead of 56 % of the matmul limit).
        with dask.config.set({"distributed.nanny.pre-spawn-environ.MALLOC_TRIM_THRESHOLD_": None}), \
                _sigint_ignored():
            # Worker processes start with Ctrl-C ignored: the terminal sends it to the whole
            # process group, and only this process should react (by closing the cluster). Their
            # logs stay quiet below CRITICAL: a task's own error reaches the client through
            # fut.result(), and a worker outliving the scheduler at shutdown is no error.
            cluster = LocalCluster(n_workers=n, threads_per_worker=1, processes=True, dashboard_address=None,
                                   silence_logs=logging.CRITICAL)
        client = Client(cluster)
    try:
        n_workers = max(1, len(client.scheduler_info().get("workers", {})) or (workers or 1))
        limit = max_in_flight or 2 * n_workers
        pending = list(todo)
        futures = as_completed()
        held: dict[int, GroupResult] = {}
        submitted = 0
        next_i = 0  # index into todo of the next group to hand out

        def fill() -> None:
            nonlocal submitted
            while submitted < len(pending) and (submitted - next_i) < limit:
                g = pending[submitted]
                futures.add(client.submit(train_group, cfg, g, probe_seconds=probe_seconds, spill_dir=spill_dir,
                                          pure=False, retries=2))
                submitted += 1

        fill()
        for fut in futures:
            res = fut.result()
            held[res.group] = res
            fut.release()
            while next_i < len(pending) and pending[next_i] in held:
                yield held.pop(pending[next_i])
                next_i += 1
            fill()
    finally:
        client.close()
        if cluster is not None:
            cluster.close()


@contextlib.contextmanager
def _sigint_ignored():
    """Spawn processes that ignore SIGINT (they inherit it; Python then installs no handler).

    SIGINT is also blocked in this thread meanwhile, so a Ctrl-C that the kernel hands to it stays
    pending and raises KeyboardInterrupt once the handler is back; one handed to another thread
    of this process while the workers start (a few seconds) is lost, and the next one counts.
    """
    import signal

    if threading.current_thread() is not threading.main_thread():
        yield  # signals are the main thread's to change
        return
    blocking = hasattr(signal, "pthread_sigmask")
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT}) if blocking else None
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, handler)
        if blocking:
            signal.pthread_sigmask(signal.SIG_SETMASK, mask)


class _Progress:
    """rich progress: runs done, checkpoints, checkpoints/s, ETA (on stderr)."""

    def __init__(self, enabled: bool, cfg: CollectConfig, todo: list[int]):
        self.enabled = enabled
        self.total = cfg.runs
        self.done_before = cfg.runs - sum(len(cfg.group_runs(g)) for g in todo)
        self.rows = 0
        self.t0 = time.perf_counter()

    def __enter__(self) -> "_Progress":
        if self.enabled:
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

            self._bar = Progress(TextColumn("collecting runs"), BarColumn(), MofNCompleteColumn(),
                                 TextColumn("{task.fields[rows]:,} checkpoints · {task.fields[rate]:,.0f}/s"),
                                 TimeRemainingColumn(), console=Console(stderr=True))
            self._bar.__enter__()
            self._task = self._bar.add_task("runs", total=self.total, completed=self.done_before, rows=0, rate=0.0)
        return self

    def advance(self, runs: int, rows: int) -> None:
        self.rows += rows
        if self.enabled:
            rate = self.rows / max(time.perf_counter() - self.t0, 1e-9)
            self._bar.update(self._task, advance=runs, rows=self.rows, rate=rate)

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._bar.__exit__(*exc)
