"""``hyperforget compare-baselines``: every baseline against models retrained from scratch.

Trains an original MLP and S retrained MLPs the way a run does (pipelines.retrain), applies each
registered baseline of pipelines.baselines to the original, and prints one comparison table
(pipelines.report.render_comparison, printed by the CLI). It sits above the methods, so that pipelines.baselines
itself depends on nothing but the data layer.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Sequence

import torch

from hyperforget.pipelines.baselines import compare_baselines
from hyperforget.pipelines.retrain import keep_converged, retrain_without
from hyperforget.pipelines.rundir import RunConfig
from hyperforget.zoo.datasets import load_dataset
from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.mlp import MLP, MLPSpec, evaluate_per_class, get_preset


def _train_from_scratch(spec, x: torch.Tensor, y: torch.Tensor, forget: Sequence[int], seeds: Sequence[int],
                        wanted: int, *, epochs: int, lr: float, batch_size: int,
                        margin: float | None) -> tuple[list[MLP], float, list[int]]:
    """The run pipeline's training (pipelines.retrain: one lockstep pass, failed seeds replaced).

    There is no validation split here, so a failed training (a dead hidden unit that loses a
    class) is judged on the training split's retain classes. Returns (the first ``wanted``
    models that trained, seconds per trained model, the failed seeds passed over).
    """
    start = time.perf_counter()
    params = retrain_without(spec, x, y, forget, seeds, epochs=epochs, lr=lr, batch_size=batch_size)  # (R, P)
    seconds = (time.perf_counter() - start) / len(seeds)
    retain = [c for c in range(spec.num_classes) if c not in forget]
    acc = evaluate_per_class(spec, params, x, y).acc[:, retain].mean(1)  # (R,)
    keep, failed = keep_converged(acc, wanted, margin)
    return [MLP.from_flat(spec, params[i]) for i in keep], seconds, [int(seeds[i]) for i in failed]


@dataclass
class ComparisonConfig:
    """What ``hyperforget compare-baselines`` trains and compares (the defaults: a run's)."""

    dataset: str = "mnist-5k"
    classes: tuple[int, ...] = (0, 1, 2, 3)  # original class ids of the task
    hidden: int = 2  # hidden units (2: MNIST-4, 7: MNIST-10)
    forget: tuple[int, ...] = (2,)  # task labels to forget
    epochs: int = get_preset(RunConfig().preset).epochs  # of the original and retrained models
    retrained: int = 3  # models retrained without the forget set
    seed: int = 0
    lr: float = RunConfig().lr
    batch_size: int = RunConfig().batch_size

    def __post_init__(self) -> None:
        if self.retrained < 1:
            raise HyperForgetError(f"--retrained must be >= 1, got {self.retrained}")
        if self.hidden < 1 or self.epochs < 1 or self.batch_size < 1:
            raise HyperForgetError("--hidden, --epochs and --batch-size must be >= 1")


def run_comparison(cfg: ComparisonConfig) -> dict:
    """Train an original and the retrained MLPs (failed seeds replaced, as a run does), apply every
    baseline to the original, and return compare_baselines' records with ``dropped_seeds``."""
    run_defaults = RunConfig()
    ds = load_dataset(cfg.dataset, classes=list(cfg.classes))
    forget = list(cfg.forget)
    x, y = torch.tensor(ds.x_train), torch.tensor(ds.y_train)
    spec = MLPSpec(ds.input_size, cfg.hidden, ds.num_classes)
    # Train the original on every class and the gold standard without the forget classes, with
    # spare seeds in the same pass to replace failed trainings, as a run does.
    spares = run_defaults.spare_seeds if run_defaults.failure_margin is not None else 0
    train = dict(epochs=cfg.epochs, lr=cfg.lr, batch_size=cfg.batch_size, margin=run_defaults.failure_margin)
    (original,), _, dropped_original = _train_from_scratch(
        spec, x, y, (), [cfg.seed + i for i in range(1 + spares)], 1, **train)
    retrained, retrain_seconds, dropped = _train_from_scratch(
        spec, x, y, forget, [cfg.seed + 1000 + i for i in range(cfg.retrained + spares)], cfg.retrained, **train)
    entry = compare_baselines(original, retrained, x, y, ds.x_test, ds.y_test, forget, seed=cfg.seed,
                              retrain_seconds=retrain_seconds)
    entry["dropped_seeds"] = {"original": dropped_original, "retrain": dropped}
    return entry
