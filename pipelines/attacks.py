"""Distribution-level unlearning attacks: populations of unlearned models against retrained ones.

A single retrained model is a weak reference: an unlearned model only has to look like *some*
model retrained without the forget set. Everything here therefore compares two populations of
models on the same examples, per example, as the NeurIPS 2023 Machine Unlearning Challenge and
U-LiRA (Hayes et al. 2024, "Inexact unlearning needs more careful evaluations") do. Pure numpy
(scipy / scikit-learn for ranks and ROC curves).

Shapes: ``M`` models, ``N`` examples, ``C`` classes. Populations:

- ``U``: unlearned models (DiHyFo candidates, repeated baseline runs, a control);
- ``R_ref``: retrained models the attacker calibrates on (per-example Gaussians, mean output);
- ``R_eval``: retrained models, disjoint from ``R_ref``, that play the negatives.

The statistic of every attack is the logit-scaled confidence of the true class,
φ = log(p_y / (1 − p_y)) (Carlini et al. 2022, LiRA), which is close to Gaussian across models.

Attacks and their direction:

- ``calibrated_threshold_attack``: Yeom's confidence threshold with per-example difficulty
  calibration (Watson et al. 2022): score = (φ − μ_ref) / σ_ref, pooled over (model, example)
  pairs. One-sided: a model that still remembers the forget set is *more* confident than the
  retrained ones (AUC > 0.5). AUC well below 0.5 also means the populations differ, the other way.
- ``ulira_attack``: likelihood ratio of two per-example Gaussians, "unlearned" fitted on half of U
  and "retrained" on R_ref (two-fold cross-fitting, so no model scores itself). With fewer than
  ``min_two_gaussian`` unlearned models there is nothing to fit, and it falls back to the offline
  (retrained-only) test: score = −log N(φ; μ_ref, σ_ref), two-sided.
- ``per_example_epsilon``: the challenge's ε from the FPR/FNR of every threshold on φ, per example.

:func:`jsd_to_population` uses the textbook Jensen–Shannon divergence per example
(``hyperforget.pipelines.metrics.js_divergence``, base 2) and averages over the batch ("batch-mean"). The widespread
``0.5·F.kl_div(log p, m) + 0.5·F.kl_div(log q, m)`` is not that: ``F.kl_div(input=log p, target=m)``
is KL(m‖p), the reverse of the textbook term, and its default ``reduction='mean'`` divides by N·C,
not N, squashing "1 − JSD" toward 1 (``hyperforget.pipelines.metrics.kl_div_public_variant`` reproduces it).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from hyperforget.zoo.errors import HyperForgetError

# |φ| cap. A masked logit gives φ = −∞, which no Gaussian can fit; the cap lies far beyond any finite
# model's value (models retrained on MNIST-4 without a class reach about −70 on it), so clipping never
# merges a mask with a real model.
CONFIDENCE_CLIP = 1000.0
SIGMA_FLOOR = 1e-3  # per-example std floor: identical models would give σ = 0
EPS_BIN_WIDTH = 0.5  # challenge: ε histogram bins of width 0.5 ...
EPS_NUM_BINS = 13  # ... 13 bin edges 0, 0.5, ..., 6.0; ε ≥ 6 (and ∞) share the last bin
DEFAULT_DELTA = 0.01  # challenge's δ


# ----------------------------------------------------------------------------------------------
# Statistic


def logit_scaled_confidence(logits: np.ndarray, y: np.ndarray, clip: float = CONFIDENCE_CLIP) -> np.ndarray:
    """φ = log(p_y / (1 − p_y)) of the true class, computed without forming p.

    log p_y − log(1 − p_y) = z_y − logsumexp_{c≠y} z_c, so no softmax saturates to 1.0 and no
    log(0) appears while the logits are finite. A logit of −∞ (masking) gives ±∞, clipped.

    Args:
        logits: (M, N, C) or (N, C) logits.
        y: (N,) true labels in [0, C).
        clip: |φ| is capped at this value.
    Returns:
        (M, N) (or (N,)) float64 confidences.
    """
    z = np.asarray(logits, dtype=np.float64)
    squeeze = z.ndim == 2
    if squeeze:
        z = z[None]
    if z.ndim != 3:
        raise HyperForgetError(f"logits must have shape (M, N, C) or (N, C), got {z.shape}")
    y = np.asarray(y, dtype=np.int64)
    n, c = z.shape[1], z.shape[2]
    if y.shape != (n,):
        raise HyperForgetError(f"labels have shape {y.shape}, the logits need ({n},)")
    if c < 2:
        raise HyperForgetError("logit-scaled confidence needs at least 2 classes")
    if n and (y.min() < 0 or y.max() >= c):
        raise HyperForgetError(f"labels must lie in [0, {c}), got range [{y.min()}, {y.max()}]")
    idx = np.arange(n)
    zy = z[:, idx, y]  # (M, N)
    others = z.copy()
    others[:, idx, y] = -np.inf
    top = others.max(-1, keepdims=True)  # (M, N, 1)
    finite_top = np.where(np.isfinite(top), top, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        lse = np.log(np.exp(others - finite_top).sum(-1)) + finite_top[..., 0]  # logsumexp_{c≠y}
        phi = zy - lse
    phi = np.nan_to_num(phi, nan=0.0, posinf=clip, neginf=-clip)
    phi = np.clip(phi, -clip, clip)
    return phi[0] if squeeze else phi


# ----------------------------------------------------------------------------------------------
# ROC helpers


def roc_auc(pos: np.ndarray, neg: np.ndarray) -> float:
    """Area under the ROC curve of "positive if score is higher" (Mann–Whitney U, ties count ½)."""
    from scipy.stats import rankdata

    pos, neg = np.ravel(pos).astype(np.float64), np.ravel(neg).astype(np.float64)
    if len(pos) == 0 or len(neg) == 0:
        raise HyperForgetError("AUC needs at least one positive and one negative score")
    ranks = rankdata(np.concatenate([pos, neg]))
    u = ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2.0
    return float(u / (len(pos) * len(neg)))


def tpr_at_fpr(pos: np.ndarray, neg: np.ndarray, target_fpr: float = 0.01) -> float:
    """Highest true-positive rate over thresholds whose false-positive rate is ≤ target_fpr.

    Operating points are the ROC's exact steps (no interpolation), as in LiRA's
    ``tpr[np.where(fpr <= target)[0][-1]]``; with fewer than 1/target_fpr negatives the only
    admissible point may be FPR 0.
    """
    from sklearn.metrics import roc_curve

    pos, neg = np.ravel(pos).astype(np.float64), np.ravel(neg).astype(np.float64)
    if len(pos) == 0 or len(neg) == 0:
        raise HyperForgetError("TPR at FPR needs at least one positive and one negative score")
    labels = np.concatenate([np.ones(len(pos)), np.zeros(len(neg))])
    fpr, tpr, _ = roc_curve(labels, np.concatenate([pos, neg]), drop_intermediate=False)
    ok = fpr <= target_fpr + 1e-12
    return float(tpr[ok].max()) if ok.any() else 0.0


@dataclass
class AttackResult:
    """How well an attack tells unlearned models from retrained ones on (model, example) pairs."""

    attack: str  # "calibrated_threshold", "ulira" or "ulira_offline"
    auc: float  # ROC AUC, positives = unlearned pairs; 0.5 = indistinguishable
    tpr_at_1fpr: float  # TPR at FPR ≤ 1%
    n_pos: int  # positive (unlearned model, example) pairs
    n_neg: int  # negative (retrained model, example) pairs

    def to_dict(self) -> dict:
        return asdict(self)


def _check_pop(name: str, conf: np.ndarray, n: int | None = None, min_models: int = 1) -> np.ndarray:
    conf = np.asarray(conf, dtype=np.float64)
    if conf.ndim != 2:
        raise HyperForgetError(f"{name} confidences must have shape (models, examples), got {conf.shape}")
    if conf.shape[0] < min_models:
        raise HyperForgetError(f"{name} needs at least {min_models} models, got {conf.shape[0]}")
    if n is not None and conf.shape[1] != n:
        raise HyperForgetError(f"{name} has {conf.shape[1]} examples, the other populations {n}")
    return conf


def fit_gaussians(conf: np.ndarray, sigma_floor: float = SIGMA_FLOOR) -> tuple[np.ndarray, np.ndarray]:
    """Per-example Gaussian over models: (M, N) -> mean (N,), std (N,) (ddof 0, floored)."""
    conf = _check_pop("reference", conf)
    return conf.mean(0), np.maximum(conf.std(0), sigma_floor)


def _log_normal(x: np.ndarray, mu: np.ndarray, sigma: np.ndarray) -> np.ndarray:
    return -0.5 * ((x - mu) / sigma) ** 2 - np.log(sigma) - 0.5 * np.log(2 * np.pi)


def calibrated_threshold_attack(conf_u: np.ndarray, conf_r_eval: np.ndarray, conf_r_ref: np.ndarray,
                                target_fpr: float = 0.01) -> AttackResult:
    """Per-example calibrated confidence threshold (one-sided: "remembers" = more confident).

    Args:
        conf_u: (Mu, N) φ of the unlearned models (positives).
        conf_r_eval: (Me, N) φ of retrained models not used for calibration (negatives).
        conf_r_ref: (Mr, N) φ of the retrained reference models (calibration, Mr ≥ 2).
    """
    conf_r_ref = _check_pop("retrained reference", conf_r_ref, min_models=2)
    n = conf_r_ref.shape[1]
    conf_u = _check_pop("unlearned", conf_u, n)
    conf_r_eval = _check_pop("retrained evaluation", conf_r_eval, n)
    mu, sigma = fit_gaussians(conf_r_ref)
    pos, neg = (conf_u - mu) / sigma, (conf_r_eval - mu) / sigma
    return AttackResult("calibrated_threshold", roc_auc(pos, neg), tpr_at_fpr(pos, neg, target_fpr),
                        pos.size, neg.size)


def ulira_attack(conf_u: np.ndarray, conf_r_eval: np.ndarray, conf_r_ref: np.ndarray,
                 target_fpr: float = 0.01, min_two_gaussian: int = 4) -> AttackResult:
    """U-LiRA-style likelihood-ratio test per (model, example) pair.

    With ≥ min_two_gaussian unlearned models: score = log N(φ; μ_U, σ_U) − log N(φ; μ_R, σ_R),
    μ_R, σ_R from R_ref, μ_U, σ_U from one half of U; the other half of U and half of R_eval are
    scored (two folds, swapped), so no model is scored by Gaussians fitted on itself.
    Otherwise ("ulira_offline"): score = −log N(φ; μ_R, σ_R), which needs only R_ref.
    """
    conf_r_ref = _check_pop("retrained reference", conf_r_ref, min_models=2)
    n = conf_r_ref.shape[1]
    conf_u = _check_pop("unlearned", conf_u, n)
    conf_r_eval = _check_pop("retrained evaluation", conf_r_eval, n)
    mu_r, sd_r = fit_gaussians(conf_r_ref)
    if conf_u.shape[0] < min_two_gaussian or conf_r_eval.shape[0] < 2:
        pos = -_log_normal(conf_u, mu_r, sd_r)
        neg = -_log_normal(conf_r_eval, mu_r, sd_r)
        return AttackResult("ulira_offline", roc_auc(pos, neg), tpr_at_fpr(pos, neg, target_fpr),
                            pos.size, neg.size)
    u_halves = (conf_u[0::2], conf_u[1::2])
    r_halves = (conf_r_eval[0::2], conf_r_eval[1::2])
    pos, neg = [], []
    for fit, (score_u, score_r) in ((0, (u_halves[1], r_halves[1])), (1, (u_halves[0], r_halves[0]))):
        mu_u, sd_u = fit_gaussians(u_halves[fit])
        for x, out in ((score_u, pos), (score_r, neg)):
            out.append(_log_normal(x, mu_u, sd_u) - _log_normal(x, mu_r, sd_r))
    pos, neg = np.concatenate([p.ravel() for p in pos]), np.concatenate([q.ravel() for q in neg])
    return AttackResult("ulira", roc_auc(pos, neg), tpr_at_fpr(pos, neg, target_fpr), pos.size, neg.size)


# ----------------------------------------------------------------------------------------------
# The NeurIPS 2023 Machine Unlearning Challenge's ε score


def threshold_sweep_rates(u: np.ndarray, r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """FPR and FNR of every single-threshold attack, per example, in both directions.

    For each example, each pooled value t is a threshold; "unlearned if φ > t" gives
    FPR = #(r > t)/|r| and FNR = #(u ≤ t)/|u|; the reversed rule "unlearned if φ ≤ t" gives
    (1 − FPR, 1 − FNR). (The challenge kit sweeps only the first direction; with δ > 0 its ε
    formula misses partially reversed separations, so both are kept here.)

    Args:
        u: (Mu, N) unlearned models' statistic; r: (Mr, N) retrained models' statistic.
    Returns:
        fpr, fnr: (N, 2·(Mu+Mr)) arrays.
    """
    u, r = np.asarray(u, np.float64), np.asarray(r, np.float64)
    thresholds = np.concatenate([u, r], 0).T  # (N, T)
    fpr = (r.T[:, None, :] > thresholds[:, :, None]).mean(-1)  # (N, T)
    fnr = (u.T[:, None, :] <= thresholds[:, :, None]).mean(-1)
    return np.concatenate([fpr, 1.0 - fpr], 1), np.concatenate([fnr, 1.0 - fnr], 1)


def epsilon_from_rates(fpr: np.ndarray, fnr: np.ndarray, delta: float = DEFAULT_DELTA) -> np.ndarray:
    """Per-example ε from the FPR/FNR of several attacks, the challenge kit's way.

    ε_attack = max(log(1 − δ − FPR) − log FNR, log(1 − δ − FNR) − log FPR); ε = max over attacks
    and 0. Zeros as in the kit: FPR = FNR = 0 (a perfect attack) gives ε = ∞; exactly one of
    them 0 drops that attack (its ε would be ∞ from a finite-sample fluke); when both terms are
    undefined (both rates > 1 − δ: a perfect attack read backwards) ε = ∞.

    Args:
        fpr, fnr: (N, A) rates of A attacks on N examples (or (A,) for one example).
    Returns:
        (N,) ε (or a 0-d array).
    """
    fpr, fnr = np.asarray(fpr, np.float64), np.asarray(fnr, np.float64)
    if fpr.shape != fnr.shape:
        raise HyperForgetError(f"FPR shape {fpr.shape} differs from FNR shape {fnr.shape}")
    with np.errstate(divide="ignore", invalid="ignore"):
        e1 = np.log(1.0 - delta - fpr) - np.log(fnr)
        e2 = np.log(1.0 - delta - fnr) - np.log(fpr)
    per_attack = np.fmax(e1, e2)  # fmax ignores a NaN beside a number
    per_attack = np.where(np.isnan(e1) & np.isnan(e2), np.inf, per_attack)
    per_attack = np.where((fpr == 0) ^ (fnr == 0), -np.inf, per_attack)  # dropped attack
    per_attack = np.where((fpr == 0) & (fnr == 0), np.inf, per_attack)
    return np.maximum(per_attack.max(-1), 0.0)


def per_example_epsilon(conf_u: np.ndarray, conf_r: np.ndarray, delta: float = DEFAULT_DELTA,
                        chunk: int = 256) -> np.ndarray:
    """(Mu, N) and (Mr, N) statistics -> (N,) ε from the threshold sweep of each example."""
    conf_r = _check_pop("retrained", conf_r)
    conf_u = _check_pop("unlearned", conf_u, conf_r.shape[1])
    out = np.empty(conf_r.shape[1])
    # Chunk the examples: the sweep holds (n, T, M) booleans, T = Mu + Mr thresholds.
    models = conf_u.shape[0] + conf_r.shape[0]
    step = max(1, int(chunk * 4096 // (models * max(conf_u.shape[0], conf_r.shape[0]))))
    for i in range(0, conf_r.shape[1], step):
        fpr, fnr = threshold_sweep_rates(conf_u[:, i:i + step], conf_r[:, i:i + step])
        out[i:i + step] = epsilon_from_rates(fpr, fnr, delta)
    return out


def epsilon_bin_scores(eps: np.ndarray, bin_width: float = EPS_BIN_WIDTH,
                       num_bins: int = EPS_NUM_BINS) -> np.ndarray:
    """H = 2 / 2^n with n the 1-based index of ε's 0.5-wide bin (np.digitize on 0, 0.5, …, 6)."""
    edges = np.arange(num_bins) * bin_width
    return 2.0 / 2.0 ** np.digitize(np.asarray(eps, np.float64), edges)


