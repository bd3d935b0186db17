"""Unit roles: what a network's hidden units do for each class, as a condition for DiHyFo-1.

DiHyFo-1 reads θ as a parameter vector. To move class k's loss it must find the hidden units
that carry class k in *this* network, and a new network puts them elsewhere than the training
networks did. The role matrix says so directly, measured on a fixed set of training images:

    R[k, h] = W2[k, h] · mean_{x of class k} relu(W1[h] · x + b1[h])

the mean contribution of unit h to class k's logit on the images of class k (C × H values, in
the hidden-unit order of θ as the tokenizer presents it). The condition embedder adds an MLP of
sign(R) · log(1 + |R|) to the adaLN vector c, beside the loss embedding; it is not dropped under
classifier-free guidance, since it describes θ, which the unconditional model also sees.
"""

from __future__ import annotations

import torch
from torch import nn

from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.mlp import MLPSpec, batched_hidden

UNIT_ROLE_SEED = 20_261_207  # fixed choice of probe images; saved with the model as a buffer anyway


class UnitRoles(nn.Module):
    """Normalized θ (B, P) -> embedding (B, E) of its C × H role matrix (module docstring)."""

    def __init__(self, spec: MLPSpec, probes_per_class: int, dim: int):
        super().__init__()
        self.spec, self.per_class = spec, probes_per_class
        c, h = spec.num_classes, spec.hidden
        self.register_buffer("probes", torch.zeros(c * probes_per_class, spec.input_size))
        # The tokenizer's normalization (normalized = (raw − shift) · scale), which hyper.denoise.build
        # sets on every build: derived state, so neither saved nor averaged by the EMA.
        self.register_buffer("scale", torch.ones(spec.num_params), persistent=False)
        self.register_buffer("shift", torch.zeros(spec.num_params), persistent=False)
        self.embed = nn.Sequential(nn.LayerNorm(c * h), nn.Linear(c * h, dim), nn.SiLU(), nn.Linear(dim, dim))
        nn.init.zeros_(self.embed[-1].weight), nn.init.zeros_(self.embed[-1].bias)  # starts as "no roles"

    def set_normalization(self, scale: torch.Tensor, shift: torch.Tensor) -> None:
        self.scale.copy_(scale), self.shift.copy_(shift)

    def set_probes(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Take ``probes_per_class`` training images of every class (a fixed draw)."""
        gen = torch.Generator().manual_seed(UNIT_ROLE_SEED)
        rows = []
        for k in range(self.spec.num_classes):
            idx = torch.nonzero(y == k).flatten()
            if len(idx) < self.per_class:
                raise HyperForgetError(f"class {k} has {len(idx)} training images, unit roles need "
                                       f"{self.per_class}; lower unit_role_probes")
            rows.append(idx[torch.randperm(len(idx), generator=gen)[: self.per_class]])
        self.probes.copy_(torch.as_tensor(x, dtype=torch.float32)[torch.cat(rows)])

    @torch.no_grad()
    def roles(self, params: torch.Tensor) -> torch.Tensor:
        """Normalized θ (B, P) -> R (B, C, H)."""
        raw = params.float() / self.scale + self.shift
        c, h, n = self.spec.num_classes, self.spec.hidden, self.per_class
        act = batched_hidden(self.spec, raw, self.probes).reshape(raw.shape[0], c, n, h).mean(2)  # (B, C, H)
        w2 = self.spec.layout.unflatten(raw)["fc2.weight"]  # (B, C, H)
        return w2 * act

    def forward(self, params: torch.Tensor) -> torch.Tensor:
        r = self.roles(params).flatten(1)
        return self.embed((torch.sign(r) * torch.log1p(r.abs())).to(params.dtype))
