"""Evaluation that unlearning researchers trust: every method against a population of retrained models.

For each forget set of a run directory (docs/format.md, "Unlearning run directory") this:

1. Trains ``n_retrained`` (default 128) MLPs from scratch without the forget classes, in lockstep
   (zoo.lockstep.train_models, several data orders), from seeds in a range disjoint from the run's
   and the zoo's seeds (checked against the zoo's metadata when the zoo is reachable). Half is the
   *reference* population (per-example Gaussians, mean prediction, MIA reference), the other half
   the *evaluation* population, split again: one quarter plays the negatives of every attack, the
   other quarter is the retrain-vs-retrain floor.
2. Builds the rows of every table: the floor (retrained quarter), the ceiling (the original model),
   each method found in RUN/forget-X (DiHyFo candidates and selected model, baselines with their
   repeats, topped up to ``baseline_seeds`` with pipelines.baselines.run_baseline), the logit-masking
   control, and the "nearest training checkpoint" control (the zoo checkpoint closest to each
   selected DiHyFo model, permutation-invariant L2).
3. Scores each row (pipelines.attacks, pipelines.metrics): accuracies; calibrated-threshold and U-LiRA attacks
   (AUC, TPR at 1% FPR); the challenge's ε score F and F·(RA_U/RA_R)·(TA_U/TA_R); entropy and loss
   MIA minus the retrained value; batch-mean JSD to the retrained mean prediction on D_f,
   retain-class test and forget-class test; a linear probe for the forget classes on the hidden
   layer; relearn steps; cost against retrain time and the challenge's 20% rule.
4. Writes RUN/evaluation/forget-X.{json,md}, eps_hist_forget-X.png, retain_vs_forget_forget-X.png.

Data: D_r / D_f are the retain / forget examples of the run's fit split (what the models trained
on); "test retain" / "test forget" split the dataset's test split by class.
"""

from __future__ import annotations

import itertools
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from hyperforget.pipelines import attacks as za
from hyperforget.pipelines.metrics import format_stat, summarize
from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.mlp import MLPSpec, batched_hidden, batched_logits, model_logits
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


# ----------------------------------------------------------------------------------------------
# Model outputs


def _acc(logits: np.ndarray, y: np.ndarray) -> np.ndarray:
    """(M, N, C), (N,) -> (M,) accuracy (NaN without examples)."""
    if len(y) == 0:
        return np.full(logits.shape[0], np.nan)
    return (logits.argmax(-1) == y[None]).mean(1)


def _subsample(n: int, cap: int, seed: int) -> np.ndarray:
    if n <= cap:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).permutation(n)[:cap])


# ----------------------------------------------------------------------------------------------
# Permutation-invariant distance to the zoo (the "nearest training checkpoint" control)


