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
0 per step), written on one layer-major vector holding all runs, so one update of five passes
serves them all; the result matches ``torch.optim.SGD`` on each run alone (tests check this).
The backward pass is written out: on MNIST-4 shapes (R = 64, B = 128) it measured about 1.5×
faster per step than autograd on the same stacked tensors (``grad_mode="autograd"`` remains,
and is used for activations without a closed-form derivative here).
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
    """SGD with momentum on a stack of R parameter vectors of one MLPSpec.

    The stack is held layer-major in one vector, each layer a contiguous view — W1 (R·H, D),
    b1 (R, H), W2 (R, C, H), b2 (R, C) — so the first-layer products need no copies and the
    update is a few passes over one vector; :attr:`params` / :meth:`rows` give the flat (·, P)
    vectors of the zoo layout.

    Attributes:
        layers: [W1, b1, W2, b2] as above, views of ``storage`` updated in place.
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
        flat = torch.as_tensor(params, dtype=torch.float32)
        spec.layout.check(flat)
        r, h, d, c = flat.shape[0], spec.hidden, spec.input_size, spec.num_classes
        lay = spec.layout.unflatten(flat)
        # Layer-major storage: [W1 of all runs | b1 of all runs | W2 ... | b2 ...], so every layer
        # is a contiguous view and the optimizer update is a handful of passes over one vector.
        shapes = [(r * h, d), (r, h), (r, c, h), (r, c)]
        sizes = [int(np.prod(sh)) for sh in shapes]
        self.storage = torch.cat([lay["fc1.weight"].reshape(-1), lay["fc1.bias"].reshape(-1),
                                  lay["fc2.weight"].reshape(-1), lay["fc2.bias"].reshape(-1)])  # (R·P,)
        self.layers = [v.view(sh) for v, sh in zip(self.storage.split(sizes), shapes)]  # W1, b1, W2, b2
        self.grad_storage = torch.zeros_like(self.storage)
        self.grads = [v.view(sh) for v, sh in zip(self.grad_storage.split(sizes), shapes)]
        self.buf = torch.zeros_like(self.storage)  # momentum; a 0 start equals torch's first-step copy
        self.lr = torch.as_tensor(lr, dtype=torch.float32).expand(r).clone()  # (R,)
        per_row = [self.lr.repeat_interleave(h)[:, None], self.lr[:, None], self.lr[:, None, None], self.lr[:, None]]
        self._lr_storage = torch.cat([lr_col.expand(sh).reshape(-1) for lr_col, sh in zip(per_row, shapes)])
        self.total_steps = int(total_steps)
        self.momentum, self.nesterov, self.weight_decay = float(momentum), bool(nesterov), float(weight_decay)
        self.schedule = schedule
        # The manual backward covers the activations with a closed-form derivative; others use autograd.
        self.grad_mode = grad_mode if spec.activation in ("relu", "tanh", "sigmoid") else "autograd"
        self.step_count = 0

    @property
    def num_runs(self) -> int:
        return self.layers[1].shape[0]

    @property
    def params(self) -> torch.Tensor:
        """(R, P) flat copies of the current parameters."""
        return self.rows(None)

    def rows(self, runs: torch.Tensor | np.ndarray | None) -> torch.Tensor:
        """(m, P) flat copies of the current parameters of the given runs (all when None)."""
        w1, b1, w2, b2 = self.layers
        r, h = self.num_runs, self.spec.hidden
        w1 = w1.view(r, h * self.spec.input_size)
        if runs is not None:
            idx = torch.as_tensor(runs, dtype=torch.long)
            w1, b1, w2, b2 = w1[idx], b1[idx], w2[idx], b2[idx]
        m = w1.shape[0]
        return torch.cat([w1, b1, w2.reshape(m, -1), b2], dim=1)

    def lr_factor(self, step: int) -> float:
        if self.schedule == "constant":
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min(step, self.total_steps) / self.total_steps))

    def loss_and_grad(self, x: torch.Tensor, y: torch.Tensor,
                      w: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Weighted cross-entropy of every run on one minibatch and its gradient.

        Args:
            x: (B, D) inputs, y: (B,) labels, w: (R, B) per-run example weights (≥ 0).
        Returns:
            loss (R,) = sum_b w·ce / sum_b w (0 where a run has no weight), and :attr:`grads`
            (views shaped like :attr:`layers`) holding the gradient; the next call overwrites them.
        """
        if self.grad_mode == "autograd":
            loss, grads = _autograd_loss_and_grad(self.spec, self.layers, x, y, w)
            for dst, src in zip(self.grads, grads):
                dst.copy_(src)
            return loss, self.grads
        return _manual_loss_and_grad(self.spec, self.layers, x, y, w, self.grads), self.grads

    def flat_grad(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """Layer gradients -> (R, P) in the flat layout."""
        r = self.num_runs
        return torch.cat([grads[0].reshape(r, -1), grads[1], grads[2].reshape(r, -1), grads[3]], dim=1)

    @torch.no_grad()
    def step(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """One SGD step of all runs on the shared minibatch; returns the (R,) losses before it."""
        loss, _ = self.loss_and_grad(x, y, w)
        g, p = self.grad_storage, self.storage
        if self.weight_decay:
            g.add_(p, alpha=self.weight_decay)
        self.buf.mul_(self.momentum).add_(g)
        update = g.add_(self.buf, alpha=self.momentum) if self.nesterov else self.buf
        p.addcmul_(update, self._lr_storage, value=-self.lr_factor(self.step_count))
        self.step_count += 1
        return loss


def _normalized_weights(w: torch.Tensor) -> torch.Tensor:
    # A run whose minibatch holds only removed examples gets all-zero weights, hence no gradient.
    return w / w.sum(1, keepdim=True).clamp_min(1e-12)  # (R, B)


def _forward(spec: MLPSpec, layers: list[torch.Tensor], x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    w1, b1, w2, b2 = layers
    r, b, h_ = b1.shape[0], x.shape[0], spec.hidden
    # One product for every run's first layer.
    pre = torch.addmm(b1.view(1, r * h_), x, w1.T).view(b, r, h_)  # (B, R, H)
    hid = ACTIVATIONS[spec.activation](pre)  # (B, R, H)
    hid_r = hid.transpose(0, 1)  # (R, B, H)
    logits = torch.baddbmm(b2[:, None, :], hid_r, w2.transpose(1, 2))  # (R, B, C)
    return pre, hid, hid_r, logits


def _manual_loss_and_grad(spec: MLPSpec, layers: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                          w: torch.Tensor, out: list[torch.Tensor]) -> torch.Tensor:
    """Loss (R,); writes the gradients into ``out`` (tensors shaped like ``layers``)."""
    r, b, h_ = layers[1].shape[0], x.shape[0], spec.hidden
    pre, hid, hid_r, logits = _forward(spec, layers, x)
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
    torch.bmm(dlogits.transpose(1, 2), hid_r, out=out[2])  # (R, C, H)
    torch.sum(dlogits, 1, out=out[3])  # (R, C)
    dhid = torch.bmm(dlogits, layers[2]).transpose(0, 1)  # (B, R, H)
    if spec.activation == "relu":
        dpre = torch.where(pre > 0, dhid, 0.0)
    elif spec.activation == "tanh":
        dpre = dhid * (1 - hid * hid)
    else:  # sigmoid
        dpre = dhid * hid * (1 - hid)
    dpre = dpre.reshape(b, r * h_)  # (B, R·H)
    torch.mm(dpre.T, x, out=out[0])  # (R·H, D): the second big product
    torch.sum(dpre, 0, out=out[1].view(r * h_))  # (R·H,)
    return loss


def _autograd_loss_and_grad(spec: MLPSpec, layers: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                            w: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    with torch.enable_grad():
        ps = [p.detach().requires_grad_(True) for p in layers]
        logits = _forward(spec, ps, x)[3]  # (R, B, C)
        nll = F.cross_entropy(logits.transpose(1, 2), y.expand(logits.shape[0], -1), reduction="none")  # (R, B)
        loss = (_normalized_weights(w) * nll).sum(1)
        grads = torch.autograd.grad(loss.sum(), ps)
    return loss.detach(), list(grads)


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
