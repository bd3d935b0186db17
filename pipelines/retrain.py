"""The original model and the gold standard: the same MLP retrained from scratch without the forget classes.

Both are trained in lockstep (zoo.lockstep.train_models: all seeds in one batched pass) with the
zoo's optimizer settings, on the run's fit split (the training split minus validation). A
retrained model never sees a forget-class example: those rows are dropped from its data, so the
number of steps per epoch is that of the retain data.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from typing import Iterable, Sequence

import numpy as np
import torch

from hyperforget.pipelines.rundir import Run, RunConfig, create_run, eval_split, forget_dir_name, params_sha256
from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.files import write_json
from hyperforget.zoo.mlp import MLPSpec, save_mlps


def train_mlps(spec: MLPSpec, x: torch.Tensor, y: torch.Tensor, seeds: Sequence[int], *, epochs: int,
               lr: float = 0.1, batch_size: int = 128) -> torch.Tensor:
    """Train len(seeds) MLPs from their seeded initializations on (x (N, D), y (N,)) -> (R, P)."""
    from hyperforget.zoo.lockstep import train_models

    if len(x) == 0:
        raise HyperForgetError("no training examples left to train on")
    params = train_models(spec, x, y, list(int(s) for s in seeds), epochs=int(epochs), lr=float(lr),
                          batch_size=int(batch_size))
    return torch.as_tensor(params, dtype=torch.float32).detach().cpu().reshape(len(seeds), spec.num_params)


def retrain_without(spec: MLPSpec, x: torch.Tensor, y: torch.Tensor, forget: Sequence[int],
                    seeds: Sequence[int], *, epochs: int, lr: float = 0.1, batch_size: int = 128) -> torch.Tensor:
    """(R, P) models trained from scratch on the examples whose label is not in forget."""
    keep = ~torch.isin(torch.as_tensor(y), torch.as_tensor(list(forget), dtype=torch.long))
    return train_mlps(spec, x[keep], y[keep], seeds, epochs=epochs, lr=lr, batch_size=batch_size)


def keep_converged(val_acc: np.ndarray, wanted: int, margin: float | None) -> tuple[list[int], list[int]]:
    """Indices of the first ``wanted`` models (in seed order) that trained successfully.

    A model failed when its validation accuracy is more than ``margin`` below the best model's
    (None: none failed). Returns (kept indices, failed indices among those passed over).
    """
    acc = np.asarray(val_acc, dtype=np.float64)
    ok = np.ones(len(acc), dtype=bool) if margin is None else np.nan_to_num(acc, nan=-1.0) >= np.nanmax(acc) - margin
    keep = [i for i in range(len(acc)) if ok[i]][:wanted]
    if len(keep) < wanted:
        raise HyperForgetError(f"only {len(keep)} of {len(acc)} seeds trained successfully (validation accuracy "
                               f"within {margin} of the best); raise spare_seeds or failure_margin in the run config")
    return keep, [i for i in range(keep[-1] + 1) if not ok[i]]


def _keep(run: Run, params: torch.Tensor, seeds: Sequence[int], retain: Sequence[int], wanted: int,
          margin: float | None) -> tuple[torch.Tensor, list[int], list[dict]]:
    acc = eval_split(run, params, "val").acc[:, list(retain)].mean(1)  # (R,) mean retain-class accuracy
    keep, failed = keep_converged(acc, wanted, margin)
    return params[keep], [int(seeds[i]) for i in keep], [{"seed": int(seeds[i]), "val_acc": float(acc[i])}
                                                         for i in failed]


def _spares(seeds: Sequence[int], n: int) -> list[int]:
    top = max(seeds)
    return [int(s) for s in seeds] + [top + 1 + i for i in range(n)]


def _summary(run: Run, params: torch.Tensor) -> dict:
    out = {}
    for split in ("fit", "val", "test"):
        m = eval_split(run, params, split)
        out[split] = {"acc": m.acc, "loss": m.loss, "total_acc": m.total_acc, "total_loss": m.total_loss}
    return out


def init_run(path, config: RunConfig, *, forget_sets: Iterable[Sequence[int]] = ()) -> Run:
    """Create (or reopen) a run directory and train its original model when missing."""
    run = create_run(path, config, forget_sets=forget_sets)
    if not (run.path / "original" / "model.safetensors").exists():
        train_original_into(run)
    return run


def train_original_into(run: Run, *, force: bool = False) -> torch.Tensor:
    """Train the model to unlearn (all task classes) -> RUN/original/model.safetensors + original.json."""
    path = run.path / "original" / "model.safetensors"
    if path.exists() and not force:
        return run.original_params()
    c = run.config
    d = run.data()
    t0 = time.perf_counter()
    seeds = _spares([c.seed], c.spare_seeds if c.failure_margin is not None else 0)
    trained = train_mlps(run.spec, d.x_fit, d.y_fit, seeds, epochs=c.epochs, lr=c.lr, batch_size=c.batch_size)
    params, kept, dropped = _keep(run, trained, seeds, range(run.num_classes), 1, c.failure_margin)
    wall = time.perf_counter() - t0
    path.parent.mkdir(parents=True, exist_ok=True)
    save_mlps(str(path), run.spec, params[0], {"method": "original", "seed": kept[0]})
    write_json(run.path / "original" / "original.json",
               {"seed": kept[0], "dropped_seeds": dropped, "epochs": c.epochs, "lr": c.lr,
                "batch_size": c.batch_size,
                "trained_on": "fit split (training split minus validation), all task classes",
                "run_config": asdict(c), "wall_seconds": wall, "sha256": params_sha256(params[0]),
                "metrics": _summary(run, params)})
    run.note(timing=("original_s", wall))
    return params[0]


def retrain_into(run: Run, forget: Sequence[int], *, seeds: Sequence[int] | None = None,
                 force: bool = False) -> torch.Tensor:
    """Retrain without forget for several seeds -> RUN/forget-X/retrain/models.safetensors + record.json.

    Skips the work when the file exists with the same seeds (resumable stages).
    """
    from hyperforget.zoo.files import read_json

    forget = run.check_forget(forget)
    run.note(forget=forget)
    seeds = tuple(int(s) for s in (seeds if seeds is not None else run.config.retrain_seeds))
    if not seeds:
        raise HyperForgetError("retraining needs at least one seed, e.g. --seeds 5")
    out = run.forget_dir(forget) / "retrain"
    if (out / "models.safetensors").exists() and (out / "record.json").exists() and not force:
        if tuple(read_json(out / "record.json").get("seeds", ())) == seeds:
            from hyperforget.zoo.mlp import load_mlps

            return load_mlps(str(out / "models.safetensors"))[1]
    c = run.config
    d = run.data()
    t0 = time.perf_counter()
    trained_seeds = _spares(seeds, c.spare_seeds if c.failure_margin is not None else 0)
    trained = retrain_without(run.spec, d.x_fit, d.y_fit, forget, trained_seeds, epochs=c.epochs, lr=c.lr,
                              batch_size=c.batch_size)
    retain = [k for k in range(run.num_classes) if k not in forget]
    params, kept, dropped = _keep(run, trained, trained_seeds, retain, len(seeds), c.failure_margin)
    wall = time.perf_counter() - t0
    out.mkdir(parents=True, exist_ok=True)
    save_mlps(str(out / "models.safetensors"), run.spec, params, {"method": "retrain", "forget": list(forget)})
    summary = _summary(run, params)
    write_json(out / "record.json", {
        "method": "retrain", "kind": "gold standard", "forget": list(forget),
        "retain": retain, "seeds": list(seeds), "kept_seeds": kept, "dropped_seeds": dropped,
        "failure_margin": c.failure_margin,
        "epochs": c.epochs, "lr": c.lr, "batch_size": c.batch_size,
        "trained_on": "fit split without the forget classes",
        # All seeds train in one lockstep pass; per-model time is the fair comparison with one unlearned model.
        "wall_seconds": wall / len(trained_seeds), "timings": {"total_s": wall, "models_trained": len(trained_seeds)},
        "metrics": summary,
        "summary": {"retain_acc_test": float(np.nanmean(np.asarray(summary["test"]["acc"])[:, retain])),
                    "forget_acc_test": float(np.nanmean(np.asarray(summary["test"]["acc"])[:, list(forget)]))},
    })
    run.note(timing=(f"retrain_{forget_dir_name(forget)}_s", wall))
    return params