def forgetting_quality(eps: np.ndarray) -> float:
    """F = mean over forget examples of H(ε): 1 when no example leaks, 2^-12 when all do."""
    eps = np.asarray(eps, np.float64)
    if eps.size == 0:
        raise HyperForgetError("forgetting quality needs at least one forget example")
    return float(epsilon_bin_scores(eps).mean())


def challenge_score(f: float, ra_u: float, ra_r: float, ta_u: float, ta_r: float) -> float:
    """Final score F · (RA_U / RA_R) · (TA_U / TA_R): retain and test accuracy ratios."""
    if ra_r <= 0 or ta_r <= 0:
        raise HyperForgetError("retrained retain/test accuracy must be positive for the challenge score")
    return float(f * (ra_u / ra_r) * (ta_u / ta_r))


# ----------------------------------------------------------------------------------------------
# Output distance to the retrained population


def jsd_to_population(logits_u: np.ndarray, logits_ref: np.ndarray, base: float = 2.0) -> np.ndarray:
    """Batch-mean JSD of each unlearned model to the retrained population's mean prediction.

    The reference distribution per example is the mean softmax of the reference models (the
    retrained population's predictive distribution), not a pairwise average over retrained models:
    an unlearned model should match what a retrained model predicts on average, and the pairwise
    average would mostly measure the retrained models' own seed-to-seed spread.

    Args:
        logits_u: (M, N, C) unlearned models' logits; logits_ref: (R, N, C) reference logits.
    Returns:
        (M,) mean over the N examples of the per-example JSD.
    """
    from hyperforget.pipelines import metrics as zm

    pu = zm.softmax(logits_u)  # (M, N, C)
    pr = zm.softmax(logits_ref).mean(0)  # (N, C)
    if pu.ndim != 3 or pu.shape[1:] != pr.shape:
        raise HyperForgetError(f"unlearned outputs {pu.shape[1:]} and reference outputs {pr.shape} differ")
    return np.array([zm.js_divergence(p, pr, base).mean() for p in pu])
