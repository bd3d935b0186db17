"""Group results in group order: trained in this process, or as dask tasks (a LocalCluster or a scheduler).

At most ``max_in_flight`` results are submitted, running or awaiting their turn at once, so the
committer's memory stays bounded; a failed task is retried.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from typing import Iterator

from hyperforget.zoo.collect.config import CollectConfig
from hyperforget.zoo.collect.group import GroupResult, train_group
from hyperforget.zoo.errors import HyperForgetError


def results_in_order(cfg: CollectConfig, todo: list[int], use_dask: bool, workers: int | None,
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
