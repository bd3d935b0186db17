"""The logit-masking control: the original model with the forget classes' logits at −inf."""

from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from hyperforget.pipelines.baselines.common import finished, prepare
from hyperforget.zoo.mlp import MLP


class LogitMaskedMLP(nn.Module):
    """The original MLP with the forget classes' logits set to −inf.

    Its parameters are exactly the original's (``base``), so every internal feature still encodes
    the forget classes; only the output hides them. Forget accuracy is 0 by construction.
    """

    def __init__(self, base: MLP, forget: Sequence[int]):
        super().__init__()
        self.base = base
        mask = torch.zeros(base.spec.num_classes, dtype=torch.bool)
        mask[list(forget)] = True
        self.register_buffer("mask", mask)  # (C,) True for masked classes

    @property
    def spec(self):
        return self.base.spec

    @property
    def forget(self) -> list[int]:
        return torch.nonzero(self.mask)[:, 0].tolist()

    def flat_params(self) -> torch.Tensor:
        return self.base.flat_params()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(N, D) -> (N, C) logits, −inf at the masked classes."""
        return self.base(x).masked_fill(self.mask, float("-inf"))


def logit_mask(model: MLP, x_train, y_train, forget: Sequence[int], *, seed: int = 0) -> LogitMaskedMLP:
    """Trivial control: the original model whose forget-class logits are −inf (no training)."""
    d = prepare(model, x_train, y_train, forget, seed)
    return LogitMaskedMLP(finished(copy.deepcopy(model)), d.forget).eval()
