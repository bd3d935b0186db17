"""Zoo retrieval: unlearning by looking the answer up in the zoo, the hypernetworks' control.

The zoo already holds checkpoints that forgot classes (its deletion and undersampling runs). The
``zoo_retrieval`` method ranks the zoo's checkpoints by one SQL query over their metadata
(``queries/sql/retrieval.sql``: lowest forget accuracy, then highest retain accuracy) and keeps
the top R·K as candidates; R groups of K (dealt round-robin, so every group gets a similar share
of the ranking) then go through the same selection rule on the same validation split as DiHyFo's
sampled candidates. A hypernetwork that does not beat this adds nothing a query does not.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from hyperforget.queries.engine import render, run_query, sql_template
from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.mlp import evaluate_per_class, save_mlps

METHOD = "zoo_retrieval"  # pipelines.rundir.RETRIEVAL_METHOD


def retrieval_sql(forget: Sequence[int], num_classes: int) -> str:
    """The ranking query for a forget set (task labels), with ``$k`` as its row limit."""
    forget = sorted(int(f) for f in forget)
    retain = [c for c in range(num_classes) if c not in forget]
    if not forget or not retain:
        raise HyperForgetError(f"forget set {forget} must leave at least one of {num_classes} classes to retain")

    def mean(cols: list[int]) -> str:
        return "((" + " + ".join(f"acc_{c}" for c in cols) + f") / {len(cols)}.0)"

    return render(sql_template("retrieval"), {"forget_acc": mean(forget), "retain_acc": mean(retain)})


def retrieve_candidates(zoo: str, forget: Sequence[int], num_classes: int, count: int) -> tuple[np.ndarray, dict]:
    """The top ``count`` checkpoint ids of the ranking, and the query's columns as arrays."""
    if count < 1:
        raise HyperForgetError(f"need at least one retrieval candidate, got {count}")
    table = run_query(zoo, retrieval_sql(forget, num_classes), params={"k": int(count)}, timeout=None)
    if table.num_rows == 0:
        raise HyperForgetError(f"zoo {zoo} holds no checkpoint with finite accuracies to retrieve")
    cols = {name: table.column(name).to_numpy() for name in table.column_names}
    return cols["checkpoint_id"].astype(np.int64), cols


def unlearn_by_retrieval(run, forget: tuple[int, ...], config, out_dir: Path, *, select_best, split_accuracy,
                         write_json, params_sha256) -> dict:
    """Retrieve R·K zoo checkpoints, select one per group of K on the validation split, save as DiHyFo does.

    ``config`` is an UnlearnConfig (candidates K, repeats R, tolerance); the selection helpers are
    passed in by pipelines.unlearn so that both methods use the very same rule.
    """
    from hyperforget.zoo.store import open_zoo

    if not run.config.zoo:
        raise HyperForgetError(f"run {run.path} has no zoo to retrieve from: re-create it with --zoo ZOO")
    t_start = time.perf_counter()
    reader = open_zoo(run.config.zoo)
    if reader.spec != run.spec:
        raise HyperForgetError(f"zoo {run.config.zoo} holds {reader.spec} MLPs, the run needs {run.spec}")
    k, r = config.candidates, config.repeats
    ids, cols = retrieve_candidates(run.config.zoo, forget, run.num_classes, r * k)
    t_query = time.perf_counter() - t_start
    # Deal the ranking round-robin: group g gets ranks g, g + R, g + 2R, ...
    groups = [ids[g::r] for g in range(r)]
    if min(len(g) for g in groups) == 0:
        raise HyperForgetError(f"the zoo holds {len(ids)} candidates, fewer than the {r} groups asked for; "
                               "lower --repeats")
    order = np.concatenate(groups)
    candidates = torch.as_tensor(reader.read(order), dtype=torch.float32)  # (≤ R·K, P)
    bounds = np.cumsum([0] + [len(g) for g in groups])

    t0 = time.perf_counter()
    d = run.data()
    val = evaluate_per_class(run.spec, candidates, d.x_val, d.y_val)
    f_acc, r_acc = split_accuracy(val.acc, forget)
    chosen = [int(bounds[g] + select_best(f_acc[bounds[g]:bounds[g + 1]], r_acc[bounds[g]:bounds[g + 1]],
                                          config.tolerance)) for g in range(r)]
    t_select = time.perf_counter() - t0
    selected = candidates[chosen]
    wall = t_query + t_select

    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"method": METHOD, "forget": list(forget)}
    save_mlps(str(out_dir / "model.safetensors"), run.spec, selected, meta)
    save_mlps(str(out_dir / "candidates.safetensors"), run.spec, candidates, meta)
    rank_of = {int(i): n for n, i in enumerate(ids)}
    record = {
        "method": METHOD, "kind": "retrieval", "forget": list(forget),
        "retain": [c for c in range(run.num_classes) if c not in forget], "zoo": run.config.zoo,
        "config": asdict(config), "sql": retrieval_sql(forget, run.num_classes),
        "candidates": {"checkpoint_id": order, "zoo_forget_acc": cols["forget_acc"][[rank_of[int(i)] for i in order]],
                       "zoo_retain_acc": cols["retain_acc"][[rank_of[int(i)] for i in order]],
                       "forget_acc_val": f_acc, "retain_acc_val": r_acc},
        "selected": chosen, "selected_checkpoint_ids": order[chosen],
        "selected_sha256": [params_sha256(p) for p in selected],
        "selected_val": {"forget_acc": f_acc[chosen], "retain_acc": r_acc[chosen]},
        "timings": {"query_s": t_query, "select_s": t_select, "per_model_s": wall / r},
        "wall_seconds": wall / r,
        "note": "selected parameters are zoo checkpoints, unchanged",
    }
    write_json(out_dir / "record.json", record)
    return record
