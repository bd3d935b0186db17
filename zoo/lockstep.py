"""Lockstep training: R runs of one MLPSpec trained at once on shared minibatches.

A two-layer MLP with 2 hidden units does so little work per step that a one-model-at-a-time
loop spends its time in Python and kernel launches. Here all R runs of a group share each
minibatch X (B, D) and their first layers are concatenated, so the forward pass is one
(B, D) @ (D, H·R) product and the first-layer gradient one (H·R, B) @ (B, D) product.

Everything else (activation, second layer, softmax, the gradient back to the first layer, the
per-run reductions, the SGD update) is element-wise work on (B, ·, R) tensors whose run axis is
innermost, so it vectorizes over runs. With H = 2 and C = 4 that work is as large as the two
products; as ~30 torch ops it cost twice the products, so it runs as three small C loops
(compiled once per machine, see :func:`compiled_kernels`), with the same maths as torch ops
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
import functools
import hashlib
import logging
import math
import os
import platform
import shutil
import subprocess
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from zoo.errors import HyperForgetError
from zoo.mlp import MLPSpec, flat_from_hidden_major, hidden_major, init_params as default_init_params, stacked_forward

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
    loops cannot vectorize), and the update is a few passes over one vector. :attr:`params` /
    :meth:`rows` give the flat (·, P) vectors of the zoo layout.

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
        h = spec.hidden
        per_layer = [self.lr.repeat(h)[:, None], self.lr.repeat(h), self.lr, self.lr]
        self._lr_storage = torch.cat([col.expand(sh).reshape(-1) for col, sh in zip(per_layer, shapes)])
        self.total_steps = int(total_steps)
        self.momentum, self.nesterov, self.weight_decay = float(momentum), bool(nesterov), float(weight_decay)
        self.schedule = schedule
        # The manual backward covers the activations with a closed-form derivative; others use autograd.
        self.grad_mode = grad_mode if spec.activation in _ACTIVATION_GRADS else "autograd"
        # The C kernels when they build on this machine (kernels=False: torch ops only, same maths).
        self.kernels = compiled_kernels() if kernels else None
        self.step_count = 0

    @property
    def num_runs(self) -> int:
        return self.layers[3].shape[1]

    @property
    def params(self) -> torch.Tensor:
        """(R, P) flat copies of the current parameters."""
        return self.rows(None)

    def rows(self, runs: torch.Tensor | np.ndarray | None) -> torch.Tensor:
        """(m, P) flat copies of the current parameters of the given runs (all when None)."""
        return flat_from_hidden_major(self.spec, self.layers if runs is None else self.select(runs))

    def select(self, runs: torch.Tensor | np.ndarray) -> list[torch.Tensor]:
        """Copies of the hidden-major layers (:func:`zoo.mlp.hidden_major`) of the given runs."""
        w1, b1, w2, b2 = self.layers
        h, r, idx = self.spec.hidden, self.num_runs, torch.as_tensor(runs, dtype=torch.long)
        m = len(idx)
        return [w1.view(h, r, -1).index_select(1, idx).view(h * m, -1), b1.view(h, r).index_select(1, idx).view(-1),
                w2.index_select(2, idx), b2.index_select(1, idx)]

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
    def step(self, x: torch.Tensor, y: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """One SGD step of all runs on the shared minibatch; returns the (R,) losses before it."""
        loss, _ = self.loss_and_grad(x, y, w)
        g, p, buf = self.grad_storage, self.storage, self.buf
        f = self.lr_factor(self.step_count)
        if self.kernels is not None:
            self.kernels.sgd_update(p.data_ptr(), g.data_ptr(), buf.data_ptr(), self._lr_storage.data_ptr(), p.numel(),
                                    self.weight_decay, self.momentum, int(self.nesterov), f)
        else:
            # torch.optim.SGD per parameter, as four passes over the stack: g += wd·p;
            # buf = m·buf + g; g += m·buf (Nesterov); p -= lr·g.
            if self.weight_decay:
                g.add_(p, alpha=self.weight_decay)
            torch.add(g, buf, alpha=self.momentum, out=buf)
            update = g.add_(buf, alpha=self.momentum) if self.nesterov else buf
            p.addcmul_(update, self._lr_storage, value=-f)
        self.step_count += 1
        return loss


def _layer_shapes(spec: MLPSpec, r: int) -> list[tuple[int, ...]]:
    h, c = spec.hidden, spec.num_classes
    return [(h * r, spec.input_size), (h * r,), (h, c, r), (c, r)]  # W1, b1, W2, b2


def _softmax_from_log(logp: torch.Tensor, *, inplace: bool) -> torch.Tensor:
    """exp(logp), with logp clamped at −87 (exp: 1.6e−38, the smallest normal float32).

    torch's exp falls off its vectorized path below about −88 (measured 50× slower on confident
    models' log-probabilities), and what the clamp adds to wn·(p − onehot) is below 1e−37.
    """
    return (logp.clamp_min_(-87.0) if inplace else logp.clamp_min(-87.0)).exp_()


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
    dlogits = _softmax_from_log(logp, inplace=True).mul_(wn3).scatter_add_(1, yy, wn3.neg())  # (B, C, R)
    torch.sum(dlogits, 0, out=out[3])  # (C, R)
    torch.sum(hid[:, :, None, :] * dlogits[:, None], 0, out=out[2])  # (H, C, R)
    dhid = torch.sum(dlogits[:, None] * w2, 2)  # (B, H, R)
    dpre = _ACTIVATION_GRADS[spec.activation](dhid, hid).view(b, h * r)  # (B, H·R)
    torch.mm(dpre.T, x, out=out[0])  # (H·R, D): the second big product
    torch.sum(dpre, 0, out=out[1])  # (H·R,)
    return loss


def _kernel_loss_and_grad(lib: ctypes.CDLL, spec: MLPSpec, layers: list[torch.Tensor], x: torch.Tensor,
                          y: torch.Tensor, w: torch.Tensor, out: list[torch.Tensor]) -> torch.Tensor:
    """:func:`_manual_loss_and_grad` with the element-wise work in two C loops over (B, ·, R).

    w: (B, R) example weights, normalized per run in the kernel.
    """
    w1, b1, w2, b2 = layers
    (h, c, r), b = w2.shape, x.shape[0]
    act = _KERNEL_ACTIVATIONS[spec.activation]
    hid = torch.addmm(b1, x, w1.T)  # (B, H·R), activated in place by the kernel
    logits = torch.empty(b, c, r)
    lib.layer2(hid.data_ptr(), w2.data_ptr(), b2.data_ptr(), logits.data_ptr(), b, h, c, r, act)
    logp = torch.log_softmax(logits, 1)  # (B, C, R); torch's exp and log are vectorized, libm's are not
    prob = _softmax_from_log(logp, inplace=False)
    yy = y.to(torch.int64).contiguous()
    loss, dpre = torch.empty(r), torch.empty(b, h * r)
    if lib.backward(hid.data_ptr(), logp.data_ptr(), prob.data_ptr(), yy.data_ptr(), w.data_ptr(), w2.data_ptr(),
                    loss.data_ptr(), dpre.data_ptr(), out[2].data_ptr(), out[3].data_ptr(), out[1].data_ptr(),
                    b, h, c, r, act):
        raise MemoryError("lockstep backward kernel: out of memory")
    torch.mm(dpre.T, x, out=out[0])  # (H·R, D): the second big product
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


# ----------------------------------------------------------------------------------------------
# C kernels: a lockstep step's element-wise work (layer 2, the softmax gradient, the per-run
# reductions, the SGD update) is a few dozen small torch ops on (B, ·, R) tensors, each paying
# a fixed dispatch cost and a pass over memory; as plain C loops over the run axis (which the
# compiler vectorizes) they cost a few passes in all. Built once per machine with the system C
# compiler into a cache directory; without a compiler the same maths runs as torch ops.

_KERNEL_ACTIVATIONS = {"relu": 0, "tanh": 1, "sigmoid": 2}
_KERNEL_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC"]
_KERNEL_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <stddef.h>

/* Activation in place on pre (B, H, R), then layer 2 of R runs:
   logits[b,c,r] = b2[c,r] + sum_h hid[b,h,r] * w2[h,c,r]. */
void layer2(float *restrict hid, const float *restrict w2, const float *restrict b2, float *restrict logits,
            int64_t B, int64_t H, int64_t C, int64_t R, int act) {
    const int64_t n = B * H * R;
    if (act == 0) {
        for (int64_t i = 0; i < n; i++) hid[i] = hid[i] > 0.0f ? hid[i] : 0.0f;
    } else if (act == 1) {
        for (int64_t i = 0; i < n; i++) hid[i] = tanhf(hid[i]);
    } else {
        for (int64_t i = 0; i < n; i++) hid[i] = 1.0f / (1.0f + expf(-hid[i]));
    }
    for (int64_t b = 0; b < B; b++) {
        const float *hb = hid + b * H * R;
        float *lb = logits + b * C * R;
        for (int64_t c = 0; c < C; c++) {
            float *o = lb + c * R;
            const float *bc = b2 + c * R;
            for (int64_t r = 0; r < R; r++) o[r] = bc[r];
            for (int64_t h = 0; h < H; h++) {
                const float *hh = hb + h * R, *w = w2 + (h * C + c) * R;
                for (int64_t r = 0; r < R; r++) o[r] += hh[r] * w[r];
            }
        }
    }
}

/* Loss (R,) and gradients from log-probabilities logp and probabilities p (B, C, R) and example
   weights w (B, R), normalized per run here: dlogits = wn (p - onehot), then back through layer 2
   and the activation into dpre (B, H, R) and the per-run sums dw2, db2, db1. Returns -1 when out of memory. */
int backward(const float *restrict hid, const float *restrict logp, const float *restrict p,
              const int64_t *restrict y, const float *restrict w, const float *restrict w2,
              float *restrict loss, float *restrict dpre, float *restrict dw2, float *restrict db2,
              float *restrict db1, int64_t B, int64_t H, int64_t C, int64_t R, int act) {
    float *const scratch = malloc((size_t)(C + 3) * R * sizeof(float));
    if (!scratch) return -1;
    float *restrict g = scratch, *restrict acc = g + C * R, *restrict inv = acc + R, *restrict wb = inv + R;
    for (int64_t r = 0; r < R; r++) inv[r] = 0.0f;
    for (int64_t b = 0; b < B; b++)
        for (int64_t r = 0; r < R; r++) inv[r] += w[b * R + r];
    /* A run whose minibatch holds only removed examples gets all-zero weights, hence no gradient. */
    for (int64_t r = 0; r < R; r++) inv[r] = 1.0f / (inv[r] > 1e-12f ? inv[r] : 1e-12f);
    memset(loss, 0, R * sizeof(float));
    memset(dw2, 0, H * C * R * sizeof(float));
    memset(db2, 0, C * R * sizeof(float));
    memset(db1, 0, H * R * sizeof(float));
    for (int64_t b = 0; b < B; b++) {
        const float *hb = hid + b * H * R, *pb = p + b * C * R;
        for (int64_t r = 0; r < R; r++) wb[r] = w[b * R + r] * inv[r];
        const int64_t yb = y[b];
        const float *ly = logp + (b * C + yb) * R;
        for (int64_t r = 0; r < R; r++) loss[r] -= wb[r] * ly[r];
        for (int64_t c = 0; c < C; c++) {
            float *gc = g + c * R;
            const float *pc = pb + c * R;
            const float one = (c == yb) ? 1.0f : 0.0f;
            for (int64_t r = 0; r < R; r++) gc[r] = wb[r] * (pc[r] - one);
            float *d2 = db2 + c * R;
            for (int64_t r = 0; r < R; r++) d2[r] += gc[r];
        }
        for (int64_t h = 0; h < H; h++) {
            const float *hh = hb + h * R;
            for (int64_t r = 0; r < R; r++) acc[r] = 0.0f;
            for (int64_t c = 0; c < C; c++) {
                const float *gc = g + c * R, *w = w2 + (h * C + c) * R;
                float *dw = dw2 + (h * C + c) * R;
                for (int64_t r = 0; r < R; r++) { dw[r] += hh[r] * gc[r]; acc[r] += gc[r] * w[r]; }
            }
            float *dp = dpre + (b * H + h) * R, *d1 = db1 + h * R;
            if (act == 0) {
                for (int64_t r = 0; r < R; r++) { float d = hh[r] > 0.0f ? acc[r] : 0.0f; dp[r] = d; d1[r] += d; }
            } else if (act == 1) {
                for (int64_t r = 0; r < R; r++) { float d = acc[r] * (1.0f - hh[r] * hh[r]); dp[r] = d; d1[r] += d; }
            } else {
                for (int64_t r = 0; r < R; r++) { float d = acc[r] * hh[r] * (1.0f - hh[r]); dp[r] = d; d1[r] += d; }
            }
        }
    }
    free(scratch);
    return 0;
}

/* torch.optim.SGD's update in one pass: d = g + wd p; buf = m buf + d; u = d + m buf (Nesterov) or buf; p -= lr f u. */
void sgd_update(float *restrict p, const float *restrict g, float *restrict buf, const float *restrict lr, int64_t n,
                float wd, float m, int nesterov, float f) {
    for (int64_t i = 0; i < n; i++) {
        float d = g[i] + wd * p[i];
        float b = m * buf[i] + d;
        buf[i] = b;
        float u = nesterov ? d + m * b : b;
        p[i] -= (lr[i] * f) * u;
    }
}
"""


