"""The retrained populations: reference seeds disjoint from the run's and the zoo's, and lockstep training."""

from __future__ import annotations

import time
from typing import Sequence

import numpy as np
import torch

from hyperforget.pipelines.evaluate.config import SEED_BASE
from hyperforget.zoo.errors import HyperForgetError


def used_seeds(run) -> tuple[set[int], str]:
    """Seeds the run and its zoo used, and a sentence on how far the check reached."""
    seeds = {int(run.config.seed), *[int(s) for s in run.config.retrain_seeds]}
    zoo = run.config.zoo
    if not zoo:
        return seeds, "the run names no zoo, so only the run's own seeds were checked"
    try:
        from hyperforget.zoo.store import open_zoo

        meta = open_zoo(zoo).metadata()
        zoo_seeds = {int(s) for s in np.unique(meta.column("seed").drop_null().to_numpy())}
    except HyperForgetError as exc:
        return seeds, f"the zoo {zoo} could not be read ({exc}), so only the run's own seeds were checked"
    except ImportError:
        return seeds, "hyperforget.zoo.store is not available, so only the run's own seeds were checked"
    return seeds | zoo_seeds, f"checked against the run's seeds and the {len(zoo_seeds)} run seeds of zoo {zoo}"


def reference_seeds(n: int, used: set[int], base: int = SEED_BASE) -> list[int]:
    """n consecutive seeds from base, moved up past any used seed (so none overlaps)."""
    start = base
    while True:
        seeds = list(range(start, start + n))
        clash = [s for s in seeds if s in used]
        if not clash:
            return seeds
        start = max(clash) + 1


def train_reference(run, forget: Sequence[int], seeds: Sequence[int], groups: int) -> tuple[torch.Tensor, float]:
    """(R, P) models trained from scratch without the forget classes, and the wall seconds.

    Lockstep groups share a minibatch order; each group gets its own (data_seed = its first seed),
    so the population varies in data order as well as initialization.
    """
    from hyperforget.zoo.lockstep import train_models

    d = run.data()
    keep = ~torch.isin(d.y_fit, torch.as_tensor(list(forget)))
    x, y = d.x_fit[keep], d.y_fit[keep]
    c = run.config
    out = []
    t0 = time.perf_counter()
    for chunk in np.array_split(np.asarray(seeds), min(groups, len(seeds))):
        out.append(train_models(run.spec, x, y, [int(s) for s in chunk], epochs=int(c.epochs), lr=float(c.lr),
                                batch_size=int(c.batch_size), data_seed=int(chunk[0])))
    return torch.cat(out).float(), time.perf_counter() - t0
