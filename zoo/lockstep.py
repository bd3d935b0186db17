"""Lockstep training: R runs of one MLPSpec trained at once on shared minibatches.

A two-layer MLP with 2 hidden units does so little work per step that a one-model-at-a-time
loop spends its time in Python and kernel launches. Here all R runs of a group share each
minibatch X (B, D) and their first layers are concatenated, so the forward pass is one
(B, D) @ (D, R·H) product and the first-layer gradient one (R·H, B) @ (B, D) product; the
per-run work left (second layer, softmax, SGD update) is small batched tensor algebra.

Runs still differ where it matters: each has its own initialization, learning rate and
per-example weights w (R, B). A weight of 0 removes an example from a run (undersampling,
class deletion), and each run's loss is the weighted mean  sum_b w·ce / sum_b w.

The optimizer is SGD as in G.pt's zoo (Nesterov momentum 0.9, weight decay 5e-4, lr cosine to
0 per step), written on the stacked (R, P) parameter matrix so one update serves all runs and
the result matches ``torch.optim.SGD`` on each run alone (tests check this).
"""

from __future__ import annotations

import math
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from zoo.errors import HyperForgetError
from zoo.mlp import ACTIVATIONS, MLPSpec, init_params as default_init_params

GRAD_MODES = ("manual", "autograd")
SCHEDULES = ("cosine", "constant")


def epoch_batches(n: int, batch_size: int, generator: torch.Generator) -> list[torch.Tensor]:
    """One epoch's minibatches: a permutation of range(n) split into (≤ batch_size,) index tensors.

    The last batch may be short, as with a DataLoader without ``drop_last``.
    """
    return list(torch.randperm(n, generator=generator).split(batch_size))


def steps_per_epoch(n: int, batch_size: int) -> int:
    return math.ceil(n / batch_size)


