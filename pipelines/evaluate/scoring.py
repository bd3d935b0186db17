"""The scores of one row: the context of a forget set (data splits, reference outputs) and score_population."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from hyperforget.pipelines import attacks as za
from hyperforget.pipelines.evaluate.config import EvalConfig, Population
from hyperforget.pipelines.evaluate.representation import probe_forget_accuracy, relearn_steps
from hyperforget.pipelines.metrics import summarize
from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.mlp import MLPSpec, model_logits


def _acc(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(M, N, C), (N,) -> (M,) accuracy (NaN without examples)."""
    if len(y) == 0:
        return np.full(logits.shape[0], np.nan)
    return (logits.argmax(-1) == y[None]).mean(1)


def _subsample(n: int, cap: int, seed: int) -> np.ndarray:
    if n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:cap])


@dataclass
class Context:
    """One forget set's data splits and what every row is scored against (the reference half's outputs)."""

    spec: MLPSpec
    forget: tuple[int, ...]
    retain: tuple[int, ...]
    x: dict  # split name -> (N, D) tensor: "df", "dr", "test", "test_r", "test_f", "fit"
    y: dict  # split name -> (N,) int64 numpy
    ref: torch.Tensor  # (R/2, P) reference retrained models
    neg: torch.Tensor  # (R/4, P) retrained models that are the attacks' negatives
    floor: torch.Tensor  # (R/4, P) retrained models scored as the floor row
    conf_ref: np.ndarray  # (R/2, N_f) φ of the reference on D_f
    conf_neg: np.ndarray  # (R/4, N_f) φ of the negatives on D_f
    ref_logits: dict  # split -> (R/2, N, C) reference logits for JSD
    retrained_acc: dict  # RA_R, TA_R and other accuracies of the reference half (means)
    retrained_mia: dict  # "entropy", "loss": mean MIA of the reference half
    original_forget_test_acc: float
    relearn_subset: tuple[torch.Tensor, torch.Tensor]
    retrain_seconds: float
    config: EvalConfig


def build_context(run, forget, retain, ref, neg, floor, retrain_seconds, cfg) -> Context:
    """The subsampled splits, the relearning subset and the reference half's outputs and scores."""
    d = run.data()
    y_fit, y_test = d.y_fit.numpy(), d.y_test.numpy()
    fmask = np.isin(y_fit, forget)
    idx_f = np.flatnonzero(fmask)[_subsample(int(fmask.sum()), cfg.max_forget_examples, 1)]
    idx_r = np.flatnonzero(~fmask)[_subsample(int((~fmask).sum()), cfg.max_examples, 2)]
    idx_t = _subsample(len(y_test), cfg.max_examples, 3)
    tf = np.isin(y_test, forget)
    if idx_f.size == 0:
        raise HyperForgetError(f"the fit split has no examples of forget classes {list(forget)}; nothing to evaluate")
    if not tf.any():
        raise HyperForgetError(f"the test split has no examples of forget classes {list(forget)}")
    x = {"df": d.x_fit[idx_f], "dr": d.x_fit[idx_r], "test": d.x_test[idx_t], "test_r": d.x_test[~tf],
         "test_f": d.x_test[tf], "fit": d.x_fit}
    y = {"df": y_fit[idx_f], "dr": y_fit[idx_r], "test": y_test[idx_t], "test_r": y_test[~tf],
         "test_f": y_test[tf], "fit": y_fit}
    # Relearning subset: a few training examples per class, forget classes included.
    rng = np.random.default_rng(4)
    sub = np.concatenate([rng.permutation(np.flatnonzero(y_fit == c))[:cfg.relearn_per_class]
                          for c in range(run.spec.num_classes)])
    spec = run.spec
    original = run.original_params()[None]
    orig_acc = _acc(model_logits(spec, original, x["test_f"]).numpy(), y["test_f"])[0]
    ctx = Context(spec, forget, retain, x, y, ref, neg, floor,
                   conf_ref=za.logit_scaled_confidence(model_logits(spec, ref, x["df"]).numpy(), y["df"]),
                   conf_neg=za.logit_scaled_confidence(model_logits(spec, neg, x["df"]).numpy(), y["df"]),
                   ref_logits={s: model_logits(spec, ref, x[s]).numpy() for s in ("df", "test_r", "test_f")},
                   retrained_acc={}, retrained_mia={}, original_forget_test_acc=float(orig_acc),
                   relearn_subset=(d.x_fit[sub], d.y_fit[sub]), retrain_seconds=retrain_seconds, config=cfg)
    # Retrained reference values come from the reference half, which no row (the floor included) reuses.
    acc = accuracies(ctx, ref, ())
    ctx.retrained_acc = {k: float(np.nanmean(v)) for k, v in acc.items()}
    k = min(ref.shape[0], cfg.probe_models)
    ctx.retrained_acc["probe"] = float(np.mean(probe_forget_accuracy(spec, ref[:k], x["fit"], y["fit"],
                                                                     x["test"], y["test"], forget)))
    mia = _mia(ctx, ref, ())
    ctx.retrained_mia = {key: float(np.nanmean(v)) for key, v in mia.items()}
    return ctx


