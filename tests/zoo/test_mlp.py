"""The MLP family: layout round trips, batched evaluation against per-model torch, init, files."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.nn.utils import parameters_to_vector

from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.mlp import (MLP, TASK_PRESETS, MLPSpec, batched_hidden, batched_logits, evaluate_per_class,
                                 get_preset, init_params, load_mlps, model_logits, save_mlps)

torch.set_num_threads(1)


def test_paper_presets():
    assert TASK_PRESETS["mnist4"].spec.num_params == 784 * 2 + 2 + 2 * 4 + 4 == 1582
    assert TASK_PRESETS["mnist10"].spec.num_params == 784 * 7 + 7 + 7 * 10 + 10
    assert TASK_PRESETS["mnist4"].pivots == (0, 1) and TASK_PRESETS["mnist10"].pivots == (5, 6, 7, 8, 9)
    assert TASK_PRESETS["mnist4"].checkpoints_per_run == 150 and TASK_PRESETS["mnist10"].checkpoints_per_run == 200
    small = get_preset("mnist4").with_input_size(64)
    assert small.spec == MLPSpec(64, 2, 4) and small.classes == (0, 1, 2, 3)
    with pytest.raises(HyperForgetError, match="unknown preset 'mnist3'"):
        get_preset("mnist3")


@pytest.mark.parametrize("spec", [MLPSpec(64, 3, 4), MLPSpec(784, 7, 10, "tanh"), MLPSpec(5, 1, 2, "gelu")])
def test_flatten_unflatten_round_trip(spec):
    torch.manual_seed(0)
    model = MLP(spec)
    flat = model.flat_params()
    assert flat.shape == (spec.num_params,) and flat.dtype == torch.float32
    # Independent: torch's own parameter vector (same order as state_dict for this module).
    torch.testing.assert_close(flat, parameters_to_vector(model.parameters()), rtol=0, atol=0)
    back = MLP.from_flat(spec, flat)
    for k, v in model.state_dict().items():
        assert torch.equal(back.state_dict()[k], v)
    assert torch.equal(back.flat_params(), flat)
    # Batched unflatten gives each model's tensors.
    stack = torch.stack([flat, flat * 2])
    w = spec.layout.unflatten(stack)
    assert w["fc1.weight"].shape == (2, spec.hidden, spec.input_size)
    assert torch.equal(w["fc2.bias"][1], model.fc2.bias.detach() * 2)
    assert spec.layout.names == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert spec.layout.slot("fc2.bias").stop == spec.num_params
    # numpy in, exact values out
    np.testing.assert_array_equal(spec.layout.unflatten(flat.numpy())["fc1.bias"].numpy(),
                                  model.fc1.bias.detach().numpy())


def test_layout_errors():
    spec = MLPSpec(64, 3, 4)
    with pytest.raises(HyperForgetError, match="has 210 values, the MLP spec needs 211"):
        spec.layout.unflatten(torch.zeros(210))
    with pytest.raises(HyperForgetError, match=r"lacks \['fc2.bias'\]"):
        spec.layout.flatten({k: v for k, v in MLP(spec).state_dict().items() if k != "fc2.bias"})
    bad = dict(MLP(spec).state_dict())
    bad["fc1.bias"] = torch.zeros(4)
    with pytest.raises(HyperForgetError, match=r"fc1.bias has shape \(4,\), the spec expects \(3,\)"):
        spec.layout.flatten(bad)
    with pytest.raises(HyperForgetError, match="unknown activation 'swish'"):
        MLPSpec(64, 3, 4, "swish")
    with pytest.raises(HyperForgetError, match="must be positive"):
        MLPSpec(64, 0, 4)
    assert MLPSpec.from_dict(MLPSpec(9, 2, 3, "tanh").to_dict()) == MLPSpec(9, 2, 3, "tanh")


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_batched_logits_match_modules(tiny_dataset, activation):
    spec = MLPSpec(64, 3, 4, activation)
    params = init_params(spec, range(7)) + 0.3 * torch.randn(7, spec.num_params, generator=torch.Generator().manual_seed(1))
    x = torch.as_tensor(tiny_dataset.x_test)
    logits = batched_logits(spec, params, x)
    hidden = batched_hidden(spec, params, x)
    assert logits.shape == (7, len(x), 4) and hidden.shape == (7, len(x), 3)
    with torch.no_grad():
        for m in range(7):
            model = MLP.from_flat(spec, params[m])
            torch.testing.assert_close(logits[m], model(x), rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(hidden[m], model.hidden_features(x), rtol=1e-5, atol=1e-5)


def test_model_logits_chunks_and_masks(tiny_dataset):
    spec = MLPSpec(64, 3, 4)
    params = init_params(spec, range(7))
    x = torch.as_tensor(tiny_dataset.x_test)
    whole = batched_logits(spec, params, x)
    chunked = model_logits(spec, params.numpy(), x, masked=[1, 3], models_per_pass=3)  # passes of 3, 3, 1
    assert chunked.shape == whole.shape and torch.isneginf(chunked[..., [1, 3]]).all()
    torch.testing.assert_close(chunked[..., [0, 2]], whole[..., [0, 2]])
    assert model_logits(spec, params[:0], x).shape == (0, len(x), 4)


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid"])
def test_evaluate_per_class_matches_cross_entropy_per_model(tiny_dataset, kernels, activation):
    """Batched metrics == each model alone with F.cross_entropy, across model and row passes."""
    spec = MLPSpec(64, 3, 4, activation)
    gen = torch.Generator().manual_seed(2)
    params = init_params(spec, range(11)) + 0.5 * torch.randn(11, spec.num_params, generator=gen)
    x = torch.as_tensor(tiny_dataset.x_test)
    y = torch.as_tensor(tiny_dataset.y_test)
    got = evaluate_per_class(spec, params, x, y, models_per_pass=4, rows_per_pass=50)  # odd passes
    assert got.loss.shape == (11, 4) and got.acc.dtype == np.float32
    with torch.no_grad():
        for m in range(11):
            out = MLP.from_flat(spec, params[m])(x)
            for c in range(4):
                mask = y == c
                ce = F.cross_entropy(out[mask], y[mask]).item()
                acc = (out[mask].argmax(1) == c).float().mean().item()
                assert got.loss[m, c] == pytest.approx(ce, rel=1e-5, abs=1e-6)
                assert got.acc[m, c] == pytest.approx(acc, abs=1e-6)
            assert got.total_loss[m] == pytest.approx(F.cross_entropy(out, y).item(), rel=1e-5)
            assert got.total_acc[m] == pytest.approx((out.argmax(1) == y).float().mean().item(), abs=1e-6)


def test_evaluate_edge_cases(tiny_dataset, kernels):
    spec = MLPSpec(64, 3, 4)
    p = init_params(spec, [0])
    x, y = tiny_dataset.x_test, tiny_dataset.y_test
    one = evaluate_per_class(spec, p[0], x, y)  # a single (P,) vector
    assert one.loss.shape == (1, 4)
    keep = y != 2  # class 2 absent: NaN for it, finite for others
    m = evaluate_per_class(spec, p, x[keep], y[keep])
    assert np.isnan(m.loss[0, 2]) and np.isnan(m.acc[0, 2]) and np.isfinite(m.loss[0, [0, 1, 3]]).all()
    bad = torch.cat([p, p])
    bad[1, 5] = float("nan")  # a diverged model: NaN loss, no correct prediction, the other one untouched
    m = evaluate_per_class(spec, bad, x, y)
    assert np.isnan(m.loss[1]).all() and np.isnan(m.total_loss[1]) and (m.acc[1] == 0).all()
    np.testing.assert_allclose(m.loss[0], one.loss[0], rtol=1e-6)
    with pytest.raises(HyperForgetError, match="inputs have 63 features"):
        evaluate_per_class(spec, p, x[:, :63], y)
    with pytest.raises(HyperForgetError, match="needs 211"):
        evaluate_per_class(spec, p[:, :100], x, y)


def test_init_params_is_torch_default_init_and_keeps_rng():
    spec = MLPSpec(64, 3, 4)
    torch.manual_seed(123)
    before = torch.rand(3)
    torch.manual_seed(123)
    p = init_params(spec, [5, 9, 5])
    assert torch.equal(torch.rand(3), before)  # global RNG untouched
    assert torch.equal(p[0], p[2]) and not torch.equal(p[0], p[1])
    torch.manual_seed(9)
    assert torch.equal(p[1], MLP(spec).flat_params())
    bound = 1 / np.sqrt(64)  # nn.Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    w1 = spec.layout.unflatten(p)["fc1.weight"]
    assert w1.abs().max() <= bound and w1.abs().max() > 0.8 * bound


def test_save_load_mlps(tmp_path):
    from safetensors.torch import load_file

    spec = MLPSpec(64, 3, 4)
    p = init_params(spec, [1, 2, 3])
    path = str(tmp_path / "models.safetensors")
    save_mlps(path, spec, p, {"method": "retrain", "seeds": [1, 2, 3]})
    spec2, p2, meta = load_mlps(path)
    assert spec2 == spec and torch.equal(p2, p) and meta["method"] == "retrain"
    plain = load_file(path)  # any safetensors user reads the first model's layers
    assert torch.equal(plain["fc1.weight"], spec.layout.unflatten(p[0])["fc1.weight"])
    bad = p.clone()
    bad[1, 0] = float("nan")
    save_mlps(path, spec, bad)
    with pytest.raises(HyperForgetError, match="NaN or infinite"):
        load_mlps(path)
    with pytest.raises(HyperForgetError, match="no MLP file"):
        load_mlps(str(tmp_path / "absent.safetensors"))


def test_an_exact_logit_tie_is_not_a_correct_prediction(kernels):
    spec = MLPSpec(5, 2, 3)
    x, y = torch.randn(30, 5), torch.arange(30) % 3
    zero = evaluate_per_class(spec, torch.zeros(1, spec.num_params), x, y)  # every logit ties
    assert (zero.acc == 0).all() and (zero.total_acc == 0).all()
    # Elsewhere accuracy agrees with argmax of an nn.Linear forward.
    p = torch.randn(3, spec.num_params)
    acc = evaluate_per_class(spec, p, x, y).acc
    for i in range(3):
        model = MLP(spec)
        torch.nn.utils.vector_to_parameters(p[i], model.parameters())
        hit = (model(x).argmax(1) == y).float()
        np.testing.assert_allclose(acc[i], [hit[y == k].mean().item() for k in range(3)], atol=1e-6)
