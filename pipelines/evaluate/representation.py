"""Representation checks of unlearned models: a linear probe on the hidden layer, and relearning steps."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from hyperforget.zoo.mlp import MLPSpec, batched_hidden, batched_logits


def probe_forget_accuracy(spec: MLPSpec, params: torch.Tensor, x_train: torch.Tensor, y_train: np.ndarray,
                          x_test: torch.Tensor, y_test: np.ndarray, forget: Sequence[int]) -> np.ndarray:
    """Linear probe on the hidden layer: (M,) accuracy on forget-class test examples.

    A multinomial logistic regression per model is fitted on the hidden activations (H features,
    standardized) of the training examples of every class, labels = task classes, and scored on
    the test examples of the forget classes. A model whose forget class is only masked at the output
    keeps features that separate it; a retrained model's features were never shaped by it.
    """
    from sklearn.linear_model import LogisticRegression

    test_f = np.isin(y_test, list(forget))
    with torch.no_grad():
        h_tr = batched_hidden(spec, params, x_train).numpy()  # (M, N, H)
        h_te = batched_hidden(spec, params, x_test[torch.as_tensor(test_f)]).numpy()
    out = []
    for m in range(params.shape[0]):
        mu, sd = h_tr[m].mean(0), h_tr[m].std(0) + 1e-6
        clf = LogisticRegression(max_iter=500)
        clf.fit((h_tr[m] - mu) / sd, y_train)
        out.append(float((clf.predict((h_te[m] - mu) / sd) == y_test[test_f]).mean()))
    return np.array(out)


def relearn_steps(spec: MLPSpec, params: torch.Tensor, x_sub: torch.Tensor, y_sub: torch.Tensor,
                  x_eval: torch.Tensor, y_eval: torch.Tensor, level: float, *, max_steps: int, lr: float) -> np.ndarray:
    """Full-batch SGD steps on a small subset until forget-class accuracy ≥ level, per model.

    Args:
        params: (M, P) start points (the weights, not any output mask: whoever holds the weights can
            drop a mask). x_sub, y_sub: the relearning subset (forget and retain classes).
        x_eval, y_eval: forget-class test examples.
    Returns:
        (M,) steps; 0 when already at the level, NaN when max_steps did not reach it.
    """
    from hyperforget.zoo.lockstep import LockstepSGD

    opt = LockstepSGD(spec, params, lr, max_steps, momentum=0.9, nesterov=False, weight_decay=0.0,
                      schedule="constant")
    w = torch.ones(params.shape[0], len(y_sub))
    steps = np.full(params.shape[0], np.nan)
    for step in range(max_steps + 1):
        with torch.no_grad():
            acc = (batched_logits(spec, opt.params, x_eval).argmax(-1) == y_eval).float().mean(1).numpy()
        newly = np.isnan(steps) & (acc >= level)
        steps[newly] = step
        if not np.isnan(steps).any() or step == max_steps:
            break
        opt.step(x_sub, y_sub, w)
    return steps
