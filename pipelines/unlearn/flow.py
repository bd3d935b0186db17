"""Unlearning one forget set with one method: DiHyFo sampling and selection, zoo retrieval or a baseline.

:func:`unlearn` applies the method named by :class:`UnlearnConfig` to the run's original model
and saves the result (model.safetensors, record.json) under RUN/forget-X/METHOD.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from hyperforget.pipelines.retrieval import unlearn_by_retrieval
from hyperforget.pipelines.rundir import (DIHYFO_METHODS, RETRIEVAL_METHOD, Run, eval_split, forget_dir_name,
                                          params_sha256)
from hyperforget.pipelines.unlearn.prompts import LossStats, PromptConfig, build_prompts
from hyperforget.pipelines.unlearn.selection import per_class_accuracy, select_best, split_accuracy
from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.files import write_json
from hyperforget.zoo.mlp import MLP, model_logits, save_mlps


@dataclass
class UnlearnConfig:
    """How one unlearning method is applied to the run's original model."""

    method: str = "dihyfo1"  # dihyfo1, dihyfo2, zoo_retrieval or a name in pipelines.baselines.BASELINES
    candidates: int = 32  # K candidates sampled per selected model (DiHyFo)
    repeats: int = 5  # selected models per method (the paper averages 5 sampled unlearned models)
    start: str = "model"  # DiHyFo-1 starting point: "model" (the model to unlearn) or "noise"
    # classifier-free guidance: "auto" (the model's default), None, a scale or a list of scales
    guidance: str | float | list | None = "auto"
    sampler: str = "ddim"  # sampling method of the hypernetwork
    steps: int = 50  # denoising steps
    sample_batch: int = 64  # candidates per sampler call (bounds memory)
    seed: int = 0  # sampling / baseline seed
    tolerance: float = 0.0  # forget-accuracy tie tolerance in selection (0 = strict, Appendix A.1)
    prompts: PromptConfig = field(default_factory=PromptConfig)  # target losses
    overrides: dict = field(default_factory=dict)  # baseline hyper-parameters that replace defaults

    def __post_init__(self) -> None:
        if isinstance(self.prompts, dict):
            self.prompts = PromptConfig(**self.prompts)
        if self.candidates < 1 or self.repeats < 1:
            raise HyperForgetError(f"candidates and repeats must be >= 1, got {self.candidates}, {self.repeats}")
        if self.start not in ("model", "noise"):
            raise HyperForgetError(f"unknown DiHyFo-1 start {self.start!r}: use model or noise")
        if isinstance(self.guidance, str) and self.guidance != "auto":
            raise HyperForgetError(f"guidance {self.guidance!r}: use 'auto', None, a scale or a list of scales")
        if isinstance(self.guidance, (list, tuple)) and not self.guidance:
            raise HyperForgetError("guidance lists need at least one scale")


def _row_guidance(guidance, rows: slice):
    """The guidance for one sampler call: a list gives scales cycled over all candidate rows."""
    if isinstance(guidance, (list, tuple)):
        return [float(guidance[i % len(guidance)]) for i in range(rows.start, rows.stop)]
    return guidance


def _progress():
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), transient=True)


def unlearn(run: Run, forget: Sequence[int], config: UnlearnConfig, *, model_dir: str | None = None,
            out: str | os.PathLike | None = None) -> dict:
    """Apply one method to the run's original model and save it under RUN/forget-X/METHOD (or out).

    Returns the method's record (also written to record.json).
    """
    method = config.method
    forget = run.check_forget(forget, dihyfo=method in DIHYFO_METHODS or model_dir is not None)
    run.note(forget=forget)
    out_dir = Path(out) if out is not None else run.forget_dir(forget) / method
    if method in DIHYFO_METHODS or model_dir is not None:
        record = _unlearn_dihyfo(run, forget, config, model_dir, out_dir)
    elif method == RETRIEVAL_METHOD:
        record = unlearn_by_retrieval(run, forget, config, out_dir, select_best=select_best,
                                      split_accuracy=split_accuracy, write_json=write_json,
                                      params_sha256=params_sha256)
    else:
        record = _unlearn_baseline(run, forget, config, out_dir)
    return record


