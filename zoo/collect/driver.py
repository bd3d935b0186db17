"""The driver: :func:`collect` creates or resumes a zoo, commits each group in order, then normalizes and compacts.

The client is the zoo's single committer: each group commits under ``group-NNNNNN`` in group
order (so checkpoint ids do not depend on the workers), committed groups are skipped on resume,
and the call ends with a :class:`CollectSummary`.
"""

from __future__ import annotations

import os
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Callable

import numpy as np
import pyarrow as pa

from hyperforget.zoo.collect.config import COLLECTION_FORMAT, CollectConfig, group_key
from hyperforget.zoo.collect.group import GroupResult
from hyperforget.zoo.collect.plan import Task, resolve_task
from hyperforget.zoo.collect.schedule import results_in_order
from hyperforget.zoo.errors import HyperForgetError


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
            for res in results_in_order(cfg, todo, use_dask, workers, scheduler, max_in_flight, probe_seconds,
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
