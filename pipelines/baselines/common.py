"""What every baseline shares: checked inputs, seeded minibatches, trainable and finished copies, CE epochs."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.mlp import MLP


@dataclass
class Inputs:
    """Inputs checked once: tensors, masks and the generator every method draws from."""

    x: torch.Tensor  # (N, D) float32
    y: torch.Tensor  # (N,) int64
    forget: list[int]  # sorted class ids
    retain_idx: torch.Tensor  # (N_r,) indices of D_r
    forget_idx: torch.Tensor  # (N_f,) indices of D_f
    num_classes: int
    gen: torch.Generator = field(repr=False, default_factory=torch.Generator)


def prepare(model: nn.Module, x, y, forget: Sequence[int], seed: int) -> Inputs:
    """Check a method's arguments and split D into D_r / D_f; the generator is seeded with ``seed``."""
    if not isinstance(model, MLP):
        raise HyperForgetError(f"baselines unlearn a hyperforget.zoo.mlp.MLP, got {type(model).__name__}; "
                               "build one with MLP.from_flat(spec, params)")
    spec = model.spec
    x = torch.as_tensor(x, dtype=torch.float32)
    y = torch.as_tensor(y).to(torch.long)
    if x.ndim != 2 or x.shape[1] != spec.input_size:
        raise HyperForgetError(f"x_train must be (N, {spec.input_size}) for this MLP, got {tuple(x.shape)}")
    if y.shape != (x.shape[0],):
        raise HyperForgetError(f"y_train must be ({x.shape[0]},) labels, got {tuple(y.shape)}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= spec.num_classes):
        raise HyperForgetError(f"labels must be task labels in [0, {spec.num_classes}), "
                               f"got {int(y.min())}..{int(y.max())}")
    try:
        fset = sorted({int(c) for c in forget})
    except TypeError:
        raise HyperForgetError(f"forget must be a sequence of class ids, got {forget!r}") from None
    if not fset:
        raise HyperForgetError("the forget set is empty; name at least one class, e.g. forget=[2]")
    if fset[0] < 0 or fset[-1] >= spec.num_classes:
        raise HyperForgetError(f"forget classes {fset} are outside the task's classes 0..{spec.num_classes - 1}")
    if len(fset) == spec.num_classes:
        raise HyperForgetError("the forget set holds every class; keep at least one class to retain")
    is_f = torch.isin(y, torch.tensor(fset))
    if not bool(is_f.any()):
        raise HyperForgetError(f"no training example has a label in the forget set {fset}")
    if bool(is_f.all()):
        raise HyperForgetError("every training example is in the forget set; pass the whole training split")
    gen = torch.Generator().manual_seed(int(seed))
    return Inputs(x, y, fset, torch.nonzero(~is_f)[:, 0], torch.nonzero(is_f)[:, 0], spec.num_classes, gen)


def batches(idx: torch.Tensor, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Shuffled minibatches of ``idx`` (the last one may be smaller)."""
    perm = idx[torch.randperm(len(idx), generator=gen)]
    for i in range(0, len(perm), batch_size):
        yield perm[i:i + batch_size]


def trainable_copy(model: MLP) -> MLP:
    """A deep copy in training mode with fresh gradients: the student a method trains."""
    student = copy.deepcopy(model)
    student.train()
    for p in student.parameters():
        p.grad = None  # deepcopy carries the original's stale gradients along
        p.requires_grad_(True)
    return student


def finished(model: MLP) -> MLP:
    """The model a method returns: eval mode, no gradients, parameters frozen."""
    model.eval()
    for p in model.parameters():
        p.grad = None
        p.requires_grad_(False)
    return model


def train_ce(model: MLP, x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, *, epochs: int, batch_size: int,
             optimizer: torch.optim.Optimizer, gen: torch.Generator) -> None:
    """Plain cross-entropy epochs over the examples ``idx`` (labels taken from ``y``)."""
    for _ in range(epochs):
        for b in batches(idx, batch_size, gen):
            loss = F.cross_entropy(model(x[b]), y[b])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
