"""Lockstep training: R runs of one MLPSpec trained at once on shared minibatches.

A two-layer MLP with 2 hidden units does so little work per step that a one-model-at-a-time
loop spends its time in Python and kernel launches. Here all R runs of a group share each
minibatch X (B, D) and their first layers are concatenated, so the forward pass is one
(B, D) @ (D, H·R) product and the first-layer gradient one (H·R, B) @ (B, D) product.

Everything else (activation, second layer, softmax, the gradient back to the first layer, the
per-run reductions, the SGD update) is element-wise work on (B, ·, R) tensors whose run axis is
innermost, so it vectorizes over runs. With H = 2 and C = 4 that work is as large as the two
products; as ~30 torch ops it cost twice the products, so it runs as two C loops — one pass
over the examples for everything between the products, one over the stack for the update —
compiled once per machine (see :mod:`hyperforget.zoo.kernels`), with the same maths as torch ops
where no C compiler exists. Tests check both paths against ``torch.optim.SGD`` on each run alone.

Runs still differ where it matters: each has its own initialization, learning rate and
per-example weights w (R, B). A weight of 0 removes an example from a run (undersampling,
class deletion), and each run's loss is the weighted mean  sum_b w·ce / sum_b w.

The optimizer is SGD as in G.pt's zoo (Nesterov momentum 0.9, weight decay 5e-4, lr cosine to
0 per step), written on one layer-major vector holding all runs, so one update serves them all.
The backward pass is written out (``grad_mode="autograd"`` remains, and is used for
activations without a closed-form derivative here).
"""

from __future__ import annotations