def _units(spec: MLPSpec, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(K, P) -> hidden units (K, H, D + 1 + C) [incoming weights, bias, outgoing weights], fc2 bias (K, C)."""
    w = spec.layout.unflatten(params)
    units = torch.cat([w["fc1.weight"], w["fc1.bias"][..., None], w["fc2.weight"].transpose(-1, -2)], -1)
    return units, w["fc2.bias"]


def permutation_invariant_distance(spec: MLPSpec, a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """min over hidden-unit permutations π of ‖a − π(b)‖₂, for one (P,) vector a and (K, P) vectors b.

    Permuting hidden units moves each unit's incoming row, bias and outgoing column together and
    leaves the function unchanged, so
    ‖a − π(b)‖² = Σ_h ‖unit_a(h) − unit_b(π(h))‖² + ‖b2_a − b2_b‖²,
    a linear assignment over an H×H cost matrix, solved exactly (all H! permutations when H ≤ 4,
    the Hungarian method otherwise). Sorting units into a canonical order would be cheaper but is
    not a minimum: two nearby networks can sort differently.
    """
    ua, ba = _units(spec, a[None].double())
    ub, bb = _units(spec, b.double())
    cost = torch.cdist(ua.expand(ub.shape[0], -1, -1), ub) ** 2  # (K, H, H)
    bias = ((bb - ba) ** 2).sum(-1)  # (K,)
    h = spec.hidden
    if math.factorial(h) <= 24:
        perms = torch.tensor(list(itertools.permutations(range(h))))  # (h!, H)
        rows = torch.arange(h)
        total = cost[:, rows[None, :], perms].sum(-1)  # (K, h!)
        best = total.min(1).values
    else:
        from scipy.optimize import linear_sum_assignment

        c = cost.numpy()
        best = torch.tensor([c[k][linear_sum_assignment(c[k])].sum() for k in range(len(c))])
    return torch.sqrt((best + bias).clamp_min(0)).numpy()


def nearest_zoo_checkpoint(zoo_path: str, spec: MLPSpec, target: torch.Tensor, *, max_rows: int | None = None,
                           chunk_rows: int = 8192) -> dict:
    """The zoo row nearest to target (P,) in permutation-invariant L2 -> {checkpoint_id, distance, params}.

    Permuted copies (perm_index > 0) are skipped: the distance is already permutation-invariant.
    """
    from hyperforget.zoo.store import open_zoo

    reader = open_zoo(zoo_path)
    if reader.spec != spec:
        raise HyperForgetError(f"zoo {zoo_path} holds {reader.spec} MLPs, the run's models are {spec}")
    stop = reader.num_rows if max_rows is None else min(reader.num_rows, int(max_rows))
    if stop == 0:
        raise HyperForgetError(f"zoo {zoo_path} has no committed checkpoints to compare with")
    meta = reader.metadata()
    original_row = (np.asarray(meta.column("perm_index").to_numpy()) == 0 if "perm_index" in meta.column_names
                    else np.ones(reader.num_rows, bool))
    best_d, best_id, scanned = math.inf, -1, 0
    for first, block in reader.iter_rows(chunk_rows, 0, stop):
        keep = np.flatnonzero(original_row[first:first + len(block)])
        if keep.size == 0:
            continue
        d = permutation_invariant_distance(spec, target, torch.as_tensor(block[keep]))
        scanned += keep.size
        j = int(np.argmin(d))
        if d[j] < best_d:
            best_d, best_id = float(d[j]), first + int(keep[j])
    params = torch.as_tensor(reader.read(np.array([best_id])), dtype=torch.float32)
    return {"checkpoint_id": best_id, "distance": best_d, "params": params, "rows_scanned": scanned}


# ----------------------------------------------------------------------------------------------
# Representation checks


def probe_forget_accuracy(spec: MLPSpec, params: torch.Tensor, x_train: torch.Tensor, y_train: np.ndarray,
                          x_test: torch.Tensor, y_test: np.ndarray, forget: Sequence[int]) -> np.ndarray:
    """Linear probe on the hidden layer: (M,) accuracy on forget-class test examples.

    A multinomial logistic regression per model is fitted on the hidden activations (H features,
    standardized) of the training examples of every class, labels = task classes, and scored on
    the test examples of the forget classes. A model whose forget class is only masked at the output
    keeps features that separate it; a retrained model's features were never shaped by it.
    """
    from sklearn.linear_model import LogisticRegression

    test_f = np.isin(y_test, list(forget))
    with torch.no_grad():
        h_tr = batched_hidden(spec, params, x_train).numpy()  # (M, N, H)
        h_te = batched_hidden(spec, params, x_test[torch.as_tensor(test_f)]).numpy()
    out = []
    for m in range(params.shape[0]):
        mu, sd = h_tr[m].mean(0), h_tr[m].std(0) + 1e-6
        clf = LogisticRegression(max_iter=500)
        clf.fit((h_tr[m] - mu) / sd, y_train)
        out.append(float((clf.predict((h_te[m] - mu) / sd) == y_test[test_f]).mean()))
    return np.array(out)


def relearn_steps(spec: MLPSpec, params: torch.Tensor, x_sub: torch.Tensor, y_sub: torch.Tensor,
                  x_eval: torch.Tensor, y_eval: torch.Tensor, level: float, *, max_steps: int, lr: float) -> np.ndarray:
    """Full-batch SGD steps on a small subset until forget-class accuracy ≥ level, per model.

    Args:
        params: (M, P) start points (the weights, not any output mask: whoever holds the weights can
            drop a mask). x_sub, y_sub: the relearning subset (forget and retain classes).
        x_eval, y_eval: forget-class test examples.
    Returns:
        (M,) steps; 0 when already at the level, NaN when max_steps did not reach it.
    """
    from hyperforget.zoo.lockstep import LockstepSGD

    opt = LockstepSGD(spec, params, lr, max_steps, momentum=0.9, nesterov=False, weight_decay=0.0,
                      schedule="constant")
    w = torch.ones(params.shape[0], len(y_sub))
    steps = np.full(params.shape[0], np.nan)
    for step in range(max_steps + 1):
        with torch.no_grad():
            acc = (batched_logits(spec, opt.params, x_eval).argmax(-1) == y_eval).float().mean(1).numpy()
        newly = np.isnan(steps) & (acc >= level)
        steps[newly] = step
        if not np.isnan(steps).any() or step == max_steps:
            break
        opt.step(x_sub, y_sub, w)
    return steps


# ----------------------------------------------------------------------------------------------
# The context of one forget set


@dataclass
class _Context:
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


def _mia(ctx: _Context, params: torch.Tensor, masked: Sequence[int]) -> dict:
    from hyperforget.pipelines import metrics as zm

    k = min(params.shape[0], ctx.config.mia_models)
    out = {"entropy": [], "loss": []}
    lg = {s: model_logits(ctx.spec, params[:k], ctx.x[s], masked).numpy() for s in ("dr", "test", "df")}
    for m in range(k):
        p = {s: zm.softmax(lg[s][m]) for s in lg}
        out["entropy"].append(zm.entropy_mia(p["dr"], p["test"], p["df"]))
        out["loss"].append(zm.loss_mia(p["dr"], ctx.y["dr"], p["test"], ctx.y["test"], p["df"], ctx.y["df"]))
    return {key: np.array(v) for key, v in out.items()}


def _accuracies(ctx: _Context, params: torch.Tensor, masked: Sequence[int]) -> dict:
    acc = {}
    for split, key in (("dr", "retain_train"), ("df", "forget_train"), ("test_r", "test_retain"),
                       ("test_f", "test_forget"), ("test", "test")):
        acc[key] = _acc(model_logits(ctx.spec, params, ctx.x[split], masked).numpy(), ctx.y[split])
    return acc


def score_population(ctx: _Context, pop: Population) -> dict:
    """Every score of one row (see the module docstring). Returns a JSON-ready dict."""
    cfg = ctx.config
    params = pop.params
    neg_conf = ctx.conf_neg
    acc = _accuracies(ctx, params, pop.masked)
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


# ----------------------------------------------------------------------------------------------
# Reference populations and seeds


def _used_seeds(run) -> tuple[set[int], str]:
    """Seeds the run and its zoo used, and a sentence on how far the check reached."""
    seeds = {int(run.config.seed), *[int(s) for s in run.config.retrain_seeds]}
    zoo = run.config.zoo
    if not zoo:
        return seeds, "the run names no zoo, so only the run's own seeds were checked"
    try:
        from hyperforget.zoo.store import open_zoo

        meta = open_zoo(zoo).metadata()
        zoo_seeds = {int(s) for s in np.unique(meta.column("seed").drop_null().to_numpy())}
    except HyperForgetError as exc:
        return seeds, f"the zoo {zoo} could not be read ({exc}), so only the run's own seeds were checked"
    except ImportError:
        return seeds, "hyperforget.zoo.store is not available, so only the run's own seeds were checked"
    return seeds | zoo_seeds, f"checked against the run's seeds and the {len(zoo_seeds)} run seeds of zoo {zoo}"


def reference_seeds(n: int, used: set[int], base: int = SEED_BASE) -> list[int]:
    """n consecutive seeds from base, moved up past any used seed (so none overlaps)."""
    start = base
    while True:
        seeds = list(range(start, start + n))
        clash = [s for s in seeds if s in used]
        if not clash:
            return seeds
        start = max(clash) + 1


def train_reference(run, forget: Sequence[int], seeds: Sequence[int], groups: int) -> tuple[torch.Tensor, float]:
    """(R, P) models trained from scratch without the forget classes, and the wall seconds.

    Lockstep groups share a minibatch order; each group gets its own (data_seed = its first seed),
    so the population varies in data order as well as initialization.
    """
    from hyperforget.zoo.lockstep import train_models

    d = run.data()
    keep = ~torch.isin(d.y_fit, torch.as_tensor(list(forget)))
    x, y = d.x_fit[keep], d.y_fit[keep]
    c = run.config
    out = []
    t0 = time.perf_counter()
    for chunk in np.array_split(np.asarray(seeds), min(groups, len(seeds))):
        out.append(train_models(run.spec, x, y, [int(s) for s in chunk], epochs=int(c.epochs), lr=float(c.lr),
                                batch_size=int(c.batch_size), data_seed=int(chunk[0])))
    return torch.cat(out).float(), time.perf_counter() - t0


# ----------------------------------------------------------------------------------------------
# Rows from the run directory


def _method_populations(run, forget, cfg: EvalConfig, log) -> tuple[list[Population], list[tuple[str, torch.Tensor]]]:
    """Rows of the methods in RUN/forget-X, and the selected DiHyFo models (for the nearest-checkpoint control)."""
    from hyperforget.pipelines.unlearn import DIHYFO_METHODS, load_method, method_dirs

    pops, selected = [], []
    for path in method_dirs(run, forget):
        name = path.name
        params, record = load_method(run, forget, name)
        secs = record.get("wall_seconds")
        if name in DIHYFO_METHODS or record.get("kind") in ("dihyfo", "retrieval"):
            cand_path = path / "candidates.safetensors"
            if cand_path.exists():
                cands = _load_candidates(cand_path, run.spec)
                finite = torch.isfinite(cands).all(1)
                what = "retrieved" if record.get("kind") == "retrieval" else "sampled"
                pops.append(Population(f"{name} (candidates)", "method", cands[finite], seconds_per_model=secs,
                                       note=f"{name}: all {int(finite.sum())} {what} candidates"))
            pops.append(Population(f"{name} (selected)", "method", params, seconds_per_model=secs,
                                   note=f"{name}: the selected model(s), chosen on the validation split"))
            selected.append((name, params[0]))
            continue
        if name == "logit_mask" or record.get("method") == "logit_mask":
            continue  # the evaluation builds its own exact logit-masking control
        params = _top_up_baseline(run, forget, name, params, record, cfg, log)
        pops.append(Population(name, "method", params, seconds_per_model=secs,
                               note=f"{name}: {params.shape[0]} runs with different seeds"))
    return pops, selected


def _load_candidates(path: Path, spec: MLPSpec) -> torch.Tensor:
    """(K, P) candidates as sampled. zoo.mlp.load_mlps rejects NaN rows, which a sampler may produce;
    those rows are dropped by the caller instead."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            params = f.get_tensor("params")
    except Exception as exc:  # safetensors raises several types for damaged files
        raise HyperForgetError(f"cannot read candidates {path}: {exc}; re-run the unlearning stage") from None
    spec.layout.check(params)
    return params.reshape(-1, spec.num_params).float()


def _top_up_baseline(run, forget, name, params, record, cfg: EvalConfig, log) -> torch.Tensor:
    if cfg.baseline_seeds == 0:
        return params  # keep the saved repeats as they are
    if params.shape[0] >= cfg.baseline_seeds:
        return params[:cfg.baseline_seeds]
    try:
        from hyperforget.pipelines.baselines import BASELINES, run_baseline
    except ImportError:
        log(f"hyperforget.pipelines.baselines is not available: {name} keeps its {params.shape[0]} saved model(s)")
        return params
    if name not in BASELINES:
        return params
    from hyperforget.zoo.mlp import MLP

    d = run.data()
    overrides = (record.get("hyperparameters") or {}).get("overrides") or {}
    base_seed = int((record.get("config") or {}).get("seed", 0)) + 10_000  # away from the saved repeats' seeds
    extra = []
    for i in range(cfg.baseline_seeds - params.shape[0]):
        module, _ = run_baseline(name, MLP.from_flat(run.spec, run.original_params()), d.x_fit, d.y_fit,
                                 list(forget), base_seed + i, **overrides)
        if not hasattr(module, "flat_params"):
            raise HyperForgetError(f"baseline {name} returned a {type(module).__name__} without flat_params(); "
                                   "it cannot be evaluated as an MLP")
        extra.append(torch.as_tensor(module.flat_params()).detach().float().reshape(-1))
    return torch.cat([params, torch.stack(extra)])


def _setup_seconds(run) -> dict:
    """Seconds spent on the zoo and on each hypernetwork: run.json timings, else the demo's demo.json.

    Keys naming "collect" or "zoo" count as zoo time; keys naming a DiHyFo variant as its
    hypernetwork's training time. Returns {"zoo": s or None, "train": {variant: s}, "sources": [...]}.
    """
    from hyperforget.pipelines.unlearn import DIHYFO_METHODS
    from hyperforget.zoo.files import read_json

    sources = [("run.json timings", run.meta.get("timings") or {})]
    demo = run.path.parent / "demo.json"
    if demo.exists():
        sources.append((str(demo) + " stages", (read_json(demo).get("stages") or {})))
    zoo, train, used = None, {}, []
    for label, timings in sources:
        for key, value in timings.items():
            k = key.lower()
            if any(w in k for w in ("retrain", "unlearn", "baseline", "report", "eval", "original")):
                continue
            if zoo is None and ("collect" in k or "zoo" in k):
                zoo = float(value)
                used.append(f"{label}: {key}")
            for variant in DIHYFO_METHODS:
                if variant in k and variant not in train:
                    train[variant] = float(value)
                    used.append(f"{label}: {key}")
    return {"zoo": zoo, "train": train, "sources": used}


# ----------------------------------------------------------------------------------------------
# Entry point


def evaluate(run_dir: str | Path, forget_sets: Sequence[Sequence[int]] | None = None, n_retrained: int = 128,
             *, baseline_seeds: int = 3, config: EvalConfig | None = None) -> dict:
    """Evaluate every method of a run against retrained populations -> {forget dir name: result}.

    Writes RUN/evaluation/forget-X.json, forget-X.md, eps_hist_forget-X.png and
    retain_vs_forget_forget-X.png for each forget set (default: every forget set in run.json).
    """
    from hyperforget.pipelines.unlearn import forget_dir_name, open_run, parse_classes
    from hyperforget.zoo.files import write_json

    cfg = config or EvalConfig(n_retrained=n_retrained, baseline_seeds=baseline_seeds)
    run = open_run(run_dir)
    if run.config.epochs is None:
        raise HyperForgetError(f"{run_dir}/run.json has no training epochs; re-create the run with the pipeline")
    sets = [run.check_forget(parse_classes(f)) for f in forget_sets] if forget_sets else run.forget_sets
    if not sets:
        raise HyperForgetError(f"run {run_dir} has no forget sets yet: unlearn one first, or pass --forget 2")
    out_dir = Path(run_dir) / "evaluation"
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for forget in sets:
        name = forget_dir_name(forget)
        if not run.forget_dir(forget).exists():
            raise HyperForgetError(f"{run.forget_dir(forget)} does not exist: run `hyperforget unlearn --forget "
                                   f"{','.join(map(str, forget))}` first or drop that --forget")
        result = evaluate_forget_set(run, forget, cfg)
        write_json(out_dir / f"{name}.json", result)
        (out_dir / f"{name}.md").write_text(render_markdown(result))
        plot_eps_histogram(result, out_dir / f"eps_hist_{name}.png")
        plot_retain_vs_forget(result, out_dir / f"retain_vs_forget_{name}.png")
        results[name] = result
    return results


def evaluate_forget_set(run, forget: tuple[int, ...], cfg: EvalConfig) -> dict:
    """Build the populations of one forget set and score every row (no files written)."""
    from contextlib import nullcontext

    t_start = time.perf_counter()
    spec = run.spec
    retain = tuple(c for c in range(spec.num_classes) if c not in forget)
    notes: list[str] = []
    log = notes.append
    progress = None
    if cfg.progress:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                            TimeElapsedColumn(), transient=True)
    with progress or nullcontext():
        what = f"evaluate forget {list(forget)}"
        task = progress.add_task(f"{what}: retrained population", total=None) if progress else None

        # Reference populations, from seeds no other model of the run or its zoo used.
        used, seed_check = _used_seeds(run)
        seeds = reference_seeds(cfg.n_retrained, used, cfg.seed_base)
        retrained, train_wall = train_reference(run, forget, seeds, cfg.retrain_groups)
        # Interleaved splits: every part holds models of every lockstep group (data order).
        ref, evaluation = retrained[0::2], retrained[1::2]
        neg, floor = evaluation[1::2], evaluation[0::2]
        # One model alone, with the same settings: the retrain time a user would otherwise pay.
        # Best of three on one thread, as timeit does: on a shared machine the minimum is the least
        # disturbed, and a lone tiny MLP gains nothing from more threads but suffers their contention.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            retrain_seconds = min(train_reference(run, forget, [seeds[-1] + 1 + k], 1)[1] for k in range(3))
        finally:
            torch.set_num_threads(threads)

        ctx = _build_context(run, forget, retain, ref, neg, floor, retrain_seconds, cfg)
        cloud = _accuracies(ctx, retrained, ())

        # Rows: floor, ceiling, methods, controls.
        original = run.original_params()[None]
        pops = [Population("retrain (floor)", "floor", floor,
                           note="retrain vs retrain: a quarter of the retrained evaluation half, scored like a method")]
        pops.append(Population("original (ceiling)", "ceiling", original, note="no unlearning: the model to unlearn"))
        methods, selected = _method_populations(run, forget, cfg, log)
        pops += methods
        pops.append(Population("logit_mask (control)", "control", original, masked=tuple(forget),
                               seconds_per_model=0.0,
                               note="original model with the forget logits set to −∞; "
                                    "probe and relearn use its weights"))
        if cfg.nearest_checkpoint and selected:
            pops += _nearest_controls(run, selected, cfg, log)
        if progress:
            progress.update(task, description=f"{what}: scoring", total=len(pops), completed=0)
        rows = []
        for pop in pops:
            rows.append(score_population(ctx, pop))
            if progress:
                progress.advance(task)

    setup = _setup_seconds(run)
    n_requests = max(1, len(run.forget_sets))
    for row in rows:
        variant = row["name"].split(" ")[0]
        if row["cost"] is None or variant not in setup["train"] or setup["zoo"] is None:
            continue
        # The zoo and the hypernetwork are paid once and serve every forget request of the run.
        amortized = row["cost"]["seconds_per_model"] + (setup["zoo"] + setup["train"][variant]) / n_requests
        row["cost"]["amortized_seconds"] = amortized
        row["cost"]["amortized_fraction_of_retrain"] = amortized / retrain_seconds
        row["cost"]["amortized_under_20pct"] = bool(amortized / retrain_seconds < 0.2)
    return {
        "format": EVAL_FORMAT, "version": EVAL_VERSION, "run": str(run.path), "forget": list(forget),
        "retain": list(retain), "config": asdict(cfg),
        "reference": {
            "n_retrained": cfg.n_retrained, "seeds": [seeds[0], seeds[-1]], "reference_models": int(ref.shape[0]),
            "negative_models": int(neg.shape[0]), "floor_models": int(floor.shape[0]),
            "seed_check": f"none of the {len(seeds)} reference seeds ({seeds[0]}..{seeds[-1]}) appears among "
                          f"{len(used)} seeds used elsewhere; {seed_check}",
            "train_seconds": train_wall, "retrain_seconds_one_model": retrain_seconds,
            "retrained_accuracy": ctx.retrained_acc, "retrained_mia": ctx.retrained_mia,
            "examples": {k: int(len(v)) for k, v in ctx.y.items()},
        },
        "cost_setup": {**setup, "requests": n_requests},
        "retrained_cloud": {k: cloud[k].tolist() for k in ("test_retain", "test_forget")},
        "rows": rows, "notes": notes, "wall_seconds": time.perf_counter() - t_start,
    }


