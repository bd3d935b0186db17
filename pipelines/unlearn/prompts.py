"""DiHyFo prompts (paper, Section 3): target per-class losses built from a zoo's loss statistics.

High loss on the forget classes, a loss near the best found in the zoo on the retain classes
(:func:`build_prompts`; the options in :class:`PromptConfig` are those the paper and G.pt discuss).
The retain classes are asked by default for a level the zoo's best checkpoints reach on all of
them at once ("joint"), not each class's own low quantile: with nine retained classes (MNIST-10)
no checkpoint reaches every class's 5 % quantile together, and a hypernetwork asked for one
loses some class instead (docs/experiments.md, "Joint retain prompts").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from hyperforget.hyper.data import loss_quantile, loss_statistics, retain_profile
from hyperforget.zoo.errors import HyperForgetError


RETAIN_MODES = ("joint", "quantile", "min", "fixed")


@dataclass
class PromptConfig:
    """How target losses are chosen from the zoo's per-class test losses (the hypernetwork's units)."""

    # "quantile": spread over forget_quantiles; "max": highest seen; "fixed": forget_value
    forget_mode: str = "quantile"
    forget_quantiles: tuple[float, float] = (0.9, 0.995)  # low/high quantile of each forget class's zoo loss
    forget_value: float = 5.0  # target loss on forget classes for "fixed"
    # "joint": the zoo's best checkpoints on the retain classes together, spread over retain_fractions;
    # "quantile": each class's own quantiles, spread over retain_quantiles; "min": best seen; "fixed": retain_value
    retain_mode: str = "joint"
    retain_fractions: tuple[float, float] = (0.005, 0.05)  # "joint": low/high share of the zoo ranked by mean retain loss
    retain_quantiles: tuple[float, float] = (0.0, 0.05)  # "quantile": low/high quantile of each retain class's zoo loss
    retain_value: float = 0.05  # target loss on retain classes for "fixed"
    retain_scale: float = 1.0  # multiplies retain targets: slightly below (<1) or above (>1) the best (G.pt)
    seed: int = 0  # decorrelates retain levels from forget levels across candidates

    def __post_init__(self) -> None:
        if self.forget_mode not in ("quantile", "max", "fixed"):
            raise HyperForgetError(f"unknown forget prompt mode {self.forget_mode!r}: use quantile, max or fixed")
        if self.retain_mode not in RETAIN_MODES:
            raise HyperForgetError(f"unknown retain prompt mode {self.retain_mode!r}: use {', '.join(RETAIN_MODES)}")
        for name in ("forget_quantiles", "retain_quantiles", "retain_fractions"):
            lo, hi = getattr(self, name)
            if not 0.0 <= lo <= hi <= 1.0:
                raise HyperForgetError(f"{name} must satisfy 0 <= low <= high <= 1, got {(lo, hi)}")
            setattr(self, name, (float(lo), float(hi)))
        if self.retain_scale <= 0:
            raise HyperForgetError(f"retain_scale must be positive, got {self.retain_scale}")


class LossStats:
    """Per-class loss quantiles that prompts are built from: the statistics a hypernetwork saved
    (hyper.data.loss_statistics over its zoo), or those of an (N, C) array of losses."""

    def __init__(self, stats: dict):
        self.stats = stats
        self.num_classes = len(stats["max"])

    @classmethod
    def of_losses(cls, losses: np.ndarray) -> "LossStats":
        losses = np.asarray(losses)
        return cls(loss_statistics(losses, forgettable=range(losses.shape[1])))

    def quantile(self, q: float) -> np.ndarray:
        """(C,) per-class q-quantile."""
        return loss_quantile(self.stats, q)

    def retain_profile(self, forget: Sequence[int], fraction: float) -> np.ndarray:
        """(C,) joint low-loss level of the classes outside ``forget`` (hyper.data.retain_profile)."""
        return retain_profile(self.stats, forget, fraction)

    def summary(self) -> dict:
        return {"rows": self.stats.get("rows"), "min": self.quantile(0.0), "q05": self.quantile(0.05),
                "median": self.quantile(0.5), "q95": self.quantile(0.95), "max": self.quantile(1.0)}


def build_prompts(stats: "LossStats | np.ndarray", forget: Sequence[int], n: int,
                  options: PromptConfig | None = None) -> np.ndarray:
    """Target per-class losses for n candidates: high on forget classes, near the best on the rest.

    Args:
        stats: LossStats (a hypernetwork's saved statistics) or an (N, C) array of zoo losses.
        forget: task labels to forget. n: number of prompts.
    Returns:
        (n, C) float32 targets. With quantile modes the n candidates spread evenly over the
        quantile range (the paper prompts "different high losses values"); retain levels follow a
        seeded permutation so that each candidate pairs a different forget and retain level.
    """
    options = options or PromptConfig()
    if not isinstance(stats, LossStats):
        stats = LossStats.of_losses(stats)
    c = stats.num_classes
    forget = list(forget)
    if any(not 0 <= k < c for k in forget):
        raise HyperForgetError(f"forget classes {forget} are outside the zoo's labels 0..{c - 1}")
    if n < 1:
        raise HyperForgetError(f"need at least one prompt, got n={n}")
    retain = [k for k in range(c) if k not in forget]
    pos = np.linspace(0.0, 1.0, n) if n > 1 else np.array([0.5])  # (n,)
    retain_pos = np.random.default_rng(options.seed).permutation(pos)

    def spread(quantiles: tuple[float, float], where: np.ndarray) -> np.ndarray:
        lo, hi = stats.quantile(quantiles[0]), stats.quantile(quantiles[1])  # (C,)
        return lo[None, :] + where[:, None] * (hi - lo)[None, :]  # (n, C)

    out = np.zeros((n, c), dtype=np.float64)
    if options.forget_mode == "quantile":
        out[:, forget] = spread(options.forget_quantiles, pos)[:, forget]
    elif options.forget_mode == "max":
        out[:, forget] = stats.quantile(1.0)[forget]
    else:
        out[:, forget] = options.forget_value
    if options.retain_mode == "joint":
        lo, hi = options.retain_fractions
        for i, where in enumerate(retain_pos):
            out[i, retain] = stats.retain_profile(forget, lo + where * (hi - lo))[retain]
    elif options.retain_mode == "quantile":
        out[:, retain] = spread(options.retain_quantiles, retain_pos)[:, retain]
    elif options.retain_mode == "min":
        out[:, retain] = stats.quantile(0.0)[retain]
    else:
        out[:, retain] = options.retain_value
    out[:, retain] *= options.retain_scale
    return out.astype(np.float32)