def _mia(ctx: Context, params: torch.Tensor, masked: Sequence[int]) -> dict:
    from hyperforget.pipelines import metrics as zm

    k = min(params.shape[0], ctx.config.mia_models)
    out = {"entropy": [], "loss": []}
    lg = {s: model_logits(ctx.spec, params[:k], ctx.x[s], masked).numpy() for s in ("dr", "test", "df")}
    for m in range(k):
        p = {s: zm.softmax(lg[s][m]) for s in lg}
        out["entropy"].append(zm.entropy_mia(p["dr"], p["test"], p["df"]))
        out["loss"].append(zm.loss_mia(p["dr"], ctx.y["dr"], p["test"], ctx.y["test"], p["df"], ctx.y["df"]))
    return {key: np.array(v) for key, v in out.items()}


def accuracies(ctx: Context, params: torch.Tensor, masked: Sequence[int]) -> dict:
    """(M,) accuracy per split: retain_train, forget_train, test_retain, test_forget, test."""
    acc = {}
    for split, key in (("dr", "retain_train"), ("df", "forget_train"), ("test_r", "test_retain"),
                       ("test_f", "test_forget"), ("test", "test")):
        acc[key] = _acc(model_logits(ctx.spec, params, ctx.x[split], masked).numpy(), ctx.y[split])
    return acc


def score_population(ctx: Context, pop: Population) -> dict:
    """Every score of one row (see the package docstring, step 3). Returns a JSON-ready dict."""
    cfg = ctx.config
    params = pop.params
    neg_conf = ctx.conf_neg
    acc = accuracies(ctx, params, pop.masked)
    conf_u = za.logit_scaled_confidence(model_logits(ctx.spec, params, ctx.x["df"], pop.masked).numpy(), ctx.y["df"])
    thr = za.calibrated_threshold_attack(conf_u, neg_conf, ctx.conf_ref, cfg.target_fpr)
    lira = za.ulira_attack(conf_u, neg_conf, ctx.conf_ref, cfg.target_fpr)
    eps = za.per_example_epsilon(conf_u, neg_conf, cfg.delta)
    f = za.forgetting_quality(eps)
    ra_u, ta_u = float(np.nanmean(acc["retain_train"])), float(np.nanmean(acc["test_retain"]))
    final = za.challenge_score(f, ra_u, ctx.retrained_acc["retain_train"], ta_u, ctx.retrained_acc["test_retain"])
    mia = _mia(ctx, params, pop.masked)
    jsd = {}
    for split, key in (("df", "forget_train"), ("test_r", "test_retain"), ("test_f", "test_forget")):
        lg = model_logits(ctx.spec, params, ctx.x[split], pop.masked).numpy()
        jsd[key] = summarize(za.jsd_to_population(lg, ctx.ref_logits[split]))
    kp, kr = min(params.shape[0], cfg.probe_models), min(params.shape[0], cfg.relearn_models)
    probe = probe_forget_accuracy(ctx.spec, params[:kp], ctx.x["fit"], ctx.y["fit"], ctx.x["test"], ctx.y["test"],
                                  ctx.forget)
    level = cfg.relearn_level * ctx.original_forget_test_acc
    relearn = relearn_steps(ctx.spec, params[:kr], *ctx.relearn_subset, ctx.x["test_f"],
                            torch.as_tensor(ctx.y["test_f"]), level, max_steps=cfg.relearn_max_steps,
                            lr=cfg.relearn_lr)
    cost = None
    if pop.seconds_per_model is not None:
        frac = pop.seconds_per_model / ctx.retrain_seconds if ctx.retrain_seconds > 0 else math.nan
        cost = {"seconds_per_model": pop.seconds_per_model, "fraction_of_retrain": frac,
                "under_20pct": bool(frac < 0.2)}
    return {
        "name": pop.name, "kind": pop.kind, "num_models": int(params.shape[0]), "masked": list(pop.masked),
        "note": pop.note, **pop.extra,
        "accuracy": {k: summarize(v) for k, v in acc.items()},
        "attacks": {"calibrated_threshold": thr.to_dict(), "ulira": lira.to_dict()},
        "epsilon": {"F": f, "final_score": final, "median": float(np.median(eps)),
                    "fraction_infinite": float(np.isinf(eps).mean()),
                    "histogram": np.bincount(np.digitize(eps, np.arange(za.EPS_NUM_BINS) * za.EPS_BIN_WIDTH),
                                             minlength=za.EPS_NUM_BINS + 1)[1:].tolist(),
                    "ra_ratio": ra_u / ctx.retrained_acc["retain_train"],
                    "ta_ratio": ta_u / ctx.retrained_acc["test_retain"]},
        "mia": {key: {**summarize(v), "minus_retrained": (float(np.nanmean(v)) - ctx.retrained_mia[key])}
                for key, v in mia.items()},
        "jsd_to_retrained": jsd,
        "probe_forget_acc": {**summarize(probe), "retrained": ctx.retrained_acc["probe"]},
        "relearn": {"level": level, "steps": summarize(relearn), "reached": int(np.isfinite(relearn).sum()),
                    "tried": int(kr), "max_steps": cfg.relearn_max_steps},
        "cost": cost,
        # Per-model accuracies for the retain-vs-forget plot (a few hundred at most).
        "per_model": {k: np.asarray(acc[k][:256]).tolist() for k in ("test_retain", "test_forget")},
    }
