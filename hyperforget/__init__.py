"""HyperForget: machine unlearning with diffusion hypernetworks, over a queryable checkpoint zoo.

The repository's folders install as one namespace: ``hyperforget.zoo`` (the zoo and its format),
``hyperforget.queries`` (SQL, views, the streaming loader), ``hyperforget.hyper`` (the DiT and
the diffusion) and ``hyperforget.pipelines`` (flows and the CLI). This module re-exports the
entry points another project needs; each is imported on first use, so ``import hyperforget``
stays cheap::

    import hyperforget as hf
    zoo = hf.open_zoo("zoos/mnist4")
    stream = hf.CheckpointStream("zoos/mnist4", "dihyfo2_train_1bda658a", batch_size=256)
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "HyperForgetError": "hyperforget.zoo.errors",
    "open_zoo": "hyperforget.zoo.store",
    "verify_zoo": "hyperforget.zoo.store",
    "CollectConfig": "hyperforget.zoo.collect",
    "collect": "hyperforget.zoo.collect",
    "build_view": "hyperforget.queries.views",
    "CheckpointStream": "hyperforget.queries.loader",
    "make_loader": "hyperforget.queries.loader",
    "train": "hyperforget.hyper.train",
    "load_hypernetwork": "hyperforget.hyper.sample",
    "create_run": "hyperforget.pipelines.rundir",
    "open_run": "hyperforget.pipelines.rundir",
    "UnlearnConfig": "hyperforget.pipelines.unlearn",
    "unlearn": "hyperforget.pipelines.unlearn",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hyperforget' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
