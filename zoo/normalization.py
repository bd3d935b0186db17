"""Normalization statistics of parameter vectors, with one estimator for every user.

The zoo's per-layer statistics (zoo.json's ``normalization``), the tokenizer's statistics of an
in-memory stack and the per-value statistics a hypernetwork stores all come from running sums
(count, Σx, Σx²) in float64 and the unbiased standard deviation sqrt((Σx² − n·mean²) / (n − 1)),
the estimator ``torch.std`` and ``numpy.std(ddof=1)`` use. Sums add, so batches and DDP ranks
combine exactly before the statistics are taken.
"""

from __future__ import annotations

import numpy as np

from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.mlp import ParamLayout

GPT_TARGET_STD = 0.538  # G.pt's scale: normalized parameters get this standard deviation


class MomentSums:
    """Per-value count, Σx and Σx² of a stream of (N, P) parameter stacks."""

    def __init__(self, num_params: int):
        self.count = 0
        self.s1 = np.zeros(num_params, dtype=np.float64)
        self.s2 = np.zeros(num_params, dtype=np.float64)

    def add(self, x) -> "MomentSums":
        x = np.asarray(x, dtype=np.float64)
        self.count += len(x)
        self.s1 += x.sum(0)
        self.s2 += np.square(x).sum(0)
        return self

    def mean_std(self, a: int = 0, b: int | None = None) -> tuple[float, float]:
        """Mean and unbiased std of all values in columns [a, b) pooled together."""
        b = len(self.s1) if b is None else b
        n = self.count * (b - a)
        if n < 2:
            raise HyperForgetError(f"{self.count} checkpoints cannot give normalization statistics; grow the zoo")
        mean = self.s1[a:b].sum() / n
        return float(mean), unbiased_std(n, self.s1[a:b].sum(), self.s2[a:b].sum())

    def per_value(self) -> tuple[np.ndarray, np.ndarray]:
        """(P,) means and unbiased stds, one per parameter position."""
        if self.count < 2:
            raise HyperForgetError(f"{self.count} finite checkpoints cannot give per-value statistics; grow the zoo")
        mean = self.s1 / self.count
        return mean, unbiased_std(self.count, self.s1, self.s2)


def unbiased_std(n, s1, s2):
    """sqrt((Σx² − Σx²/n) / (n − 1)), clamped at 0 against rounding; scalars or arrays."""
    var = np.maximum((s2 - s1 * s1 / n) / (n - 1), 0.0)
    return float(np.sqrt(var)) if np.ndim(var) == 0 else np.sqrt(var)


def layer_normalization(layout: ParamLayout, sums: MomentSums) -> dict:
    """zoo.json's normalization: ``mean``, ``std`` over all parameters, ``gpt_coeff`` = 0.538 / std
    (G.pt's single scale) and ``layers`` {name: {mean, std}} in the layout's order."""
    mean, std = sums.mean_std()
    if std == 0:
        raise HyperForgetError("every sampled parameter is equal; cannot normalize")
    layers = {}
    for s in layout.slots:
        m, sd = sums.mean_std(s.offset, s.stop)
        layers[s.name] = {"mean": m, "std": sd}
    return {"mean": mean, "std": std, "gpt_coeff": GPT_TARGET_STD / std, "layers": layers}