import contextlib
import ctypes
import math
import time
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from hyperforget.zoo import kernels as kernels_module
from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.mlp import (MLPSpec, flat_from_hidden_major, hidden_major, init_params as default_init_params,
                                 stacked_forward, take_models)

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

    The stack is held layer-major in one vector, each layer a contiguous view with the run axis
    innermost except in W1 — W1 (H·R, D) with row h·R + r for hidden unit h of run r, b1 (H·R,),
    W2 (H, C, R), b2 (C, R) — so the first-layer products need no copies, every element-wise op
    of a step runs over rows of R contiguous floats (not over axes of 2 or 4, where per-element
    loops cannot vectorize), and the update is a few passes over one vector. :attr:`params` gives
    the flat (R, P) vectors of the zoo layout, :meth:`select` hidden-major copies of some runs.

    ``kernels=False`` runs the element-wise work as torch ops even where the C kernels build.

    Attributes:
        layers: [W1, b1, W2, b2] as above, views of ``storage`` updated in place.
        lr: (R,) base learning rates.
        total_steps: length of the cosine schedule (lr reaches 0 after it).
    """

    def __init__(self, spec: MLPSpec, params: torch.Tensor, lr: torch.Tensor | Sequence[float] | float,
                 total_steps: int, *, momentum: float = 0.9, nesterov: bool = True,
                 weight_decay: float = 5e-4, schedule: str = "cosine", grad_mode: str = "manual",
                 kernels: bool = True):
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
        r = flat.shape[0]
        self.storage = torch.cat([t.reshape(-1) for t in hidden_major(spec, flat)])  # (R·P,)
        shapes = _layer_shapes(spec, r)
        sizes = [math.prod(sh) for sh in shapes]
        self.layers = [v.view(sh) for v, sh in zip(self.storage.split(sizes), shapes)]  # W1, b1, W2, b2
        self.grad_storage = torch.zeros_like(self.storage)
        self.grads = [v.view(sh) for v, sh in zip(self.grad_storage.split(sizes), shapes)]
        self.buf = torch.zeros_like(self.storage)  # momentum; a 0 start equals torch's first-step copy
        self.lr = torch.as_tensor(lr, dtype=torch.float32).expand(r).clone()  # (R,)
        self.total_steps = int(total_steps)
        self.momentum, self.nesterov, self.weight_decay = float(momentum), bool(nesterov), float(weight_decay)
        self.schedule = schedule
        # The manual backward covers the activations with a closed-form derivative; others use autograd.
        self.grad_mode = grad_mode if spec.activation in _ACTIVATION_GRADS else "autograd"
        # The C kernels when they build on this machine (kernels=False: torch ops only, same maths).
        self.kernels = kernels_module.compiled_kernels() if kernels else None
        if self.kernels is None:  # the torch-op update reads each element's learning rate from a stack-sized vector
            self._lr_storage = self._stack_sized(self.lr)
        self.step_count = 0

    @property
    def num_runs(self) -> int:
        return self.layers[3].shape[1]

    @property
    def params(self) -> torch.Tensor:
        """(R, P) flat copies of the current parameters."""
        return flat_from_hidden_major(self.spec, self.layers)

    def select(self, runs: torch.Tensor | np.ndarray) -> list[torch.Tensor]:
        """Copies of the hidden-major layers (:func:`hyperforget.zoo.mlp.hidden_major`) of the given runs."""
        return take_models(self.spec, self.layers, runs)

    def lr_factor(self, step: int) -> float:
        if self.schedule == "constant":
            return 1.0
        return 0.5 * (1.0 + math.cos(math.pi * min(step, self.total_steps) / self.total_steps))

    def loss_and_grad(self, x: torch.Tensor, y: torch.Tensor,
                      w: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Weighted cross-entropy of every run on one minibatch and its gradient.

        Args:
            x: (B, D) inputs, y: (B,) labels, w: (R, B) per-run example weights (≥ 0); a
                transposed view of a contiguous (B, R) tensor is read without a copy.
        Returns:
            loss (R,) = sum_b w·ce / sum_b w (0 where a run has no weight), and :attr:`grads`
            (views shaped like :attr:`layers`) holding the gradient; the next call overwrites them.
        """
        wt = w.T.to(torch.float32).contiguous()  # (B, R)
        if self.grad_mode == "manual" and self.kernels is not None:
            return _kernel_loss_and_grad(self.kernels, self.spec, self.layers, x, y, wt, self.grads), self.grads
        wn = _normalized_weights(wt)
        if self.grad_mode == "autograd":
            loss, grads = _autograd_loss_and_grad(self.spec, self.layers, x, y, wn)
            for dst, src in zip(self.grads, grads):
                dst.copy_(src)
            return loss, self.grads
        return _manual_loss_and_grad(self.spec, self.layers, x, y, wn, self.grads), self.grads

    def flat_grad(self, grads: list[torch.Tensor]) -> torch.Tensor:
        """Layer gradients -> (R, P) in the flat layout."""
        return flat_from_hidden_major(self.spec, grads)

    @torch.no_grad()
    def step(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor,
             lr_factors: torch.Tensor | None = None) -> torch.Tensor:
        """One SGD step of all runs on the shared minibatch; returns the (R,) losses before it.

        lr_factors: (R,) per-run multipliers of the base lr for this step, in place of the
            schedule's common factor (runs whose schedules differ, e.g. restarted at a deletion).
        """
        loss, _ = self.loss_and_grad(x, y, w)
        g, p, buf = self.grad_storage, self.storage, self.buf
        f = self.lr_factor(self.step_count)
        lr = self.lr
        if lr_factors is not None:
            lr, f = self.lr * torch.as_tensor(lr_factors, dtype=torch.float32), 1.0
        if self.kernels is not None:
            h, r, (d, c) = self.spec.hidden, self.num_runs, (self.spec.input_size, self.spec.num_classes)
            self.kernels.sgd_update(p.data_ptr(), g.data_ptr(), buf.data_ptr(), lr.data_ptr(), r, d, h * r,
                                    h + h * c + c, self.weight_decay, self.momentum, int(self.nesterov), f)
        else:
            # torch.optim.SGD per parameter, as four passes over the stack: g += wd·p;
            # buf = m·buf + g; g += m·buf (Nesterov); p -= lr·g.
            if self.weight_decay:
                g.add_(p, alpha=self.weight_decay)
            torch.add(g, buf, alpha=self.momentum, out=buf)
            update = g.add_(buf, alpha=self.momentum) if self.nesterov else buf
            p.addcmul_(update, self._lr_storage if lr_factors is None else self._stack_sized(lr), value=-f)
        self.step_count += 1
        return loss

    def _stack_sized(self, per_run: torch.Tensor) -> torch.Tensor:
        """(R,) per-run values -> one per element of the stack (the torch-op update's lr)."""
        h, shapes = self.spec.hidden, _layer_shapes(self.spec, self.num_runs)
        per_layer = [per_run.repeat(h)[:, None], per_run.repeat(h), per_run, per_run]
        return torch.cat([col.expand(sh).reshape(-1) for col, sh in zip(per_layer, shapes)])


