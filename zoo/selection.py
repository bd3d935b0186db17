"""Which checkpoints of a training run to keep: the heuristics of Appendix A.5 (Figure 25), vectorized.

SGD alone would fill a zoo with near-identical, well-trained checkpoints. The paper keeps a
checkpoint only when

1. a random check passes (β): an iteration is *considered* with a probability that is higher
   early in training (and right after a class deletion) and lower later;
2. every pivot class reaches test accuracy γ (default 0.8), so pivots stay high-performing;
3. the loss of each non-pivot class falls in a loss bin that still has room (a cap per bin keeps
   common loss levels from crowding out rare ones);
4. the run has saved fewer than ``max_per_run`` checkpoints.

Other run kinds: ``relaxed`` runs drop pivots and bins and keep a considered checkpoint when its
class losses moved enough since the last kept one; ``random`` runs keep the initialization, the
final model and uniformly random steps in between (the "general loss evolution" examples).

Runs that delete classes mid-training (the forgetting process DiHyFo-1 learns from) split their
budget: ``forget_share`` of it is reserved for checkpoints after the deletion step, and bins are
counted per phase, so full low-loss bins from learning never block the rising losses after it.

A :class:`Selector` holds the state of the R runs of a lockstep group as arrays, so deciding for
all runs at one step is a handful of numpy operations.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from hyperforget.zoo.errors import HyperForgetError, from_settings

RUN_KINDS = ("binned", "relaxed", "random")
REASONS = ("pivot_bin", "relaxed", "random", "init", "final", "augment")
MODES = ("binned", "relaxed")
LEARNING, FORGETTING = 0, 1
PHASES = ("learning", "forgetting")


@dataclass
class SelectionConfig:
    """Checkpoint-saving heuristics (Appendix A.5). Saved in zoo.json with the collection settings."""

    gamma: float = 0.8  # pivot test accuracy a binned checkpoint must reach on every pivot class
    max_per_run: int | None = None  # checkpoint budget per run; None: the preset's (150 mnist4, 200 mnist10)
    mode: str = "binned"  # "binned": pivots + loss bins; "relaxed": no pivots or bins (see module doc)
    random_share: float = 0.1  # share of runs that save at uniformly random steps (run_kind "random")
    consider_factor: float = 3.0  # β: expected considered iterations per phase, as a multiple of its budget
    early_boost: float = 4.0  # β at the start of a phase divided by β at its end (geometric decay)
    bin_edges: tuple[float, ...] = (0.02, 0.05, 0.1, 0.2, 0.35, 0.6, 1.0, 1.5, 2.5, 4.0)  # loss bins (nats)
    bin_cap: float = 0.4  # max share of a phase's budget whose loss on one class falls in one bin
    forget_share: float = 0.4  # share of a deletion run's budget reserved for after its deletion step
    relaxed_min_change: float = 0.05  # relaxed runs: min max_k |Δ log loss_k| since the last kept checkpoint

    def __post_init__(self) -> None:
        self.bin_edges = tuple(float(e) for e in self.bin_edges)
        if self.mode not in MODES:
            raise HyperForgetError(f"unknown selection mode {self.mode!r}: choose one of {', '.join(MODES)}")
        if not 0.0 <= self.gamma <= 1.0:
            raise HyperForgetError(f"gamma is an accuracy in [0, 1], got {self.gamma}")
        if self.max_per_run is not None and self.max_per_run < 2:
            raise HyperForgetError(f"max_per_run must be ≥ 2, got {self.max_per_run}")
        for name in ("random_share", "bin_cap", "forget_share"):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise HyperForgetError(f"{name} is a share in [0, 1], got {getattr(self, name)}")
        if self.consider_factor <= 0 or self.early_boost < 1:
            raise HyperForgetError("consider_factor must be > 0 and early_boost ≥ 1")
        if list(self.bin_edges) != sorted(set(self.bin_edges)) or not self.bin_edges or self.bin_edges[0] <= 0:
            raise HyperForgetError(f"bin_edges must be positive and strictly increasing, got {self.bin_edges}")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["bin_edges"] = list(self.bin_edges)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "SelectionConfig":
        return from_settings(cls, d, "selection")

    @property
    def num_bins(self) -> int:
        return len(self.bin_edges) + 1


def phase_budgets(cfg: SelectionConfig, max_per_run: int, deletes: bool) -> tuple[int, int]:
    """(learning budget, forgetting reserve) of a run; the total stays max_per_run."""
    reserve = int(round(cfg.forget_share * max_per_run)) if deletes else 0
    return max_per_run - reserve, reserve


def consider_mask(cfg: SelectionConfig, kind: str, total_steps: int, deletion_step: int, max_per_run: int,
                  rng: np.random.Generator) -> np.ndarray:
    """Which checkpoints of one run get evaluated: (total_steps + 1,) bool over t = 0..T.

    Checkpoint t is the parameters after t optimizer steps (t = 0: the initialization). For a
    ``random`` run the mask is exactly the steps it saves: 0, T and max_per_run − 2 uniform
    steps in between. Otherwise step t is considered with probability β_t that decays
    geometrically by ``early_boost`` over each phase and sums to about consider_factor × the
    phase budget (capped at 1 per step).
    """
    mask = np.zeros(total_steps + 1, dtype=bool)
    if kind == "random":
        inner = np.arange(1, total_steps)
        k = min(max(max_per_run - 2, 0), len(inner))
        mask[rng.choice(inner, size=k, replace=False)] = True
        mask[[0, total_steps]] = True
        return mask
    deletes = deletion_step >= 0
    learn_budget, forget_budget = phase_budgets(cfg, max_per_run, deletes)
    spans = [(1, deletion_step if deletes else total_steps, learn_budget)]
    if deletes:
        spans.append((deletion_step + 1, total_steps, forget_budget))
    for a, b, budget in spans:
        n = b - a + 1
        if n <= 0 or budget <= 0:
            continue
        decay = cfg.early_boost ** (-np.arange(n) / max(n - 1, 1))
        p = np.minimum(1.0, cfg.consider_factor * budget * decay / decay.sum())
        mask[a:b + 1] = rng.random(n) < p
    return mask


class Selector:
    """Saving decisions for the R runs of one lockstep group.

    Args:
        cfg: the heuristics.
        kinds: (R,) run kinds (entries of RUN_KINDS).
        deletion_steps: (R,) deletion step per run, −1 for runs without deletion.
        total_steps: optimizer steps per run (T).
        max_per_run: checkpoint budget per run.
        pivots: task labels of the pivot classes; num_classes: C.
        consider: (R, T + 1) masks from :func:`consider_mask`.
    """

    def __init__(self, cfg: SelectionConfig, kinds: list[str], deletion_steps: np.ndarray, total_steps: int,
                 max_per_run: int, pivots: tuple[int, ...], num_classes: int, consider: np.ndarray):
        r = len(kinds)
        bad = sorted(set(kinds) - set(RUN_KINDS))
        if bad:
            raise HyperForgetError(f"unknown run kinds {bad}: choose from {', '.join(RUN_KINDS)}")
        self.cfg = cfg
        self.kind = np.array([RUN_KINDS.index(k) for k in kinds])  # (R,)
        self.deletion_step = np.asarray(deletion_steps, dtype=np.int64)  # (R,)
        self.total_steps, self.max_per_run = int(total_steps), int(max_per_run)
        self.consider = np.asarray(consider, dtype=bool)  # (R, T + 1)
        assert self.consider.shape == (r, total_steps + 1)
        self.pivots = np.array(sorted(pivots), dtype=np.int64)
        self.nonpivots = np.array([c for c in range(num_classes) if c not in set(pivots)], dtype=np.int64)
        self.edges = np.array(cfg.bin_edges)
        budgets = [phase_budgets(cfg, self.max_per_run, d >= 0) for d in self.deletion_step]
        self.learn_budget = np.array([b[0] for b in budgets])  # (R,)
        # Bin capacity per phase: a share of the budget that phase is meant to fill.
        phase_budget = np.array([[b[0], b[1]] for b in budgets])  # (R, 2)
        self.bin_cap = np.maximum(1, np.ceil(cfg.bin_cap * phase_budget)).astype(np.int64)  # (R, 2)
        self.bins = np.zeros((r, 2, num_classes, cfg.num_bins), dtype=np.int64)  # (R, phase, C, bin) counts
        self.count = np.zeros(r, dtype=np.int64)  # (R,) saved so far
        self.count_learning = np.zeros(r, dtype=np.int64)  # (R,) saved in the learning phase
        self.last_log_loss = np.full((r, num_classes), np.nan)  # (R, C) relaxed runs' last kept losses

    def phase(self, t: int, runs: np.ndarray) -> np.ndarray:
        """(m,) phase codes (LEARNING / FORGETTING) of checkpoint t for the given runs."""
        d = self.deletion_step[runs]
        return ((d >= 0) & (t > d)).astype(np.int64)

    def candidates(self, t: int) -> np.ndarray:
        """Indices of runs whose checkpoint t must be evaluated (considered and with budget left)."""
        runs = np.flatnonzero(self.consider[:, t] & (self.count < self.max_per_run))
        ph = self.phase(t, runs)
        room = (ph == FORGETTING) | (self.count_learning[runs] < self.learn_budget[runs]) | (
            self.kind[runs] == RUN_KINDS.index("random"))
        return runs[room]

    def select(self, t: int, runs: np.ndarray, loss: np.ndarray, acc: np.ndarray,
               valid: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Decide for the evaluated checkpoints of step t and update the run states.

        Args:
            runs: (m,) distinct run indices from :meth:`candidates`.
            loss, acc: (m, C) per-class test loss and accuracy of those checkpoints.
            valid: (m,) False for checkpoints that must not be kept (e.g. non-finite parameters).
        Returns:
            keep (m,) bool and reason (m,) indices into REASONS (meaningful where keep).
        """
        m = len(runs)
        kind = self.kind[runs]
        ph = self.phase(t, runs)
        keep = np.ones(m, dtype=bool) if valid is None else np.asarray(valid, dtype=bool).copy()
        reason = np.empty(m, dtype=np.int64)

        is_random = kind == RUN_KINDS.index("random")
        reason[is_random] = REASONS.index("random")
        if t == 0:
            reason[is_random] = REASONS.index("init")
        elif t == self.total_steps:
            reason[is_random] = REASONS.index("final")

        is_binned = kind == RUN_KINDS.index("binned")
        if is_binned.any():
            b = np.flatnonzero(is_binned)
            pivots_ok = (acc[np.ix_(b, self.pivots)] >= self.cfg.gamma).all(1) if len(self.pivots) else True
            k = np.digitize(loss[np.ix_(b, self.nonpivots)], self.edges)  # (mb, U); NaN lands in the top bin, as inf
            rb, pb = runs[b], ph[b]
            filled = self.bins[rb[:, None], pb[:, None], self.nonpivots[None, :], k]  # (mb, U)
            room = (filled < self.bin_cap[rb, pb][:, None]).all(1)
            keep[b] &= pivots_ok & room
            reason[b] = REASONS.index("pivot_bin")

        is_relaxed = kind == RUN_KINDS.index("relaxed")
        if is_relaxed.any():
            x = np.flatnonzero(is_relaxed)
            log_loss = np.log(np.maximum(loss[x], 1e-12))
            change = np.nan_to_num(np.abs(log_loss - self.last_log_loss[runs[x]]), nan=np.inf).max(1)
            keep[x] &= change >= self.cfg.relaxed_min_change
            reason[x] = REASONS.index("relaxed")

        # Commit the decisions to the run states.
        kept = runs[keep]
        self.count[kept] += 1
        self.count_learning[kept[ph[keep] == LEARNING]] += 1
        if is_binned.any():
            sel = keep[b]
            rows = np.repeat(rb[sel], len(self.nonpivots))
            self.bins[rows, np.repeat(pb[sel], len(self.nonpivots)), np.tile(self.nonpivots, int(sel.sum())),
                      k[sel].reshape(-1)] += 1
        if is_relaxed.any():
            sel = keep[x]
            self.last_log_loss[runs[x][sel]] = log_loss[sel]
        return keep, reason


def default_max_per_run(cfg: SelectionConfig, preset_budget: int) -> int:
    return int(cfg.max_per_run if cfg.max_per_run is not None else preset_budget)


__all__ = ["SelectionConfig", "Selector", "consider_mask", "phase_budgets", "RUN_KINDS", "REASONS", "PHASES",
           "MODES", "LEARNING", "FORGETTING"]
