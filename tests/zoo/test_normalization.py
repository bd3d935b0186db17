import numpy as np
import pytest

from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.mlp import MLPSpec
from hyperforget.zoo.normalization import MomentSums, layer_normalization

SPEC = MLPSpec(input_size=5, hidden=3, num_classes=4)


def test_sums_over_batches_equal_numpy_unbiased():
    x = np.random.default_rng(0).normal(2.0, 3.0, size=(37, SPEC.num_params))
    sums = MomentSums(SPEC.num_params)
    for part in np.array_split(x, 5):  # batches (or DDP ranks) combine exactly
        sums.add(part)
    mean, std = sums.per_value()
    np.testing.assert_allclose(mean, x.mean(0), rtol=1e-12)
    np.testing.assert_allclose(std, x.std(0, ddof=1), rtol=1e-10)
    stats = layer_normalization(SPEC.layout, sums)
    assert stats["std"] == pytest.approx(x.std(ddof=1), rel=1e-10)
    assert stats["gpt_coeff"] == pytest.approx(0.538 / x.std(ddof=1), rel=1e-10)
    s = SPEC.layout.slot("fc2.bias")
    assert stats["layers"]["fc2.bias"]["std"] == pytest.approx(x[:, s.offset:s.stop].std(ddof=1), rel=1e-10)


def test_too_few_or_constant_checkpoints_are_refused():
    with pytest.raises(HyperForgetError, match="grow the zoo"):
        MomentSums(SPEC.num_params).add(np.zeros((1, SPEC.num_params))).per_value()
    with pytest.raises(HyperForgetError, match="equal"):
        layer_normalization(SPEC.layout, MomentSums(SPEC.num_params).add(np.ones((4, SPEC.num_params))))
