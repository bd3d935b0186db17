"""Forget sets kept out of a zoo: a collection that never shows a model having forgotten them.

The paper's claim is that one hypernetwork serves every forget request. A zoo collected with
``holdout=[[2, 3]]`` makes it testable for {2, 3}:

- no run lowers every class of the set together: a run plan whose deleted and undersampled classes
  cover the set gives one of those classes back (``restrict_plan``);
- no checkpoint is saved that has forgotten the set while knowing the rest: every class of the set
  at accuracy <= ``forget_acc`` and every other class >= ``retain_acc`` (``forgets``).

Unlearning exactly that set then asks for a model the zoo never held. ``zoo info`` counts the
checkpoints of a zoo that forget each held-out set, which is 0 for a holdout collection.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from hyperforget.zoo.errors import HyperForgetError

FORGET_ACC = 0.2  # default: a held-out set counts as forgotten when each of its classes is at most this accurate
RETAIN_ACC = 0.8  # ... while every other class is at least this accurate


def check_holdout(sets: Sequence[Sequence[int]], num_classes: int, pivots: Sequence[int]) -> list[list[int]]:
    """Held-out forget sets as sorted lists of task labels; a one-line error names a bad one."""
    out = []
    for s in sets:
        labels = sorted({int(k) for k in s})
        if not labels:
            raise HyperForgetError("a held-out forget set is empty: name its classes, e.g. --holdout 2,3")
        bad = [k for k in labels if not 0 <= k < num_classes]
        if bad:
            raise HyperForgetError(f"held-out forget set {labels} names classes {bad} outside 0..{num_classes - 1}")
        named_pivots = sorted(set(labels) & {int(p) for p in pivots})
        if named_pivots:
            raise HyperForgetError(f"held-out forget set {labels} names pivots {named_pivots}, which no run "
                                   "forgets and DiHyFo cannot unlearn; hold out non-pivot classes only")
        if labels not in out:
            out.append(labels)
    return out


def restrict_plan(sets: Sequence[Sequence[int]], under: tuple[int, ...], rates: tuple[float, ...],
                  deleted: tuple[int, ...], rng: np.random.Generator
                  ) -> tuple[tuple[int, ...], tuple[float, ...], tuple[int, ...]]:
    """A run plan's (undersampled, rates, deleted) with no held-out set covered by their union.

    While a set is covered, one of its lowered classes (drawn by ``rng``) is given back: taken out of
    the undersampled classes if it is there, else out of the deleted ones.
    """
    under, rates, deleted = list(under), list(rates), list(deleted)
    for s in sets:
        while set(s) <= set(under) | set(deleted):
            k = int(rng.choice(sorted(set(s))))
            if k in under:
                i = under.index(k)
                del under[i], rates[i]
            else:
                deleted.remove(k)
    return tuple(under), tuple(rates), tuple(deleted)


def forgets(acc: np.ndarray, forget: Sequence[int], forget_acc: float, retain_acc: float) -> np.ndarray:
    """(N,) True where a checkpoint's per-class accuracies (N, C) forget ``forget`` and keep the rest.

    Compared in float32, the metadata's type, as SQL over the Parquet compares them: an accuracy stored
    as 0.2 is then at most 0.2.
    """
    acc = np.asarray(acc, dtype=np.float32)
    forget_acc, retain_acc = np.float32(forget_acc), np.float32(retain_acc)
    f = sorted(set(int(k) for k in forget))
    rest = [k for k in range(acc.shape[1]) if k not in set(f)]
    low = (acc[:, f] <= forget_acc).all(1)
    high = (acc[:, rest] >= retain_acc).all(1) if rest else np.ones(len(acc), dtype=bool)
    return low & high


def forgets_any(acc: np.ndarray, sets: Sequence[Sequence[int]], forget_acc: float, retain_acc: float) -> np.ndarray:
    """(N,) True where a checkpoint forgets at least one of the held-out sets."""
    out = np.zeros(len(acc), dtype=bool)
    for s in sets:
        out |= forgets(acc, s, forget_acc, retain_acc)
    return out


def holdout_counts(acc: np.ndarray, sets: Sequence[Sequence[int]], forget_acc: float,
                   retain_acc: float) -> dict[str, int]:
    """{"2-3": number of checkpoints that forget {2,3} and keep the rest} for each set."""
    return {"-".join(map(str, s)): int(forgets(acc, s, forget_acc, retain_acc).sum()) for s in sets}
