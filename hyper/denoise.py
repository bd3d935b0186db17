"""The pieces training and sampling share: building a denoiser from saved configs, the model function
with its conditions and classifier-free guidance, sampling raw MLP parameters, and the saved model
directory's format checks and zoo path. Sampling imports this, never the trainer.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import torch

from hyperforget.hyper.diffusion import GaussianDiffusion
from hyperforget.hyper.model import DiTConfig, build_denoiser
from hyperforget.hyper.tokenizer import ParamTokenizer, TokenizerConfig
from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.mlp import MLPSpec


CONFIG_FORMAT = "hyperforget-dihyfo"


CONFIG_VERSION = 1


def build(variant: str, spec: MLPSpec, normalization: dict, model_cfg: DiTConfig,
          tok_cfg: TokenizerConfig, loss_stats: dict | None = None) -> tuple[torch.nn.Module, ParamTokenizer]:
    """The denoiser and the tokenizer a saved (or resolved) config describes."""
    tokenizer = ParamTokenizer(spec, tok_cfg, normalization)
    model = build_denoiser(replace(model_cfg, variant=variant), tokenizer.num_tokens, tok_cfg.token_size,
                           spec.num_params, spec.num_classes, loss_stats, spec)
    if getattr(model, "unit_roles", None) is not None:
        model.unit_roles.set_normalization(tokenizer.scale, tokenizer.shift)
    return model, tokenizer


def make_model_fn(model: torch.nn.Module, tokenizer: ParamTokenizer, target_losses: torch.Tensor,
                  current: torch.Tensor | None, current_losses: torch.Tensor | None,
                  drop: torch.Tensor | None = None, guidance=None):
    """Close over the conditions: normalized flat x_t (B, P), t (B,) -> normalized flat x0_hat (B, P).

    current: normalized flat θ (B, P) or None. With ``guidance`` s, a scalar or one scale per row
    (B,) (classifier-free): x̂0 = x̂0_uncond + s · (x̂0_cond − x̂0_uncond).
    """
    flat = getattr(model, "flat", False) or getattr(getattr(model, "module", None), "flat", False)  # DDP wraps
    to_tokens = (lambda v: v) if flat else tokenizer.to_tokens
    from_tokens = (lambda v: v) if flat else tokenizer.from_tokens
    cur_tok = to_tokens(current) if current is not None else None
    scale = None
    if guidance is not None:
        scale = torch.as_tensor(guidance, dtype=torch.float32).to(target_losses.device)
        if scale.ndim == 0 and float(scale) == 1.0:
            scale = None  # s = 1 is the plain conditional model
        elif scale.ndim == 1:
            scale = scale[:, None]  # (B, 1)

    def fn(x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x_tok = to_tokens(x_t)
        if scale is None:
            return from_tokens(model(x_tok, t, target_losses, cur_tok, current_losses, drop))
        b = x_t.shape[0]
        both = model(torch.cat([x_tok, x_tok]), torch.cat([t, t]), torch.cat([target_losses, target_losses]),
                     None if cur_tok is None else torch.cat([cur_tok, cur_tok]),
                     None if current_losses is None else torch.cat([current_losses, current_losses]),
                     torch.cat([torch.zeros(b, dtype=torch.bool), torch.ones(b, dtype=torch.bool)]).to(x_t.device))
        cond, uncond = from_tokens(both[:b]), from_tokens(both[b:])
        return uncond + scale.to(cond.dtype) * (cond - uncond)

    return fn


@torch.no_grad()
def sample_params(model: torch.nn.Module, tokenizer: ParamTokenizer, diffusion: GaussianDiffusion, targets: torch.Tensor,
                  current: torch.Tensor | None, current_losses: torch.Tensor | None, *, method: str = "ddim",
                  steps: int = 50, eta: float = 0.0, seed: int = 0, guidance: float | None = None,
                  device: torch.device | str = "cpu", progress=None) -> torch.Tensor:
    """Sample raw MLP parameters (K, P) for raw target losses (K, C) (and raw θ (K, P) for DiHyFo-1)."""
    model.eval()
    dev = torch.device(device)
    targets = torch.as_tensor(targets, dtype=torch.float32).to(dev)
    cur = None
    if current is not None:
        cur = tokenizer.normalize(tokenizer.canonicalize(torch.as_tensor(current, dtype=torch.float32).to(dev)))
    cl = torch.as_tensor(current_losses, dtype=torch.float32).to(dev) if current_losses is not None else None
    fn = make_model_fn(model, tokenizer, targets, cur, cl, None, guidance)
    gen = torch.Generator().manual_seed(int(seed))
    x = diffusion.sample(fn, (targets.shape[0], tokenizer.spec.num_params), method=method, steps=steps, eta=eta,
                         generator=gen, device=dev, progress=progress)
    return tokenizer.denormalize(x).float().cpu()


def stored_zoo_path(zoo: str | None, model_dir: Path) -> str | None:
    """How config.json records its zoo: a local path relative to the model directory (so that a
    model directory moved together with its zoo, or used from any working directory, still finds
    it); URLs as given."""
    if zoo is None or "://" in str(zoo):
        return zoo
    return os.path.relpath(os.path.abspath(zoo), os.path.abspath(model_dir))


def resolve_zoo_path(stored: str | None, model_dir: Path) -> str | None:
    """The zoo a config.json names: a relative path is relative to the model directory."""
    if stored is None or "://" in stored or os.path.isabs(stored):
        return stored
    return os.path.normpath(os.path.join(os.path.abspath(model_dir), stored))


def check_config_version(saved: dict, where) -> None:
    if saved.get("format") != CONFIG_FORMAT:
        raise HyperForgetError(f"{where} is not a hyperforget hypernetwork (format {saved.get('format')!r})")
    if saved.get("version") != CONFIG_VERSION:
        raise HyperForgetError(f"unsupported hypernetwork version in {where}: expected {CONFIG_VERSION}, "
                               f"got {saved.get('version')}")

