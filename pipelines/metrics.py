"""Every evaluation formula of the paper (Appendix A.4), on arrays of logits, probabilities and losses.

Inputs are numpy arrays or torch tensors (converted to float64 numpy); outputs are Python floats
or numpy arrays. Nothing here trains a model, except the one-feature logistic regression that the
entropy membership-inference attack (MIA) of Figure 22 fits.

Notation (paper, Appendix A.4):

- D_r: training examples whose label is not in the forget set; D_f: training examples whose label
  is; "test": the whole test split (forget classes included, as in the SSD code).
- S(z)_i = exp(z_i) / Σ_j exp(z_j) — the softmax turning logits z into probabilities.
- H(p) = −Σ_i p_i ln p_i — the entropy of one probability vector (natural log, as in the public
  MIA code).
- KL(P‖Q) = Σ_i P_i log(P_i / Q_i);  M = (P + Q) / 2;
  JSD(P‖Q) = ½ KL(P‖M) + ½ KL(Q‖M)                                             (Eq. 8)
  With base-2 logarithms JSD ∈ [0, 1].
- φ = 1 − JSD(S(z_model1) ‖ S(z_model2)), averaged over the examples            (Eq. 9)
- Prompt alignment  R² = 1 − Σ (L*_i − L̂*_i)² / (Σ (L*_i − η)² + ε),  η = mean(L*)   (Eq. 6–7)
  where L* are the prompted (target) losses and L̂* the observed ones.
- MIA (Figure 22): X = [H(F(D_r)), H(F(test))], Y = [1…1, 0…0];
  LR = LogisticRegression(class_weight="balanced", solver="lbfgs").fit(X, Y);
  MIA = mean(LR.predict(H(F(D_f)))).  (The figure's line 7 reads H(P_r); the text and the public
  code apply the classifier to the forget set, which is what this module does.)

Distribution-level scores against many retrained models (U-LiRA, the NeurIPS 2023 challenge's
ε-score) live in :mod:`hyperforget.pipelines.attacks`.

Tables 1–4 report each metric "averaged over the sampled models and over the retrained seeds,
with their spread": :func:`summarize` gives mean, std, min, max and n, and
:func:`unlearning_metrics` assembles every column of those tables in one call.
"""

from __future__ import annotations

import math
from typing import Iterable, Sequence

import numpy as np

from hyperforget.zoo.errors import HyperForgetError

__all__ = [
    "as_numpy", "softmax", "predictions", "accuracy", "split_masks", "split_accuracies", "entropy",
    "per_example_loss", "entropy_mia", "loss_mia", "output_overlap", "kl_divergence", "js_divergence",
    "unlearning_score", "kl_div_public_variant", "confusion_matrix",
    "summarize", "unlearning_metrics",
]


# ----------------------------------------------------------------------------------------------
# Conversions


def as_numpy(a, dtype=np.float64) -> np.ndarray:
    """A numpy copy-or-view of a numpy array, torch tensor or sequence, cast to ``dtype``."""
    if hasattr(a, "detach"):  # torch tensor, without importing torch here
        a = a.detach().cpu().numpy()
    return np.asarray(a, dtype=dtype)


def softmax(logits) -> np.ndarray:
    """(..., C) logits -> (..., C) probabilities, S(z)_i = exp(z_i − max z) / Σ_j exp(z_j − max z).

    Subtracting the row maximum keeps exp() finite; −inf logits (masked classes) get probability 0.
    """
    z = as_numpy(logits)
    if z.ndim < 1 or z.shape[-1] < 1:
        raise HyperForgetError(f"logits need a class axis, got shape {z.shape}")
    if np.isnan(z).any():
        raise HyperForgetError("logits hold NaN; evaluate a model with finite parameters")
    zmax = z.max(axis=-1, keepdims=True)
    if not np.isfinite(zmax).all():
        raise HyperForgetError("a row of logits has no finite entry; at least one class must stay unmasked")
    e = np.exp(z - zmax)
    return e / e.sum(axis=-1, keepdims=True)


def _check_probs(p, name: str) -> np.ndarray:
    p = as_numpy(p)
    if p.ndim != 2:
        raise HyperForgetError(f"{name} must be (N, C) probabilities, got shape {p.shape}")
    if (p < -1e-9).any() or not np.allclose(p.sum(axis=1), 1.0, atol=1e-4):
        raise HyperForgetError(f"{name} rows must be probabilities summing to 1; pass softmax(logits)")
    return np.clip(p, 0.0, 1.0)


