"""Generation quality of a hypernetwork: prompt alignment R² and Pearson r per class.

Appendix A.4 of the reference text (after G.pt): for each class k, prompt 20 regularly spaced
target losses for class k while the other classes are asked for a low ("good") loss, sample
parameters, decode them into MLPs, measure the obtained class-k test loss, and score
    R² = 1 − Σ(L*_i − L̂_i)² / (Σ(L*_i − η)² + ε),   η = mean(L*)      (Eq. 6-7)
and the Pearson correlation between target and obtained losses, each over the 20 prompts of one
sampled "network" (one noise draw and one start point), then averaged over the networks.
DiHyFo-1 starts from randomly initialized MLPs, as the appendix says.
"""

from __future__ import annotations

import math

from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch

from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.mlp import MLPSpec, evaluate_per_class, init_params

# sampler(targets (K, C), current_params (K, P) | None, current_losses (K, C) | None, seed) -> (K, P) raw
SampleFn = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor | None, int], torch.Tensor]


def prompt_alignment_r2(target, observed, eps: float = 1e-8) -> float:
    """R² = 1 − Σ_i (L*_i − L̂*_i)² / (Σ_i (L*_i − η)² + ε),  η = (1/n) Σ_i L*_i   (Eq. 6–7).

    Args:
        target: (n,) prompted losses L*; observed: (n,) losses L̂* the sampled models reached.
    1 is perfect alignment; 0 is as good as always answering the targets' mean; negative is worse.
    """
    t, o = np.asarray(target, dtype=np.float64).ravel(), np.asarray(observed, dtype=np.float64).ravel()
    if t.shape != o.shape or t.size == 0:
        raise HyperForgetError(f"target and observed need the same non-zero length, got {t.size} and {o.size}")
    eta = t.mean()
    return float(1.0 - np.sum((t - o) ** 2) / (np.sum((t - eta) ** 2) + eps))


def pearson(target, observed) -> float:
    """Pearson correlation r = cov(t, o) / (σ_t σ_o) of (n,) targets and observations.

    NaN (not an error) when either input is constant or n < 2: the correlation is undefined there,
    and a sweep of many networks should report it rather than stop.
    """
    t, o = np.asarray(target, dtype=np.float64).ravel(), np.asarray(observed, dtype=np.float64).ravel()
    if t.shape != o.shape:
        raise HyperForgetError(f"target and observed need the same length, got {t.size} and {o.size}")
    if t.size < 2:
        return math.nan
    tc, oc = t - t.mean(), o - o.mean()
    denom = math.sqrt(float(np.sum(tc ** 2)) * float(np.sum(oc ** 2)))
    if denom == 0.0 or not math.isfinite(denom):
        return math.nan
    return float(np.clip(np.sum(tc * oc) / denom, -1.0, 1.0))


@dataclass
class AlignmentResult:
    """Per-class scores (C,) and the raw prompts/observations they came from."""

    r2: list[float]  # (C,) mean over sampled networks of the per-network R² over the prompts
    pearson: list[float]  # (C,) same for Pearson r
    targets: np.ndarray  # (C, S, n) prompted loss of the swept class
    observed: np.ndarray  # (C, S, n) obtained loss of the swept class

    def to_dict(self) -> dict:
        return {"r2": self.r2, "pearson": self.pearson, "r2_mean": float(np.nanmean(self.r2)),
                "pearson_mean": float(np.nanmean(self.pearson))}


def prompt_grid(low: np.ndarray, high: np.ndarray, good: np.ndarray, n_prompts: int = 20) -> np.ndarray:
    """Prompts sweeping one class at a time: (C, n_prompts, C).

    Row [k, i] asks class k for linspace(low_k, high_k)[i] and every other class j for good_j.
    """
    c = len(low)
    grid = np.repeat(np.asarray(good, dtype=np.float32)[None, None, :], c, 0).repeat(n_prompts, 1)
    for k in range(c):
        grid[k, :, k] = np.linspace(low[k], high[k], n_prompts, dtype=np.float32)
    return grid


@torch.no_grad()
def evaluate_alignment(sample: SampleFn, spec: MLPSpec, x_test: torch.Tensor, y_test: torch.Tensor,
                       low: np.ndarray, high: np.ndarray, good: np.ndarray, *, variant: str,
                       n_prompts: int = 20, n_networks: int = 2, seed: int = 0) -> AlignmentResult:
    """Prompt alignment and Pearson r per class, evaluated on (x_test (N, D), y_test (N,)).

    Samples C · n_prompts · n_networks models in one batch and evaluates them vectorized.
    """
    c = spec.num_classes
    grid = prompt_grid(low, high, good, n_prompts)  # (C, S, C)
    targets = torch.as_tensor(grid).reshape(c * n_prompts, c).repeat(n_networks, 1)  # (n·C·S, C)
    current = current_losses = None
    if variant == "dihyfo1":
        # One random start per network, shared by all its prompts (so R² measures the prompt's effect).
        starts = init_params(spec, [seed * 1000 + i for i in range(n_networks)])  # (n, P)
        current = starts.repeat_interleave(c * n_prompts, 0)  # (K, P)
        start_loss = torch.as_tensor(evaluate_per_class(spec, starts, x_test, y_test).loss)
        current_losses = start_loss.repeat_interleave(c * n_prompts, 0)
    params = sample(targets, current, current_losses, seed)  # (K, P)
    obs = evaluate_per_class(spec, params, x_test, y_test).loss  # (K, C)
    obs = np.nan_to_num(obs, nan=1e3, posinf=1e3).reshape(n_networks, c, n_prompts, c)
    tgt = targets.numpy().reshape(n_networks, c, n_prompts, c)
    swept_t = np.stack([tgt[:, j, :, j] for j in range(c)])  # (C, n, S)
    swept_o = np.stack([obs[:, j, :, j] for j in range(c)])
    r2 = [float(np.mean([prompt_alignment_r2(swept_t[j, s], swept_o[j, s]) for s in range(n_networks)])) for j in range(c)]
    pr = [float(np.nanmean([pearson(swept_t[j, s], swept_o[j, s]) for s in range(n_networks)]))
          if np.isfinite(swept_o[j]).all() else float("nan") for j in range(c)]
    return AlignmentResult(r2, pr, swept_t.transpose(0, 2, 1), swept_o.transpose(0, 2, 1))
