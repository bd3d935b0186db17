"""Lockstep SGD against an independent one-model-at-a-time torch loop, and train_models behaviour."""

from __future__ import annotations

import math
import os
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from hyperforget.zoo.datasets import load_dataset
from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo import kernels as kernels_module
from hyperforget.zoo.lockstep import LockstepSGD, epoch_batches, train_models
from hyperforget.zoo.mlp import MLP, MLPSpec, evaluate_per_class, init_params

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def digits4():
    return load_dataset("digits", classes=(0, 1, 2, 3))


def reference_train(spec, x, y, seed, *, epochs, lr, batch_size, data_seed, class_weights=None,
                    momentum=0.9, nesterov=True, weight_decay=5e-4):
    """Plain PyTorch: nn.Linear layers, torch.optim.SGD, per-step cosine lr."""
    model = MLP.from_flat(spec, init_params(spec, [seed])[0])
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, nesterov=nesterov,
                          weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(data_seed)
    total = epochs * math.ceil(len(y) / batch_size)
    cw = torch.ones(spec.num_classes) if class_weights is None else torch.as_tensor(class_weights)
    step = 0
    for _ in range(epochs):
        for idx in epoch_batches(len(y), batch_size, gen):
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1 + math.cos(math.pi * step / total))
            w = cw[y[idx]]
            ce = F.cross_entropy(model(x[idx]), y[idx], reduction="none")
            loss = (w * ce).sum() / w.sum().clamp_min(1e-12)
            opt.zero_grad()
            loss.backward()
            opt.step()
            step += 1
    return model.flat_params()


def test_kernels_build_where_a_compiler_exists():
    if shutil.which(os.environ.get("CC", "cc")):
        assert kernels_module.compiled_kernels() is not None


@pytest.mark.parametrize("grad_mode", ["manual", "autograd"])
def test_lockstep_matches_torch_sgd(digits4, grad_mode, kernels):
    spec = MLPSpec(64, 3, 4)
    x, y = torch.as_tensor(digits4.x_train), torch.as_tensor(digits4.y_train)
    seeds, lrs = [11, 12, 13], [0.1, 0.05, 0.2]
    cw = torch.tensor([[1.0, 1, 1, 1], [1, 0, 1, 1], [0.5, 1, 0, 2]])
    got = train_models(spec, x, y, seeds, epochs=2, lr=lrs, batch_size=37, class_weights=cw,
                       data_seed=5, grad_mode=grad_mode)
    for i, s in enumerate(seeds):
        want = reference_train(spec, x, y, s, epochs=2, lr=lrs[i], batch_size=37, data_seed=5,
                               class_weights=cw[i])
        torch.testing.assert_close(got[i], want, rtol=1e-4, atol=1e-5)


def test_a_diverged_run_stays_nan_and_leaves_the_others_alone(digits4, kernels):
    spec = MLPSpec(64, 3, 4)
    x, y = torch.as_tensor(digits4.x_train)[:128], torch.as_tensor(digits4.y_train)[:128]
    start = init_params(spec, [1, 2, 3])
    start[1, 7] = float("nan")
    opt = LockstepSGD(spec, start, 0.1, 5)
    alone = LockstepSGD(spec, start[[0, 2]], 0.1, 5)
    for idx in torch.arange(128).split(32):
        loss = opt.step(x[idx], y[idx], torch.ones(3, len(idx)))
        alone.step(x[idx], y[idx], torch.ones(2, len(idx)))
    assert torch.isnan(loss[1]) and torch.isnan(opt.params[1]).any()
    torch.testing.assert_close(opt.params[[0, 2]], alone.params)