def predictions(logits_or_preds) -> np.ndarray:
    """(N, C) logits/probabilities -> (N,) argmax; (N,) integer predictions pass through."""
    a = as_numpy(logits_or_preds)
    if a.ndim == 2:
        return a.argmax(axis=1).astype(np.int64)
    if a.ndim == 1:
        if not np.all(a == np.round(a)):
            raise HyperForgetError("1-D predictions must be integer class ids; pass (N, C) logits otherwise")
        return a.astype(np.int64)
    raise HyperForgetError(f"expected (N, C) logits or (N,) predictions, got shape {a.shape}")


def _labels(y, n: int | None = None) -> np.ndarray:
    y = as_numpy(y, dtype=np.float64)
    if y.ndim != 1 or not np.all(y == np.round(y)):
        raise HyperForgetError(f"labels must be a 1-D array of class ids, got shape {y.shape}")
    if n is not None and y.shape[0] != n:
        raise HyperForgetError(f"{y.shape[0]} labels for {n} examples; pass one label per example")
    return y.astype(np.int64)


# ----------------------------------------------------------------------------------------------
# Accuracy on D_r, D_f and test


def accuracy(logits_or_preds, y) -> float:
    """Fraction of examples whose prediction (argmax of (N, C) logits, or (N,) ids) equals y (N,).

    acc = (1/N) Σ_i [ŷ_i = y_i]; NaN for N = 0 (an empty split has no accuracy).
    """
    pred = predictions(logits_or_preds)
    y = _labels(y, pred.shape[0])
    return float(np.mean(pred == y)) if len(y) else math.nan