def step_product_shapes(spec: MLPSpec, runs: int, batch_size: int) -> list[tuple[int, int, int, bool]]:
    """The two big products of a lockstep step as (m, k, n, a_transposed) for :func:`matmul_gflops`:
    the forward (B, D) @ (D, H·R) and the weight gradient (H·R, B) @ (B, D), whose (H·R, B)
    operand is the transpose of the contiguous (B, H·R) dpre."""
    hr = spec.hidden * runs
    return [(batch_size, spec.input_size, hr, False), (hr, batch_size, spec.input_size, True)]


def matmul_gflops(shapes: Sequence[tuple[int, int, int, bool]], seconds: float = 1.0, threads: int = 1,
                  wall: bool = False) -> float:
    """float32 GFLOP/s of torch.mm on ``threads`` threads, averaged over (m, k, n, a_transposed) shapes.

    The compute limit a lockstep step is judged against, measured on its own shapes; by default over
    the calling thread's CPU time, so that a busy machine's preemptions count neither here nor in
    the steps; ``wall`` (or several threads, whose CPU times would add up) times it by the wall
    clock, for work that is itself timed by the wall clock.
    a_transposed: the (m, k) operand is the transpose of a contiguous (k, m) tensor.
    """
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    clock = time.perf_counter if wall or threads > 1 else time.thread_time
    try:
        flops = elapsed = 0.0
        for m, k, n, a_t in shapes:
            a, b = (torch.rand(k, m).T if a_t else torch.rand(m, k)), torch.rand(k, n)
            for _ in range(3):
                a @ b
            reps, t0 = 0, clock()
            while clock() - t0 < seconds / len(shapes):
                a @ b
                reps += 1
            elapsed += clock() - t0
            flops += 2.0 * m * k * n * reps
        return flops / elapsed / 1e9
    finally:
        torch.set_num_threads(old)


def _layer_shapes(spec: MLPSpec, r: int) -> list[tuple[int, ...]]:
    h, c = spec.hidden, spec.num_classes
    return [(h * r, spec.input_size), (h * r,), (h, c, r), (c, r)]  # W1, b1, W2, b2


def _softmax_from_log(logp: torch.Tensor) -> torch.Tensor:
    """exp(logp), with logp clamped at −87 (exp: 1.6e−38, the smallest normal float32).

    torch's exp falls off its vectorized path below about −88 (measured 50× slower on confident
    models' log-probabilities), and what the clamp adds to wn·(p − onehot) is below 1e−37.
    """
    return logp.clamp_min_(-87.0).exp_()  # in place


@contextlib.contextmanager
def flush_denormals() -> Iterator[None]:
    """Treat float32 values below 1.2e−38 as 0 on this thread (x86 FTZ/DAZ) while training.

    Confident runs' softmax probabilities and gradients underflow into the denormal range, where
    arithmetic takes a slow microcode path (on a step with such gradients the weight-gradient
    product measured 1.8× and the C backward 4× slower); those values are far below float32
    rounding of the sums they enter. Restores torch's default (off) on exit.
    """
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


def _normalized_weights(w: torch.Tensor) -> torch.Tensor:
    # A run whose minibatch holds only removed examples gets all-zero weights, hence no gradient.
    return w / w.sum(0).clamp_min(1e-12)  # (B, R)


