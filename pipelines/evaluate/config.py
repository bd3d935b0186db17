"""What an evaluation is configured with and what its rows are: the format constants, EvalConfig, Population."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from hyperforget.pipelines import attacks as za
from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.seeds import REFERENCE_SEED_BASE

EVAL_FORMAT = "hyperforget-evaluation"
EVAL_VERSION = 1
SEED_BASE = REFERENCE_SEED_BASE  # first seed of the reference populations: far from run (0, 100..) and zoo seeds
MIN_EPS_MODELS = 8  # below this many models a row's ε is flagged: one model gives only a range test


@dataclass
class EvalConfig:
    """How `hyperforget evaluate` scores a run; saved in every forget-X.json."""

    n_retrained: int = 128  # retrained models per forget set (½ reference, ¼ attack negatives, ¼ floor)
    retrain_groups: int = 2  # lockstep groups, each with its own minibatch order (more groups cost more steps)
    seed_base: int = SEED_BASE  # first reference seed; shifted past any seed the run or its zoo used
    baseline_seeds: int = 3  # models per baseline: saved repeats, topped up with run_baseline if fewer; 0 = saved only
    delta: float = za.DEFAULT_DELTA  # δ of the challenge's per-example ε
    target_fpr: float = 0.01  # FPR of the reported TPR
    max_forget_examples: int = 1000  # D_f examples the attacks and ε use (deterministic subsample)
    max_examples: int = 2000  # rows per other split for MIA / JSD (deterministic subsample)
    mia_models: int = 8  # models per row whose MIA is computed (one logistic regression each)
    probe_models: int = 4  # models per row whose hidden layer is probed
    relearn_models: int = 4  # models per row that relearn
    relearn_per_class: int = 16  # examples per class in the relearning subset (forget and retain classes)
    relearn_level: float = 0.8  # relearned when forget-class test accuracy ≥ level × the original's
    relearn_max_steps: int = 100  # full-batch SGD steps before giving up
    relearn_lr: float = 0.05  # SGD learning rate (momentum 0.9) of relearning
    nearest_checkpoint: bool = True  # search the zoo for the checkpoint nearest each selected DiHyFo model
    max_zoo_rows: int | None = None  # cap on zoo rows scanned (None: all original, un-permuted rows)
    progress: bool = True  # rich progress bars

    def __post_init__(self) -> None:
        if self.n_retrained < 8:
            raise HyperForgetError(
                f"--retrained must be at least 8 (4 reference, 2+2 evaluation), got {self.n_retrained}")
        if self.baseline_seeds < 0:
            raise HyperForgetError(f"--baseline-seeds must be ≥ 0, got {self.baseline_seeds}")
        if not 0 < self.delta < 1 or not 0 < self.target_fpr < 1:
            raise HyperForgetError("delta and target_fpr must lie in (0, 1)")
        if self.retrain_groups < 1:
            raise HyperForgetError(f"retrain_groups must be ≥ 1, got {self.retrain_groups}")


@dataclass
class Population:
    """One row of the tables: M models (flat parameters) and how they came about."""

    name: str  # row label
    kind: str  # "floor", "ceiling", "method", "control"
    params: torch.Tensor  # (M, P) parameter vectors
    masked: tuple[int, ...] = ()  # classes whose logits are set to −∞ (logit-masking control)
    seconds_per_model: float | None = None  # wall time to produce one model
    note: str = ""  # shown under the table
    extra: dict = field(default_factory=dict)  # row-specific facts (distance to the zoo, ...)
