import numpy as np
import pytest

from hyperforget.hyper.data import LOSS_LEVELS, loss_quantile, loss_statistics
from hyperforget.zoo.errors import HyperForgetError


def test_loss_statistics_quantile_grid_matches_numpy():
    rng = np.random.default_rng(0)
    losses = rng.lognormal(0.0, 1.0, size=(301, 3))
    losses[7, 1] = np.nan  # a row with a NaN loss is left out entirely
    acc = np.where(losses < 1.0, 0.95, 0.3)
    stats = loss_statistics(losses, acc)
    finite = losses[np.isfinite(losses).all(1)]
    assert stats["rows"] == 300 and len(stats["quantiles"]) == len(LOSS_LEVELS)
    for q in (0.0, 0.005, 0.9, 0.995, 1.0):  # every level prompts use sits on the grid: exact
        np.testing.assert_allclose(loss_quantile(stats, q), np.quantile(finite, q, axis=0), rtol=1e-12)
    np.testing.assert_allclose(stats["q95"], np.quantile(finite, 0.95, axis=0))
    between = loss_quantile(stats, 0.15)  # linear between the 0.1 and 0.2 levels
    np.testing.assert_allclose(between, (np.quantile(finite, 0.1, axis=0) + np.quantile(finite, 0.2, axis=0)) / 2)
    known = (acc >= 0.9).all(1) & np.isfinite(losses).all(1)
    np.testing.assert_allclose(stats["known_median"], np.median(losses[known], axis=0))


def test_loss_quantile_refuses_old_statistics_and_bad_levels():
    with pytest.raises(HyperForgetError, match="retrain"):
        loss_quantile({"q05": [0.1], "max": [1.0]}, 0.5)
    with pytest.raises(HyperForgetError, match=r"\[0, 1\]"):
        loss_quantile(loss_statistics(np.ones((3, 2))), 1.5)
    with pytest.raises(HyperForgetError, match="no finite"):
        loss_statistics(np.full((4, 2), np.nan))
