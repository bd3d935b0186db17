"""Gradient baselines from the original model: fine-tune on D_r, NegGrad+, random labels."""

from __future__ import annotations

from typing import Iterator, Sequence

import torch
import torch.nn.functional as F

from hyperforget.pipelines.baselines.common import batches, finished, prepare, train_ce, trainable_copy
from hyperforget.zoo.mlp import MLP


def _cycle(idx: torch.Tensor, batch_size: int, gen: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless shuffled minibatches, reshuffled at every pass."""
    while True:
        yield from batches(idx, batch_size, gen)


def finetune(model: MLP, x_train, y_train, forget: Sequence[int], *, seed: int = 0, epochs: int = 5,
             lr: float = 0.02, momentum: float = 0.9, batch_size: int = 128) -> MLP:
    """Fine-tune on D_r with cross-entropy ("catastrophic forgetting" of D_f).

    Defaults: SSD repository (Foster et al. 2024), 5 epochs, lr 0.02. The momentum of 0.9 is this
    harness's choice (the same as the retrain pipeline's SGD), not a published setting.
    """
    d = prepare(model, x_train, y_train, forget, seed)
    student = trainable_copy(model)
    opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=momentum)
    train_ce(student, d.x, d.y, d.retain_idx, epochs=epochs, batch_size=batch_size, optimizer=opt, gen=d.gen)
    return finished(student)


def neggrad_plus(model: MLP, x_train, y_train, forget: Sequence[int], *, seed: int = 0, alpha: float = 0.95,
                 epochs: int = 5, lr: float = 0.01, momentum: float = 0.9, batch_size: int = 128,
                 forget_batch_size: int = 128) -> MLP:
    """NegGrad+: minimize α·CE(D_r) − (1 − α)·CE(D_f) (Kurmanji et al. 2023, SCRUB repository).

    Each step pairs a retain minibatch with a forget minibatch (the forget set is cycled); one
    epoch is one pass over D_r. α = 0.95 as in the SCRUB repository; SGD lr 0.01, momentum 0.9.
    """
    d = prepare(model, x_train, y_train, forget, seed)
    student = trainable_copy(model)
    opt = torch.optim.SGD(student.parameters(), lr=lr, momentum=momentum)
    forget_batches = _cycle(d.forget_idx, forget_batch_size, d.gen)
    for _ in range(epochs):
        for b in batches(d.retain_idx, batch_size, d.gen):
            bf = next(forget_batches)
            loss = (alpha * F.cross_entropy(student(d.x[b]), d.y[b])
                    - (1.0 - alpha) * F.cross_entropy(student(d.x[bf]), d.y[bf]))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return finished(student)


def random_labels(model: MLP, x_train, y_train, forget: Sequence[int], *, seed: int = 0, epochs: int = 3,
                  lr: float = 1e-4, batch_size: int = 128) -> MLP:
    """Relabel each D_f example with a uniformly drawn *other* class, then train on D_f ∪ D_r.

    Defaults: SSD repository (Adam 1e-4, 3 epochs). Several repositories call this "amnesiac";
    Graves et al. (2021)'s amnesiac unlearning instead rolls back the recorded parameter updates
    of the batches that held forget data, which needs the training history this harness does not
    keep. The random label of an example is drawn once, before training. For class unlearning
    "other" means any class except the example's own (retain classes and other forget classes
    alike), as in the public code.
    """
    d = prepare(model, x_train, y_train, forget, seed)
    student = trainable_copy(model)
    y = d.y.clone()
    # Uniform over the C − 1 other classes: shift the true label by 1..C−1 modulo C.
    shift = torch.randint(1, d.num_classes, (len(d.forget_idx),), generator=d.gen)
    y[d.forget_idx] = (y[d.forget_idx] + shift) % d.num_classes
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    train_ce(student, d.x, y, torch.arange(len(y)), epochs=epochs, batch_size=batch_size, optimizer=opt, gen=d.gen)
    return finished(student)
