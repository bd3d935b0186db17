"""Teacher–student baselines: bad teaching, SCRUB, and UNSIR (noise learned against the frozen original)."""

from __future__ import annotations

import copy
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from hyperforget.pipelines.baselines.common import batches, finished, prepare, train_ce, trainable_copy
from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.mlp import MLP


def _seeded_init(spec, gen: torch.Generator) -> MLP:
    """A fresh MLP with nn.Linear's default init, drawn from ``gen`` without touching global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(torch.randint(0, 2**62, (1,), generator=gen)))
        return MLP(spec)


def _frozen(model: nn.Module) -> nn.Module:
    """A deep copy in eval mode with frozen parameters: a teacher."""
    teacher = copy.deepcopy(model).eval()
    for p in teacher.parameters():
        p.grad = None
        p.requires_grad_(False)
    return teacher


def _distill_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(S(t/T) ‖ S(s/T)) · T², summed over classes and averaged over the batch (Hinton et al.)."""
    log_s = F.log_softmax(student_logits / temperature, dim=1)
    p_t = F.softmax(teacher_logits / temperature, dim=1)
    return F.kl_div(log_s, p_t, reduction="batchmean") * temperature ** 2


def bad_teacher(model: MLP, x_train, y_train, forget: Sequence[int], *, seed: int = 0, temperature: float = 1.0,
                lr: float = 1e-4, epochs: int = 1, retain_fraction: float = 0.3, batch_size: int = 256) -> MLP:
    """"Bad teaching" (Chundawat et al., AAAI 2023; github.com/vikram2000b/bad-teaching-unlearning).

    The student starts as the original. On D_f it is pulled towards a randomly initialized
    ("incompetent") teacher, on a random 30 % of D_r towards the original ("competent") teacher:
    minimize KL(t ‖ S(s/T)) with t = S(z_bad/T) on forget and S(z_orig/T) on retain examples.
    T = 1, Adam 1e-4, 1 epoch, batch 256. The public code uses F.kl_div's default reduction
    'mean' (divides by N·C); here 'batchmean', the KL itself — with Adam only the scale of the
    step changes.
    """
    d = prepare(model, x_train, y_train, forget, seed)
    if not 0.0 <= retain_fraction <= 1.0:
        raise HyperForgetError(f"retain_fraction must be in [0, 1], got {retain_fraction}")
    good, bad = _frozen(model), _frozen(_seeded_init(model.spec, d.gen))
    student = trainable_copy(model)
    n_keep = int(round(retain_fraction * len(d.retain_idx)))
    keep = d.retain_idx[torch.randperm(len(d.retain_idx), generator=d.gen)[:n_keep]]
    idx = torch.cat([d.forget_idx, keep])
    is_forget = torch.zeros(len(d.y), dtype=torch.bool)
    is_forget[d.forget_idx] = True
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    for _ in range(epochs):
        for b in batches(idx, batch_size, d.gen):
            xb = d.x[b]
            with torch.no_grad():
                t = torch.where(is_forget[b, None], F.softmax(bad(xb) / temperature, 1),
                                F.softmax(good(xb) / temperature, 1))
            loss = F.kl_div(F.log_softmax(student(xb) / temperature, 1), t, reduction="batchmean")
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return finished(student)