class LockstepSGD:
    """SGD with momentum on a stack of R flat parameter vectors of one MLPSpec.

    Attributes:
        params: (R, P) float32, updated in place; row r is run r's current checkpoint.
        lr: (R,) base learning rates.
        total_steps: length of the cosine schedule (lr reaches 0 after it).
    """

    def __init__(self, spec: MLPSpec, params: torch.Tensor, lr: torch.Tensor | Sequence[float] | float,
                 total_steps: int, *, momentum: float = 0.9, nesterov: bool = True,
                 weight_decay: float = 5e-4, schedule: str = "cosine", grad_mode: str = "manual"):
        if schedule not in SCHEDULES:
            raise HyperForgetError(f"unknown lr schedule {schedule!r}: choose one of {', '.join(SCHEDULES)}")
        if grad_mode not in GRAD_MODES:
            raise HyperForgetError(f"unknown grad_mode {grad_mode!r}: choose one of {', '.join(GRAD_MODES)}")
        if nesterov and momentum <= 0:
            raise HyperForgetError("Nesterov momentum needs momentum > 0; pass nesterov=False or a momentum")
        if total_steps < 1:
            raise HyperForgetError(f"total_steps must be ≥ 1, got {total_steps}")
        self.spec = spec
        self.params = torch.as_tensor(params, dtype=torch.float32).clone().contiguous()  # (R, P)
        spec.layout.check(self.params)
        r = self.params.shape[0]
        self.lr = torch.as_tensor(lr, dtype=torch.float32).expand(r).clone()  # (R,)
        self.total_steps = int(total_steps)
        self.momentum, self.nesterov, self.weight_decay = float(momentum), bool(nesterov), float(weight_decay)
        self.schedule = schedule
        # The manual backward covers the activations with a closed-form derivative; others use autograd.
        self.grad_mode = grad_mode if spec.activation in ("relu", "tanh", "sigmoid") else "autograd"
        self.buf = torch.zeros_like(self.params)  # (R, P) momentum buffer; 0 start == torch's first-step copy
        self.step_count = 0

    @property
    def num_runs(self) -> int:
        return self.params.shape[0]

    def lr_factor(self, step: int) -> float:
        if self.schedule == "constant":
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min(step, self.total_steps) / self.total_steps))

    def loss_and_grad(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Weighted cross-entropy of every run on one minibatch and its gradient.

        Args:
            x: (B, D) inputs, y: (B,) labels, w: (R, B) per-run example weights (≥ 0).
        Returns:
            loss (R,) = sum_b w·ce / sum_b w (0 where a run has no weight), grad (R, P).
        """
        if self.grad_mode == "autograd":
            return _autograd_loss_and_grad(self.spec, self.params, x, y, w)
        return _manual_loss_and_grad(self.spec, self.params, x, y, w)

    @torch.no_grad()
    def step(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """One SGD step of all runs on the shared minibatch; returns the (R,) losses before it."""
        loss, grad = self.loss_and_grad(x, y, w)
        if self.weight_decay:
            grad.add_(self.params, alpha=self.weight_decay)
        self.buf.mul_(self.momentum).add_(grad)
        update = grad.add_(self.buf, alpha=self.momentum) if self.nesterov else self.buf
        lr = (self.lr * self.lr_factor(self.step_count))[:, None]  # (R, 1)
        self.params.addcmul_(update, lr, value=-1.0)
        self.step_count += 1
        return loss


def _normalized_weights(w: torch.Tensor) -> torch.Tensor:
    # A run whose minibatch holds only removed examples gets all-zero weights, hence no gradient.
    return w / w.sum(1, keepdim=True).clamp_min(1e-12)  # (R, B)


def _manual_loss_and_grad(spec: MLPSpec, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                          w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    r, b = params.shape[0], x.shape[0]
    h_, d, c = spec.hidden, spec.input_size, spec.num_classes
    lay = spec.layout.unflatten(params)
    w1 = lay["fc1.weight"].reshape(r * h_, d)  # (R·H, D)
    w2 = lay["fc2.weight"]  # (R, C, H)
    # Forward: one product for every run's first layer.
    pre = torch.addmm(lay["fc1.bias"].reshape(1, r * h_), x, w1.T).view(b, r, h_)  # (B, R, H)
    hid = ACTIVATIONS[spec.activation](pre)  # (B, R, H)
    hid_r = hid.transpose(0, 1)  # (R, B, H)
    logits = torch.baddbmm(lay["fc2.bias"][:, None, :], hid_r, w2.transpose(1, 2))  # (R, B, C)
    # torch.log_softmax is slow when the class axis is this short; the explicit form is not.
    z = logits - logits.amax(-1, keepdim=True)
    logp = z - z.exp().sum(-1, keepdim=True).log_()  # (R, B, C)
    yy = y.expand(r, b)[..., None]  # (R, B, 1)
    nll = -logp.gather(-1, yy)[..., 0]  # (R, B)
    wn = _normalized_weights(w)
    loss = (wn * nll).sum(1)  # (R,)
    # Backward: d loss / d logits = wn · (softmax − onehot).
    dlogits = logp.exp_()
    dlogits.scatter_add_(-1, yy, torch.full_like(yy, -1.0, dtype=dlogits.dtype))
    dlogits.mul_(wn[..., None])  # (R, B, C)
    g_w2 = torch.bmm(dlogits.transpose(1, 2), hid_r)  # (R, C, H)
    g_b2 = dlogits.sum(1)  # (R, C)
    dhid = torch.bmm(dlogits, w2).transpose(0, 1)  # (B, R, H)
    if spec.activation == "relu":
        dpre = torch.where(pre > 0, dhid, 0.0)
    elif spec.activation == "tanh":
        dpre = dhid * (1 - hid * hid)
    else:  # sigmoid
        dpre = dhid * hid * (1 - hid)
    dpre = dpre.reshape(b, r * h_)  # (B, R·H)
    g_w1 = dpre.T @ x  # (R·H, D): the second big product
    g_b1 = dpre.sum(0)  # (R·H,)
    grad = torch.cat([g_w1.view(r, h_ * d), g_b1.view(r, h_), g_w2.reshape(r, c * h_), g_b2], dim=1)
    return loss, grad


def _autograd_loss_and_grad(spec: MLPSpec, params: torch.Tensor, x: torch.Tensor, y: torch.Tensor,
                            w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    from zoo.mlp import batched_logits

    with torch.enable_grad():
        p = params.detach().requires_grad_(True)
        logits = batched_logits(spec, p, x)  # (R, B, C)
        nll = F.cross_entropy(logits.transpose(1, 2), y.expand(p.shape[0], -1), reduction="none")  # (R, B)
        loss = (_normalized_weights(w) * nll).sum(1)
        (grad,) = torch.autograd.grad(loss.sum(), p)
    return loss.detach(), grad


def train_models(spec: MLPSpec, x_train: torch.Tensor | np.ndarray, y_train: torch.Tensor | np.ndarray,
                 seeds: Sequence[int], *, epochs: int, lr: float | Sequence[float] = 0.1, batch_size: int = 128,
                 class_weights: torch.Tensor | np.ndarray | Sequence[float] | None = None,
                 momentum: float = 0.9, nesterov: bool = True, weight_decay: float = 5e-4,
                 init_params: torch.Tensor | np.ndarray | None = None, schedule: str = "cosine",
                 data_seed: int | None = None, grad_mode: str = "manual",
                 progress: bool = False) -> torch.Tensor:
    """Train R = len(seeds) MLPs from scratch (or from ``init_params``) in lockstep.

    Used for retrained-from-scratch baselines and reference populations. Every model sees the
    same minibatch sequence (drawn from ``data_seed``, default ``seeds[0]``); models differ in
    their initialization (``zoo.mlp.init_params(spec, seeds)``) and, if given, lr / class weights.

    Args:
        x_train: (N, D) inputs; y_train: (N,) labels in [0, C).
        seeds: R initialization seeds.
        lr: base learning rate, scalar or (R,); cosine-annealed to 0 per step unless schedule="constant".
        class_weights: (C,) or (R, C) weight of each class in the loss; 0 removes a class entirely
            (retraining without a forget set). None: all 1.
        init_params: (R, P) start points instead of fresh initializations (fine-tuning).
    Returns:
        (R, P) float32 trained parameter vectors.
    Deterministic for the same arguments and torch thread count.
    """
    seeds = [int(s) for s in seeds]
    if not seeds:
        raise HyperForgetError("train_models needs at least one seed")
    if epochs < 1 or batch_size < 1:
        raise HyperForgetError(f"epochs and batch_size must be ≥ 1, got epochs={epochs}, batch_size={batch_size}")
    x = torch.as_tensor(x_train, dtype=torch.float32)
    y = torch.as_tensor(y_train, dtype=torch.long)
    if x.ndim != 2 or x.shape[1] != spec.input_size:
        raise HyperForgetError(f"x_train must be (N, {spec.input_size}), got {tuple(x.shape)}")
    if y.shape != (x.shape[0],):
        raise HyperForgetError(f"y_train must be ({x.shape[0]},) labels, got shape {tuple(y.shape)}")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= spec.num_classes):
        raise HyperForgetError(f"labels must lie in [0, {spec.num_classes}); got {int(y.min())}..{int(y.max())}")
    r = len(seeds)
    if class_weights is None:
        cw = torch.ones(r, spec.num_classes)
    else:
        cw = torch.as_tensor(np.asarray(class_weights, dtype=np.float32))
        if cw.ndim == 1:
            cw = cw.expand(r, -1)
        if tuple(cw.shape) != (r, spec.num_classes):
            raise HyperForgetError(
                f"class_weights must be ({spec.num_classes},) or ({r}, {spec.num_classes}), got {tuple(cw.shape)}")
        if (cw < 0).any() or not torch.isfinite(cw).all():
            raise HyperForgetError("class_weights must be finite and ≥ 0")
    if init_params is None:
        start = default_init_params(spec, seeds)
    else:
        start = torch.as_tensor(init_params, dtype=torch.float32)
        if tuple(start.shape) != (r, spec.num_params):
            raise HyperForgetError(f"init_params must be ({r}, {spec.num_params}), got {tuple(start.shape)}")
    total = epochs * steps_per_epoch(len(y), batch_size)
    opt = LockstepSGD(spec, start, torch.as_tensor(lr, dtype=torch.float32), total, momentum=momentum,
                      nesterov=nesterov, weight_decay=weight_decay, schedule=schedule, grad_mode=grad_mode)
    gen = torch.Generator().manual_seed(seeds[0] if data_seed is None else int(data_seed))
    example_w = cw[:, y]  # (R, N)
    for _ in _epochs(epochs, progress, "training"):
        for idx in epoch_batches(len(y), batch_size, gen):
            opt.step(x[idx], y[idx], example_w[:, idx])
    return opt.params


def _epochs(epochs: int, progress: bool, what: str) -> Iterator[int]:
    if not progress:
        yield from range(epochs)
        return
    from rich.progress import Progress

    with Progress(transient=True) as bar:
        task = bar.add_task(what, total=epochs)
        for e in range(epochs):
            yield e
            bar.advance(task)
