"""The task a collection trains on and its run plans: run r's configuration from (seed, r) alone.

:func:`resolve_task` adapts the preset to the dataset (loaded once per process); :func:`plan_run`
draws one run's seed, learning rate, undersampling and deletion (:func:`plan_single`), or, with
``branches`` > 1, one branch of a family that shares everything up to its deletion step
(:func:`plan_branch`).
"""

from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from hyperforget.zoo.collect.config import CollectConfig
from hyperforget.zoo.datasets import Dataset, load_dataset
from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.holdout import restrict_plan
from hyperforget.zoo.lockstep import steps_per_epoch
from hyperforget.zoo.mlp import TaskPreset, get_preset


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


def _draw_run(cfg: CollectConfig, rng: np.random.Generator) -> tuple[int, float, str]:
    """A run's initialization seed, base learning rate (log-uniform) and selection kind."""
    seed = int(rng.integers(0, 2**31 - 1))
    lr = float(np.exp(rng.uniform(np.log(cfg.lr_min), np.log(cfg.lr_max))))
    kind = "random" if rng.random() < cfg.selection.random_share else cfg.selection.mode
    return seed, lr, kind


def _draw_undersampling(cfg: CollectConfig, rng: np.random.Generator, c: int, nonpivots: list[int]
                        ) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """Which classes a run undersamples (none to all of the pool) and their kept fractions."""
    pool = list(range(c)) if cfg.undersample_pivots else nonpivots
    n_under = int(rng.integers(0, len(pool) + 1))
    under = tuple(sorted(int(k) for k in rng.choice(pool, size=n_under, replace=False))) if n_under else ()
    lo, hi = np.log(cfg.undersample_rate_min), np.log(cfg.undersample_rate_max)
    rates = tuple(float(np.float32(np.exp(rng.uniform(lo, hi)))) for _ in under)
    return under, rates


def _draw_deletion_step(cfg: CollectConfig, task: Task, rng: np.random.Generator) -> int:
    a, b = cfg.deletion_window
    return min(max(int(round(rng.uniform(a, b) * task.total_steps)), 1), task.total_steps - 1)


def plan_single(cfg: CollectConfig, task: Task, run_id: int) -> RunPlan:
    rng = np.random.default_rng([cfg.seed, 0, run_id])
    c = task.spec.num_classes
    pivots = set(task.preset.pivots)
    nonpivots = [k for k in range(c) if k not in pivots]
    seed, lr, kind = _draw_run(cfg, rng)
    under, rates = _draw_undersampling(cfg, rng, c, nonpivots)
    deleted: tuple[int, ...] = ()
    deletion_step = -1
    if nonpivots and rng.random() < cfg.deletion_share:
        size = int(rng.integers(1, len(nonpivots) + 1))
        deleted = tuple(sorted(int(k) for k in rng.choice(nonpivots, size=size, replace=False)))
        deletion_step = _draw_deletion_step(cfg, task, rng)
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
    seed, lr, kind = _draw_run(cfg, rng)
    under: tuple[int, ...] = ()
    rates: tuple[float, ...] = ()
    if cfg.deletion_undersample:
        under, rates = _draw_undersampling(cfg, rng, c, nonpivots)
        if cfg.holdout:
            under, rates, _ = restrict_plan(cfg.holdout, under, rates, (), rng)
    deletion_step = _draw_deletion_step(cfg, task, rng)
    # Sets that would lower a held-out set together with the family's undersampling are never deleted.
    allowed = [d for d in deletion_sets(nonpivots)
               if not any(set(h) <= set(d) | set(under) for h in cfg.holdout)]
    order = [allowed[i] for i in rng.permutation(len(allowed))] if allowed else []
    if branch == 0 or not order:
        return RunPlan(run_id, seed, lr, kind, under, rates, (), -1)
    # Branch b >= 1: deletion step (b-1) mod T of the family's T steps, set (b-1) div T of its order.
    which_step, which_set = (branch - 1) % cfg.branch_steps, (branch - 1) // cfg.branch_steps
    steps = [deletion_step]
    if cfg.branch_steps > 1:  # a separate stream: one-step families keep their plans
        more = np.random.default_rng([cfg.seed, 7, family])
        steps = sorted(steps + [_draw_deletion_step(cfg, task, more) for _ in range(cfg.branch_steps - 1)])
    if cfg.branch_from_start:  # the earliest becomes 0: the branch never trains on the set
        steps[0] = 0
    deletion_step = steps[which_step]
    return RunPlan(run_id, seed, lr, kind, under, rates, order[which_set % len(order)], deletion_step)
