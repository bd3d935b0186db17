"""DDPM maths: the forward process against its closed form, samplers against a known optimum."""

import math

import pytest
import torch

from hyperforget.hyper.diffusion import DiffusionConfig, GaussianDiffusion
from hyperforget.zoo.errors import HyperForgetError


def test_schedule_is_linear_g_pt():
    d = GaussianDiffusion()
    assert d.num_timesteps == 1000
    assert d.betas[0].item() == pytest.approx(1e-4) and d.betas[-1].item() == pytest.approx(0.02)
    assert torch.allclose(d.betas.diff(), d.betas.diff()[0].expand(999))


def test_iterated_forward_process_matches_closed_form():
    d = GaussianDiffusion()
    # Exactly: x_t = a_t x0 + noise of variance v_t with a_t = Π√α, v_t = α_t v_{t−1} + β_t.
    a, v = 1.0, 0.0
    for t in range(1000):
        a, v = a * math.sqrt(d.alphas[t]), d.alphas[t].item() * v + d.betas[t].item()
        if t in (0, 9, 499, 999):
            assert a == pytest.approx(d.sqrt_alpha_bar[t].item(), rel=1e-9)
            assert v == pytest.approx(1 - d.alpha_bar[t].item(), rel=1e-9)
    # And by simulation: iterate q(x_t | x_{t-1}) and compare moments with q(x_t | x_0).
    torch.manual_seed(0)
    x0 = torch.tensor([[1.5, -2.0, 0.25]]).repeat(8000, 1)
    x = x0.clone()
    for t in range(300):
        x = d.q_step(x, torch.full((len(x),), t))
    closed = d.q_sample(x0, torch.full((len(x0),), 299))
    ab = d.alpha_bar[299].item()
    torch.testing.assert_close(x.mean(0), math.sqrt(ab) * x0[0], atol=0.03, rtol=0)
    torch.testing.assert_close(x.var(0), torch.full((3,), 1 - ab), atol=0.03, rtol=0)
    torch.testing.assert_close(closed.mean(0), x.mean(0), atol=0.04, rtol=0)
    torch.testing.assert_close(closed.var(0), x.var(0), atol=0.04, rtol=0)


def _gaussian_oracle(d: GaussianDiffusion, mu: float, s: float):
    """E[x0 | x_t] when x0 ~ N(mu, s²): the exact x0-predictor of a Gaussian data set."""
    def fn(x, t):
        ab = d.alpha_bar[t].to(x.dtype)[:, None]
        return mu + s * s * ab.sqrt() / (ab * s * s + 1 - ab) * (x - ab.sqrt() * mu)
    return fn


@pytest.mark.parametrize("method,steps,variance", [("ddpm", 1000, "small"), ("ddpm", 1000, "large"),
                                                     ("ddim", 250, "small")])
def test_samplers_recover_a_gaussian_data_distribution(method, steps, variance):
    # DDIM with few steps shrinks the spread (exact oracle, std 0.3: 10 steps give 0.18, 50 give 0.28).

    d = GaussianDiffusion(DiffusionConfig(variance=variance))
    mu, s = 0.7, 0.3
    x = d.sample(_gaussian_oracle(d, mu, s), (1500, 2), method=method, steps=steps,
                 generator=torch.Generator().manual_seed(1))
    assert x.mean().item() == pytest.approx(mu, abs=0.02)
    assert x.std().item() == pytest.approx(s, rel=0.06)


def test_sampling_is_deterministic_for_a_seed():
    d = GaussianDiffusion()
    fn = _gaussian_oracle(d, 0.0, 1.0)
    for method in ("ddim", "ddpm"):
        a = d.sample(fn, (3, 5), method=method, steps=10, generator=torch.Generator().manual_seed(4))
        b = d.sample(fn, (3, 5), method=method, steps=10, generator=torch.Generator().manual_seed(4))
        c = d.sample(fn, (3, 5), method=method, steps=10, generator=torch.Generator().manual_seed(5))
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_ddim_returns_a_constant_x0_prediction_exactly():
    d = GaussianDiffusion()
    target = torch.randn(2, 7)
    out = d.ddim_sample(lambda x, t: target, (2, 7), steps=25, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, target)
    assert d.ddim_timesteps(5) == [999, 749, 500, 250, 0]


def test_training_loss_is_eq5_mse():
    d = GaussianDiffusion()
    x0 = torch.randn(4, 6)
    terms = d.training_losses(lambda x, t: torch.zeros_like(x), x0, torch.tensor([0, 5, 50, 999]))
    assert terms["mse"].item() == pytest.approx((x0 ** 2).mean().item())
    w = torch.tensor([3.0, 3.0, 0.0, 0.0, 0.0, 0.0])
    weighted = d.training_losses(lambda x, t: torch.zeros_like(x), x0, torch.zeros(4, dtype=torch.long), weights=w)
    assert weighted["loss"].item() == pytest.approx((x0[:, :2] ** 2).mean().item())


def test_bad_configs():
    with pytest.raises(HyperForgetError, match="schedule"):
        DiffusionConfig(schedule="cosine-ish")
    with pytest.raises(HyperForgetError, match="beta"):
        DiffusionConfig(beta_start=0.1, beta_end=0.01)
    with pytest.raises(HyperForgetError, match="method"):
        GaussianDiffusion().sample(lambda x, t: x, (1, 1), method="euler")
    with pytest.raises(HyperForgetError, match="DDIM steps"):
        GaussianDiffusion().ddim_timesteps(0)
