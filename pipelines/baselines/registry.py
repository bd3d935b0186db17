"""The registry of baselines (BASELINES: method, published defaults, reference) and running one by name."""

from __future__ import annotations

import importlib
import time
from dataclasses import dataclass
from typing import Callable, Sequence

from torch import nn

from hyperforget.pipelines.baselines.control import logit_mask
from hyperforget.pipelines.baselines.dampening import ssd
from hyperforget.pipelines.baselines.gradient import finetune, neggrad_plus, random_labels
from hyperforget.pipelines.baselines.teacher import bad_teacher, scrub, unsir
from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.mlp import MLP


@dataclass(frozen=True)
class BaselineSpec:
    """One unlearning method of the comparison table."""

    fn: Callable[..., nn.Module]  # fn(model, x, y, forget, *, seed, **hparams) -> module
    defaults: dict  # published hyper-parameters (keyword -> value)
    reference: str  # paper and code the defaults come from
    notes: str = ""  # where this implementation differs from the public code, and why


def _defaults(fn: Callable) -> dict:
    import inspect

    return {k: p.default for k, p in inspect.signature(fn).parameters.items()
            if p.kind is inspect.Parameter.KEYWORD_ONLY and k != "seed"}


BASELINES: dict[str, BaselineSpec] = {
    "finetune": BaselineSpec(finetune, _defaults(finetune), "Foster et al. 2024 (SSD repo, finetune)",
                             "SGD with momentum 0.9 on D_r"),
    "neggrad_plus": BaselineSpec(neggrad_plus, _defaults(neggrad_plus), "Kurmanji et al. 2023 (SCRUB repo, NegGrad+)",
                                 "one forget minibatch per retain minibatch"),
    "random_labels": BaselineSpec(random_labels, _defaults(random_labels),
                                  "Foster et al. 2024 (SSD repo, 'amnesiac')",
                                  "called 'amnesiac' in the SSD/bad-teaching repos; Graves et al.'s amnesiac "
                                  "rolls back updates instead"),
    "ssd": BaselineSpec(ssd, _defaults(ssd), "Foster et al., AAAI 2024 (if-loops/selective-synaptic-dampening)",
                        "importances from minibatch gradients as in the code; importance='per_example' for the "
                        "textbook Fisher"),
    "bad_teacher": BaselineSpec(bad_teacher, _defaults(bad_teacher),
                                "Chundawat et al., AAAI 2023 (vikram2000b/bad-teaching-unlearning)",
                                "KL with reduction 'batchmean' instead of 'mean'"),
    "scrub": BaselineSpec(scrub, _defaults(scrub), "Kurmanji et al., NeurIPS 2023 (meghdadk/SCRUB)",
                          "no SWA smoothing term, no gradient clipping"),
    "unsir": BaselineSpec(unsir, _defaults(unsir), "Tarun et al., IEEE TNNLS 2023 (SSD repo port)",
                          "paper's learning rates (impair 0.02, repair 0.01), repo uses 1e-4"),
    "logit_mask": BaselineSpec(logit_mask, {}, "control (no reference)",
                               "forget logits set to -inf; parameters equal the original"),
}


def check_overrides(name: str, overrides: dict) -> None:
    """Refuse overrides a registered method does not take, or of another kind or sign than its defaults."""
    if name not in BASELINES:
        raise HyperForgetError(f"unknown unlearning method {name!r}: choose one of {', '.join(BASELINES)}")
    spec = BASELINES[name]
    unknown = sorted(set(overrides) - set(spec.defaults))
    if unknown:
        raise HyperForgetError(f"{name} has no hyper-parameter {', '.join(unknown)}; "
                               f"it takes {', '.join(spec.defaults) or 'none'}")
    for key, value in overrides.items():
        _check_override(name, key, value, spec.defaults[key])


def _check_override(method: str, key: str, value, default) -> None:
    """An override keeps its default's kind and sign: counts stay counts, positive rates positive."""
    import math

    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise HyperForgetError(f"--set {key}={value!r}: {method}'s {key} is true or false")
        return
    if isinstance(default, (int, float)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise HyperForgetError(f"--set {key}={value!r}: {method}'s {key} is a finite number (default {default})")
        if isinstance(default, int) and not isinstance(value, int):
            raise HyperForgetError(f"--set {key}={value!r}: {method}'s {key} is a whole number (default {default})")
        if default > 0 and value <= 0:
            raise HyperForgetError(f"--set {key}={value!r}: {method}'s {key} must be > 0 (default {default})")
        if default >= 0 and value < 0:
            raise HyperForgetError(f"--set {key}={value!r}: {method}'s {key} must be >= 0 (default {default})")
    elif isinstance(default, str) and not isinstance(value, str):
        raise HyperForgetError(f"--set {key}={value!r}: {method}'s {key} is a name (default {default!r})")


def run_baseline(name: str, model: MLP, x, y, forget: Sequence[int], seed: int = 0,
                 **overrides) -> tuple[nn.Module, float]:
    """Run one registered method with its defaults updated by ``overrides``.

    Returns (unlearned module, wall-clock seconds of the method itself). The original ``model``
    is not modified.
    """
    if name not in BASELINES:
        raise HyperForgetError(f"unknown unlearning method {name!r}: choose one of {', '.join(BASELINES)}")
    spec = BASELINES[name]
    check_overrides(name, overrides)
    hparams = {**spec.defaults, **overrides}
    # A process's first torch.optim optimizer imports torch._dynamo (~2 s here); that one-time cost
    # belongs to no method, so it is paid before the clock starts.
    importlib.import_module("torch._dynamo")
    start = time.perf_counter()
    module = spec.fn(model, x, y, forget, seed=seed, **hparams)
    return module, time.perf_counter() - start