def _build_context(run, forget, retain, ref, neg, floor, retrain_seconds, cfg) -> _Context:
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
    ctx = _Context(spec, forget, retain, x, y, ref, neg, floor,
                   conf_ref=za.logit_scaled_confidence(model_logits(spec, ref, x["df"]).numpy(), y["df"]),
                   conf_neg=za.logit_scaled_confidence(model_logits(spec, neg, x["df"]).numpy(), y["df"]),
                   ref_logits={s: model_logits(spec, ref, x[s]).numpy() for s in ("df", "test_r", "test_f")},
                   retrained_acc={}, retrained_mia={}, original_forget_test_acc=float(orig_acc),
                   relearn_subset=(d.x_fit[sub], d.y_fit[sub]), retrain_seconds=retrain_seconds, config=cfg)
    # Retrained reference values come from the reference half, which no row (the floor included) reuses.
    acc = _accuracies(ctx, ref, ())
    ctx.retrained_acc = {k: float(np.nanmean(v)) for k, v in acc.items()}
    k = min(ref.shape[0], cfg.probe_models)
    ctx.retrained_acc["probe"] = float(np.mean(probe_forget_accuracy(spec, ref[:k], x["fit"], y["fit"],
                                                                     x["test"], y["test"], forget)))
    mia = _mia(ctx, ref, ())
    ctx.retrained_mia = {key: float(np.nanmean(v)) for key, v in mia.items()}
    return ctx


