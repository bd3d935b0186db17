"""hyperforget.pipelines.metrics against hand-computed cases and independent implementations (scipy, sklearn, numpy)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from hyperforget.pipelines import metrics as M
from hyperforget.zoo.errors import HyperForgetError


def _onehot_logits(pred, c, scale=10.0):
    out = np.zeros((len(pred), c))
    out[np.arange(len(pred)), pred] = scale
    return out


# ---------------------------------------------------------------------------------------------- accuracy


def test_accuracy_from_logits_and_predictions():
    y = np.array([0, 1, 2, 3, 2])
    pred = np.array([0, 1, 1, 3, 2])
    assert M.accuracy(pred, y) == pytest.approx(4 / 5)
    assert M.accuracy(_onehot_logits(pred, 4), y) == pytest.approx(4 / 5)
    assert M.accuracy(torch.tensor(_onehot_logits(pred, 4)), torch.tensor(y)) == pytest.approx(4 / 5)
    assert math.isnan(M.accuracy(np.zeros((0, 4)), np.zeros(0)))


def test_split_accuracies_model_that_never_predicts_forget_classes():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, size=117)
    logits = _onehot_logits(y, 4)
    logits[:, 2] = -50.0  # never class 2
    acc = M.split_accuracies(logits, y, [2])
    assert acc["forget"] == 0.0
    assert acc["retain"] == 1.0
    assert acc["test"] == pytest.approx(np.mean(y != 2))


def test_split_accuracies_two_forget_classes_and_bad_input():
    y = np.array([0, 1, 2, 3, 3])
    pred = np.array([0, 0, 2, 3, 1])
    acc = M.split_accuracies(pred, y, (2, 3))
    assert acc == {"retain": 0.5, "forget": pytest.approx(2 / 3), "test": pytest.approx(3 / 5)}
    with pytest.raises(HyperForgetError, match="empty"):
        M.split_accuracies(pred, y, [])
    with pytest.raises(HyperForgetError, match="labels"):
        M.split_accuracies(pred, y[:3], [2])


# ---------------------------------------------------------------------------------------------- entropy, MIA


def test_softmax_and_entropy():
    z = np.array([[0.0, 0.0, 0.0, 0.0], [1.0, 2.0, 3.0, -np.inf]])
    p = M.softmax(z)
    assert np.allclose(p[0], 0.25)
    e = np.exp([1.0, 2.0, 3.0])
    assert np.allclose(p[1], np.r_[e / e.sum(), 0.0])
    h = M.entropy(p)
    assert h[0] == pytest.approx(math.log(4))
    q = e / e.sum()
    assert h[1] == pytest.approx(-(q * np.log(q)).sum())
    assert M.entropy(np.array([[1.0, 0.0]]))[0] == 0.0
    with pytest.raises(HyperForgetError, match="summing to 1"):
        M.entropy(np.array([[0.5, 0.6]]))


def _probs_with_entropy(rng, n, c, confident):
    """Peaked rows (low entropy) or near-uniform rows (high entropy)."""
    z = rng.normal(size=(n, c)) * 0.1
    if confident:
        z[np.arange(n), rng.integers(0, c, n)] += 8.0
    return M.softmax(z)


def test_entropy_mia_separates_low_and_high_entropy():
    rng = np.random.default_rng(1)
    retain = _probs_with_entropy(rng, 101, 4, confident=True)
    test = _probs_with_entropy(rng, 37, 4, confident=False)
    # Forget examples that look like training members (low entropy) are all flagged...
    assert M.entropy_mia(retain, test, _probs_with_entropy(rng, 23, 4, True)) == 1.0
    # ...and ones that look like unseen data are not.
    assert M.entropy_mia(retain, test, _probs_with_entropy(rng, 23, 4, False)) == 0.0
    # The same recipe, written out with sklearn directly, gives the same number on a mixed set.
    from sklearn.linear_model import LogisticRegression

    forget = np.concatenate([_probs_with_entropy(rng, 9, 4, True), _probs_with_entropy(rng, 14, 4, False)])
    x = np.r_[M.entropy(retain), M.entropy(test)][:, None]
    lab = np.r_[np.ones(101), np.zeros(37)]
    clf = LogisticRegression(class_weight="balanced", solver="lbfgs").fit(x, lab)
    expected = clf.predict(M.entropy(forget)[:, None]).mean()
    assert M.entropy_mia(retain, test, forget) == pytest.approx(expected)
    assert M.entropy_mia(retain, test, forget) == pytest.approx(9 / 23)


def test_loss_mia_uses_the_true_label():
    rng = np.random.default_rng(2)
    y_r = rng.integers(0, 4, 80)
    retain = M.softmax(_onehot_logits(y_r, 4, 6.0))  # low loss
    y_t = rng.integers(0, 4, 40)
    test = M.softmax(_onehot_logits((y_t + 1) % 4, 4, 6.0))  # confident but wrong: high loss
    y_f = rng.integers(0, 4, 20)
    # Confident on the forget set: the entropy attack calls these members either way,
    # the loss attack only when the confident class is the true one.
    right = M.softmax(_onehot_logits(y_f, 4, 6.0))
    wrong = M.softmax(_onehot_logits((y_f + 2) % 4, 4, 6.0))
    assert M.loss_mia(retain, y_r, test, y_t, right, y_f) == 1.0
    assert M.loss_mia(retain, y_r, test, y_t, wrong, y_f) == 0.0
    # Masked classes (p = 0, infinite loss) stay usable.
    masked = np.zeros((20, 4))
    masked[:, 0] = 1.0
    assert M.loss_mia(retain, y_r, test, y_t, masked, np.full(20, 2)) == 0.0


def test_identical_models_give_overlap_one_and_phi_one():
    rng = np.random.default_rng(3)
    logits = rng.normal(size=(53, 10))
    assert M.output_overlap(logits, logits.copy()) == 1.0
    assert M.unlearning_score(M.softmax(logits), M.softmax(logits)) == pytest.approx(1.0)
    other = logits.copy()
    other[:10] = _onehot_logits((logits[:10].argmax(1) + 1) % 10, 10, 100.0)
    assert M.output_overlap(logits, other) == pytest.approx(43 / 53)
    assert M.output_overlap(logits.argmax(1), other) == pytest.approx(43 / 53)


def test_js_divergence_by_hand():
    p = np.array([[1.0, 0.0], [0.5, 0.5], [0.3, 0.7]])
    q = np.array([[0.0, 1.0], [1.0, 0.0], [0.3, 0.7]])
    # Row 2 by hand: M = (0.75, 0.25);
    # KL(P‖M) = 0.5 log2(0.5/0.75) + 0.5 log2(0.5/0.25); KL(Q‖M) = log2(1/0.75).
    kl_pm = 0.5 * math.log2(0.5 / 0.75) + 0.5 * math.log2(2.0)
    kl_qm = math.log2(1 / 0.75)
    jsd = M.js_divergence(p, q)
    assert jsd == pytest.approx([1.0, 0.5 * (kl_pm + kl_qm), 0.0], abs=1e-12)
    assert M.js_divergence(q, p) == pytest.approx(jsd)  # symmetric
    assert M.js_divergence(p, q, base=math.e) == pytest.approx(jsd * math.log(2))
    # Independent: scipy's Jensen-Shannon *distance* is the square root of the divergence.
    from scipy.spatial.distance import jensenshannon

    rng = np.random.default_rng(4)
    a, b = M.softmax(rng.normal(size=(19, 5))), M.softmax(rng.normal(size=(19, 5)) * 3)
    ref = np.array([jensenshannon(a[i], b[i], base=2) ** 2 for i in range(19)])
    assert M.js_divergence(a, b) == pytest.approx(ref, abs=1e-10)
    assert M.unlearning_score(a, b) == pytest.approx(1 - ref.mean(), abs=1e-10)


def test_public_kl_div_variant_is_reverse_kl_over_n_times_c():
    p = np.array([[0.5, 0.5], [0.9, 0.1]])
    q = np.array([[0.9, 0.1], [0.2, 0.8]])
    m = (p + q) / 2
    # F.kl_div(log p, m) with reduction='mean' = Σ m (ln m − ln p) / (N·C): KL(M‖P), natural log.
    by_hand = 0.5 * np.sum(m * (np.log(m) - np.log(p))) / p.size + 0.5 * np.sum(m * (np.log(m) - np.log(q))) / q.size
    got = M.kl_div_public_variant(p, q)
    assert got == pytest.approx(by_hand)
    textbook = M.js_divergence(p, q, base=math.e).mean()
    assert abs(got - textbook) > 0.01  # not the same quantity
    assert got < textbook  # the N·C divisor shrinks it: scores 1 − got sit closer to 1


def test_kl_divergence_infinite_when_support_missing():
    assert M.kl_divergence(np.array([[0.5, 0.5]]), np.array([[1.0, 0.0]]))[0] == math.inf
    assert M.kl_divergence(np.array([[1.0, 0.0]]), np.array([[0.5, 0.5]]))[0] == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------- confusion, summaries


def test_confusion_matrix_matches_sklearn():
    from sklearn.metrics import confusion_matrix as sk_cm

    rng = np.random.default_rng(6)
    a, b = rng.integers(0, 4, 117), rng.integers(0, 4, 117)
    cm = M.confusion_matrix(a, b, 4)
    assert cm.dtype == np.int64 and cm.sum() == 117
    assert np.array_equal(cm, sk_cm(a, b, labels=range(4)))
    assert np.array_equal(M.confusion_matrix(_onehot_logits(a, 4), b, 4), cm)
    with pytest.raises(HyperForgetError, match="num_classes"):
        M.confusion_matrix(a, b, 3)


def test_summarize():
    s = M.summarize([1.0, 2.0, 4.0, float("nan")])
    assert s["n"] == 3 and s["mean"] == pytest.approx(7 / 3) and s["min"] == 1.0 and s["max"] == 4.0
    assert s["std"] == pytest.approx(np.std([1, 2, 4], ddof=1))
    assert M.summarize([5.0])["std"] == 0.0
    assert M.summarize([])["n"] == 0 and math.isnan(M.summarize([])["mean"])


# ---------------------------------------------------------------------------------------------- the table row


def _fake_models(rng, y, k, c, noise, forget=None):
    out = np.stack([_onehot_logits(y, c, 5.0) + rng.normal(size=(len(y), c)) * noise for _ in range(k)])
    if forget is not None:
        out[..., forget] = -30.0
    return out


def test_unlearning_metrics_against_direct_computation():
    rng = np.random.default_rng(7)
    c, forget = 4, [2]
    y_tr, y_te = rng.integers(0, c, 117), rng.integers(0, c, 41)
    m_tr, m_te = _fake_models(rng, y_tr, 2, c, 3.0), _fake_models(rng, y_te, 2, c, 3.0)
    r_tr, r_te = _fake_models(rng, y_tr, 3, c, 3.0, forget), _fake_models(rng, y_te, 3, c, 3.0, forget)
    out = M.unlearning_metrics(m_tr, m_te, y_tr, y_te, forget, r_tr, r_te)
    assert out["num_models"] == 2 and out["num_retrained"] == 3 and out["forget"] == [2]
    keep, fgt = y_tr != 2, y_tr == 2
    accs = [M.split_accuracies(m_tr[k], y_tr, forget) for k in range(2)]
    assert out["acc_retain"]["mean"] == pytest.approx(np.mean([a["retain"] for a in accs]))
    assert out["acc_forget"]["mean"] == pytest.approx(np.mean([a["forget"] for a in accs]))
    assert out["acc_test"]["mean"] == pytest.approx(np.mean([M.accuracy(m_te[k], y_te) for k in range(2)]))
    mia = [M.entropy_mia(M.softmax(m_tr[k][keep]), M.softmax(m_te[k]), M.softmax(m_tr[k][fgt])) for k in range(2)]
    assert out["mia"]["mean"] == pytest.approx(np.mean(mia))
    phi = [M.unlearning_score(M.softmax(m_te[k]), M.softmax(r_te[s])) for k in range(2) for s in range(3)]
    assert out["phi_test"]["n"] == 6 and out["phi_test"]["mean"] == pytest.approx(np.mean(phi))
    assert out["phi_test"]["std"] == pytest.approx(np.std(phi, ddof=1))
    ov = [M.output_overlap(m_tr[k][fgt], r_tr[s][fgt]) for k in range(2) for s in range(3)]
    assert out["overlap_forget"]["mean"] == pytest.approx(np.mean(ov))
    assert out["per_model"]["phi_test"] == pytest.approx(phi)
    # Retrained models never predict the forget class.
    ret = M.unlearning_metrics(r_tr, r_te, y_tr, y_te, forget, r_tr, r_te, distinct_pairs=True)
    assert ret["acc_forget"]["max"] == 0.0 and ret["overlap_test"]["n"] == 6


def test_unlearning_metrics_identical_models_and_errors():
    rng = np.random.default_rng(8)
    y_tr, y_te = rng.integers(0, 4, 59), rng.integers(0, 4, 23)
    tr, te = _fake_models(rng, y_tr, 1, 4, 2.0)[0], _fake_models(rng, y_te, 1, 4, 2.0)[0]
    out = M.unlearning_metrics(tr, te, y_tr, y_te, [1, 3], tr, te)
    for split in ("retain", "forget", "test"):
        assert out[f"overlap_{split}"]["mean"] == 1.0
        assert out[f"phi_{split}"]["mean"] == pytest.approx(1.0)
    no_ref = M.unlearning_metrics(tr, te, y_tr, y_te, [1])
    assert "phi_test" not in no_ref and no_ref["num_retrained"] == 0
    with pytest.raises(HyperForgetError, match="outside"):
        M.unlearning_metrics(tr, te, y_tr, y_te, [4])
    with pytest.raises(HyperForgetError, match="both"):
        M.unlearning_metrics(tr, te, y_tr, y_te, [1], tr, None)
    with pytest.raises(HyperForgetError, match="do not match"):
        M.unlearning_metrics(tr, te, y_tr, y_te, [1], tr[:10], te)


# ---------------------------------------------------------------------------------------------- distribution-level


def test_format_stat_one_rule_for_every_table():
    assert M.format_stat(M.summarize([0.5, 0.7])) == "0.600 ± 0.141"  # sample std, as summarize
    assert M.format_stat(M.summarize([0.5]), 4) == "0.5000"  # one value: no spread
    assert M.format_stat(M.summarize([0.5, 0.7]), spread=False) == "0.600"
    assert M.format_stat(M.summarize([math.nan])) == M.format_stat(None) == M.format_stat(math.nan) == "–"
    assert M.format_stat(0.25, 2) == "0.25" and M.format_stat(True) == "yes"