def split_masks(y, forget: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(N,) labels -> (retain mask, forget mask), forget = label ∈ forget set."""
    y = _labels(y)
    forget = _forget_set(forget)
    f = np.isin(y, forget)
    return ~f, f


def _forget_set(forget: Iterable[int]) -> list[int]:
    try:
        out = sorted({int(c) for c in forget})
    except TypeError:
        raise HyperForgetError(f"forget must be a sequence of class ids, got {forget!r}") from None
    if not out:
        raise HyperForgetError("the forget set is empty; name at least one class, e.g. forget=[2]")
    return out


def split_accuracies(logits, y, forget: Sequence[int]) -> dict[str, float]:
    """Accuracy of one model on the retain classes, the forget classes and all examples.

    Args:
        logits: (N, C) logits (or (N,) predictions) of one model on one split.
        y: (N,) labels; forget: class ids to forget.
    Returns:
        {"retain": acc on examples with y ∉ forget, "forget": acc on y ∈ forget, "test": acc on all}.
        A split with no examples gets NaN.
    """
    pred = predictions(logits)
    y = _labels(y, pred.shape[0])
    r, f = split_masks(y, forget)
    return {"retain": accuracy(pred[r], y[r]), "forget": accuracy(pred[f], y[f]), "test": accuracy(pred, y)}


# ----------------------------------------------------------------------------------------------
# Membership inference


def entropy(probs) -> np.ndarray:
    """(N, C) probabilities -> (N,) entropies H(p) = −Σ_i p_i ln p_i, with 0·ln 0 = 0."""
    p = _check_probs(probs, "probs")
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0)
    return -terms.sum(axis=1)


def per_example_loss(probs, y) -> np.ndarray:
    """(N, C) probabilities, (N,) labels -> (N,) cross-entropy −ln p_y (inf where p_y = 0)."""
    p = _check_probs(probs, "probs")
    y = _labels(y, p.shape[0])
    if len(y) and (y.min() < 0 or y.max() >= p.shape[1]):
        raise HyperForgetError(f"labels must lie in [0, {p.shape[1]}), got {y.min()}..{y.max()}")
    with np.errstate(divide="ignore"):
        return -np.log(p[np.arange(len(y)), y])


def _fit_predict_mia(member: np.ndarray, nonmember: np.ndarray, target: np.ndarray, seed: int) -> float:
    from sklearn.linear_model import LogisticRegression

    if len(member) == 0 or len(nonmember) == 0:
        raise HyperForgetError("the MIA needs at least one retain (member) and one test (non-member) example")
    if len(target) == 0:
        return math.nan
    # Losses of masked classes can be inf; a large finite cap keeps their order and lbfgs happy.
    cap = 1e6
    x = np.clip(np.concatenate([member, nonmember]), -cap, cap)[:, None]
    y = np.concatenate([np.ones(len(member)), np.zeros(len(nonmember))])
    clf = LogisticRegression(class_weight="balanced", solver="lbfgs", random_state=seed)
    clf.fit(x, y)
    return float(clf.predict(np.clip(target, -cap, cap)[:, None]).mean())


def entropy_mia(probs_retain, probs_test, probs_forget, seed: int = 0) -> float:
    """Entropy membership-inference score (paper Figure 22, SSD / bad-teaching code).

    Fits ``LogisticRegression(class_weight="balanced", solver="lbfgs")`` on the 1-D feature
    H(p): members (label 1) are the retain training examples, non-members (label 0) the test
    examples; returns the mean prediction on the forget examples, i.e. the fraction of D_f the
    attack calls "member". No cross-validation, as in the public code. Compare the value with the
    retrained model's, not with 0.

    Args:
        probs_retain: (N_r, C) softmax outputs on D_r; probs_test: (N_t, C) on the test split;
        probs_forget: (N_f, C) on D_f; seed: the classifier's random_state (lbfgs is deterministic).
    Returns:
        MIA ∈ [0, 1] (NaN when D_f is empty).
    """
    return _fit_predict_mia(entropy(probs_retain), entropy(probs_test), entropy(probs_forget), seed)


def loss_mia(probs_retain, y_retain, probs_test, y_test, probs_forget, y_forget, seed: int = 0) -> float:
    """The same attack with the per-example loss −ln p_y as its feature (the label is known).

    Members: D_r, non-members: test, score: mean prediction on D_f. Shapes as in
    :func:`entropy_mia`, plus (N,) labels for each set.
    """
    return _fit_predict_mia(per_example_loss(probs_retain, y_retain), per_example_loss(probs_test, y_test),
                            per_example_loss(probs_forget, y_forget), seed)


# ----------------------------------------------------------------------------------------------
# Comparing two models' outputs


def output_overlap(preds_a, preds_b) -> float:
    """Fraction of examples on which two models predict the same class: (1/N) Σ_i [ŷ^a_i = ŷ^b_i].

    Takes (N, C) logits/probabilities or (N,) predictions for each model; NaN for N = 0.
    """
    a, b = predictions(preds_a), predictions(preds_b)
    if a.shape != b.shape:
        raise HyperForgetError(f"the two models were evaluated on different inputs: {a.shape} vs {b.shape}")
    return float(np.mean(a == b)) if len(a) else math.nan


def kl_divergence(p, q, base: float = 2.0) -> np.ndarray:
    """(N, C), (N, C) probabilities -> (N,) KL(P‖Q) = Σ_i P_i log_base(P_i / Q_i), 0·log 0 = 0.

    Infinite where P_i > 0 = Q_i.
    """
    p, q = _check_probs(p, "p"), _check_probs(q, "q")
    if p.shape != q.shape:
        raise HyperForgetError(f"p and q must have the same shape, got {p.shape} and {q.shape}")
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(p > 0, p / np.where(q > 0, q, 0.0), 1.0)
        terms = np.where(p > 0, p * np.log(ratio), 0.0)
    return terms.sum(axis=1) / math.log(base)


def js_divergence(p, q, base: float = 2.0) -> np.ndarray:
    """(N, C), (N, C) probabilities -> (N,) textbook Jensen–Shannon divergence (Eq. 8).

    JSD(P‖Q) = ½ KL(P‖M) + ½ KL(Q‖M), M = (P + Q)/2. Symmetric, always finite (M > 0 wherever
    P or Q is), and in [0, 1] for base 2 (in [0, ln 2] for base e).
    """
    p, q = _check_probs(p, "p"), _check_probs(q, "q")
    if p.shape != q.shape:
        raise HyperForgetError(f"p and q must have the same shape, got {p.shape} and {q.shape}")
    m = 0.5 * (p + q)
    return np.clip(0.5 * kl_divergence(p, m, base) + 0.5 * kl_divergence(q, m, base), 0.0, None)


def unlearning_score(probs_a, probs_b) -> float:
    """φ = 1 − (1/N) Σ_n JSD_2(P_n‖Q_n)  (Eq. 9), from two models' (N, C) softmax outputs.

    Textbook base-2 JSD per example, then the mean; φ ∈ [0, 1], 1 for identical outputs. This is
    not the number the public code prints: see :func:`kl_div_public_variant`.
    """
    jsd = js_divergence(probs_a, probs_b, base=2.0)
    return float(1.0 - jsd.mean()) if len(jsd) else math.nan


def kl_div_public_variant(p, q) -> float:
    """The "JSDiv" of the bad-teaching / SSD code, reproduced so tables can say which one they show.

    ``0.5 * F.kl_div(log p, m) + 0.5 * F.kl_div(log q, m)`` with m = (p + q)/2 and the default
    reduction='mean'. ``F.kl_div(input=log p, target=m)`` computes Σ m (ln m − ln p), i.e. KL(M‖P),
    the reverse of the textbook term, and 'mean' divides by N·C instead of N, so the value shrinks
    with the number of classes (the repos' score 1 − this stays near 1). Natural log. Infinite
    when one distribution has a zero where the other does not.

    Args: p, q: (N, C) probabilities. Returns: a float.
    """
    import torch
    import torch.nn.functional as F

    p_t = torch.as_tensor(_check_probs(p, "p"))
    q_t = torch.as_tensor(_check_probs(q, "q"))
    if p_t.shape != q_t.shape:
        raise HyperForgetError(f"p and q must have the same shape, got {tuple(p_t.shape)} and {tuple(q_t.shape)}")
    m = (p_t + q_t) / 2
    # 'sum' / numel is what reduction='mean' computes; torch warns that 'mean' will change meaning,
    # and the repos' numbers were produced with this one.
    n = m.numel()
    return float(0.5 * F.kl_div(torch.log(p_t), m, reduction="sum") / n
                 + 0.5 * F.kl_div(torch.log(q_t), m, reduction="sum") / n)


# ----------------------------------------------------------------------------------------------
# Confusion matrices and summaries


def confusion_matrix(pred_ref, pred_model, num_classes: int) -> np.ndarray:
    """(C, C) int64 counts: entry [i, j] = examples the reference (retrained) model puts in class i
    and the evaluated model in class j. Inputs: (N,) predictions or (N, C) logits of each model.
    """
    a, b = predictions(pred_ref), predictions(pred_model)
    if a.shape != b.shape:
        raise HyperForgetError(f"the two models were evaluated on different inputs: {a.shape} vs {b.shape}")
    if len(a) and (min(a.min(), b.min()) < 0 or max(a.max(), b.max()) >= num_classes):
        raise HyperForgetError(f"predictions must lie in [0, {num_classes}); pass the task's num_classes")
    out = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(out, (a, b), 1)
    return out


def summarize(values) -> dict[str, float]:
    """Mean, sample std (ddof=1; 0 for one value), min, max and n of the finite values.

    NaN entries (e.g. accuracy on an empty split) are left out and not counted in n; all-NaN input
    gives NaN statistics with n = 0.
    """
    v = as_numpy(values).ravel()
    v = v[np.isfinite(v)]
    if v.size == 0:
        return {"mean": math.nan, "std": math.nan, "min": math.nan, "max": math.nan, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if v.size > 1 else 0.0,
            "min": float(v.min()), "max": float(v.max()), "n": int(v.size)}


def format_stat(stat, digits: int = 3, spread: bool = True) -> str:
    """A table cell: a :func:`summarize` dict -> '0.984 ± 0.012' (the spread only over more than one
    finite value), a number -> '0.984', a bool -> yes / no; missing or NaN -> '–'."""
    if isinstance(stat, bool):
        return "yes" if stat else "no"
    mean, std, n = (stat.get("mean"), stat.get("std"), stat.get("n", 2)) if isinstance(stat, dict) else (stat, None, 1)
    if mean is None or not math.isfinite(float(mean)):
        return "–"
    text = f"{float(mean):.{digits}f}"
    if spread and n > 1 and std is not None and math.isfinite(float(std)) and float(std) > 0:
        text += f" ± {float(std):.{digits}f}"
    return text


def _stack(logits, name: str) -> np.ndarray:
    a = as_numpy(logits)
    if a.ndim == 2:
        a = a[None]
    if a.ndim != 3:
        raise HyperForgetError(f"{name} must be (K, N, C) or (N, C) logits, got shape {a.shape}")
    return a


def unlearning_metrics(model_train, model_test, y_train, y_test, forget: Sequence[int],
                       retrained_train=None, retrained_test=None, *, distinct_pairs: bool = False,
                       mia_seed: int = 0) -> dict:
    """Every column of Tables 1–4 for one method, averaged over its models and the retrained seeds.

    Args:
        model_train: (K, N_train, C) logits of the K models of one method on the training split
            (or (N_train, C) for one model); model_test: (K, N_test, C) on the test split.
        y_train: (N_train,), y_test: (N_test,) labels; forget: class ids removed.
        retrained_train, retrained_test: (S, N_train, C), (S, N_test, C) logits of S models
            retrained without the forget classes; None skips the comparison columns.
        distinct_pairs: skip pairs (k, s) with k == s — set it when the method *is* the retrained
            set, so a model is not compared with itself.
        mia_seed: random_state of the MIA classifier.
    Returns:
        {"acc_retain", "acc_forget", "acc_test", "mia",                       # over the K models
         "overlap_retain", "overlap_forget", "overlap_test",                   # over K × S pairs
         "phi_retain", "phi_forget", "phi_test",                               # over K × S pairs
         "per_model": {metric: [K values] for acc/MIA, [K·S values, k-major] for overlap/φ},
         "num_models": K, "num_retrained": S, "forget": [...]}
        Each metric is a :func:`summarize` dict {"mean", "std", "min", "max", "n"}.
        D_r / D_f are the training examples outside / inside the forget classes; accuracy on
        "retain"/"forget" is measured there (the paper's D_r and D_f), "test" on the full test
        split; the MIA uses D_r as members, the full test split as non-members, D_f as targets.
    """
    forget = _forget_set(forget)
    mtr, mte = _stack(model_train, "model_train"), _stack(model_test, "model_test")
    y_train, y_test = _labels(y_train, mtr.shape[1]), _labels(y_test, mte.shape[1])
    if mtr.shape[0] != mte.shape[0] or mtr.shape[2] != mte.shape[2]:
        raise HyperForgetError(f"model_train {mtr.shape} and model_test {mte.shape} disagree on models or classes")
    num_classes = mtr.shape[2]
    if max(forget) >= num_classes or min(forget) < 0:
        raise HyperForgetError(f"forget classes {forget} are outside the task's classes 0..{num_classes - 1}")
    r, f = split_masks(y_train, forget)
    per_model: dict[str, list[float]] = {k: [] for k in ("acc_retain", "acc_forget", "acc_test", "mia")}
    for k in range(mtr.shape[0]):
        ptr, pte = softmax(mtr[k]), softmax(mte[k])
        per_model["acc_retain"].append(accuracy(mtr[k][r], y_train[r]))
        per_model["acc_forget"].append(accuracy(mtr[k][f], y_train[f]))
        per_model["acc_test"].append(accuracy(mte[k], y_test))
        per_model["mia"].append(entropy_mia(ptr[r], pte, ptr[f], seed=mia_seed))
    out: dict = {key: summarize(vals) for key, vals in per_model.items()}
    num_retrained = 0
    if retrained_train is not None or retrained_test is not None:
        if retrained_train is None or retrained_test is None:
            raise HyperForgetError("pass both retrained_train and retrained_test, or neither")
        rtr, rte = _stack(retrained_train, "retrained_train"), _stack(retrained_test, "retrained_test")
        if rtr.shape[1:] != mtr.shape[1:] or rte.shape[1:] != mte.shape[1:] or rtr.shape[0] != rte.shape[0]:
            raise HyperForgetError(
                f"retrained logits {rtr.shape}/{rte.shape} do not match the method's {mtr.shape}/{mte.shape}")
        num_retrained = rtr.shape[0]
        pair_vals: dict[str, list[float]] = {f"{m}_{s}": [] for m in ("overlap", "phi")
                                             for s in ("retain", "forget", "test")}
        for k in range(mtr.shape[0]):
            for s in range(num_retrained):
                if distinct_pairs and k == s:
                    continue
                for split, a, b in (("retain", mtr[k][r], rtr[s][r]), ("forget", mtr[k][f], rtr[s][f]),
                                    ("test", mte[k], rte[s])):
                    pair_vals[f"overlap_{split}"].append(output_overlap(a, b))
                    pair_vals[f"phi_{split}"].append(unlearning_score(softmax(a), softmax(b)) if len(a) else math.nan)
        out.update({key: summarize(vals) for key, vals in pair_vals.items()})
        per_model.update({key: vals for key, vals in pair_vals.items()})  # pairs, k-major
    out["per_model"] = per_model
    out["num_models"] = int(mtr.shape[0])
    out["num_retrained"] = int(num_retrained)
    out["forget"] = forget
    return out