def _nearest_controls(run, selected, cfg: EvalConfig, log) -> list[Population]:
    zoo = run.config.zoo
    if not zoo:
        log("nearest training checkpoint: the run names no zoo, control skipped")
        return []
    pops = []
    for name, params in selected:
        try:
            near = nearest_zoo_checkpoint(zoo, run.spec, params, max_rows=cfg.max_zoo_rows)
        except (HyperForgetError, ImportError) as exc:
            log(f"nearest training checkpoint for {name}: zoo {zoo} unavailable ({exc}); control skipped")
            continue
        to_original = float(permutation_invariant_distance(run.spec, params, run.original_params()[None])[0])
        pops.append(Population(
            f"nearest zoo checkpoint ({name})", "control", near["params"],
            note=f"zoo checkpoint {near['checkpoint_id']} nearest to {name}'s selected model "
                 f"(permutation-invariant L2 {near['distance']:.3f}; that model is {to_original:.3f} "
                 f"from the original; "
                 f"{near['rows_scanned']} zoo rows scanned)",
            extra={"nearest": {"checkpoint_id": near["checkpoint_id"], "distance": near["distance"],
                               "selected_to_original": to_original, "rows_scanned": near["rows_scanned"]}}))
    return pops


# ----------------------------------------------------------------------------------------------
# Report