@functools.lru_cache(maxsize=1)
def compiled_kernels() -> ctypes.CDLL | None:
    """The lockstep C kernels for this machine, or None when they cannot be built.

    The shared library is cached under $HYPERFORGET_CACHE (default ~/.cache/hyperforget), named
    by a hash of the source, flags and CPU (-march=native code must not run on another CPU), and
    written to a temporary name then renamed, so concurrent workers never load half a file.
    Set HYPERFORGET_KERNELS=0 to use torch ops only.
    """
    if os.environ.get("HYPERFORGET_KERNELS", "1") == "0":
        return None
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        logging.getLogger(__name__).info("no C compiler: lockstep training uses torch ops")
        return None
    key = hashlib.sha256("\n".join([_KERNEL_SOURCE, " ".join(_KERNEL_FLAGS), cc, _cpu_id()]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("HYPERFORGET_CACHE", Path.home() / ".cache" / "hyperforget"))
    lib = cache / f"lockstep-{key}.so"
    if not lib.exists():
        try:
            cache.mkdir(parents=True, exist_ok=True)
            src, tmp = cache / f"lockstep-{key}-{os.getpid()}.c", cache / f"lockstep-{key}-{os.getpid()}.so.tmp"
            src.write_text(_KERNEL_SOURCE)
            subprocess.run([cc, *_KERNEL_FLAGS, "-o", str(tmp), str(src)], check=True, capture_output=True, timeout=120)
            src.unlink()
            os.replace(tmp, lib)
        except (OSError, subprocess.SubprocessError) as exc:
            logging.getLogger(__name__).warning("lockstep C kernels did not build (%s); using torch ops", exc)
            return None
    dll = ctypes.CDLL(str(lib))
    i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    dll.layer2.argtypes = [ptr] * 4 + [i64] * 4 + [ctypes.c_int]
    dll.backward.argtypes = [ptr] * 11 + [i64] * 4 + [ctypes.c_int]
    dll.sgd_update.argtypes = [ptr] * 4 + [i64, f32, f32, ctypes.c_int, f32]
    dll.layer2.restype = dll.sgd_update.restype = None
    dll.backward.restype = ctypes.c_int
    return dll


def _cpu_id() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        return platform.machine() + "".join(line for line in info.splitlines()
                                            if line.startswith(("model name", "flags")))[:4096]
    except OSError:
        return platform.machine() + platform.processor()


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
