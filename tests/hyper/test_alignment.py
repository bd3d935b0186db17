"""Prompt alignment: R² (Eq. 6) and Pearson r against sklearn and numpy."""

import math

import numpy as np
import pytest

from hyperforget.hyper.alignment import pearson, prompt_alignment_r2
from hyperforget.zoo.errors import HyperForgetError


# ---------------------------------------------------------------------------------------------- R², Pearson


def test_prompt_alignment_r2():
    t = np.array([0.1, 0.5, 0.9, 1.4, 2.0])
    assert prompt_alignment_r2(t, t) == pytest.approx(1.0)
    assert prompt_alignment_r2(t, np.full(5, t.mean())) == pytest.approx(0.0, abs=1e-6)
    o = t + np.array([0.1, -0.2, 0.05, 0.3, -0.1])
    from sklearn.metrics import r2_score

    assert prompt_alignment_r2(t, o) == pytest.approx(r2_score(t, o), rel=1e-6)
    assert prompt_alignment_r2(t, t[::-1]) < 0
    # Constant targets: the ε keeps it finite (and very negative unless perfect).
    assert prompt_alignment_r2(np.ones(3), np.ones(3)) == 1.0
    with pytest.raises(HyperForgetError, match="same"):
        prompt_alignment_r2(t, t[:3])


def test_pearson_matches_numpy_and_is_nan_for_constant_input():
    rng = np.random.default_rng(5)
    t, o = rng.normal(size=31), rng.normal(size=31)
    assert pearson(t, o) == pytest.approx(np.corrcoef(t, o)[0, 1])
    assert pearson(t, 3 * t + 1) == pytest.approx(1.0)
    assert math.isnan(pearson(t, np.full(31, 2.0)))
    assert math.isnan(pearson([1.0], [2.0]))


