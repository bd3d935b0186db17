"""Parameter vectors <-> normalized tokens, and the frequency encoder for scalar conditions.

A flat MLP vector θ (P,) is normalized with the zoo's statistics, cut layer by layer (weights and
biases are separate layers, as in G.pt) into tokens of at most ``token_size`` values, and padded
with zeros to ``token_size`` so that all tokens stack into one (B, N, token_size) tensor. The
network then applies one linear map per token (G.pt's per-token ``Linear(chunk_len, hidden)``:
zero padding makes the padded rows of a token's matrix inert, so this is the same map) or one
shared map (SANE-style). ``detokenize`` drops the padding and undoes the normalization exactly.

Normalization modes:
    "global":     x · c with c = target_std / std(all parameters) (G.pt: 0.538 / std, no shift).
    "layer":      (x − mean_l) · target_std / std_l with each layer's own statistics.
    "coordinate": (x − mean_i) / std_i for every value i of the vector (statistics of canonical
                  vectors, see ``canonical``): every coordinate enters the diffusion at unit scale,
                  so the noise schedule treats a rarely-moving bias and a pixel weight alike.

With ``canonical`` the hidden units of every vector are put in a canonical order before
normalization: one vector per function instead of H!. ``canonical_order`` says which: "bias" sorts
them by fc1.bias (zoo.augment.canonicalize); "match" assigns them to the units of a template network
computed from the training checkpoints (zoo.augment.matching_permutations), which also puts units
that compute similar features in the same place across the zoo (stored with the statistics).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
import torch

from hyperforget.zoo.augment import (CANONICAL_ORDERS, canonical_permutations, canonicalize, matching_permutations,
                                     permute_hidden, unit_template)
from hyperforget.zoo.errors import HyperForgetError, from_settings
from hyperforget.zoo.mlp import MLPSpec
from hyperforget.zoo.normalization import GPT_TARGET_STD, MomentSums, layer_normalization

NORMALIZATIONS = ("global", "layer", "coordinate")


@dataclass(frozen=True)
class TokenizerConfig:
    """How parameters become tokens (stored with every hypernetwork)."""

    token_size: int = 64  # most values in one token; must stay below the DiT hidden size
    normalization: str = "global"  # "global" (one scale, G.pt) or "layer" (per-layer mean/std)
    target_std: float = GPT_TARGET_STD  # std of normalized parameters (G.pt's constant; "coordinate" uses 1)
    canonical: bool = False  # put hidden units in a canonical order before normalizing (one mode per function)
    canonical_order: str = "bias"  # which order: "bias" (sorted by fc1.bias) or "match" (to a template network)

    def __post_init__(self) -> None:
        if self.canonical_order not in CANONICAL_ORDERS:
            raise HyperForgetError(f"unknown canonical order {self.canonical_order!r}: choose one of "
                                   f"{', '.join(CANONICAL_ORDERS)}")
        if self.normalization not in NORMALIZATIONS:
            raise HyperForgetError(
                f"unknown normalization {self.normalization!r}: choose one of {', '.join(NORMALIZATIONS)}")
        if self.token_size < 1:
            raise HyperForgetError(f"token_size must be positive, got {self.token_size}")
        if not self.target_std > 0:
            raise HyperForgetError(f"target_std must be positive, got {self.target_std}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TokenizerConfig":
        return from_settings(cls, d, "tokenizer")


def compute_normalization(spec: MLPSpec, params: torch.Tensor | np.ndarray) -> dict:
    """Normalization statistics of a stack of checkpoints, in the zoo.json layout.

    params: (N, P). Returns {"mean", "std", "gpt_coeff", "layers": {name: {"mean", "std"}}}.
    """
    p = torch.as_tensor(params, dtype=torch.float64)
    spec.layout.check(p)
    return layer_normalization(spec.layout, MomentSums(spec.num_params).add(p.numpy()))


def compute_coordinate_normalization(spec: MLPSpec, params: torch.Tensor | np.ndarray, canonical: bool,
                                     all_reduce=None, order: str = "bias") -> dict:
    """Per-value mean and std of (N, P) checkpoints (put in canonical ``order`` first when ``canonical``).

    ``all_reduce`` (in place, summing, e.g. torch.distributed.all_reduce) combines the sums of
    several DDP ranks, so that every rank normalizes alike. Returns {"mean": (P,) list, "std": (P,)
    list, "canonical": bool, "rows": N}, and with order "match" also "order" and "template" (P,)
    list, the network every vector's hidden units are matched to; stored with the hypernetwork
    under normalization["coordinate"].
    """
    p = torch.as_tensor(params, dtype=torch.float32)
    spec.layout.check(p)
    p = p[torch.isfinite(p).all(1)]
    extra = {}
    if canonical and order == "match":
        template = unit_template(spec, p, all_reduce=all_reduce)
        p = permute_hidden(spec, p, matching_permutations(spec, p, template))
        extra = {"order": "match", "template": template.tolist()}
    elif canonical:
        p = canonicalize(spec, p)
    sums = MomentSums(spec.num_params).add(p.double().numpy())
    if all_reduce is not None:
        packed = torch.from_numpy(np.stack([np.full_like(sums.s1, sums.count), sums.s1, sums.s2]))
        all_reduce(packed)
        sums.count, sums.s1, sums.s2 = int(packed[0, 0]), packed[1].numpy(), packed[2].numpy()
    mean, std = sums.per_value()
    return {"mean": mean.astype(np.float32).tolist(), "std": std.astype(np.float32).tolist(),
            "canonical": bool(canonical), "rows": int(sums.count), **extra}


def _layer_stats(stats: dict, name: str) -> tuple[float, float]:
    layers = stats.get("layers") or {}
    if name not in layers:
        raise HyperForgetError(f"normalization statistics lack layer {name!r}; rebuild the zoo's statistics "
                               "or use --normalization global")
    entry = layers[name]
    return float(entry["mean"]), float(entry["std"])


class ParamTokenizer:
    """Normalize and cut (B, P) parameter vectors into (B, N, token_size) tokens and back.

    Attributes:
        chunks: list of (layer name, start, stop) ranges into the flat vector, one per token.
        chunk_sizes: values per token (≤ token_size).
        scale, shift: (P,) float32; normalized = (θ − shift) · scale.
    """

    def __init__(self, spec: MLPSpec, config: TokenizerConfig, stats: dict):
        self.spec, self.config, self.stats = spec, config, stats
        k = config.token_size
        self.chunks: list[tuple[str, int, int]] = []
        for s in spec.layout.slots:
            n = math.ceil(s.size / k)
            for i in range(n):
                self.chunks.append((s.name, s.offset + i * k, min(s.offset + (i + 1) * k, s.stop)))
        self.chunk_sizes = [b - a for _, a, b in self.chunks]
        self.num_tokens = len(self.chunks)
        # Gather index: token j, slot i holds flat value index[j, i] when mask[j, i].
        index = torch.zeros(self.num_tokens, k, dtype=torch.long)
        mask = torch.zeros(self.num_tokens, k, dtype=torch.bool)
        for j, (_, a, b) in enumerate(self.chunks):
            index[j, : b - a] = torch.arange(a, b)
            mask[j, : b - a] = True
        self.index, self.mask = index, mask
        self.scale, self.shift = self._normalization(stats)
        self.template = None  # the network hidden units are matched to (canonical order "match")
        if config.canonical and config.canonical_order == "match":
            self.template = torch.as_tensor(stats["coordinate"]["template"], dtype=torch.float32)

    def _normalization(self, stats: dict) -> tuple[torch.Tensor, torch.Tensor]:
        p = self.spec.num_params
        scale, shift = torch.empty(p, dtype=torch.float32), torch.zeros(p, dtype=torch.float32)
        if self.config.normalization == "global":
            if "std" not in stats:
                raise HyperForgetError("normalization statistics lack the global 'std'; rebuild the zoo's statistics")
            std = float(stats["std"])
            if not std > 0:
                raise HyperForgetError(f"global parameter std is {std}; the zoo's statistics are broken")
            scale[:] = self.config.target_std / std
        elif self.config.normalization == "coordinate":
            coord = stats.get("coordinate")
            order = self.config.canonical_order if self.config.canonical else None
            if not coord or len(coord.get("mean", ())) != p or bool(coord.get("canonical")) != self.config.canonical \
                    or (order is not None and coord.get("order", "bias") != order) \
                    or (order == "match" and len(coord.get("template", ())) != p):
                raise HyperForgetError("normalization statistics lack per-value statistics of this form "
                                       f"(canonical={self.config.canonical}, order={order}); the trainer computes "
                                       "them, the model directory is damaged")
            std = torch.as_tensor(coord["std"], dtype=torch.float32)
            # A value that never moved (std 0) keeps unit scale rather than dividing by zero.
            scale[:] = torch.where(std > 1e-8, 1.0 / std.clamp_min(1e-8), torch.ones_like(std))
            shift[:] = torch.as_tensor(coord["mean"], dtype=torch.float32)
        else:
            for s in self.spec.layout.slots:
                mean, std = _layer_stats(stats, s.name)
                # A layer that never moved (std 0) keeps unit scale rather than dividing by zero.
                scale[s.offset:s.stop] = self.config.target_std / std if std > 1e-12 else 1.0
                shift[s.offset:s.stop] = mean
        return scale, shift

    # ---------------------------------------------------------------- canonical order
    def canonical_permutations(self, params: torch.Tensor) -> torch.Tensor | None:
        """(B, H) hidden-unit orders that make raw (B, P) vectors canonical, or None without ``canonical``."""
        if not self.config.canonical:
            return None
        if self.template is not None:
            return matching_permutations(self.spec, params, self.template).to(params.device)
        return canonical_permutations(self.spec, params).to(params.device)

    def permute(self, params: torch.Tensor, perms: torch.Tensor | None) -> torch.Tensor:
        """Apply (B, H) hidden-unit orders to raw (B, P) vectors (same functions); None: unchanged."""
        if perms is None:
            return params
        return permute_hidden(self.spec, params, perms).to(params)

    def canonicalize(self, params: torch.Tensor) -> torch.Tensor:
        """Raw (B, P) -> raw (B, P) in canonical hidden-unit order (unchanged without ``canonical``)."""
        return self.permute(params, self.canonical_permutations(params))

    # ---------------------------------------------------------------- normalization
    def normalize(self, params: torch.Tensor) -> torch.Tensor:
        """Raw (B, P) -> normalized (B, P)."""
        self.spec.layout.check(params)
        return (params - self.shift.to(params)) * self.scale.to(params)

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized (B, P) -> raw (B, P)."""
        return x / self.scale.to(x) + self.shift.to(x)

    # ---------------------------------------------------------------- tokens
    def to_tokens(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized (B, P) -> (B, N, token_size), zero padded."""
        tokens = x[:, self.index.to(x.device)]  # (B, N, k)
        return tokens * self.mask.to(x.device, x.dtype)

    def from_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, N, token_size) -> normalized (B, P); padding is dropped."""
        flat = tokens[:, self.mask.to(tokens.device)]  # (B, P): mask order is token order = flat order
        return flat

    def tokenize(self, params: torch.Tensor) -> torch.Tensor:
        """Raw (B, P) -> normalized tokens (B, N, token_size)."""
        return self.to_tokens(self.normalize(params))

    def detokenize(self, tokens: torch.Tensor) -> torch.Tensor:
        """Normalized tokens (B, N, token_size) -> raw (B, P)."""
        return self.denormalize(self.from_tokens(tokens))

    def layer_weights(self, power: float = 1.0) -> torch.Tensor:
        """(P,) MSE weights that average to 1: power 1 gives every layer the same total weight; power
        0.5 takes the square root of those per-value weights (halfway, in log scale, to uniform)."""
        w = torch.empty(self.spec.num_params)
        n = len(self.spec.layout.slots)
        for s in self.spec.layout.slots:
            w[s.offset:s.stop] = (self.spec.num_params / (n * s.size)) ** power
        # Power 1 averages to 1 by construction; rescaling it would move some weights by a rounding step.
        return w if power == 1 else w / w.mean()

    def describe(self) -> dict:
        return {"num_tokens": self.num_tokens, "chunk_sizes": self.chunk_sizes,
                "layers": [name for name, _, _ in self.chunks]}


# -------------------------------------------------------------------- scalar conditions

def frequency_encode(x: torch.Tensor, num_freqs: int = 128, max_exp: float = 14.0) -> torch.Tensor:
    """G.pt's scalar encoder: [sin(f x), cos(f x), x] with f = 2**linspace(0, max_exp, num_freqs).

    x: (...,) -> (..., 2·num_freqs + 1).
    """
    freqs = 2.0 ** torch.linspace(0.0, max_exp, num_freqs, device=x.device, dtype=torch.float32)
    xf = x.float()[..., None]
    angles = xf * freqs
    return torch.cat([torch.sin(angles), torch.cos(angles), xf], dim=-1)


def loss_transform(losses: torch.Tensor, mode: str = "log", offset: float = 0.01) -> torch.Tensor:
    """What the network sees of a class loss: log(loss + offset) or the loss itself.

    The offset keeps log finite for losses that reach 0 (log(loss) alone gave NaN in the
    feasibility run) and spreads the low-loss region where retain classes live: 0.01 -> 0.02
    and 0.1 -> 0.11 become log values 1.1 apart rather than 0.09.
    """
    if mode == "log":
        return torch.log(losses.clamp_min(0) + offset)
    if mode == "raw":
        return losses
    raise HyperForgetError(f"unknown loss transform {mode!r}: choose log or raw")
