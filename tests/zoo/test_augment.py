"""Permutation augmentation: copies compute the same function, are real permutations, are deterministic."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hyperforget.zoo.augment import augment, permute_hidden, random_permutations
from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.mlp import MLP, MLPSpec, batched_logits, init_params


@pytest.mark.parametrize("hidden", [1, 2, 5])
def test_copies_compute_the_same_logits(hidden):
    spec = MLPSpec(13, hidden, 4)
    noise = torch.randn(7, spec.num_params, generator=torch.Generator().manual_seed(0))
    params = init_params(spec, range(7)) + 0.1 * noise
    rows, perm_index = augment(spec, params, 3, seed=42)
    assert rows.shape == (7 * 4, spec.num_params)
    assert perm_index.tolist() == [0, 1, 2, 3] * 7
    x = torch.randn(19, 13, generator=torch.Generator().manual_seed(1))
    logits = batched_logits(spec, rows, x).view(7, 4, 19, 4)
    for j in range(4):
        torch.testing.assert_close(logits[:, j], logits[:, 0], rtol=1e-5, atol=1e-5)
    assert torch.equal(rows.view(7, 4, -1)[:, 0], params)
    if hidden > 1:  # copies really differ from their source
        assert (rows.view(7, 4, -1)[:, 1:] != params[:, None]).any(-1).all()
    # Deterministic per seed, different for another seed (when there is a choice).
    again, _ = augment(spec, params, 3, seed=42)
    assert torch.equal(rows, again)
    if hidden == 5:
        assert not torch.equal(rows, augment(spec, params, 3, seed=43)[0])


def test_permute_hidden_against_nn_modules():
    spec = MLPSpec(6, 3, 2)
    flat = init_params(spec, [5])
    perm = torch.tensor([[2, 0, 1]])
    out = permute_hidden(spec, flat, perm)[0]
    src = MLP.from_flat(spec, flat[0])
    got = MLP.from_flat(spec, out)
    # The layer tensors move as documented: fc1 rows, fc1.bias, fc2 columns; fc2.bias stays.
    assert torch.equal(got.fc1.weight, src.fc1.weight[[2, 0, 1]])
    assert torch.equal(got.fc1.bias, src.fc1.bias[[2, 0, 1]])
    assert torch.equal(got.fc2.weight, src.fc2.weight[:, [2, 0, 1]])
    assert torch.equal(got.fc2.bias, src.fc2.bias)
    x = torch.randn(4, 6)
    torch.testing.assert_close(got(x), src(x))


def test_random_permutations_avoid_identity_and_check_input():
    perms = random_permutations(2, 50, seed=0)
    assert (perms == [1, 0]).all()
    assert (random_permutations(1, 3, seed=0) == 0).all()
    perms = random_permutations(4, 200, seed=1)
    assert not (perms == np.arange(4)).all(1).any()
    assert (np.sort(perms, 1) == np.arange(4)).all()
    with pytest.raises(HyperForgetError, match="perms"):
        permute_hidden(MLPSpec(6, 3, 2), init_params(MLPSpec(6, 3, 2), [0]), torch.tensor([[0, 1]]))
    with pytest.raises(HyperForgetError, match="≥ 0"):
        augment(MLPSpec(6, 3, 2), init_params(MLPSpec(6, 3, 2), [0]), -1, seed=0)
