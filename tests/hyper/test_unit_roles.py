"""Unit roles (hyper/unit_roles.py): the C × H matrix against a per-image loop, its equivariance under
hidden-unit permutations, and the DiHyFo-1 denoiser that reads it."""

from __future__ import annotations

import pytest
import torch

from hyperforget.hyper.model import DiTConfig, build_denoiser
from hyperforget.hyper.unit_roles import UnitRoles
from hyperforget.zoo.augment import permute_hidden, random_permutations
from hyperforget.zoo.errors import HyperForgetError

from tests.hyper.conftest import SPEC


def _roles_by_loop(raw: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """R[k, h] = W2[k, h] · mean over the images of class k of relu(W1[h] · x + b1[h]), image by image."""
    w = SPEC.layout.unflatten(raw[None])
    w1, b1, w2 = w["fc1.weight"][0], w["fc1.bias"][0], w["fc2.weight"][0]
    r = torch.zeros(SPEC.num_classes, SPEC.hidden)
    for k in range(SPEC.num_classes):
        acts = [torch.relu(w1 @ xi + b1) for xi in x[y == k]]
        r[k] = w2[k] * torch.stack(acts).mean(0)
    return r


def _roles_module(ckpt_zoo, per_class: int = 5) -> UnitRoles:
    u = UnitRoles(SPEC, per_class, 16)
    x, y = ckpt_zoo["x_test"], ckpt_zoo["y_test"]
    u.set_probes(torch.as_tensor(x), torch.as_tensor(y))
    return u


def test_roles_match_a_per_image_loop_after_normalization(ckpt_zoo):
    u = _roles_module(ckpt_zoo)
    shift, scale = torch.randn(SPEC.num_params) * 0.1, torch.rand(SPEC.num_params) + 0.5
    u.set_normalization(scale, shift)
    raw = ckpt_zoo["params"][-3:]
    got = u.roles((raw - shift) * scale)  # the model sees normalized θ
    probe_labels = torch.arange(SPEC.num_classes).repeat_interleave(5)
    for i in range(len(raw)):
        torch.testing.assert_close(got[i], _roles_by_loop(raw[i], u.probes, probe_labels), rtol=1e-4, atol=1e-5)


def test_roles_follow_the_hidden_units_when_they_are_permuted(ckpt_zoo):
    u = _roles_module(ckpt_zoo)
    raw = ckpt_zoo["params"][-4:]
    perms = random_permutations(SPEC.hidden, len(raw), seed=1)
    moved = u.roles(permute_hidden(SPEC, raw, perms))
    base = u.roles(raw)
    for i in range(len(raw)):
        torch.testing.assert_close(moved[i], base[i][:, torch.as_tensor(perms[i])], rtol=1e-5, atol=1e-6)


def test_probes_are_a_fixed_class_balanced_draw_and_too_few_images_are_refused(ckpt_zoo):
    x, y = torch.as_tensor(ckpt_zoo["x_test"]), torch.as_tensor(ckpt_zoo["y_test"])
    a, b = UnitRoles(SPEC, 4, 8), UnitRoles(SPEC, 4, 8)
    a.set_probes(x, y), b.set_probes(x, y)
    assert torch.equal(a.probes, b.probes)
    with pytest.raises(HyperForgetError, match="lower unit_role_probes"):
        UnitRoles(SPEC, 10_000, 8).set_probes(x, y)


def test_dihyfo1_with_unit_roles_starts_as_the_model_without_them():
    cfg = DiTConfig(variant="dihyfo1", backbone="mlp", hidden=32, layers=2, mlp_ratio=1.0, cond_dim=16)
    torch.manual_seed(0)
    plain = build_denoiser(cfg, 1, SPEC.num_params, SPEC.num_params, SPEC.num_classes)
    torch.manual_seed(0)
    roles = build_denoiser(DiTConfig(**{**cfg.to_dict(), "unit_role_probes": 3}), 1, SPEC.num_params,
                           SPEC.num_params, SPEC.num_classes, spec=SPEC)
    roles.load_state_dict({**roles.state_dict(), **plain.state_dict()})
    # zero-initialized last layer: the role embedding adds nothing until training moves it
    b = 5
    args = (torch.randn(b, SPEC.num_params), torch.randint(0, 100, (b,)), torch.rand(b, SPEC.num_classes),
            torch.randn(b, SPEC.num_params), torch.rand(b, SPEC.num_classes))
    torch.testing.assert_close(roles(*args), plain(*args))
    with pytest.raises(HyperForgetError, match="unit_role_probes must be"):
        DiTConfig(unit_role_probes=-1)
    with pytest.raises(HyperForgetError, match="MLP backbone"):
        build_denoiser(DiTConfig(variant="dihyfo1", unit_role_probes=3), 4, 64, SPEC.num_params, SPEC.num_classes)
