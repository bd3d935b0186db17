"""Peak resident memory of this process and all its descendants (dask or DataLoader workers)."""

from __future__ import annotations

import threading

import psutil


class TreePeakRSS:
    """Samples the RSS of this process tree every ``interval`` seconds while active.

    ``peak`` is the highest total seen, divided by ``scale`` (1: bytes, 1e6: MB). A child that
    exits between listing and reading is skipped for that sample.
    """

    def __init__(self, interval: float = 0.2, scale: float = 1.0):
        self.interval, self.scale, self.peak, self._stop = interval, scale, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = psutil.Process()
        while not self._stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.peak = max(self.peak, total / self.scale)
            self._stop.wait(self.interval)

    def __enter__(self) -> "TreePeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
