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


def test_min_cost_assignments_agree_with_every_permutation_tried():
    import itertools

    from hyperforget.zoo.augment import min_cost_assignments

    cost = torch.rand(40, 5, 5, generator=torch.Generator().manual_seed(0))
    perms = torch.tensor(list(itertools.permutations(range(5))))  # (120, 5)
    totals = cost[:, torch.arange(5)[None, :], perms].sum(-1)  # (40, 120)
    got = min_cost_assignments(cost)
    assert (torch.sort(got, 1).values == torch.arange(5)).all()  # real permutations
    torch.testing.assert_close(cost.gather(2, got[..., None]).squeeze(-1).sum(-1), totals.min(1).values)
    assert min_cost_assignments(torch.zeros(0, 3, 3)).shape == (0, 3)


def _units_with_shared_features(spec: MLPSpec, n: int, seed: int) -> torch.Tensor:
    """n networks whose hidden units are noisy copies of the same H features, in a random order and with
    biases that put them in a random fc1.bias order: a zoo whose units correspond, as trained zoos' partly do."""
    g = torch.Generator().manual_seed(seed)
    feature = 3 * init_params(spec, [seed])[0]
    params = feature + 0.05 * torch.randn(n, spec.num_params, generator=g)
    b1 = spec.layout.slot("fc1.bias")
    params[:, b1.offset:b1.stop] = 0.3 * torch.randn(n, spec.hidden, generator=g)
    return permute_hidden(spec, params, torch.stack([torch.randperm(spec.hidden, generator=g) for _ in range(n)]))


def test_matching_to_a_template_is_a_canonical_form_that_lines_up_similar_units():
    from hyperforget.zoo.augment import canonicalize, matching_permutations, unit_template

    spec = MLPSpec(11, 5, 4)
    params = _units_with_shared_features(spec, 60, seed=3)
    template = unit_template(spec, params)
    matched = permute_hidden(spec, params, matching_permutations(spec, params, template))
    # Every permuted copy maps to the same vector, which computes the same function.
    copies = permute_hidden(spec, params, random_permutations(spec.hidden, len(params), seed=4))
    torch.testing.assert_close(permute_hidden(spec, copies, matching_permutations(spec, copies, template)), matched)
    x = torch.randn(9, 11, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(batched_logits(spec, matched, x), batched_logits(spec, params, x), rtol=1e-5, atol=1e-5)
    # Units that compute the same feature end in the same place: the incoming weights barely vary
    # across networks, unlike the fc1.bias order, which scatters them.
    w1 = spec.layout.slot("fc1.weight")
    spread = {name: float(p[:, w1.offset:w1.stop].var(0).sum())
              for name, p in (("match", matched), ("bias", canonicalize(spec, params)))}
    assert spread["match"] < 0.1 * spread["bias"], spread
    # The template is (at its fixed point) the mean of the networks matched to it.
    torch.testing.assert_close(matched.mean(0), template, rtol=1e-4, atol=1e-5)
