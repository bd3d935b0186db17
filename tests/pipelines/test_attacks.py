"""hyperforget.pipelines.attacks: the statistic, the attacks and the challenge's ε score on constructed populations."""

from __future__ import annotations

import math

import numpy as np
import pytest

from hyperforget.pipelines import attacks as za
from hyperforget.zoo.errors import HyperForgetError

TINY_H = 2.0 / 2.0 ** 13  # H of the last ε bin (ε ≥ 6 or ∞)


def _softmax(z):
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def test_logit_scaled_confidence_matches_direct_formula():
    rng = np.random.default_rng(0)
    z = rng.normal(scale=3, size=(3, 17, 5))
    y = rng.integers(0, 5, 17)
    p = _softmax(z)[:, np.arange(17), y]
    np.testing.assert_allclose(za.logit_scaled_confidence(z, y), np.log(p) - np.log1p(-p), rtol=1e-9, atol=1e-9)
    assert za.logit_scaled_confidence(z[0], y).shape == (17,)


def test_logit_scaled_confidence_is_stable_and_clips_masks():
    # p_y = 1 − 1e-13 in float64 is exact enough for the naive formula to lose digits; ours does not.
    z = np.array([[[30.0, 0.0, 0.0]]])
    assert za.logit_scaled_confidence(z, np.array([0]))[0, 0] == pytest.approx(30.0 - math.log(2.0), abs=1e-12)
    masked = np.array([[[-np.inf, 1.0, 2.0], [3.0, -np.inf, 0.0]]])
    phi = za.logit_scaled_confidence(masked, np.array([0, 0]))
    assert phi[0, 0] == -za.CONFIDENCE_CLIP and np.isfinite(phi).all()
    with pytest.raises(HyperForgetError):
        za.logit_scaled_confidence(z, np.array([3]))


def test_roc_auc_and_tpr_against_sklearn():
    from sklearn.metrics import roc_auc_score

    rng = np.random.default_rng(1)
    pos, neg = np.round(rng.normal(0.5, 1, 301), 1), np.round(rng.normal(0, 1, 257), 1)  # many ties
    labels = np.r_[np.ones(301), np.zeros(257)]
    assert za.roc_auc(pos, neg) == pytest.approx(roc_auc_score(labels, np.r_[pos, neg]), abs=1e-12)
    # Hand case: negatives 0..99, positives 97.5, 99.5, 100.5 ("positive if score ≥ threshold").
    neg = np.arange(100.0)
    pos = np.array([97.5, 99.5, 100.5])
    assert za.tpr_at_fpr(pos, neg, 0.0) == pytest.approx(2 / 3)  # threshold 99.5: no negative above
    assert za.tpr_at_fpr(pos, neg, 0.01) == pytest.approx(2 / 3)  # threshold 99: one negative (1%)
    assert za.tpr_at_fpr(pos, neg, 0.02) == pytest.approx(1.0)  # threshold 97.5: 98 and 99 (2%)


def test_identical_populations_are_indistinguishable():
    rng = np.random.default_rng(2)
    pops = rng.normal(size=(3, 64, 300))  # reference, negatives, "unlearned": one distribution
    thr = za.calibrated_threshold_attack(pops[2], pops[1], pops[0])
    lira = za.ulira_attack(pops[2], pops[1], pops[0])
    assert lira.attack == "ulira"
    for res in (thr, lira):
        assert res.auc == pytest.approx(0.5, abs=0.02)
        assert res.tpr_at_1fpr < 0.03
        assert res.n_pos == res.n_neg == 64 * 300


def test_disjoint_populations_are_fully_distinguishable():
    rng = np.random.default_rng(3)
    ref, neg = rng.normal(size=(2, 64, 300))
    unl = rng.normal(size=(64, 300)) + 8.0
    for res in (za.calibrated_threshold_attack(unl, neg, ref), za.ulira_attack(unl, neg, ref),
                za.ulira_attack(unl[:1], neg, ref)):
        assert res.auc > 0.999 and res.tpr_at_1fpr > 0.99
    eps = za.per_example_epsilon(unl, neg)
    assert np.isinf(eps).all() and za.forgetting_quality(eps) == pytest.approx(TINY_H)


def test_ulira_sees_a_spread_difference_the_threshold_misses():
    rng = np.random.default_rng(4)
    ref, neg = rng.normal(size=(2, 64, 200))
    unl = 3.0 * rng.normal(size=(64, 200))  # same mean, three times the spread
    assert za.calibrated_threshold_attack(unl, neg, ref).auc == pytest.approx(0.5, abs=0.03)
    assert za.ulira_attack(unl, neg, ref).auc > 0.75
    # With one unlearned model there is nothing to fit: the offline test still applies.
    assert za.ulira_attack(unl[:2], neg, ref).attack == "ulira_offline"