def render_markdown(result: dict) -> str:
    """Two Markdown tables (accuracy + attacks; outputs, representations, cost) and the notes."""
    ref = result["reference"]
    ra = ref["retrained_accuracy"]
    lines = [f"## Evaluation, forget set {result['forget']} (retain {result['retain']})", "",
             f"Reference: {ref['n_retrained']} models retrained without the forget classes "
             f"({ref['reference_models']} reference, {ref['negative_models']} attack negatives, "
             f"{ref['floor_models']} floor); {ref['seed_check']}.",
             f"Retrained reference half: retain-train acc {ra['retain_train']:.3f}, retain-class test acc "
             f"{ra['test_retain']:.3f}, forget-class test acc {ra['test_forget']:.3f}.", "",
             "| row | M | acc D_r | acc D_f | test retain | test forget | thr AUC | thr TPR@1% | LiRA AUC "
             "| LiRA TPR@1% | F | F·RA·TA |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        a, at, e = r["accuracy"], r["attacks"], r["epsilon"]
        lira = at["ulira"]
        tag = "" if lira["attack"] == "ulira" else "*"
        few = "†" if r["num_models"] < MIN_EPS_MODELS else ""
        lines.append(f"| {r['name']} | {r['num_models']} | {format_stat(a['retain_train'])} | {format_stat(a['forget_train'])} | "
                     f"{format_stat(a['test_retain'])} | {format_stat(a['test_forget'])} | "
                     f"{at['calibrated_threshold']['auc']:.3f} | {at['calibrated_threshold']['tpr_at_1fpr']:.3f} | "
                     f"{lira['auc']:.3f}{tag} | {lira['tpr_at_1fpr']:.3f}{tag} | {e['F']:.3f}{few} | "
                     f"{e['final_score']:.3f}{few} |")
    lines += ["", "| row | ΔMIA entropy | ΔMIA loss | JSD D_f | JSD test retain | JSD test forget | probe forget acc "
              "| relearn steps | s / model | < 20% retrain |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        m, j, c, rl = r["mia"], r["jsd_to_retrained"], r["cost"], r["relearn"]
        steps = format_stat(rl["steps"], 1) if rl["reached"] else f"> {rl['max_steps']}"
        if 0 < rl["reached"] < rl["tried"]:
            steps += f" ({rl['reached']}/{rl['tried']} reached)"
        cost = "–" if c is None else f"{c['seconds_per_model']:.3g}"
        if c is not None and c.get("amortized_seconds") is not None:
            cost += f" (amortized {c['amortized_seconds']:.3g})"
        under = "–" if c is None else format_stat(c["under_20pct"])
        if c is not None and "amortized_under_20pct" in c:
            under += f" (amortized {format_stat(c['amortized_under_20pct'])})"
        lines.append(f"| {r['name']} | {m['entropy']['minus_retrained']:+.3f} | {m['loss']['minus_retrained']:+.3f} | "
                     f"{format_stat(j['forget_train'])} | {format_stat(j['test_retain'])} | {format_stat(j['test_forget'])} | "
                     f"{format_stat(r['probe_forget_acc'])} | {steps} | {cost} | {under} |")
    lines += ["", f"Retrained models: probe forget acc {ra['probe']:.3f}; one retrain takes "
              f"{ref['retrain_seconds_one_model']:.3g} s (the 20% rule's reference).", "",
              "Columns: attacks compare each row's models with the retrained negatives on D_f, per "
              "(model, example) pair, using the logit-scaled confidence log(p_y/(1−p_y)); AUC 0.5 = "
              "indistinguishable. thr = per-example calibrated confidence threshold (one-sided: more confident "
              "than retrained; AUC < 0.5 is a difference in the other direction). LiRA = U-LiRA likelihood ratio "
              "(* = offline variant, retrained Gaussians only, for rows with < 4 models). F = challenge forgetting "
              "quality from per-example ε (δ = %g), F·RA·TA = F·(RA_U/RA_R)·(TA_U/TA_R) with TA on retain-class "
              "test. ε has a finite-sample floor: compare with the floor row, not with 1; † = fewer than %d models, "
              "where ε reduces to a range test (ε = ∞ only where the model lies outside every retrained model). "
              "ΔMIA = row's MIA − "
              "retrained MIA (entropy: paper Fig. 22; loss: same recipe on −ln p_y). JSD = textbook base-2 JSD per "
              "example to the reference population's mean prediction, batch mean (not F.kl_div's reverse KL "
              "with mean over N·C). Relearn = full-batch SGD steps on %d examples per class until forget-class "
              "test accuracy ≥ %.2f." % (result["config"]["delta"], MIN_EPS_MODELS,
                                         result["config"]["relearn_per_class"],
                                         result["rows"][0]["relearn"]["level"]), ""]
    lines += [f"- {r['name']}: {r['note']}" for r in result["rows"] if r["note"]]
    cs = result["cost_setup"]
    if cs["zoo"] is not None and cs["train"]:
        trains = ", ".join(f"{v} {t:.3g} s" for v, t in cs["train"].items())
        lines.append(f"- amortized cost: zoo {cs['zoo']:.3g} s + hypernetwork training ({trains}), spread over "
                     f"{cs['requests']} forget requests (from {'; '.join(cs['sources'])})")
    else:
        lines.append("- amortized cost: no zoo / hypernetwork timings found (run.json timings or the demo's demo.json)")
    lines += [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def plot_eps_histogram(result: dict, path: str | Path) -> None:
    """Grouped bars: share of forget examples per ε bin, one colour per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    bins = za.EPS_NUM_BINS
    width = 0.8 / max(1, len(rows))
    fig, ax = plt.subplots(figsize=(10, 4))
    for i, r in enumerate(rows):
        h = np.asarray(r["epsilon"]["histogram"], float)
        ax.bar(np.arange(bins) + i * width, h / max(h.sum(), 1), width, label=r["name"], color=plt.cm.tab20(i % 20))
    labels = [f"[{k * za.EPS_BIN_WIDTH:g},{(k + 1) * za.EPS_BIN_WIDTH:g})" for k in range(bins - 1)] + ["≥6 / ∞"]
    ax.set_xticks(np.arange(bins) + 0.4 - width / 2, labels, rotation=45, fontsize=7)
    ax.set_xlabel("per-example ε (bin)")
    ax.set_ylabel("share of forget examples")
    ax.set_title(f"Per-example ε against retrained models, forget {result['forget']}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_retain_vs_forget(result: dict, path: str | Path) -> None:
    """Retain-class vs forget-class test accuracy: the retrained population as a grey cloud, every row's
    models as small dots and its mean ± std as a square."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    markers = {"floor": "o", "ceiling": "*", "method": "s", "control": "X"}
    for i, r in enumerate(result["rows"]):
        a = r["accuracy"]
        x, y = a["test_forget"], a["test_retain"]
        if not (np.isfinite(x["mean"]) and np.isfinite(y["mean"])):
            continue
        line = ax.errorbar(x["mean"], y["mean"], xerr=x["std"], yerr=y["std"], marker=markers.get(r["kind"], "s"),
                           linestyle="none", capsize=3, color=plt.cm.tab20(i % 20),
                           label=f"{r['name']} (M={r['num_models']})")
        pm = r.get("per_model") or {}
        if len(pm.get("test_forget", [])) > 1:
            ax.scatter(pm["test_forget"], pm["test_retain"], s=6, alpha=0.35, color=line[0].get_color())
    cloud = result.get("retrained_cloud")
    if cloud:
        ax.scatter(cloud["test_forget"], cloud["test_retain"], s=8, color="grey", alpha=0.4,
                   label="retrained models")
    ax.set_xlabel("forget-class test accuracy")
    ax.set_ylabel("retain-class test accuracy")
    ax.set_title(f"Retain vs forget, forget {result['forget']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
