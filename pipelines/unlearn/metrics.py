"""Metrics against the retrained models: every method of a forget set -> RUN/forget-X/metrics.json."""

from __future__ import annotations

from typing import Sequence

import torch

from hyperforget.pipelines import metrics as zm
from hyperforget.pipelines.rundir import Run, load_method, method_dirs
from hyperforget.zoo.files import jsonable, read_json, write_json
from hyperforget.zoo.mlp import model_logits


def compute_metrics(run: Run, forget: Sequence[int], methods: Sequence[str] | None = None) -> dict:
    """Every method's metrics against the retrained models -> forget-X/metrics.json.

    D_r / D_f are the retain / forget examples of the training split the models learned from
    (minus validation); "test" is the dataset's test split. Each method's M models are compared
    with each of the S retrained models and summarized as mean / std / min / max.
    """
    forget = run.check_forget(forget)
    retrained, _ = load_method(run, forget, "retrain")  # (S, P)
    d = run.data()
    names = list(methods) if methods else [p.name for p in method_dirs(run, forget)]
    out = {"forget": list(forget), "retain": [c for c in range(run.num_classes) if c not in forget],
           "reference": "retrain", "num_retrained": int(retrained.shape[0]), "methods": {}}
    original = run.original_params()[None]
    entries = [("original", original, {"wall_seconds": None}), ("retrain", retrained, read_json(
        run.forget_dir(forget) / "retrain" / "record.json"))]
    for name in names:
        params, record = load_method(run, forget, name)
        entries.append((name, params, record))
    with torch.no_grad():
        ref_fit = model_logits(run.spec, retrained, d.x_fit)  # (S, N_fit, C)
        ref_test = model_logits(run.spec, retrained, d.x_test)  # (S, N_test, C)
    for name, params, record in entries:
        mask = record.get("output_mask") or ()
        with torch.no_grad():
            fit_logits = model_logits(run.spec, params, d.x_fit, mask)  # (M, N_fit, C)
            test_logits = model_logits(run.spec, params, d.x_test, mask)  # (M, N_test, C)
        summary = zm.unlearning_metrics(fit_logits, test_logits, d.y_fit, d.y_test, list(forget), ref_fit, ref_test,
                                        distinct_pairs=name == "retrain")
        # The paper computes φ "across the entire dataset": the test split's value is the table's φ.
        summary["phi"] = summary.get("phi_test")
        out["methods"][name] = {"wall_seconds": record.get("wall_seconds"), **jsonable(summary)}
    write_json(run.forget_dir(forget) / "metrics.json", out)
    return out


def refresh_metrics(run: Run, forget: Sequence[int]) -> dict | None:
    """Recompute forget-X/metrics.json when the retrained models exist (None otherwise)."""
    forget = run.check_forget(forget)
    if not (run.forget_dir(forget) / "retrain" / "models.safetensors").exists():
        return None
    return compute_metrics(run, forget)
