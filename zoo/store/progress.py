"""The store's progress bars (rich, on request) for compaction and verification."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def progress_bar(enabled: bool, what: str, total: int):
    """Yield ``advance(k=1)`` for a transient rich bar of ``total`` steps; a no-op unless ``enabled``."""
    if not enabled:
        yield lambda k=1: None
        return
    from rich.progress import Progress

    with Progress(transient=True) as prog:
        task = prog.add_task(what, total=total)
        yield lambda k=1: prog.advance(task, k)
