"""The MLP family every zoo holds: its spec, the flat parameter layout, and batched evaluation.

A checkpoint is one float32 vector θ of length ``spec.num_params``; the layout says where
each tensor lives in it, in ``state_dict`` order (fc1.weight, fc1.bias, fc2.weight, fc2.bias),
each flattened C-order with torch's ``(out_features, in_features)`` weight shape. Another
project reads a zoo row back into ``nn.Linear`` layers with nothing but this convention.

Batched evaluation treats a stack of M vectors as M models and runs them in one pass:
``X @ W1ᵀ`` for all models is one (N × D) @ (D × M·H) matrix product.
"""

from __future__ import annotations

import functools
import math
from dataclasses import asdict, dataclass
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from hyperforget.zoo import kernels
from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.files import atomic_path

ACTIVATIONS = {"relu": torch.relu, "tanh": torch.tanh, "gelu": F.gelu, "sigmoid": torch.sigmoid}


@dataclass(frozen=True)
class MLPSpec:
    """A two-layer MLP: input -> hidden (activation) -> class logits."""

    input_size: int = 784  # pixels per image
    hidden: int = 2  # hidden units (2 for MNIST-4, 7 for MNIST-10 in the paper)
    num_classes: int = 4  # output logits
    activation: str = "relu"  # one of ACTIVATIONS

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise HyperForgetError(
                f"unknown activation {self.activation!r}: choose one of {', '.join(ACTIVATIONS)}")
        if min(self.input_size, self.hidden, self.num_classes) < 1:
            raise HyperForgetError(f"MLP sizes must be positive, got {self}")

    @property
    def layout(self) -> "ParamLayout":
        return ParamLayout.for_spec(self)

    @property
    def num_params(self) -> int:
        return self.layout.num_params

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "MLPSpec":
        return cls(**{k: d[k] for k in ("input_size", "hidden", "num_classes", "activation")})


@dataclass(frozen=True)
class LayerSlot:
    name: str  # state_dict key, e.g. "fc1.weight"
    shape: tuple[int, ...]  # torch shape
    offset: int  # first index in the flat vector

    @property
    def size(self) -> int:
        return int(np.prod(self.shape))

    @property
    def stop(self) -> int:
        return self.offset + self.size


@dataclass(frozen=True)
class ParamLayout:
    """Where each tensor of a model lives in its flat parameter vector."""

    slots: tuple[LayerSlot, ...]

    @classmethod
    def for_spec(cls, spec: MLPSpec) -> "ParamLayout":
        return _layout_for(spec)

    @classmethod
    def _build(cls, spec: MLPSpec) -> "ParamLayout":
        shapes = [("fc1.weight", (spec.hidden, spec.input_size)), ("fc1.bias", (spec.hidden,)),
                  ("fc2.weight", (spec.num_classes, spec.hidden)), ("fc2.bias", (spec.num_classes,))]
        slots, offset = [], 0
        for name, shape in shapes:
            slots.append(LayerSlot(name, shape, offset))
            offset += int(np.prod(shape))
        return cls(tuple(slots))

    @property
    def num_params(self) -> int:
        return self.slots[-1].stop

    @property
    def names(self) -> list[str]:
        return [s.name for s in self.slots]

    def slot(self, name: str) -> LayerSlot:
        for s in self.slots:
            if s.name == name:
                return s
        raise KeyError(name)

    def flatten(self, state: dict) -> torch.Tensor:
        """state_dict -> (P,) float32 vector."""
        missing = [s.name for s in self.slots if s.name not in state]
        if missing:
            raise HyperForgetError(f"state_dict lacks {missing}; expected keys {self.names}")
        parts = []
        for s in self.slots:
            t = torch.as_tensor(state[s.name])
            if tuple(t.shape) != s.shape:
                raise HyperForgetError(f"{s.name} has shape {tuple(t.shape)}, the spec expects {s.shape}")
            parts.append(t.detach().reshape(-1).to(torch.float32))
        return torch.cat(parts)

    def unflatten(self, flat: torch.Tensor | np.ndarray) -> dict[str, torch.Tensor]:
        """(..., P) vector(s) -> state_dict of (..., *shape) tensors (views when possible)."""
        flat = torch.as_tensor(flat)
        self.check(flat)
        lead = tuple(flat.shape[:-1])
        return {s.name: flat[..., s.offset:s.stop].reshape(*lead, *s.shape) for s in self.slots}

    def check(self, flat: torch.Tensor | np.ndarray) -> None:
        if flat.shape[-1] != self.num_params:
            raise HyperForgetError(
                f"parameter vector has {flat.shape[-1]} values, the MLP spec needs {self.num_params}")