def _unlearn_dihyfo(run: Run, forget: tuple[int, ...], config: UnlearnConfig, model_dir: str | None,
                    out_dir: Path) -> dict:
    from hyperforget.hyper.sample import load_hypernetwork

    t_start = time.perf_counter()
    if model_dir is None:
        model_dir = run.config.models.get(config.method)
        if model_dir is None:
            raise HyperForgetError(f"run {run.path} has no {config.method} hypernetwork: pass --model MODEL_DIR")
    net = load_hypernetwork(str(model_dir))
    variant = str(net.variant)
    if config.method in DIHYFO_METHODS and variant != config.method:
        raise HyperForgetError(f"{model_dir} holds a {variant} hypernetwork, not {config.method}: "
                               f"pass --method {variant} or the other model directory")
    config.method = variant
    if net.spec != run.spec:
        raise HyperForgetError(f"hypernetwork {model_dir} makes {net.spec} MLPs, the run needs {run.spec}: "
                               "use a run made from the same zoo")
    if out_dir == run.forget_dir(forget) / "dihyfo" or out_dir.name in DIHYFO_METHODS:
        out_dir = out_dir.parent / variant
    run.note(model=(variant, str(model_dir)))
    t_load = time.perf_counter() - t_start

    # Prompts from the loss statistics the hypernetwork saved of its zoo (per-class test losses).
    t0 = time.perf_counter()
    stats = LossStats(net.loss_stats)
    prompts = build_prompts(stats, forget, config.candidates, config.prompts)  # (K, C)
    t_prompts = time.perf_counter() - t0

    k, r = config.candidates, config.repeats
    targets = torch.as_tensor(np.tile(prompts, (r, 1)))  # (R*K, C)
    original = run.original_params()  # (P,)
    current_params = current_losses = None
    original_test = eval_split(run, original[None], "test")
    if variant == "dihyfo1" and config.start == "model":
        current_params = original[None].expand(r * k, -1).contiguous()  # (R*K, P)
        current_losses = torch.as_tensor(original_test.loss).expand(r * k, -1).contiguous()  # (R*K, C)

    # Sample all candidates in a few batched calls.
    t0 = time.perf_counter()
    chunks = []
    with _progress() as progress:
        task = progress.add_task(f"sampling {variant} {forget_dir_name(forget)}", total=r * k)
        for i0 in range(0, r * k, config.sample_batch):
            sl = slice(i0, min(i0 + config.sample_batch, r * k))
            chunk = net.sample(targets[sl], None if current_params is None else current_params[sl],
                               None if current_losses is None else current_losses[sl],
                               method=config.sampler, steps=config.steps, seed=config.seed + i0,
                               guidance=_row_guidance(config.guidance, sl))
            chunks.append(torch.as_tensor(chunk, dtype=torch.float32).detach().cpu())
            progress.advance(task, sl.stop - sl.start)
    candidates = torch.cat(chunks)  # (R*K, P)
    t_sample = time.perf_counter() - t0
    if candidates.shape != (r * k, run.spec.num_params):
        raise HyperForgetError(f"the sampler returned shape {tuple(candidates.shape)}, "
                               f"expected {(r * k, run.spec.num_params)}")

    # Select on the validation split; the test losses only feed the report's alignment figure.
    t0 = time.perf_counter()
    finite = torch.isfinite(candidates).all(1)
    safe = torch.where(finite[:, None], candidates, torch.zeros_like(candidates))
    val = eval_split(run, safe, "val")
    f_acc, r_acc = split_accuracy(val.acc, forget)
    f_acc[~finite.numpy()] = np.nan
    r_acc[~finite.numpy()] = np.nan
    chosen = [g * k + select_best(f_acc[g * k:(g + 1) * k], r_acc[g * k:(g + 1) * k], config.tolerance)
              for g in range(r)]
    t_select = time.perf_counter() - t0
    selected = candidates[chosen]  # (R, P), exactly as sampled
    if not torch.isfinite(selected).all():
        raise HyperForgetError(f"every {variant} candidate in a group had NaN parameters; retrain the hypernetwork")
    test = eval_split(run, safe, "test")
    wall = t_load + t_prompts + t_sample + t_select

    out_dir.mkdir(parents=True, exist_ok=True)
    meta = {"method": variant, "forget": list(forget)}
    save_mlps(str(out_dir / "model.safetensors"), run.spec, selected, meta)
    save_mlps(str(out_dir / "candidates.safetensors"), run.spec, candidates, meta)
    record = {
        "method": variant, "kind": "dihyfo", "forget": list(forget),
        "retain": [c for c in range(run.num_classes) if c not in forget],
        "model_dir": str(model_dir), "zoo": run.config.zoo, "config": asdict(config),
        "prompts": prompts, "zoo_loss_stats": stats.summary(),
        "original_test_loss": original_test.loss[0],
        "candidates": {"val_acc": val.acc, "val_loss": val.loss, "test_loss": test.loss, "test_acc": test.acc,
                       "forget_acc_val": f_acc, "retain_acc_val": r_acc, "finite": finite.numpy(),
                       "target_loss": targets.numpy()},
        "selected": chosen, "selected_sha256": [params_sha256(p) for p in selected],
        "selected_val": {"forget_acc": f_acc[chosen], "retain_acc": r_acc[chosen]},
        "timings": {"load_s": t_load, "prompts_s": t_prompts, "sample_s": t_sample, "select_s": t_select,
                    "per_model_s": wall / r},
        "wall_seconds": wall / r,
        "note": "selected parameters are saved exactly as sampled (no edit, clip or fine-tune)",
    }
    write_json(out_dir / "record.json", record)
    return record