def test_epsilon_hand_computed_case():
    # One example: u (unlearned) = 2, 3, 4, 5; r (retrained) = 0, 1, 2.5, 6; δ = 0.01.
    # Best threshold t = 2.5 ("unlearned if φ > 2.5"): FNR = 1/4 (u = 2), FPR = 1/4 (r = 6), so
    # ε = log(1 − 0.01 − 0.25) − log(0.25) = log(2.96); t = 0, 1 give FNR = 0 with FPR > 0 (dropped),
    # every other threshold in either direction gives less.
    u = np.array([[2.0], [3.0], [4.0], [5.0]])
    r = np.array([[0.0], [1.0], [2.5], [6.0]])
    eps = za.per_example_epsilon(u, r, delta=0.01)
    assert eps[0] == pytest.approx(math.log(0.74 / 0.25), abs=1e-12)  # 1.0852
    assert za.epsilon_bin_scores(eps)[0] == 0.25  # bin [1.0, 1.5) is the 3rd: 2 / 2^3
    # Three examples: the case above, a perfectly separated one (ε = ∞) and identical values (ε = 0).
    u3 = np.hstack([u, u + 10.0, np.ones((4, 1))])
    r3 = np.hstack([r, r - 10.0, np.ones((4, 1))])
    eps3 = za.per_example_epsilon(u3, r3, delta=0.01)
    assert np.isinf(eps3[1]) and eps3[2] == 0.0
    f = za.forgetting_quality(eps3)
    assert f == pytest.approx((0.25 + TINY_H + 1.0) / 3)
    assert za.challenge_score(f, 0.9, 0.95, 0.8, 0.85) == pytest.approx(f * (0.9 / 0.95) * (0.8 / 0.85))


def test_epsilon_zero_handling_follows_the_kit():
    fpr = np.array([[0.0, 0.9], [0.0, 0.5], [0.995, 0.5], [0.3, 0.2]])
    fnr = np.array([[0.0, 0.9], [0.5, 0.5], [0.995, 0.5], [0.4, 0.2]])
    eps = za.epsilon_from_rates(fpr, fnr, delta=0.01)
    assert np.isinf(eps[0])  # FPR = FNR = 0: a perfect attack
    assert eps[1] == 0.0  # one zero: dropped; (0.5, 0.5) gives log(0.49/0.5) < 0 -> floor 0
    assert np.isinf(eps[2])  # both rates above 1 − δ: a perfect attack read backwards
    expected = max(math.log(0.69 / 0.4), math.log(0.59 / 0.3), math.log(0.79 / 0.2))
    assert eps[3] == pytest.approx(expected)
    with pytest.raises(HyperForgetError):
        za.epsilon_from_rates(fpr, fnr[:2])


def test_bin_scores():
    eps = np.array([0.0, 0.49, 0.5, 1.2, 5.99, 6.0, np.inf])
    np.testing.assert_allclose(za.epsilon_bin_scores(eps), [1, 1, 0.5, 0.25, 2 / 2 ** 12, TINY_H, TINY_H])


def test_masked_population_scores_poorly():
    # A "unlearned" population that masks the forget class: accuracy 0 by construction, but its
    # confidences sit at −clip, far from retrained models that merely never learned the class.
    rng = np.random.default_rng(5)
    n, c = 50, 4
    y = np.full(n, 2)
    retrained = rng.normal(size=(96, n, c))
    retrained[..., 2] -= 3.0
    masked = rng.normal(size=(8, n, c)) + np.eye(c)[2] * 4.0
    masked[..., 2] = -np.inf
    conf_r = za.logit_scaled_confidence(retrained, y)
    conf_m = za.logit_scaled_confidence(masked, y)
    assert (masked.argmax(-1) != 2).all()
    assert za.ulira_attack(conf_m, conf_r[64:], conf_r[:64]).auc > 0.99
    assert za.forgetting_quality(za.per_example_epsilon(conf_m, conf_r[64:])) < 0.01


def test_jsd_to_population_against_scipy():
    from scipy.spatial.distance import jensenshannon

    rng = np.random.default_rng(6)
    u, ref = rng.normal(size=(3, 9, 4)), rng.normal(size=(5, 9, 4))
    got = za.jsd_to_population(u, ref)
    q = _softmax(ref).mean(0)
    want = [np.mean([jensenshannon(_softmax(u[m, i]), q[i], base=2) ** 2 for i in range(9)]) for m in range(3)]
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)
    assert za.jsd_to_population(ref, ref[:1])[0] == pytest.approx(0.0, abs=1e-12)


def test_public_kl_div_variant_is_not_the_textbook_jsd():
    from hyperforget.pipelines.metrics import js_divergence, kl_div_public_variant

    rng = np.random.default_rng(7)
    p, q = _softmax(rng.normal(size=(20, 10))), _softmax(rng.normal(size=(20, 10)))
    textbook = js_divergence(p, q, base=math.e).mean()
    public = kl_div_public_variant(p, q)
    # Reverse KL terms, divided by N·C instead of N: about C (= 10) times smaller here.
    assert public < textbook / 5


def test_bad_shapes_raise():
    with pytest.raises(HyperForgetError):
        za.calibrated_threshold_attack(np.zeros((3, 5)), np.zeros((3, 4)), np.zeros((3, 5)))
    with pytest.raises(HyperForgetError):
        za.ulira_attack(np.zeros((3, 5)), np.zeros((3, 5)), np.zeros((1, 5)))
    with pytest.raises(HyperForgetError):
        za.forgetting_quality(np.array([]))
