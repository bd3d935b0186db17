"""Function matching: a training term that compares what θ̂* and θ* compute, not their values.

The diffusion loss (Equation 5) is an MSE over the normalized parameter vector. Equal MSE can hide
very different networks: thousands of small, independent errors in fc1.weight add up in every
hidden pre-activation (Σ_i δw_i x_i over 784 pixels), so an x̂0 that is close value by value can
still misclassify whole classes. This term measures the error where it matters, on inputs:

    L_fn = E_t [ ᾱ_t · mean_x KL( softmax f_θ*(x) ‖ softmax f_θ̂*(x) ) ]

with x drawn class-balanced from the task's training split (the images the zoo's networks learned
from; the test split stays for evaluation) and θ̂* the network's x0 prediction decoded to raw
parameters. ᾱ_t weights it towards low noise, where x̂0 is a network the sampler will return; at
high noise x̂0 is a posterior mean over many networks and has no function worth matching.

The trainer adds ``function_loss · L_fn`` to the diffusion loss (TrainConfig.function_loss).

``metric="logits"`` replaces the KL with the mean squared difference of the centred logits
(z − mean_k z_k; Ba & Caruana's logit matching, the high-temperature limit of the KL). The KL
weighs each probe by θ*'s own probabilities, so once θ* puts e^-8 on a class it can no longer
tell e^-8 from e^-15: a class loss of 8 and one of 15 look alike to it. Centred logits keep that
difference, which is what a loss prompt asks for.

Class-loss matching (TrainConfig.class_loss_match) adds a second term on the same probes, the
squared difference of the per-class log cross-entropies:

    L_cls = E_t [ mean_c ( log(CE_c(θ̂*) + ε) − log(CE_c(θ*) + ε) )² ]

CE_c is the mean cross-entropy over the probes of class c, so L_cls compares the very numbers the
loss prompts name (on training images), in log space so that 8 against 15 weighs as much as 0.1
against 0.2. It is not weighted by ᾱ_t: at high noise DiHyFo-1's x̂0 is the posterior mean of
networks near its θ, still a network, and that is where the sampler fixes how far a class moves.

Both terms are permutation invariant, so canonical orders do not matter here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from hyperforget.hyper.tokenizer import loss_transform
from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.mlp import MLPSpec, batched_logits


class FunctionMatch:
    """Class-balanced probe images and the KL between two batches of decoded networks on them.

    Args:
        spec: the MLP family.
        x: (N, D) training images; y: (N,) their labels.
        probes: images per step (shared by every network of the batch).
        metric: "kl" (KL(θ* ‖ θ̂*) of the class predictions) or "logits" (MSE of centred logits).
    """

    METRICS = ("kl", "logits")

    def __init__(self, spec: MLPSpec, x: torch.Tensor, y: torch.Tensor, probes: int = 128, metric: str = "kl"):
        if metric not in self.METRICS:
            raise HyperForgetError(f"unknown function-matching metric {metric!r}: choose {' or '.join(self.METRICS)}")
        self.spec, self.probes, self.metric = spec, int(probes), metric
        self.x = torch.as_tensor(x, dtype=torch.float32)
        y = torch.as_tensor(y).long()
        self.labels = y
        self.by_class = [torch.nonzero(y == c).flatten() for c in range(spec.num_classes)]
        self.by_class = [rows for rows in self.by_class if len(rows)]

    def draw_rows(self, gen: torch.Generator) -> torch.Tensor:
        """Row indices of (probes,) images, the same number from every class present (rounded up)."""
        per = -(-self.probes // len(self.by_class))
        rows = torch.cat([r[torch.randint(0, len(r), (per,), generator=gen)] for r in self.by_class])
        return rows[: self.probes]

    def diffusion_terms(self, tokenizer, diffusion, t: torch.Tensor, x0_hat: torch.Tensor, x0: torch.Tensor,
                        gen: torch.Generator, function_loss: float, class_loss_match: float = 0.0) -> dict:
        """One training batch of normalized x̂0 and θ* (B, P) -> {"loss": the weighted sum to add to the
        diffusion loss, "function": L_fn (ᾱ_t-weighted), ["class_loss": L_cls]}, the last two detached."""
        weights = diffusion.alpha_bar.to(x0.device)[t]
        terms = self.terms(tokenizer.denormalize(x0_hat.float()), tokenizer.denormalize(x0), weights, gen,
                           class_loss_match > 0)
        loss = function_loss * terms["function"]
        if "class_loss" in terms:
            loss = loss + class_loss_match * terms["class_loss"]
        return {"loss": loss, **{name: value.detach() for name, value in terms.items()}}

    def terms(self, predicted: torch.Tensor, target: torch.Tensor, weights: torch.Tensor, gen: torch.Generator,
              class_loss: bool = False) -> dict:
        """{"function": mean over the batch of weights · d(target, predicted), "class_loss": L_cls (with
        ``class_loss``)} for (B, P) raw parameters."""
        rows = self.draw_rows(gen)
        x = self.x[rows].to(predicted.device)
        with torch.no_grad():
            z_p = batched_logits(self.spec, target.float(), x)  # (B, N, C)
        z_q = batched_logits(self.spec, predicted.float(), x)
        if self.metric == "logits":
            diff = (z_p - z_p.mean(-1, keepdim=True)) - (z_q - z_q.mean(-1, keepdim=True))
            per_net = diff.pow(2).mean((-1, -2))  # (B,)
        else:
            log_p, log_q = F.log_softmax(z_p, dim=-1), F.log_softmax(z_q, dim=-1)
            per_net = (log_p.exp() * (log_p - log_q)).sum(-1).mean(-1)  # (B,)
        out = {"function": (weights.to(per_net) * per_net).mean()}
        if class_loss:
            y = self.labels[rows].to(predicted.device)
            gap = self.log_class_losses(z_q, y) - self.log_class_losses(z_p, y)
            out["class_loss"] = gap.pow(2).mean()
        return out

    def log_class_losses(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """log(CE_c + ε) per network and class present among the probes: (B, N, C), (N,) -> (B, C')."""
        ce = F.cross_entropy(logits.transpose(1, 2), y.expand(logits.shape[0], -1), reduction="none")  # (B, N)
        onehot = F.one_hot(y, self.spec.num_classes).to(ce)  # (N, C)
        present = onehot.sum(0) > 0
        per_class = (ce @ onehot)[:, present] / onehot.sum(0)[present]
        return loss_transform(per_class, "log")  # the offset the loss conditions use