@functools.lru_cache(maxsize=64)
def _layout_for(spec: MLPSpec) -> ParamLayout:
    # Specs are frozen and hashable; hot loops ask for the layout on every call.
    return ParamLayout._build(spec)


class MLP(nn.Module):
    """The main network F(x; θ): Linear -> activation -> Linear."""

    def __init__(self, spec: MLPSpec):
        super().__init__()
        self.spec = spec
        self.fc1 = nn.Linear(spec.input_size, spec.hidden)
        self.fc2 = nn.Linear(spec.hidden, spec.num_classes)

    def hidden_features(self, x: torch.Tensor) -> torch.Tensor:
        return ACTIVATIONS[self.spec.activation](self.fc1(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.hidden_features(x))

    def flat_params(self) -> torch.Tensor:
        return self.spec.layout.flatten(self.state_dict())

    @classmethod
    def from_flat(cls, spec: MLPSpec, flat: torch.Tensor | np.ndarray) -> "MLP":
        model = cls(spec)
        model.load_state_dict({k: v.clone() for k, v in spec.layout.unflatten(flat).items()})
        return model


@dataclass(frozen=True)
class TaskPreset:
    """A paper setting: which MLP, which classes, which pivots, how much to collect."""

    name: str
    spec: MLPSpec
    classes: tuple[int, ...]  # original dataset class ids used by the task
    pivots: tuple[int, ...]  # task labels (indices into classes) kept high-performing
    checkpoints_per_run: int  # maximum saved checkpoints per training run
    epochs: int  # training epochs per run
    forget_sets: tuple[tuple[int, ...], ...]  # forget sets the paper evaluates

    def with_input_size(self, input_size: int) -> "TaskPreset":
        """The same task on a dataset whose images have another size."""
        spec = MLPSpec(input_size, self.spec.hidden, self.spec.num_classes, self.spec.activation)
        return TaskPreset(self.name, spec, self.classes, self.pivots, self.checkpoints_per_run,
                          self.epochs, self.forget_sets)


TASK_PRESETS: dict[str, TaskPreset] = {
    # MNIST-4: 784-2-4, classes 0-3, pivots {0,1}, 150 checkpoints per run, 25 epochs (Section 4).
    "mnist4": TaskPreset("mnist4", MLPSpec(784, 2, 4), (0, 1, 2, 3), (0, 1), 150, 25, ((2,), (2, 3))),
    # MNIST-10: 784-7-10, pivots {5..9}, 200 checkpoints per run (Section 4).
    "mnist10": TaskPreset("mnist10", MLPSpec(784, 7, 10), tuple(range(10)), (5, 6, 7, 8, 9), 200, 25,
                          ((2,), (2, 3, 4), (0, 1, 2, 3, 4))),
}


def get_preset(name: str) -> TaskPreset:
    if name not in TASK_PRESETS:
        raise HyperForgetError(f"unknown preset {name!r}: choose one of {', '.join(TASK_PRESETS)}")
    return TASK_PRESETS[name]


# ----------------------------------------------------------------------------------------------
# Batched evaluation: M flat parameter vectors as M models, one pass over the data.


def batched_hidden(spec: MLPSpec, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(M, P) params, (N, D) inputs -> (M, N, H) hidden activations."""
    w = spec.layout.unflatten(params)
    m = params.shape[0]
    # One (N, D) @ (D, M*H) product serves every model.
    pre = x @ w["fc1.weight"].reshape(m * spec.hidden, spec.input_size).T  # (N, M*H)
    pre = pre.reshape(x.shape[0], m, spec.hidden).transpose(0, 1) + w["fc1.bias"][:, None, :]
    return ACTIVATIONS[spec.activation](pre)  # (M, N, H)


def batched_logits(spec: MLPSpec, params: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(M, P) params, (N, D) inputs -> (M, N, C) logits."""
    w = spec.layout.unflatten(params)
    h = batched_hidden(spec, params, x)
    return torch.baddbmm(w["fc2.bias"][:, None, :], h, w["fc2.weight"].transpose(1, 2))  # (M, N, C)


MASKED_LOGIT = float("-inf")  # a masked class's logit: its softmax probability is exactly 0


@torch.no_grad()
def model_logits(spec: MLPSpec, params: torch.Tensor | np.ndarray, x: torch.Tensor, masked: Sequence[int] = (),
                 models_per_pass: int = 64) -> torch.Tensor:
    """(M, P) params, (N, D) inputs -> (M, N, C) float32 logits, the masked classes at −∞.

    The one "logits of many models" helper: evaluation, selection and the report use it.
    ``models_per_pass`` bounds the (models, N, H) intermediate.
    """
    params = torch.as_tensor(params, dtype=torch.float32)
    out = [batched_logits(spec, params[i:i + models_per_pass], x) for i in range(0, params.shape[0], models_per_pass)]
    logits = torch.cat(out) if out else torch.zeros(0, x.shape[0], spec.num_classes)
    if masked:
        logits[..., list(masked)] = MASKED_LOGIT
    return logits


def hidden_major(spec: MLPSpec, params: torch.Tensor) -> list[torch.Tensor]:
    """(M, P) flat vectors -> the stacked layers :func:`stacked_forward` reads (copies).

    W1 (H·M, D) with row h·M + i for hidden unit h of model i, b1 (H·M,), W2 (H, C, M), b2 (C, M).
    """
    lay = spec.layout.unflatten(params)
    return [lay["fc1.weight"].transpose(0, 1).reshape(-1, spec.input_size), lay["fc1.bias"].T.reshape(-1),
            lay["fc2.weight"].permute(2, 1, 0).contiguous(), lay["fc2.bias"].T.contiguous()]


def flat_from_hidden_major(spec: MLPSpec, layers: list[torch.Tensor]) -> torch.Tensor:
    """The inverse of :func:`hidden_major`: stacked layers of M models -> (M, P) flat vectors."""
    w1, b1, w2, b2 = layers
    h, m = spec.hidden, b2.shape[1]
    return torch.cat([w1.view(h, m, -1).transpose(0, 1).reshape(m, -1), b1.view(h, m).T,
                      w2.permute(2, 1, 0).reshape(m, -1), b2.T], dim=1)


def take_models(spec: MLPSpec, layers: list[torch.Tensor], idx: torch.Tensor | np.ndarray) -> list[torch.Tensor]:
    """Copies of the hidden-major layers (:func:`hidden_major`) of the models idx (m,) of a stack."""
    w1, b1, w2, b2 = layers
    h, r, idx = spec.hidden, b2.shape[1], torch.as_tensor(idx, dtype=torch.long)
    m = len(idx)
    return [w1.view(h, r, -1).index_select(1, idx).view(h * m, -1), b1.view(h, r).index_select(1, idx).view(-1),
            w2.index_select(2, idx), b2.index_select(1, idx)]


def concat_models(spec: MLPSpec, stacks: Sequence[list[torch.Tensor]]) -> list[torch.Tensor]:
    """Several stacks of hidden-major layers side by side as one stack (models in order; copies)."""
    h, d = spec.hidden, spec.input_size
    return [torch.cat([st[0].view(h, -1, d) for st in stacks], 1).view(-1, d),
            torch.cat([st[1].view(h, -1) for st in stacks], 1).view(-1),
            torch.cat([st[2] for st in stacks], 2), torch.cat([st[3] for st in stacks], 1)]


def stacked_forward(spec: MLPSpec, x: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor,
                    b2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """M models at once on (n, D) inputs -> hidden (n, H, M) and logits (n, C, M).

    The layers are hidden-major (:func:`hidden_major`): the first layer of all models is one
    (n, D) @ (D, H·M) product, and the model axis is innermost everywhere after it, so each
    element-wise op runs over contiguous rows of M floats instead of over axes of size H or C.
    """
    n, (h, _, m) = x.shape[0], w2.shape
    hid = ACTIVATIONS[spec.activation](torch.addmm(b1, x, w1.T)).view(n, h, m)  # (n, H, M)
    # Second layer: H multiply-adds of (n, 1, M) by (C, M); tiny per-model matmuls would cost more.
    logits = torch.addcmul(b2, hid[:, 0, None, :], w2[0])  # (n, C, M)
    for k in range(1, h):
        logits.addcmul_(hid[:, k, None, :], w2[k])
    return hid, logits


@dataclass
class ClassMetrics:
    """Per-class and overall test metrics of M models (numpy, float32)."""

    loss: np.ndarray  # (M, C) mean cross-entropy over the examples of each class
    acc: np.ndarray  # (M, C) accuracy on the examples of each class
    total_loss: np.ndarray  # (M,) mean cross-entropy over all examples
    total_acc: np.ndarray  # (M,) accuracy over all examples


class PerClassEvaluator:
    """Per-class test loss and accuracy of many flat parameter vectors against one fixed split.

    The split, its one-hot matrix and class counts are prepared once, so hot loops (the collector
    evaluates every candidate checkpoint) pay only for the products: the forward pass is
    :func:`stacked_forward`, and the per-class sums are two (C, n) @ (n, M) products.
    """

    def __init__(self, spec: MLPSpec, x: torch.Tensor | np.ndarray, y: torch.Tensor | np.ndarray,
                 models_per_pass: int | None = None, rows_per_pass: int = 16384, max_elements: int = 1 << 22):
        """x: (N, D) inputs; y: (N,) labels in [0, C). Memory per pass is bounded by
        ``models_per_pass`` (default: max_elements // (rows_per_pass · C)) and ``rows_per_pass``."""
        self.spec = spec
        self.x = torch.as_tensor(x, dtype=torch.float32)  # (N, D)
        self.y = torch.as_tensor(y, dtype=torch.long)  # (N,)
        if self.x.shape[1] != spec.input_size:
            raise HyperForgetError(f"inputs have {self.x.shape[1]} features, the MLP spec expects {spec.input_size}")
        c = spec.num_classes
        self.onehot_t = F.one_hot(self.y, c).to(torch.float32).T.contiguous()  # (C, N)
        self.counts = self.onehot_t.sum(1)  # (C,)
        self.rows_per_pass = max(1, rows_per_pass)
        rows = min(self.rows_per_pass, max(1, len(self.y)))
        self.models_per_pass = models_per_pass or max(1, max_elements // (rows * c))

    @torch.no_grad()
    def __call__(self, params: torch.Tensor | np.ndarray) -> ClassMetrics:
        """(M, P) or (P,) params -> ClassMetrics; classes without any example get NaN.

        Accuracy counts an example as correct when its true class has strictly the largest logit: an
        exact tie counts as wrong, so a degenerate model (e.g. all-zero parameters) scores 0, not 1.
        """
        params = torch.as_tensor(params, dtype=torch.float32)
        if params.ndim == 1:
            params = params[None]
        self.spec.layout.check(params)
        sums = [self._class_sums(hidden_major(self.spec, params[m0:m0 + self.models_per_pass]))
                for m0 in range(0, params.shape[0], self.models_per_pass)]
        return self._metrics(torch.cat([s[0] for s in sums], 1), torch.cat([s[1] for s in sums], 1))

    @torch.no_grad()
    def stacked(self, layers: list[torch.Tensor]) -> ClassMetrics:
        """ClassMetrics of models given as hidden-major layers (:func:`hidden_major`), without flat copies.

        The collector evaluates its checkpoint candidates this way.
        """
        return self._metrics(*self._class_sums(layers))

    def _class_sums(self, layers: list[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed cross-entropy and correct predictions per class: two (C, M) tensors."""
        m, c = layers[3].shape[1], self.spec.num_classes
        loss_sum, correct = torch.zeros(c, m), torch.zeros(c, m)
        lib = kernels.compiled_kernels()
        if lib is not None and self.spec.activation in kernels.ACTIVATIONS:
            self._kernel_class_sums(lib, layers, loss_sum, correct)
            return loss_sum, correct
        for m0 in range(0, m, self.models_per_pass):  # bounds the (n, C, M) logits
            m1 = min(m, m0 + self.models_per_pass)
            part = layers if (m0, m1) == (0, m) else take_models(self.spec, layers, torch.arange(m0, m1))
            for n0 in range(0, len(self.y), self.rows_per_pass):
                n1 = n0 + self.rows_per_pass
                logits = stacked_forward(self.spec, self.x[n0:n1], *part)[1]  # (n, C, M)
                yy = self.y[n0:n1].view(-1, 1, 1).expand(-1, 1, m1 - m0)
                nll = torch.log_softmax(logits, 1).gather(1, yy)[:, 0].neg_()  # (n, M)
                # Only the true class reaches its own logit (argmax over a short middle axis is far slower).
                hit = ((logits >= logits.gather(1, yy)).sum(1) == 1).to(torch.float32)  # (n, M)
                loss_sum[:, m0:m1].addmm_(self.onehot_t[:, n0:n1], nll)  # (C, n) @ (n, M)
                correct[:, m0:m1].addmm_(self.onehot_t[:, n0:n1], hit)
        return loss_sum, correct

    def _kernel_class_sums(self, lib, layers: list[torch.Tensor], loss_sum: torch.Tensor,
                           correct: torch.Tensor) -> None:
        """:meth:`_class_sums` with everything after the first product in one C pass per row block."""
        w1, b1, w2, b2 = (t.contiguous() for t in layers)
        h, c, m = w2.shape
        # Row blocks whose pre-activations (rows, H·M) stay in L2 for the C pass that reads them.
        rows = max(64, min(self.rows_per_pass, (1 << 19) // (h * m)))
        act = kernels.ACTIVATIONS[self.spec.activation]
        for n0 in range(0, len(self.y), rows):
            x, y = self.x[n0:n0 + rows], self.y[n0:n0 + rows]
            pre = torch.addmm(b1, x, w1.T)  # (n, H·M)
            if lib.class_sums(pre.data_ptr(), w2.data_ptr(), b2.data_ptr(), y.data_ptr(), loss_sum.data_ptr(),
                              correct.data_ptr(), len(y), h, c, m, act):
                raise MemoryError("class_sums kernel: out of memory")

    def _metrics(self, loss_sum: torch.Tensor, correct: torch.Tensor) -> ClassMetrics:
        n = self.counts.sum()
        with np.errstate(invalid="ignore", divide="ignore"):
            return ClassMetrics((loss_sum.T / self.counts).numpy(), (correct.T / self.counts).numpy(),
                                (loss_sum.sum(0) / n).numpy(), (correct.sum(0) / n).numpy())


def evaluate_per_class(spec: MLPSpec, params: torch.Tensor | np.ndarray, x: torch.Tensor | np.ndarray,
                       y: torch.Tensor | np.ndarray, models_per_pass: int = 256,
                       rows_per_pass: int = 16384) -> ClassMetrics:
    """Per-class loss and accuracy for a batch of flat parameter vectors, in one vectorized pass.

    Args:
        params: (M, P) parameter vectors.
        x: (N, D) inputs; y: (N,) labels in [0, C).
        models_per_pass, rows_per_pass: bound the (M, N, C) logits kept in memory at once.
    Classes without any example get NaN. For repeated calls on one split, build a
    :class:`PerClassEvaluator` once.
    """
    return PerClassEvaluator(spec, x, y, models_per_pass, rows_per_pass)(params)


def init_params(spec: MLPSpec, seeds: Sequence[int]) -> torch.Tensor:
    """(len(seeds), P) vectors, each nn.Linear's default init under its own seed.

    The values are those of ``torch.manual_seed(seed); MLP(spec)``: the layers draw in the same
    order from a generator seeded alike (nn.Linear.reset_parameters: kaiming_uniform_ with a = √5 on
    the weight, then U(±1/√fan_in) on the bias). A private generator leaves the global one alone
    and costs microseconds, where reseeding the global one costs milliseconds per network.
    """
    out = torch.empty(len(seeds), spec.num_params)
    shapes = [s.shape for s in spec.layout.slots]  # fc1.weight, fc1.bias, fc2.weight, fc2.bias
    for i, seed in enumerate(seeds):
        gen = torch.Generator().manual_seed(int(seed))
        parts = []
        for w_shape, b_shape in (shapes[0:2], shapes[2:4]):
            w = nn.init.kaiming_uniform_(torch.empty(w_shape), a=math.sqrt(5), generator=gen)
            bound = 1 / math.sqrt(w_shape[1]) if w_shape[1] > 0 else 0
            parts += [w.reshape(-1), torch.empty(b_shape).uniform_(-bound, bound, generator=gen)]
        out[i] = torch.cat(parts)
    return out


# ----------------------------------------------------------------------------------------------
# MLPs on disk: safetensors with the spec in its metadata, readable by any safetensors user.


def save_mlps(path: str, spec: MLPSpec, params: torch.Tensor | np.ndarray, metadata: dict | None = None) -> None:
    """Save (P,) or (K, P) flat parameter vectors as safetensors ("params" tensor + per-layer tensors of the first).

    The file's metadata holds the MLP spec as JSON (key "mlp_spec") and any extra string fields.
    Written to a temporary name and renamed, so a reader never sees half a file.
    """
    import json

    from safetensors.torch import save_file

    flat = torch.as_tensor(params, dtype=torch.float32).detach().cpu()
    spec.layout.check(flat)
    stacked = flat.reshape(-1, spec.num_params).contiguous()
    tensors = {"params": stacked}
    tensors.update({k: v.clone().contiguous() for k, v in spec.layout.unflatten(stacked[0]).items()})
    meta = {"mlp_spec": json.dumps(spec.to_dict()), "format": "hyperforget-mlp", "version": "1"}
    meta.update({k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()})
    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=meta)


def load_mlps(path: str) -> tuple[MLPSpec, torch.Tensor, dict]:
    """Read a file written by save_mlps -> (spec, (K, P) params, metadata dict)."""
    import json
    import os

    from safetensors import safe_open

    if not os.path.exists(path):
        raise HyperForgetError(f"no MLP file at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            meta = dict(f.metadata() or {})
            params = f.get_tensor("params")
    except Exception as exc:  # safetensors raises several types for damaged files
        raise HyperForgetError(f"cannot read MLP file {path}: {exc}") from None
    if "mlp_spec" not in meta:
        raise HyperForgetError(f"{path} has no mlp_spec metadata; was it written by hyperforget?")
    spec = MLPSpec.from_dict(json.loads(meta["mlp_spec"]))
    spec.layout.check(params)
    if not torch.isfinite(params).all():
        raise HyperForgetError(f"{path} holds NaN or infinite parameters")
    return spec, params, meta