# d act / d pre from the activation's output, as autograd computes it (one fused op each).
_ACTIVATION_GRADS = {
    "relu": lambda g, out: torch.ops.aten.threshold_backward(g, out, 0.0),  # out > 0 exactly where pre > 0
    "tanh": torch.ops.aten.tanh_backward,
    "sigmoid": torch.ops.aten.sigmoid_backward,
}


def _manual_loss_and_grad(spec: MLPSpec, layers: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                          wn: torch.Tensor, out: list[torch.Tensor]) -> torch.Tensor:
    """Loss (R,) for normalized weights wn (B, R); writes the gradients into ``out`` (shaped like ``layers``)."""
    w1, b1, w2, b2 = layers
    h, (b, r) = spec.hidden, wn.shape
    hid, logits = stacked_forward(spec, x, w1, b1, w2, b2)  # (B, H, R), (B, C, R)
    logp = torch.log_softmax(logits, 1)  # (B, C, R)
    yy = y.view(b, 1, 1).expand(b, 1, r)
    wn3 = wn.view(b, 1, r)
    loss = torch.linalg.vecdot(wn, logp.gather(1, yy).view(b, r), dim=0).neg_()  # (R,) sum_b wn·ce
    # Backward: d loss / d logits = wn·(softmax − onehot), built in place in logp's buffer.
    dlogits = _softmax_from_log(logp).mul_(wn3).scatter_add_(1, yy, wn3.neg())  # (B, C, R)
    torch.sum(dlogits, 0, out=out[3])  # (C, R)
    torch.sum(hid[:, :, None, :] * dlogits[:, None], 0, out=out[2])  # (H, C, R)
    dhid = torch.sum(dlogits[:, None] * w2, 2)  # (B, H, R)
    dpre = _ACTIVATION_GRADS[spec.activation](dhid, hid).view(b, h * r)  # (B, H·R)
    torch.mm(dpre.T, x, out=out[0])  # (H·R, D): the second big product
    torch.sum(dpre, 0, out=out[1])  # (H·R,)
    return loss


def _kernel_loss_and_grad(lib: ctypes.CDLL, spec: MLPSpec, layers: list[torch.Tensor], x: torch.Tensor,
                          y: torch.Tensor, w: torch.Tensor, out: list[torch.Tensor]) -> torch.Tensor:
    """:func:`_manual_loss_and_grad` with all the element-wise work in one C loop over examples.

    w: (B, R) example weights, normalized per run in the kernel.
    """
    w1, b1, w2, b2 = layers
    (h, c, r), b = w2.shape, x.shape[0]
    pre = torch.addmm(b1, x, w1.T)  # (B, H·R): the first big product; the kernel turns it into dpre
    yy = y.to(torch.int64).contiguous()
    loss = torch.empty(r)
    if lib.forward_backward(pre.data_ptr(), w2.data_ptr(), b2.data_ptr(), yy.data_ptr(), w.data_ptr(),
                            loss.data_ptr(), out[2].data_ptr(), out[3].data_ptr(), out[1].data_ptr(),
                            b, h, c, r, kernels_module.ACTIVATIONS[spec.activation]):
        raise MemoryError("lockstep forward_backward kernel: out of memory")
    torch.mm(pre.T, x, out=out[0])  # (H·R, D): the second big product, from dpre
    return loss


def _autograd_loss_and_grad(spec: MLPSpec, layers: list[torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                            wn: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    with torch.enable_grad():
        ps = [p.detach().requires_grad_(True) for p in layers]
        logits = stacked_forward(spec, x, *ps)[1]  # (B, C, R)
        nll = F.cross_entropy(logits, y[:, None].expand(-1, wn.shape[1]), reduction="none")  # (B, R)
        loss = (wn * nll).sum(0)
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
    their initialization (``hyperforget.zoo.mlp.init_params(spec, seeds)``) and, if given, lr / class weights.

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
    example_w = cw.T[y]  # (N, R): a minibatch's rows are then one contiguous (B, R) block
    with flush_denormals():
        for _ in _epochs(epochs, progress, "training"):
            for idx in epoch_batches(len(y), batch_size, gen):
                opt.step(x.index_select(0, idx), y[idx], example_w.index_select(0, idx).T)
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
