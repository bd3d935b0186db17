"""DDPM / DDIM maths for the diffusion hypernetwork, in one place.

Notation follows Ho et al. 2020 ("DDPM") and Song et al. 2021 ("DDIM"):
    β_t            linear from beta_start to beta_end over T steps          (DDPM §4)
    α_t = 1 − β_t,   ᾱ_t = ∏_{s≤t} α_s
    q(x_t | x_{t−1}) = N(√α_t x_{t−1}, β_t I)                                (DDPM Eq. 2)
    q(x_t | x_0)     = N(√ᾱ_t x_0, (1 − ᾱ_t) I)                               (DDPM Eq. 4)
    q(x_{t−1} | x_t, x_0) = N(μ̃_t, β̃_t I),                                  (DDPM Eq. 6-7)
        μ̃_t = √ᾱ_{t−1} β_t / (1 − ᾱ_t) · x_0 + √α_t (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · x_t
        β̃_t = (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · β_t
The network predicts x_0 (θ*) directly, as G.pt does, and is trained with the plain MSE of
Equation 5 of the reference text: E‖θ* − G(θ*_t, cond, t)‖². Timesteps are 0-based here:
index t ∈ [0, T) stands for DDPM's step t+1.

The network is seen only through ``model_fn(x_t (B, P), t (B,) long) -> x0_hat (B, P)``.
Samplers take a ``torch.Generator`` so that a seed gives the same parameters every time.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Callable

import torch

from hyperforget.zoo.errors import HyperForgetError, from_settings

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

SCHEDULES = ("linear",)
VARIANCES = ("small", "large")


@dataclass(frozen=True)
class DiffusionConfig:
    """The forward process and the sampler's variance choice (stored with every hypernetwork)."""

    timesteps: int = 1000  # T, number of diffusion steps (G.pt and DDPM: 1000)
    beta_start: float = 1e-4  # β_1 of the linear schedule
    beta_end: float = 0.02  # β_T of the linear schedule
    schedule: str = "linear"  # beta schedule; schedules may be added but never changed once saved
    variance: str = "small"  # DDPM reverse variance: "small" = β̃_t (posterior), "large" = β_t (G.pt)

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise HyperForgetError(f"unknown beta schedule {self.schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if self.variance not in VARIANCES:
            raise HyperForgetError(f"unknown DDPM variance {self.variance!r}: choose one of {', '.join(VARIANCES)}")
        if self.timesteps < 2 or not 0 < self.beta_start < self.beta_end < 1:
            raise HyperForgetError(
                f"bad diffusion schedule (T={self.timesteps}, β {self.beta_start}..{self.beta_end}): "
                "need T ≥ 2 and 0 < beta_start < beta_end < 1")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DiffusionConfig":
        return from_settings(cls, d, "diffusion")


class GaussianDiffusion:
    """Schedules precomputed in float64 and read out per batch as float32 (B, 1) columns."""

    def __init__(self, config: DiffusionConfig | None = None):
        self.config = config = config or DiffusionConfig()
        self.num_timesteps = config.timesteps
        betas = torch.linspace(config.beta_start, config.beta_end, config.timesteps, dtype=torch.float64)
        alphas = 1.0 - betas
        alpha_bar = torch.cumprod(alphas, 0)
        alpha_bar_prev = torch.cat([torch.ones(1, dtype=torch.float64), alpha_bar[:-1]])
        self.betas = betas
        self.alphas = alphas
        self.alpha_bar = alpha_bar
        self.alpha_bar_prev = alpha_bar_prev
        self.sqrt_alpha_bar = alpha_bar.sqrt()
        self.sqrt_one_minus_alpha_bar = (1.0 - alpha_bar).sqrt()
        # DDPM Eq. 7: posterior variance and mean coefficients of q(x_{t-1} | x_t, x_0).
        self.posterior_variance = betas * (1.0 - alpha_bar_prev) / (1.0 - alpha_bar)
        self.posterior_coef_x0 = betas * alpha_bar_prev.sqrt() / (1.0 - alpha_bar)
        self.posterior_coef_xt = (1.0 - alpha_bar_prev) * alphas.sqrt() / (1.0 - alpha_bar)

    @staticmethod
    def _at(table: torch.Tensor, t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """table[t] as a (B, 1, ...) column broadcastable against ``like`` (B, ...)."""
        out = table.to(like.device)[t].to(like.dtype)
        return out.reshape(-1, *([1] * (like.ndim - 1)))

    # ---------------------------------------------------------------- forward process
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """DDPM Eq. 4: x_t = √ᾱ_t x0 + √(1−ᾱ_t) ε.  x0, noise: (B, P); t: (B,) -> (B, P)."""
        if noise is None:
            noise = torch.randn_like(x0)
        return self._at(self.sqrt_alpha_bar, t, x0) * x0 + self._at(self.sqrt_one_minus_alpha_bar, t, x0) * noise

    def q_step(self, x_prev: torch.Tensor, t: torch.Tensor, noise: torch.Tensor | None = None) -> torch.Tensor:
        """DDPM Eq. 2, one step: x_t = √α_t x_{t−1} + √β_t ε.  (B, P) -> (B, P)."""
        if noise is None:
            noise = torch.randn_like(x_prev)
        return self._at(self.alphas.sqrt(), t, x_prev) * x_prev + self._at(self.betas.sqrt(), t, x_prev) * noise

    def sample_timesteps(self, batch: int, generator: torch.Generator | None = None,
                         device: torch.device | str = "cpu") -> torch.Tensor:
        """Uniform t ∈ [0, T) as G.pt does: (B,) long."""
        return torch.randint(0, self.num_timesteps, (batch,), generator=generator).to(device)

    # ---------------------------------------------------------------- objective
    def training_losses(self, model_fn: ModelFn, x0: torch.Tensor, t: torch.Tensor,
                        noise: torch.Tensor | None = None, weights: torch.Tensor | None = None,
                        sample_weights: torch.Tensor | None = None) -> dict:
        """Equation 5: MSE between θ* and the network's x0 prediction from θ*_t.

        Args:
            x0: (B, P) clean targets (normalized θ*); t: (B,) timesteps.
            weights: optional (P,) per-value weights that average to 1 (e.g. equal weight per layer).
            sample_weights: optional (B,) per-example weights (a view's re-balancing weights).
        Returns {"loss": scalar to minimize, "mse": unweighted scalar MSE, "x0_hat": (B, P)}.
        """
        x_t = self.q_sample(x0, t, noise)
        x0_hat = model_fn(x_t, t)
        sq = (x0_hat.float() - x0.float()) ** 2  # (B, P)
        mse = sq.mean()
        if weights is not None:
            sq = sq * weights.to(sq)
        if sample_weights is not None:
            sq = sq * (sample_weights.to(sq) / sample_weights.to(sq).mean().clamp_min(1e-12))[:, None]
        loss = sq.mean() if weights is not None or sample_weights is not None else mse
        return {"loss": loss, "mse": mse.detach(), "x0_hat": x0_hat}

    # ---------------------------------------------------------------- samplers
    def ddpm_step(self, x0_hat: torch.Tensor, x_t: torch.Tensor, t: int,
                  generator: torch.Generator | None = None) -> torch.Tensor:
        """Ancestral step x_t -> x_{t−1} from the posterior q(x_{t−1} | x_t, x0_hat) (DDPM Eq. 6-7)."""
        tt = torch.full((x_t.shape[0],), t, dtype=torch.long)
        mean = self._at(self.posterior_coef_x0, tt, x_t) * x0_hat + self._at(self.posterior_coef_xt, tt, x_t) * x_t
        if t == 0:
            return mean  # the last step returns the mean: no noise is added to x_0
        var = self.betas if self.config.variance == "large" else self.posterior_variance
        noise = torch.randn(x_t.shape, generator=generator, dtype=x_t.dtype).to(x_t.device)
        return mean + self._at(var, tt, x_t).sqrt() * noise

    @torch.no_grad()
    def ddpm_sample(self, model_fn: ModelFn, shape: tuple[int, int], generator: torch.Generator | None = None,
                    device: torch.device | str = "cpu", progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Ancestral sampling over all T steps from x_T ~ N(0, I): (B, P)."""
        x = torch.randn(shape, generator=generator).to(device)
        for t in reversed(range(self.num_timesteps)):
            tt = torch.full((shape[0],), t, dtype=torch.long, device=device)
            x = self.ddpm_step(model_fn(x, tt), x, t, generator)
            if progress is not None:
                progress(1)
        return x

    def ddim_timesteps(self, steps: int) -> list[int]:
        """Evenly spaced timesteps from T−1 down to 0 ("uniform" skip of DDIM §4.2)."""
        if not 1 <= steps <= self.num_timesteps:
            raise HyperForgetError(f"DDIM steps must be in 1..{self.num_timesteps}, got {steps}")
        ts = torch.linspace(self.num_timesteps - 1, 0, steps).round().long().tolist()
        return sorted(set(ts), reverse=True)

    @torch.no_grad()
    def ddim_sample(self, model_fn: ModelFn, shape: tuple[int, int], steps: int = 50, eta: float = 0.0,
                    generator: torch.Generator | None = None, device: torch.device | str = "cpu",
                    progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """DDIM (Song et al. 2021, Eq. 12) over a subsequence of timesteps; eta=0 is deterministic given x_T.

        x_{s} = √ᾱ_s x̂0 + √(1 − ᾱ_s − σ²) ε̂ + σ z,  ε̂ = (x_t − √ᾱ_t x̂0) / √(1 − ᾱ_t),
        σ = eta · √((1 − ᾱ_s)/(1 − ᾱ_t)) · √(1 − ᾱ_t/ᾱ_s).  Returns (B, P).
        """
        x = torch.randn(shape, generator=generator).to(device)
        ts = self.ddim_timesteps(steps)
        for i, t in enumerate(ts):
            tt = torch.full((shape[0],), t, dtype=torch.long, device=device)
            x0_hat = model_fn(x, tt)
            if i == len(ts) - 1:
                x = x0_hat  # the step to "t = −1" (ᾱ = 1) is the x0 prediction itself
            else:
                s = ts[i + 1]
                ab_t, ab_s = float(self.alpha_bar[t]), float(self.alpha_bar[s])
                eps = (x - math.sqrt(ab_t) * x0_hat) / math.sqrt(1.0 - ab_t)
                sigma = eta * math.sqrt((1.0 - ab_s) / (1.0 - ab_t)) * math.sqrt(max(0.0, 1.0 - ab_t / ab_s))
                x = math.sqrt(ab_s) * x0_hat + math.sqrt(max(0.0, 1.0 - ab_s - sigma ** 2)) * eps
                if sigma > 0:
                    x = x + sigma * torch.randn(shape, generator=generator).to(device)
            if progress is not None:
                progress(1)
        return x

    def sample(self, model_fn: ModelFn, shape: tuple[int, int], method: str = "ddim", steps: int = 50,
               eta: float = 0.0, generator: torch.Generator | None = None, device: torch.device | str = "cpu",
               progress: Callable[[int], None] | None = None) -> torch.Tensor:
        """Dispatch to the DDPM (all T steps; ``steps`` ignored) or DDIM sampler: (B, P)."""
        if method == "ddpm":
            return self.ddpm_sample(model_fn, shape, generator, device, progress)
        if method == "ddim":
            return self.ddim_sample(model_fn, shape, steps, eta, generator, device, progress)
        raise HyperForgetError(f"unknown sampling method {method!r}: choose ddim or ddpm")