def test_per_run_lr_factors_match_torch_sgd_with_per_step_lr(digits4, kernels):
    """step(lr_factors=...) gives each run its own schedule: torch.optim.SGD with lr set per step."""
    spec = MLPSpec(64, 3, 4)
    x, y = torch.as_tensor(digits4.x_train)[:200], torch.as_tensor(digits4.y_train)[:200]
    seeds, base = [21, 22], [0.1, 0.3]
    factors = [lambda s: 1.0, lambda s: 3.0 if s >= 4 else 0.5]  # run 1 restarts higher at step 4
    opt = LockstepSGD(spec, init_params(spec, seeds), base, 10)
    gen = torch.Generator().manual_seed(1)
    batches = [i for _ in range(2) for i in epoch_batches(len(y), 41, gen)]
    for s, idx in enumerate(batches):
        opt.step(x[idx], y[idx], torch.ones(2, len(idx)), torch.tensor([f(s) for f in factors]))
    for r, seed in enumerate(seeds):
        model = MLP.from_flat(spec, init_params(spec, [seed])[0])
        ref = torch.optim.SGD(model.parameters(), lr=base[r], momentum=0.9, nesterov=True, weight_decay=5e-4)
        for s, idx in enumerate(batches):
            for group in ref.param_groups:
                group["lr"] = base[r] * factors[r](s)
            ref.zero_grad()
            F.cross_entropy(model(x[idx]), y[idx]).backward()
            ref.step()
        torch.testing.assert_close(opt.params[r], model.flat_params(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("activation", ["relu", "tanh", "sigmoid", "gelu"])
def test_manual_gradient_matches_autograd(activation, kernels):
    spec = MLPSpec(10, 3, 5, activation)
    gen = torch.Generator().manual_seed(0)
    params = torch.randn(4, spec.num_params, generator=gen)
    x, y = torch.randn(9, 10, generator=gen), torch.randint(0, 5, (9,), generator=gen)
    w = (torch.rand(4, 9, generator=gen) > 0.3).float()
    w[2] = 0  # a run with nothing to learn from this batch
    man = LockstepSGD(spec, params, 0.1, 10, grad_mode="manual")
    auto = LockstepSGD(spec, params, 0.1, 10, grad_mode="autograd")
    lm, gm = man.loss_and_grad(x, y, w)
    la, ga = auto.loss_and_grad(x, y, w)
    gm, ga = man.flat_grad(gm), auto.flat_grad(ga)
    torch.testing.assert_close(lm, la)
    torch.testing.assert_close(gm, ga, rtol=1e-4, atol=1e-6)
    assert gm[2].abs().sum() == 0


def test_train_models_learns_and_class_weight_zero_never_learns(digits4):
    spec = MLPSpec(64, 8, 4)
    params = train_models(spec, digits4.x_train, digits4.y_train, [0, 1, 2], epochs=8,
                          class_weights=[1.0, 1.0, 0.0, 1.0])
    m = evaluate_per_class(spec, params, digits4.x_test, digits4.y_test)
    assert (m.acc[:, [0, 1, 3]] > 0.9).all()
    assert (m.acc[:, 2] == 0).all()  # a removed class is never predicted for its own examples
    # Deterministic for the seeds.
    again = train_models(spec, digits4.x_train, digits4.y_train, [0, 1, 2], epochs=8,
                         class_weights=[1.0, 1.0, 0.0, 1.0])
    assert torch.equal(params, again)


def test_train_models_from_init_params_and_bad_input(digits4):
    spec = MLPSpec(64, 2, 4)
    start = init_params(spec, [3, 4])
    same = train_models(spec, digits4.x_train, digits4.y_train, [3, 4], epochs=1, init_params=start)
    plain = train_models(spec, digits4.x_train, digits4.y_train, [3, 4], epochs=1)
    assert torch.equal(same, plain)
    with pytest.raises(HyperForgetError, match="class_weights"):
        train_models(spec, digits4.x_train, digits4.y_train, [0], epochs=1, class_weights=[1, 1])
    with pytest.raises(HyperForgetError, match="x_train"):
        train_models(spec, np.zeros((5, 3)), np.zeros(5), [0], epochs=1)
    with pytest.raises(HyperForgetError, match="labels"):
        train_models(spec, digits4.x_train, digits4.y_train + 4, [0], epochs=1)
    with pytest.raises(HyperForgetError, match="init_params"):
        train_models(spec, digits4.x_train, digits4.y_train, [0], epochs=1, init_params=start)
