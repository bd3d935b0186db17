"""``python -m pipelines.compare_baselines``: every baseline against models retrained from scratch.

Trains an original MLP and S retrained MLPs the way a run does (pipelines.retrain), applies each
registered baseline of pipelines.baselines to the original, and prints one comparison table
(pipelines.report.render_comparison). It sits above the methods, so that pipelines.baselines
itself depends on nothing but the data layer.
"""

from __future__ import annotations

import argparse
import time
from typing import Sequence

import torch

from hyperforget.pipelines.baselines import compare_baselines
from hyperforget.pipelines.report import render_comparison
from hyperforget.pipelines.retrain import keep_converged, retrain_without
from hyperforget.pipelines.rundir import RunConfig, parse_classes
from hyperforget.zoo.files import write_json
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


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m pipelines.compare_baselines``: train an original and S retrained MLPs, compare every method."""
    run_defaults = RunConfig()
    ap = argparse.ArgumentParser(description=main.__doc__)
    ap.add_argument("--dataset", default="mnist-5k")
    ap.add_argument("--classes", default="0,1,2,3", help="original class ids of the task")
    ap.add_argument("--hidden", type=int, default=2, help="hidden units (2: MNIST-4, 7: MNIST-10)")
    ap.add_argument("--forget", default="2", help="task labels to forget, e.g. 2 or 2,3")
    ap.add_argument("--epochs", type=int, default=get_preset(run_defaults.preset).epochs,
                    help="epochs of the original and retrained models (a run's default)")
    ap.add_argument("--retrained", type=int, default=3, help="retrained models")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, default=run_defaults.lr,
                    help="SGD learning rate of the original and retrained models (a run's default)")
    ap.add_argument("--batch-size", type=int, default=run_defaults.batch_size,
                    help="minibatch of the original and retrained models (a run's default)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (tiny MLPs gain nothing from more)")
    ap.add_argument("--json", default=None, help="also write the records and the table as JSON here")
    a = ap.parse_args(argv)
    if a.retrained < 1:
        raise HyperForgetError(f"--retrained must be >= 1, got {a.retrained}")
    torch.set_num_threads(a.threads)
    ds = load_dataset(a.dataset, classes=[int(c) for c in a.classes.split(",")])
    forget = list(parse_classes(a.forget))
    x, y = torch.tensor(ds.x_train), torch.tensor(ds.y_train)
    spec = MLPSpec(ds.input_size, a.hidden, ds.num_classes)
    # Train the original on every class and the gold standard without the forget classes, with
    # spare seeds in the same pass to replace failed trainings, as a run does.
    spares = run_defaults.spare_seeds if run_defaults.failure_margin is not None else 0
    train = dict(epochs=a.epochs, lr=a.lr, batch_size=a.batch_size, margin=run_defaults.failure_margin)
    (original,), _, dropped_original = _train_from_scratch(
        spec, x, y, (), [a.seed + i for i in range(1 + spares)], 1, **train)
    retrained, retrain_seconds, dropped = _train_from_scratch(
        spec, x, y, forget, [a.seed + 1000 + i for i in range(a.retrained + spares)], a.retrained, **train)
    # Unlearn with every method and print the report's comparison table.
    entry = compare_baselines(original, retrained, x, y, ds.x_test, ds.y_test, forget, seed=a.seed,
                              retrain_seconds=retrain_seconds)
    entry["dropped_seeds"] = {"original": dropped_original, "retrain": dropped}
    table, text = render_comparison(entry)
    print(text)
    if dropped_original or dropped:
        print(f"\nfailed trainings replaced by spare seeds: original {dropped_original}, retrained {dropped}")
    if a.json:
        write_json(a.json, {**entry, "table": table})


if __name__ == "__main__":
    import sys

    try:
        main()
    except HyperForgetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)
