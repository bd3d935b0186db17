"""C kernels for the element-wise work of many small MLPs at once, with the run axis innermost.

A lockstep step (zoo.lockstep) and the evaluation of stacked models (zoo.mlp.PerClassEvaluator)
are two big matrix products around element-wise work on (examples, ·, models) tensors: the
activation, layer 2, the softmax, the loss and its gradient, the per-model sums, the SGD update.
As torch ops that work is a few dozen calls, each paying a fixed dispatch cost and a pass over
memory; as C loops over the model axis (which the compiler vectorizes) it is one pass over the
examples with every intermediate in L1, and one pass over the parameters for the update.

Built once per machine with the system C compiler into a cache directory; without a compiler
(or with HYPERFORGET_KERNELS=0) callers run the same maths as torch ops, and tests check both.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
import os
import platform
import shutil
import subprocess
from pathlib import Path

ACTIVATIONS = {"relu": 0, "tanh": 1, "sigmoid": 2}  # activation -> the kernels' code
_FLAGS = ["-O3", "-march=native", "-shared", "-fPIC"]
_SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <stddef.h>

/* exp and log as straight-line float arithmetic (Cephes' expf and logf polynomials, within one
   ulp) so that loops over the run axis vectorize; libm's calls do not. A NaN passes through
   both, so a diverged run stays visibly diverged. */
static inline float exp_poly(float x) {
    x = x < -87.0f ? -87.0f : x;  /* exp(-87): near the smallest normal float32 */
    x = x > 88.0f ? 88.0f : x;
    const float shift = 12582912.0f;  /* 1.5 * 2^23: adding and subtracting it rounds to an integer */
    const float n = (x * 1.44269504088896341f + shift) - shift;
    float r = x - n * 0.693359375f;
    r = r + n * 2.12194440e-4f;
    const float z = r * r;
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * z + r + 1.0f;
    union { int32_t i; float f; } scale;
    scale.i = ((int32_t)n + 127) << 23;
    return p * scale.f;
}

static inline float log_poly(float x) {  /* x positive and normal, or NaN */
    union { float f; int32_t i; } u = {x};
    float e = (float)(((u.i >> 23) & 0xff) - 126);
    u.i = (u.i & 0x807fffff) | 0x3f000000;  /* the mantissa, in [0.5, 1) */
    float m = u.f;
    const int below = m < 0.707106781186547524f;
    e = below ? e - 1.0f : e;
    m = below ? m + m - 1.0f : m - 1.0f;
    const float z = m * m;
    float y = 7.0376836292e-2f;
    y = y * m - 1.1514610310e-1f;
    y = y * m + 1.1676998740e-1f;
    y = y * m - 1.2420140846e-1f;
    y = y * m + 1.4249322787e-1f;
    y = y * m - 1.6668057665e-1f;
    y = y * m + 2.0000714765e-1f;
    y = y * m - 2.4999993993e-1f;
    y = y * m + 3.3333331174e-1f;
    y = y * m * z;
    y += e * -2.12194440e-4f;
    y += -0.5f * z;
    return m + y + e * 0.693359375f + (x - x);  /* x - x: 0, or NaN for a NaN */
}

/* Hidden activations hid (H, R) and logits lg (C, R) of R models on one example, from its
   pre-activations pre (H, R) = x W1^T + b1 and the layer-2 weights w2 (H, C, R), b2 (C, R). */
static inline void forward_one(const float *restrict pre, const float *restrict w2, const float *restrict b2,
                               float *restrict hid, float *restrict lg, int64_t H, int64_t C, int64_t R, int act) {
    if (act == 0) {
        /* NaN stays NaN, as in torch.relu */
        for (int64_t i = 0; i < H * R; i++) hid[i] = pre[i] < 0.0f ? 0.0f : pre[i];
    } else if (act == 1) {
        for (int64_t i = 0; i < H * R; i++) hid[i] = tanhf(pre[i]);
    } else {
        for (int64_t i = 0; i < H * R; i++) hid[i] = 1.0f / (1.0f + expf(-pre[i]));
    }
    for (int64_t c = 0; c < C; c++) {
        float *lc = lg + c * R;
        const float *bc = b2 + c * R;
        for (int64_t r = 0; r < R; r++) lc[r] = bc[r];
        for (int64_t h = 0; h < H; h++) {
            const float *hh = hid + h * R, *wc = w2 + (h * C + c) * R;
            for (int64_t r = 0; r < R; r++) lc[r] += hh[r] * wc[r];
        }
    }
}

/* mx (R,) = the largest of the C logits lg (C, R) of each model (a NaN logit in row 0 stays NaN). */
static inline void max_logit(const float *restrict lg, float *restrict mx, int64_t C, int64_t R) {
    for (int64_t r = 0; r < R; r++) mx[r] = lg[r];
    for (int64_t c = 1; c < C; c++)
        for (int64_t r = 0; r < R; r++) mx[r] = lg[c * R + r] > mx[r] ? lg[c * R + r] : mx[r];
}

/* One lockstep step's element-wise work for R runs, one example b at a time so every
   intermediate is a few rows of R floats in L1: from the pre-activations pre (B, H, R) =
   x W1^T + b1, the activation, layer 2, the log-softmax, the loss (R,) = sum_b wn ce with
   wn the example weights w (B, R) normalized per run, dlogits = wn (softmax - onehot), and back
   through layer 2 and the activation: dpre (B, H, R), written over pre, and the per-run sums
   dw2 (H, C, R), db2 (C, R), db1 (H, R). Returns -1 when out of memory. */
int forward_backward(float *restrict pre, const float *restrict w2, const float *restrict b2,
                     const int64_t *restrict y, const float *restrict w, float *restrict loss,
                     float *restrict dw2, float *restrict db2, float *restrict db1,
                     int64_t B, int64_t H, int64_t C, int64_t R, int act) {
    float *const scratch = malloc((size_t)(H + C + 6) * R * sizeof(float));
    if (!scratch) return -1;
    float *restrict hid = scratch, *restrict g = hid + H * R, *restrict mx = g + C * R, *restrict sum = mx + R,
          *restrict inv = sum + R, *restrict wb = inv + R, *restrict ly = wb + R, *restrict acc = ly + R;
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
        float *pb = pre + b * H * R;
        const int64_t yb = y[b];
        forward_one(pb, w2, b2, hid, g, H, C, R, act);  /* logits, into g */
        max_logit(g, mx, C, R);
        for (int64_t r = 0; r < R; r++) { ly[r] = g[yb * R + r] - mx[r]; sum[r] = 0.0f; }
        for (int64_t c = 0; c < C; c++) {  /* exp(logit - max), into g */
            float *gc = g + c * R;
            for (int64_t r = 0; r < R; r++) { gc[r] = exp_poly(gc[r] - mx[r]); sum[r] += gc[r]; }
        }
        for (int64_t r = 0; r < R; r++) {
            wb[r] = w[b * R + r] * inv[r];
            loss[r] -= wb[r] * (ly[r] - log_poly(sum[r]));
            sum[r] = wb[r] / sum[r];  /* now the factor turning exp(logit - max) into wn softmax */
        }
        for (int64_t c = 0; c < C; c++) {  /* dlogits = wn (softmax - onehot), into g */
            float *gc = g + c * R, *d2 = db2 + c * R;
            if (c == yb) {
                for (int64_t r = 0; r < R; r++) { gc[r] = gc[r] * sum[r] - wb[r]; d2[r] += gc[r]; }
            } else {
                for (int64_t r = 0; r < R; r++) { gc[r] = gc[r] * sum[r]; d2[r] += gc[r]; }
            }
        }
        for (int64_t h = 0; h < H; h++) {
            const float *hh = hid + h * R;
            for (int64_t r = 0; r < R; r++) acc[r] = 0.0f;
            for (int64_t c = 0; c < C; c++) {
                const float *gc = g + c * R, *wc = w2 + (h * C + c) * R;
                float *dw = dw2 + (h * C + c) * R;
                for (int64_t r = 0; r < R; r++) { dw[r] += hh[r] * gc[r]; acc[r] += gc[r] * wc[r]; }
            }
            float *dp = pb + h * R, *d1 = db1 + h * R;
            if (act == 0) {
                for (int64_t r = 0; r < R; r++) { float d = hh[r] <= 0.0f ? 0.0f : acc[r]; dp[r] = d; d1[r] += d; }
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

/* torch.optim.SGD's update of one parameter, element-wise: d = g + wd p; buf = m buf + d;
   u = d + m buf (Nesterov) or buf; p -= lr f u. */
static inline void sgd_one(float *restrict p, const float *restrict g, float *restrict buf, float lr, float wd,
                           float m, int nesterov, int64_t i) {
    const float d = g[i] + wd * p[i];
    const float b = m * buf[i] + d;
    buf[i] = b;
    p[i] -= lr * (nesterov ? d + m * b : b);
}

/* The update of the whole stack in one pass. The stack is W1 (rows of D floats, run r = row % R,
   as row h R + r holds unit h of run r) followed by rows of R floats, one per run (b1, W2, b2);
   lr (R,) holds each run's base learning rate and f the schedule's factor. */
void sgd_update(float *restrict p, const float *restrict g, float *restrict buf, const float *restrict lr,
                int64_t R, int64_t D, int64_t w1_rows, int64_t tail_rows, float wd, float m, int nesterov, float f) {
    for (int64_t row = 0; row < w1_rows; row++) {
        const float l = lr[row % R] * f;
        float *pr = p + row * D, *br = buf + row * D;
        const float *gr = g + row * D;
        for (int64_t i = 0; i < D; i++) sgd_one(pr, gr, br, l, wd, m, nesterov, i);
    }
    float *pt = p + w1_rows * D, *bt = buf + w1_rows * D;
    const float *gt = g + w1_rows * D;
    for (int64_t row = 0; row < tail_rows; row++)
        for (int64_t r = 0; r < R; r++)
            sgd_one(pt + row * R, gt + row * R, bt + row * R, lr[r] * f, wd, m, nesterov, r);
}

/* Evaluation of M models on n examples, accumulated per class: loss_sum (C, M) += the
   cross-entropy and correct (C, M) += 1 where the true class has strictly the largest logit (a
   tie or a NaN counts as wrong), from pre (n, H, M) = x W1^T + b1. Returns -1 when out of memory. */
int class_sums(const float *restrict pre, const float *restrict w2, const float *restrict b2,
               const int64_t *restrict y, float *restrict loss_sum, float *restrict correct,
               int64_t N, int64_t H, int64_t C, int64_t M, int act) {
    float *const scratch = malloc((size_t)(H + C + 3) * M * sizeof(float));
    if (!scratch) return -1;
    float *restrict hid = scratch, *restrict lg = hid + H * M, *restrict mx = lg + C * M,
          *restrict other = mx + M, *restrict sum = other + M;
    for (int64_t b = 0; b < N; b++) {
        const int64_t yb = y[b];
        forward_one(pre + b * H * M, w2, b2, hid, lg, H, C, M, act);
        max_logit(lg, mx, C, M);
        const float *ly = lg + yb * M;
        for (int64_t r = 0; r < M; r++) { other[r] = -INFINITY; sum[r] = 0.0f; }
        for (int64_t c = 0; c < C; c++) {
            const float *lc = lg + c * M;
            if (c != yb)
                for (int64_t r = 0; r < M; r++) other[r] = lc[r] > other[r] ? lc[r] : other[r];
            for (int64_t r = 0; r < M; r++) sum[r] += exp_poly(lc[r] - mx[r]);
        }
        float *ls = loss_sum + yb * M, *cs = correct + yb * M;
        for (int64_t r = 0; r < M; r++) {
            ls[r] += mx[r] + log_poly(sum[r]) - ly[r];
            cs[r] += ly[r] > other[r] ? 1.0f : 0.0f;
        }
    }
    free(scratch);
    return 0;
}
"""


