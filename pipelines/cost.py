"""Amortized cost: after how many forget requests one hypernetwork is cheaper than retraining.

A hypernetwork is paid for once (collecting its zoo and training it) and then serves every forget
request with a sampling-and-selection step; retraining pays a full training run per request.
With F the fixed cost, u the measured cost of one DiHyFo request and r that of one retrained
model, K requests cost F + K·u against K·r, so the hypernetwork breaks even at

    K* = ceil(F / (r − u))   when r > u, and never otherwise.

Every input is a measured wall time: the zoo collection, the hypernetwork's training loop
(``summary.json`` seconds), and the per-model ``wall_seconds`` that unlearning and retraining
record for each forget set (retraining trains its S seeds in lockstep, so r is the lockstep time
divided by S, the cheapest way to retrain).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from hyperforget.pipelines.rundir import Run
from hyperforget.zoo.files import read_json


def break_even(fixed_seconds: float, request_seconds: float, retrain_seconds: float) -> int | None:
    """Smallest K with F + K·u <= K·r, or None when a request costs at least a retrain."""
    if retrain_seconds <= request_seconds:
        return None
    return max(1, math.ceil(fixed_seconds / (retrain_seconds - request_seconds)))


def amortized_cost(run: Run, forget_sets: Sequence[Sequence[int]], models: dict[str, str],
                   collect_seconds: dict[str, float]) -> dict:
    """{variant: {"fixed_s", "collect_s", "train_s", "request_s", "retrain_s", "break_even"}} from a run's metrics.

    collect_seconds: each variant's zoo collection time (a variant trained on two zoos pays for
    both). request_s and retrain_s are means over the forget sets' metrics.json; break_even is K*
    or None.
    """
    per_set = [read_json(run.forget_dir(f) / "metrics.json")["methods"] for f in forget_sets]
    retrain = [m["retrain"]["wall_seconds"] for m in per_set if m.get("retrain", {}).get("wall_seconds")]
    out = {}
    for variant, model_dir in models.items():
        summary = Path(model_dir) / "summary.json"
        requests = [m[variant]["wall_seconds"] for m in per_set if m.get(variant, {}).get("wall_seconds")]
        if not summary.exists() or not requests or not retrain:
            continue
        train_s = float(read_json(summary).get("seconds", 0.0))
        u, r = sum(requests) / len(requests), sum(retrain) / len(retrain)
        collect_s = float(collect_seconds[variant])
        fixed = collect_s + train_s
        out[variant] = {"collect_s": round(collect_s, 3), "train_s": round(train_s, 3),
                        "fixed_s": round(fixed, 3), "request_s": round(u, 4), "retrain_s": round(r, 4),
                        "break_even": break_even(fixed, u, r)}
    return out
