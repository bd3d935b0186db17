"""Selection (Appendix A.1): the best candidate by validation accuracy, and the accuracies it compares."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from hyperforget.zoo.errors import HyperForgetError


def select_best(forget_acc: np.ndarray, retain_acc: np.ndarray, tolerance: float = 0.0) -> int:
    """Index of the best candidate: lowest forget accuracy, then highest retain accuracy.

    Args:
        forget_acc, retain_acc: (K,) mean per-class accuracies on the validation split.
        tolerance: candidates whose forget accuracy is within this of the lowest count as tied
            (0 = the paper's strict rule). Remaining ties go to the lowest index.
    """
    forget_acc = np.asarray(forget_acc, dtype=np.float64)
    retain_acc = np.asarray(retain_acc, dtype=np.float64)
    if forget_acc.shape != retain_acc.shape or forget_acc.ndim != 1 or len(forget_acc) == 0:
        raise HyperForgetError(f"selection needs two (K,) arrays, got {forget_acc.shape} and {retain_acc.shape}")
    f = np.where(np.isfinite(forget_acc), forget_acc, np.inf)
    r = np.where(np.isfinite(retain_acc), retain_acc, -np.inf)
    tied = np.flatnonzero(f <= f.min() + tolerance)
    return int(tied[np.argmax(r[tied])])  # argmax returns the first maximum


def split_accuracy(acc: np.ndarray, forget: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(M, C) per-class accuracy -> (M,) mean over forget classes, (M,) mean over retain classes."""
    acc = np.asarray(acc, dtype=np.float64)
    retain = [k for k in range(acc.shape[1]) if k not in set(forget)]
    return np.nanmean(acc[:, list(forget)], axis=1), np.nanmean(acc[:, retain], axis=1)


def per_class_accuracy(logits: torch.Tensor, y: torch.Tensor, num_classes: int) -> np.ndarray:
    """(M, N, C) logits, (N,) labels -> (M, C) accuracy per true class (NaN for absent classes)."""
    hit = (logits.argmax(-1) == y).double()  # (M, N)
    onehot = torch.nn.functional.one_hot(y, num_classes).double()  # (N, C)
    counts = onehot.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((hit @ onehot) / counts).numpy()
