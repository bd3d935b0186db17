"""Selective Synaptic Dampening (SSD): Fisher importances, the dampening rule and the method."""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F

from hyperforget.pipelines.baselines.common import finished, prepare, trainable_copy
from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.mlp import MLP


def ssd_importances(model: MLP, x: torch.Tensor, y: torch.Tensor, *, batch_size: int = 128,
                    mode: str = "batch") -> dict[str, torch.Tensor]:
    """Diagonal Fisher importances []_ii = E[(∂ℓ/∂θ_i)²], one tensor per parameter.

    mode "batch" (the SSD code): the squared gradient of each minibatch's mean loss, averaged over
    the minibatches (in order, unshuffled). mode "per_example": the textbook empirical Fisher,
    the squared gradient of each example's loss averaged over examples. Note: with per-example
    importances imp_D = (N_f/N)·imp_f + (N_r/N)·imp_r ≥ (N_f/N)·imp_f, so the SSD selection
    imp_f > α·imp_D can only fire when N_f/N < 1/α (10 % of D for α = 10): forgetting one of four
    classes selects nothing. Batch gradients average out on a converged model, which is what lets
    the published α = 10 select parameters.
    """
    model = trainable_copy(model)  # a private copy: gradients never land on the caller's module
    params = {k: v.detach() for k, v in model.named_parameters()}
    imp = {k: torch.zeros_like(v) for k, v in params.items()}
    if len(y) == 0:
        return imp
    if mode == "batch":
        was_training = model.training
        model.eval()
        nb = 0
        for i in range(0, len(y), batch_size):
            model.zero_grad(set_to_none=True)
            with torch.enable_grad():
                F.cross_entropy(model(x[i:i + batch_size]), y[i:i + batch_size]).backward()
            for k, p in model.named_parameters():
                imp[k] += p.grad.detach() ** 2
            nb += 1
        model.zero_grad(set_to_none=True)
        model.train(was_training)
        return {k: v / nb for k, v in imp.items()}
    if mode == "per_example":
        from torch.func import functional_call, grad, vmap

        def loss_one(p, xi, yi):
            return F.cross_entropy(functional_call(model, p, (xi[None],)), yi[None])

        per_ex = vmap(grad(loss_one), in_dims=(None, 0, 0))
        for i in range(0, len(y), batch_size):
            g = per_ex(params, x[i:i + batch_size], y[i:i + batch_size])
            for k in imp:
                imp[k] += (g[k] ** 2).sum(0)
        return {k: v / len(y) for k, v in imp.items()}
    raise HyperForgetError(f"unknown SSD importance mode {mode!r}: choose 'batch' or 'per_example'")


def ssd_dampen(params: dict[str, torch.Tensor], imp_full: dict[str, torch.Tensor],
               imp_forget: dict[str, torch.Tensor], alpha: float = 10.0, lam: float = 1.0) -> dict[str, torch.Tensor]:
    """SSD's dampening rule (Foster et al. 2024, Eq. 3–4), a pure function on dicts of tensors.

    For each parameter θ_i:  β_i = min(λ·[]_D,i / []_Df,i, 1)  if []_Df,i > α·[]_D,i,  else 1;
    θ_i ← β_i·θ_i. Returns new tensors; the inputs are not modified.
    """
    if alpha <= 0 or lam <= 0:
        raise HyperForgetError(f"SSD needs alpha > 0 and lambda > 0, got alpha={alpha}, lambda={lam}")
    out = {}
    for name, theta in params.items():
        if name not in imp_full or name not in imp_forget:
            raise HyperForgetError(f"no importance for parameter {name!r}; compute importances on the same model")
        full, fgt = imp_full[name], imp_forget[name]
        if full.shape != theta.shape or fgt.shape != theta.shape:
            raise HyperForgetError(f"importance of {name!r} has shape {tuple(full.shape)}/{tuple(fgt.shape)}, "
                                   f"the parameter {tuple(theta.shape)}")
        selected = fgt > alpha * full
        # Where not selected the ratio is never used; the guard keeps 0/0 out of the arithmetic.
        beta = torch.where(selected, (lam * full / torch.where(selected, fgt, torch.ones_like(fgt))).clamp(max=1.0),
                           torch.ones_like(theta))
        out[name] = theta.detach() * beta
    return out


def ssd(model: MLP, x_train, y_train, forget: Sequence[int], *, seed: int = 0, alpha: float = 10.0,
        lam: float = 1.0, batch_size: int = 128, importance: str = "batch") -> MLP:
    """Selective Synaptic Dampening (Foster et al., AAAI 2024; github.com/if-loops/selective-synaptic-dampening).

    Importances over D_f and over D (:func:`ssd_importances`), then :func:`ssd_dampen` with
    λ = 1 (dampening constant) and α = 10 (selection weighting). Training-free. ``importance``
    "batch" follows the public code; "per_example" is the textbook diagonal Fisher (see the note
    in :func:`ssd_importances`). ``seed`` is unused: the method is deterministic.
    """
    d = prepare(model, x_train, y_train, forget, seed)
    student = copy.deepcopy(model)
    imp_forget = ssd_importances(student, d.x[d.forget_idx], d.y[d.forget_idx], batch_size=batch_size, mode=importance)
    imp_full = ssd_importances(student, d.x, d.y, batch_size=batch_size, mode=importance)
    new = ssd_dampen(dict(student.named_parameters()), imp_full, imp_forget, alpha=alpha, lam=lam)
    with torch.no_grad():
        for name, p in student.named_parameters():
            p.copy_(new[name])
    return finished(student)