@functools.lru_cache(maxsize=1)
def compiled_kernels() -> ctypes.CDLL | None:
    """The C kernels for this machine, or None when they cannot be built.

    The shared library is cached under $HYPERFORGET_CACHE (default ~/.cache/hyperforget), named
    by a hash of the source, flags and CPU (-march=native code must not run on another CPU), and
    written to a temporary name then renamed, so concurrent workers never load half a file.
    Set HYPERFORGET_KERNELS=0 to use torch ops only.
    """
    if os.environ.get("HYPERFORGET_KERNELS", "1") == "0":
        return None
    cc = shutil.which(os.environ.get("CC", "cc"))
    if cc is None:
        logging.getLogger(__name__).info("no C compiler: the element-wise work runs as torch ops")
        return None
    key = hashlib.sha256("\n".join([_SOURCE, " ".join(_FLAGS), cc, _cpu_id()]).encode()).hexdigest()[:16]
    cache = Path(os.environ.get("HYPERFORGET_CACHE", Path.home() / ".cache" / "hyperforget"))
    lib = cache / f"kernels-{key}.so"
    if not lib.exists():
        try:
            cache.mkdir(parents=True, exist_ok=True)
            src, tmp = cache / f"kernels-{key}-{os.getpid()}.c", cache / f"kernels-{key}-{os.getpid()}.so.tmp"
            src.write_text(_SOURCE)
            subprocess.run([cc, *_FLAGS, "-o", str(tmp), str(src)], check=True, capture_output=True, timeout=120)
            src.unlink()
            os.replace(tmp, lib)
        except (OSError, subprocess.SubprocessError) as exc:
            logging.getLogger(__name__).warning("C kernels did not build (%s); using torch ops", exc)
            return None
    dll = ctypes.CDLL(str(lib))
    i64, f32, ptr = ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
    dll.forward_backward.argtypes = [ptr] * 9 + [i64] * 4 + [ctypes.c_int]
    dll.class_sums.argtypes = [ptr] * 6 + [i64] * 4 + [ctypes.c_int]
    dll.forward_backward.restype = dll.class_sums.restype = ctypes.c_int
    dll.sgd_update.argtypes = [ptr] * 4 + [i64] * 4 + [f32, f32, ctypes.c_int, f32]
    dll.sgd_update.restype = None
    return dll


def _cpu_id() -> str:
    try:
        info = Path("/proc/cpuinfo").read_text()
        return platform.machine() + "".join(line for line in info.splitlines()
                                            if line.startswith(("model name", "flags")))[:4096]
    except OSError:
        return platform.machine() + platform.processor()
