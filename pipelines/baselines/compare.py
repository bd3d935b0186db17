"""Every baseline side by side against retrained models (records only; pipelines.report formats them)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from hyperforget.pipelines.baselines.registry import BASELINES, run_baseline
from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.mlp import MLP


@torch.no_grad()
def _logits(module: nn.Module, x: torch.Tensor, rows: int = 8192) -> torch.Tensor:
    module.eval()
    return torch.cat([module(x[i:i + rows]) for i in range(0, len(x), rows)])  # (N, C)


def compare_baselines(original: MLP, retrained: Sequence[MLP], x_train, y_train, x_test, y_test,
                      forget: Sequence[int], *, methods: Sequence[str] | None = None, seed: int = 0,
                      overrides: dict[str, dict] | None = None, retrain_seconds: float | None = None,
                      progress: bool = True) -> dict:
    """Run every method on ``original`` and score it against the ``retrained`` models.

    Args:
        original: the MLP trained on all classes; retrained: S MLPs trained without ``forget``.
        x_train (N, D), y_train (N,): the training split the methods see (D = D_r ∪ D_f);
        x_test (M, D), y_test (M,): the test split. methods: names in BASELINES (default all).
        overrides: {method: {hparam: value}}. retrain_seconds: training time per retrained model.
    Returns:
        A forget set's entry in the shape of a run's forget-X/metrics.json, so that
        :func:`hyperforget.pipelines.report.render_comparison` formats it: {"forget", "num_retrained",
        "methods": {name: pipelines.metrics.unlearning_metrics(...) without per_model, plus "phi" (φ on
        test), "wall_seconds" and "hparams"}} with "original", "retrain" (each seed against the
        other seeds) and each method.
    """
    from rich.progress import Progress

    from hyperforget.pipelines import metrics as M

    overrides = overrides or {}
    methods = list(methods) if methods is not None else list(BASELINES)
    for name in methods:
        if name not in BASELINES:
            raise HyperForgetError(f"unknown unlearning method {name!r}: choose one of {', '.join(BASELINES)}")
    if not retrained:
        raise HyperForgetError("compare_baselines needs at least one retrained model to compare with")
    x_train = torch.as_tensor(x_train, dtype=torch.float32)
    x_test = torch.as_tensor(x_test, dtype=torch.float32)
    y_train, y_test = torch.as_tensor(y_train).long(), torch.as_tensor(y_test).long()
    forget = sorted({int(c) for c in forget})
    r_tr = torch.stack([_logits(m, x_train) for m in retrained]).numpy()  # (S, N, C)
    r_te = torch.stack([_logits(m, x_test) for m in retrained]).numpy()  # (S, M, C)

    def logits(module) -> tuple:
        return _logits(module, x_train).numpy(), _logits(module, x_test).numpy()

    def record(tr, te, wall_seconds, hparams, **kw) -> dict:
        out = M.unlearning_metrics(tr, te, y_train.numpy(), y_test.numpy(), forget, r_tr, r_te, **kw)
        out.pop("per_model")
        # The paper computes φ "across the entire dataset": the test split's value is the table's φ.
        return {**out, "phi": out.get("phi_test"), "wall_seconds": wall_seconds, "hparams": hparams}

    rows = {"original": record(*logits(original), None, {}),
            "retrain": record(r_tr, r_te, retrain_seconds, {}, distinct_pairs=len(retrained) > 1)}
    with Progress(disable=not progress, transient=True) as bar:
        task = bar.add_task("baselines", total=len(methods))
        for name in methods:
            bar.update(task, description=f"unlearning with {name}")
            module, seconds = run_baseline(name, original, x_train, y_train, forget, seed=seed,
                                           **overrides.get(name, {}))
            rows[name] = record(*logits(module), seconds, {**BASELINES[name].defaults, **overrides.get(name, {})})
            bar.advance(task)
    return {"forget": forget, "num_retrained": len(retrained), "methods": rows}