def _unlearn_baseline(run: Run, forget: tuple[int, ...], config: UnlearnConfig, out_dir: Path) -> dict:
    from hyperforget.pipelines.baselines import BASELINES, run_baseline

    if config.method not in BASELINES:
        names = ", ".join([*DIHYFO_METHODS, *BASELINES])
        raise HyperForgetError(f"unknown unlearning method {config.method!r}: choose one of {names}")
    d = run.data()
    original = run.original_params()
    models, walls, masks = [], [], set()
    with _progress() as progress:
        task = progress.add_task(f"{config.method} {forget_dir_name(forget)}", total=config.repeats)
        for i in range(config.repeats):
            model = MLP.from_flat(run.spec, original)
            module, wall = run_baseline(config.method, model, d.x_fit, d.y_fit, list(forget),
                                        config.seed + i, **config.overrides)
            params, mask = _module_params(module)
            models.append(params)
            masks.update(mask)
            walls.append(float(wall))
            progress.advance(task)
    if not torch.equal(run.original_params(), original):
        raise AssertionError("a baseline changed the original model on disk")
    params = torch.stack(models)  # (R, P)
    diverged = int((~torch.isfinite(params).all(1)).sum())
    if diverged:  # refuse before saving: a NaN model on disk would stop every later stage of the run
        raise HyperForgetError(f"{config.method} diverged on forget set {list(forget)}: {diverged} of its "
                               f"{len(params)} models hold NaN or infinite parameters, so none was saved; leave "
                               f"it out (--methods) or give it a smaller learning rate")
    output_mask = sorted(masks)
    with torch.no_grad():
        val_logits = model_logits(run.spec, params, d.x_val, output_mask)  # (R, N_val, C)
    val_acc = per_class_accuracy(val_logits, d.y_val, run.num_classes)
    f_acc, r_acc = split_accuracy(val_acc, forget)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_mlps(str(out_dir / "model.safetensors"), run.spec, params, {"method": config.method, "forget": list(forget),
                                                                     "output_mask": output_mask})
    spec_entry = BASELINES[config.method]
    record = {
        "method": config.method, "kind": "baseline", "forget": list(forget),
        "retain": [c for c in range(run.num_classes) if c not in forget],
        "config": asdict(config),
        "hyperparameters": {"defaults": spec_entry.defaults, "overrides": config.overrides,
                            "effective": {**spec_entry.defaults, **config.overrides}},
        "reference": spec_entry.reference, "notes": spec_entry.notes,
        # Classes whose logits the method masks to -inf at inference (the logit_mask control); the
        # saved parameters are then the original's and every evaluation applies the mask.
        "output_mask": output_mask,
        "wall_seconds": float(np.mean(walls)), "timings": {"wall_s": walls},
        "selected_sha256": [params_sha256(p) for p in params],
        "metrics_val": {"acc": val_acc, "forget_acc": f_acc, "retain_acc": r_acc},
    }
    write_json(out_dir / "record.json", record)
    return record


def _module_params(module) -> tuple[torch.Tensor, list[int]]:
    """A baseline's module -> ((P,) parameters, classes whose logits it masks)."""
    from hyperforget.pipelines.baselines import LogitMaskedMLP

    if isinstance(module, LogitMaskedMLP):
        return module.flat_params().detach().clone(), list(module.forget)
    if isinstance(module, MLP):
        return module.flat_params().detach().clone(), []
    raise HyperForgetError(f"baseline returned a {type(module).__name__}, which is not an MLP; "
                           "it cannot be saved as a parameter vector")