def scrub(model: MLP, x_train, y_train, forget: Sequence[int], *, seed: int = 0, epochs: int = 10,
          msteps: int = 3, lr: float = 5e-4, kd_temperature: float = 2.0, alpha: float = 0.5, gamma: float = 1.0,
          weight_decay: float = 5e-4, lr_decay_epochs: tuple[int, ...] = (5, 8, 9), lr_decay_rate: float = 0.1,
          batch_size: int = 128, forget_batch_size: int = 32) -> MLP:
    """SCRUB (Kurmanji et al., NeurIPS 2023; github.com/meghdadk/SCRUB).

    Teacher = the original model. Each epoch, for the first ``msteps`` epochs a max-step pass over
    D_f (maximize d(x_f) = KL(S(z_t/T) ‖ S(z_s/T))·T²), then a min-step pass over D_r minimizing
    α·d(x_r) + γ·CE(x_r). Adam 5e-4, 10 epochs, msteps 3, T = 2, α = 0.5, γ = 1 and the learning
    rate ×0.1 after epochs 5, 8, 9: the repository's small-scale settings (its loop counts epochs
    from 1 and maximizes while epoch ≤ msteps, i.e. msteps max passes, as here). Left out: the
    repository's optional smoothing term (distance to an SWA copy of the student) and gradient
    clipping, neither of which the paper's algorithm has. Weight decay 5e-4 is the repository's
    default (its small-scale notebook sets 0.1).
    """
    d = prepare(model, x_train, y_train, forget, seed)
    teacher = _frozen(model)
    student = trainable_copy(model)
    opt = torch.optim.Adam(student.parameters(), lr=lr, weight_decay=weight_decay)
    for epoch in range(epochs):
        decay = sum(epoch + 1 > e for e in lr_decay_epochs)  # repo counts epochs from 1
        for group in opt.param_groups:
            group["lr"] = lr * lr_decay_rate ** decay
        if epoch < msteps:
            for b in batches(d.forget_idx, forget_batch_size, d.gen):
                with torch.no_grad():
                    zt = teacher(d.x[b])
                loss = -_distill_kl(student(d.x[b]), zt, kd_temperature)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
        for b in batches(d.retain_idx, batch_size, d.gen):
            with torch.no_grad():
                zt = teacher(d.x[b])
            zs = student(d.x[b])
            loss = alpha * _distill_kl(zs, zt, kd_temperature) + gamma * F.cross_entropy(zs, d.y[b])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    return finished(student)


def unsir(model: MLP, x_train, y_train, forget: Sequence[int], *, seed: int = 0, noise_batch_size: int = 32,
          noise_batches: int = 80, noise_steps: int = 25, noise_lr: float = 0.1, noise_reg: float = 0.1,
          retain_per_class: int = 500, impair_lr: float = 0.02, repair_lr: float = 0.01, impair_epochs: int = 1,
          repair_epochs: int = 1, batch_size: int = 32, repair_batch_size: int = 128) -> MLP:
    """UNSIR (Tarun et al., "Fast Yet Effective Machine Unlearning", IEEE TNNLS 2023).

    1. For each forget class c learn error-maximizing noise N_c (noise_batch_size, D) with Adam
       (lr 0.1, 25 steps) maximizing CE(F(N_c), c) − noise_reg·mean_n ‖N_c,n‖² against the frozen
       original model.
    2. Impair: one epoch of CE on noise_batches copies of every N_c (labelled c) mixed with up to
       500 retain examples per class, Adam lr 0.02.
    3. Repair: one epoch of CE on the same retain examples, Adam lr 0.01.
    Learning rates are the paper's (impair 0.02, repair 0.01); the SSD repository's port uses 1e-4
    for both, and its noise/sample sizes (32, 80, 500), which are kept here.
    """
    d = prepare(model, x_train, y_train, forget, seed)
    frozen = _frozen(model)
    # Learn the noise for each forget class.
    noise_x, noise_y = [], []
    for c in d.forget:
        noise = torch.randn(noise_batch_size, model.spec.input_size, generator=d.gen).requires_grad_(True)
        nopt = torch.optim.Adam([noise], lr=noise_lr)
        target = torch.full((noise_batch_size,), c, dtype=torch.long)
        for _ in range(noise_steps):
            loss = -F.cross_entropy(frozen(noise), target) + noise_reg * noise.pow(2).sum(1).mean()
            nopt.zero_grad(set_to_none=True)
            loss.backward()
            nopt.step()
        noise_x.append(noise.detach().repeat(noise_batches, 1))
        noise_y.append(torch.full((noise_batch_size * noise_batches,), c, dtype=torch.long))
    # Up to retain_per_class examples of each retain class, chosen at random.
    picks = []
    for c in range(d.num_classes):
        if c in d.forget:
            continue
        idx_c = d.retain_idx[d.y[d.retain_idx] == c]
        picks.append(idx_c[torch.randperm(len(idx_c), generator=d.gen)[:retain_per_class]])
    keep = torch.cat(picks)
    x_mix = torch.cat([*noise_x, d.x[keep]])
    y_mix = torch.cat([*noise_y, d.y[keep]])
    student = trainable_copy(model)
    # Impair, then repair.
    opt = torch.optim.Adam(student.parameters(), lr=impair_lr)
    train_ce(student, x_mix, y_mix, torch.arange(len(y_mix)), epochs=impair_epochs, batch_size=batch_size,
             optimizer=opt, gen=d.gen)
    opt = torch.optim.Adam(student.parameters(), lr=repair_lr)
    train_ce(student, d.x, d.y, keep, epochs=repair_epochs, batch_size=repair_batch_size, optimizer=opt, gen=d.gen)
    return finished(student)
