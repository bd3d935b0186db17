"""The denoisers behind DiHyFo-1 and DiHyFo-2, and their presets.

Two backbones, one interface ``forward(x_t, t, target_losses, current_params, current_losses,
drop_condition) -> x0_hat``:

``backbone="transformer"`` (DiT): a minGPT-style transformer without a causal mask (pre-LayerNorm
blocks, MLP ratio 4, GELU) over parameter tokens, as in G.pt (Peebles et al. 2022) and Section 3
of the reference text. The loss conditions enter in one of two ways (``conditioning``):
    "tokens": as extra tokens in the sequence (G.pt):

    DiHyFo-1: [noisy θ* tokens (N), θ tokens (N), t, Δloss_1..C, target loss_1..C, current loss_1..C]
    DiHyFo-2: [noisy θ* tokens (N), t, target loss_1..C]

    "adaln":  through DiT's adaLN-Zero (Peebles & Xie 2023, models.py): a condition vector c
              (timestep + class losses) regresses every block's LayerNorm shift/scale and a residual
              gate that starts at zero; the sequence holds only parameter tokens.

``backbone="mlp"``: the same adaLN-Zero blocks over a single token, the whole normalized
parameter vector (attention over one token is a linear map, so it is left out): a residual MLP
whose every block is modulated by c. On 1.6k-5.6k-value MLPs this is the CPU preset's choice:
one token sees every coordinate, and a step costs a fraction of a transformer's.

Parameter tokens enter through one linear map per token (+ a shared LayerNorm); scalars through
the frequency encoder and one linear map per scalar token. Learned positional embeddings start at
zero. Only the noisy-θ* positions are decoded, each by its own linear map whose weights start at
zero; DiHyFo-1 adds θ to the output (a global residual), so at initialization it predicts θ* = θ
and learns θ* − θ. Everything is in normalized parameter space (see hyper/tokenizer.py).

The presets table at the bottom names configurations; a saved hypernetwork stores its config, and
loading rebuilds the network from it rather than from command-line flags.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from hyperforget.hyper.tokenizer import frequency_encode, loss_transform
from hyperforget.hyper.unit_roles import UnitRoles
from hyperforget.zoo.errors import HyperForgetError, from_settings

VARIANTS = ("dihyfo1", "dihyfo2")
BACKBONES = ("transformer", "mlp")
CONDITIONINGS = ("tokens", "adaln")


@dataclass(frozen=True)
class DiTConfig:
    """Architecture of the hypernetwork (stored with every hypernetwork)."""

    variant: str = "dihyfo2"  # "dihyfo1" (θ, losses and targets -> θ*) or "dihyfo2" (targets -> θ*)
    hidden: int = 128  # width of every token inside the transformer
    layers: int = 4  # transformer blocks
    heads: int = 4  # attention heads; must divide hidden
    mlp_ratio: float = 4.0  # MLP width / hidden (minGPT, DiT: 4)
    dropout: float = 0.0  # dropout in attention and MLP outputs (G.pt: 0)
    num_freqs: int = 128  # frequencies of the scalar encoder (G.pt: 128 -> 257 features)
    freq_max_exp: float = 14.0  # highest frequency 2**freq_max_exp (G.pt: 14)
    loss_transform: str = "log"  # what conditions see: "log" = log(loss + loss_offset), "raw" = loss
    loss_offset: float = 0.01  # keeps log finite where a class loss reaches 0
    shared_encoder: bool = False  # True: one encoder/decoder for all tokens (SANE), False: one per token (G.pt)
    backbone: str = "transformer"  # "transformer" (DiT over tokens) or "mlp" (adaLN-Zero residual MLP, one token)
    conditioning: str = "tokens"  # transformer only: "tokens" (G.pt) or "adaln" (DiT's adaLN-Zero); mlp: adaln
    cond_dim: int = 256  # width of the adaLN condition vector c (timestep + loss embeddings)
    # DiHyFo-1, MLP backbone: > 0 adds what θ's hidden units do per class to c (hyper/unit_roles.py):
    # the mean contribution of unit h to class k's logit over this many training images per class
    unit_role_probes: int = 0

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise HyperForgetError(f"unknown variant {self.variant!r}: choose dihyfo1 or dihyfo2")
        if self.backbone not in BACKBONES:
            raise HyperForgetError(f"unknown backbone {self.backbone!r}: choose {' or '.join(BACKBONES)}")
        if self.conditioning not in CONDITIONINGS:
            raise HyperForgetError(f"unknown conditioning {self.conditioning!r}: choose {' or '.join(CONDITIONINGS)}")
        if self.cond_dim < 1 or self.hidden < 1 or self.layers < 1:
            raise HyperForgetError(f"hidden, layers and cond_dim must be ≥ 1, got {self.hidden}, {self.layers}, "
                                   f"{self.cond_dim}")
        if self.hidden % self.heads:
            raise HyperForgetError(f"hidden {self.hidden} is not divisible by heads {self.heads}")
        if self.loss_transform not in ("log", "raw"):
            raise HyperForgetError(f"unknown loss transform {self.loss_transform!r}: choose log or raw")
        if self.unit_role_probes < 0:
            raise HyperForgetError(f"unit_role_probes must be ≥ 0, got {self.unit_role_probes}")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def adaln(self) -> bool:
        """True when the conditions enter through adaLN-Zero (always for the MLP backbone)."""
        return self.backbone == "mlp" or self.conditioning == "adaln"

    @classmethod
    def from_dict(cls, d: dict) -> "DiTConfig":
        return from_settings(cls, d, "model")


# ----------------------------------------------------------------------------------------------
# adaLN-Zero conditioning (DiT, models.py: TimestepEmbedder, modulate, DiTBlock, FinalLayer).


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """DiT's sinusoidal timestep features: (B,) -> (B, dim), frequencies max_period^(-i/half)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return F.pad(emb, (0, dim % 2))


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN: LayerNorm output x shifted and scaled per sample (DiT's ``modulate``)."""
    return x * (1 + scale) + shift


def standardized_log_losses(losses: torch.Tensor, center: torch.Tensor, spread: torch.Tensor,
                            offset: float) -> torch.Tensor:
    """z = (log(loss + offset) − center) / spread, per class: what the adaLN condition sees (B, C)."""
    return (loss_transform(losses, "log", offset) - center) / spread


class ConditionEmbedder(nn.Module):
    """c = MLP(timestep features) + MLP(standardized log losses), or + a learned null under dropout.

    DiHyFo-2 embeds the C target losses; DiHyFo-1 the C target, C current losses and their C
    differences (in standardized log space). The per-class centre and spread of the log losses
    come from the zoo's loss quantiles (median; (q95 − q05) / 3.29, a standard deviation for a
    normal law), fixed at construction so that a saved model always sees the same scale.
    """

    def __init__(self, cfg: DiTConfig, num_classes: int, loss_stats: dict | None):
        super().__init__()
        e, c = cfg.cond_dim, num_classes
        self.offset = cfg.loss_offset
        self.num_inputs = 3 * c if cfg.variant == "dihyfo1" else c
        center, spread = torch.zeros(c), torch.ones(c)
        if loss_stats and all(k in loss_stats for k in ("q05", "q50", "q95")):
            q = {k: loss_transform(torch.as_tensor(loss_stats[k], dtype=torch.float32), "log", self.offset)
                 for k in ("q05", "q50", "q95")}
            center, spread = q["q50"], ((q["q95"] - q["q05"]) / 3.29).clamp_min(0.1)
        self.register_buffer("center", center)
        self.register_buffer("spread", spread)
        self.time_mlp = nn.Sequential(nn.Linear(e, e), nn.SiLU(), nn.Linear(e, e))
        self.loss_mlp = nn.Sequential(nn.Linear(self.num_inputs, e), nn.SiLU(), nn.Linear(e, e))
        self.null = nn.Parameter(torch.zeros(e))

    def forward(self, t: torch.Tensor, target: torch.Tensor, current: torch.Tensor | None,
                drop: torch.Tensor | None) -> torch.Tensor:
        """t (B,), target (B, C), current (B, C) or None, drop (B,) bool or None -> c (B, E)."""
        z = standardized_log_losses(target, self.center, self.spread, self.offset)
        if current is not None:
            zc = standardized_log_losses(current, self.center, self.spread, self.offset)
            z = torch.cat([z, zc, z - zc], dim=1)
        y = self.loss_mlp(z)
        if drop is not None:
            y = torch.where(drop[:, None], self.null.to(y.dtype)[None], y)
        return F.silu(self.time_mlp(timestep_embedding(t, self.null.shape[0])) + y)


class SelfAttention(nn.Module):
    """Multi-head self-attention over all tokens, no mask."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.hidden, 3 * cfg.hidden)
        self.proj = nn.Linear(cfg.hidden, cfg.hidden)
        self.dropout = cfg.dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # 3×(B, h, L, d/h)
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))  # (B, L, D)


class Block(nn.Module):
    """Pre-LN transformer block: x + attn(LN(x)), then x + MLP(LN(x)).

    With adaLN (DiTBlock): the LayerNorms lose their affine weights; c regresses (shift, scale,
    gate) for each half, x + gate · attn(modulate(LN(x))), and the regression starts at zero so
    every block starts as the identity (adaLN-Zero).
    """

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.hidden, elementwise_affine=not cfg.adaln)
        self.attn = SelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.hidden, elementwise_affine=not cfg.adaln)
        width = int(cfg.mlp_ratio * cfg.hidden)
        self.mlp = nn.Sequential(nn.Linear(cfg.hidden, width), nn.GELU(), nn.Linear(width, cfg.hidden),
                                 nn.Dropout(cfg.dropout))
        self.ada = nn.Linear(cfg.cond_dim, 6 * cfg.hidden) if cfg.adaln else None

    def forward(self, x: torch.Tensor, c: torch.Tensor | None = None) -> torch.Tensor:
        if self.ada is None:
            x = x + self.attn(self.ln1(x))
            return x + self.mlp(self.ln2(x))
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c)[:, None].chunk(6, dim=2)  # 6×(B, 1, D)
        x = x + g1 * self.attn(modulate(self.ln1(x), sh1, sc1))
        return x + g2 * self.mlp(modulate(self.ln2(x), sh2, sc2))


class MLPBlock(nn.Module):
    """adaLN-Zero residual block over one vector: h + gate · W2 σ(W1 modulate(LN(h)))."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        width = int(cfg.mlp_ratio * cfg.hidden)
        self.ln = nn.LayerNorm(cfg.hidden, elementwise_affine=False)
        self.fc1, self.fc2 = nn.Linear(cfg.hidden, width), nn.Linear(width, cfg.hidden)
        self.drop = nn.Dropout(cfg.dropout)
        self.ada = nn.Linear(cfg.cond_dim, 3 * cfg.hidden)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale, gate = self.ada(c).chunk(3, dim=1)  # 3×(B, D)
        return h + gate * self.drop(self.fc2(F.silu(self.fc1(modulate(self.ln(h), shift, scale)))))


class TokenLinear(nn.Module):
    """One linear map per token position, applied to all tokens at once.

    (B, N, d_in) -> (B, N, d_out); with ``shared`` a single map serves every position.
    """

    def __init__(self, num_tokens: int, d_in: int, d_out: int, shared: bool = False, bias: bool = True):
        super().__init__()
        n = 1 if shared else num_tokens
        self.weight = nn.Parameter(torch.empty(n, d_in, d_out))
        self.bias = nn.Parameter(torch.zeros(n, d_out)) if bias else None
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(d_in))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight.expand(x.shape[1], -1, -1) if self.weight.shape[0] == 1 else self.weight
        y = torch.einsum("bni,nio->bno", x, w)
        return y + self.bias if self.bias is not None else y


class DiT(nn.Module):
    """The DiHyFo transformer: predicts normalized θ* (x0) from a noisy θ*_t and the conditions.

    Args:
        config: architecture (``conditioning`` "tokens" or "adaln").
        num_tokens: parameter tokens per checkpoint (N, from the tokenizer).
        token_size: values per (padded) token.
        num_classes: C, one loss token per class and kind.
        loss_stats: the zoo's per-class loss quantiles (adaLN's loss standardization).
    """

    flat = False  # takes (B, N, k) tokens

    def __init__(self, config: DiTConfig, num_tokens: int, token_size: int, num_classes: int,
                 loss_stats: dict | None = None):
        super().__init__()
        if token_size >= config.hidden:
            raise HyperForgetError(f"token_size {token_size} must be smaller than hidden {config.hidden}: "
                                   "lower --token-size or pick a wider preset")
        self.config, self.num_tokens, self.token_size, self.num_classes = config, num_tokens, token_size, num_classes
        d, n, c = config.hidden, num_tokens, num_classes
        self.dihyfo1 = config.variant == "dihyfo1"
        self.adaln = config.adaln
        # Scalar tokens (in-context conditioning only): t, then per class Δloss, target, current
        # (DiHyFo-1) or only target (DiHyFo-2). Under adaLN they enter through c instead.
        self.num_loss_tokens = 0 if self.adaln else (3 * c if self.dihyfo1 else c)
        self.num_scalars = 0 if self.adaln else 1 + self.num_loss_tokens
        self.seq_len = n * (2 if self.dihyfo1 else 1) + self.num_scalars
        feat = 2 * config.num_freqs + 1

        self.noisy_encoder = TokenLinear(n, token_size, d, shared=config.shared_encoder, bias=False)
        self.param_ln = nn.LayerNorm(d)
        if self.dihyfo1:
            self.current_encoder = TokenLinear(n, token_size, d, shared=config.shared_encoder, bias=False)
        if self.adaln:
            self.condition = ConditionEmbedder(config, c, loss_stats)
            self.final_ada = nn.Linear(config.cond_dim, 2 * d)
        else:
            self.scalar_encoder = TokenLinear(self.num_scalars, feat, d)
            self.scalar_ln = nn.LayerNorm(d)
            # Learned "no condition" tokens replace the loss tokens under classifier-free guidance dropout.
            self.null_condition = nn.Parameter(torch.zeros(self.num_loss_tokens, d))
        self.pos_emb = nn.Parameter(torch.zeros(1, self.seq_len, d))
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.ln_f = nn.LayerNorm(d, elementwise_affine=not self.adaln)
        self.decoder = TokenLinear(n, d, token_size, shared=config.shared_encoder)
        self._init_weights()

    def _init_weights(self) -> None:
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                # minGPT: N(0, 0.02), residual projections scaled by 1/√(2·layers) (GPT-2).
                std = 0.02 / math.sqrt(2 * self.config.layers) if name.endswith(("attn.proj", "mlp.2")) else 0.02
                nn.init.normal_(module.weight, std=std)
                nn.init.zeros_(module.bias)
        if self.adaln:
            # adaLN-Zero: every block's modulation and gate, and the final shift/scale, start at zero.
            for block in self.blocks:
                nn.init.zeros_(block.ada.weight), nn.init.zeros_(block.ada.bias)
            nn.init.zeros_(self.final_ada.weight), nn.init.zeros_(self.final_ada.bias)
        else:
            nn.init.normal_(self.null_condition, std=0.02)
        # Zero decoder: at init DiHyFo-2 predicts 0 (the normalized mean) and DiHyFo-1 predicts θ.
        nn.init.zeros_(self.decoder.weight)
        nn.init.zeros_(self.decoder.bias)

    def scalar_tokens(self, t: torch.Tensor, target: torch.Tensor, current: torch.Tensor | None) -> torch.Tensor:
        """Raw t (B,), target (B, C) and current (B, C) losses -> scalar values (B, S) in token order."""
        cfg = self.config
        tgt = loss_transform(target, cfg.loss_transform, cfg.loss_offset)
        parts = [t.float()[:, None]]
        if self.dihyfo1:
            cur = loss_transform(current, cfg.loss_transform, cfg.loss_offset)
            parts += [tgt - cur, tgt, cur]  # Δ in the transformed space, as the network sees both ends
        else:
            parts += [tgt]
        return torch.cat(parts, dim=1)

    def _condition_tokens(self, t, target_losses, current_losses, drop_condition) -> torch.Tensor:
        """In-context conditioning: (B, S, D) tokens for t and the losses."""
        scalars = self.scalar_tokens(t, target_losses, current_losses)  # (B, S)
        feats = frequency_encode(scalars, self.config.num_freqs, self.config.freq_max_exp)  # (B, S, 2F+1)
        s_tok = self.scalar_ln(self.scalar_encoder(feats))  # (B, S, D)
        if drop_condition is not None:
            loss_tok = torch.where(drop_condition[:, None, None], self.null_condition.to(s_tok.dtype)[None],
                                   s_tok[:, 1:])
            s_tok = torch.cat([s_tok[:, :1], loss_tok], dim=1)
        return s_tok

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, target_losses: torch.Tensor,
                current_params: torch.Tensor | None = None, current_losses: torch.Tensor | None = None,
                drop_condition: torch.Tensor | None = None) -> torch.Tensor:
        """Predict normalized θ*.

        Args:
            x_t: (B, N, k) noisy normalized θ* tokens.
            t: (B,) long timesteps in [0, T).
            target_losses: (B, C) raw target class losses.
            current_params: (B, N, k) normalized θ tokens (DiHyFo-1 only).
            current_losses: (B, C) raw class losses of θ (DiHyFo-1 only).
            drop_condition: (B,) bool, True replaces the loss conditions by the null condition (guidance).
        Returns:
            (B, N, k) predicted normalized θ* tokens (padding positions carry no meaning).
        """
        if self.dihyfo1 and (current_params is None or current_losses is None):
            raise HyperForgetError("DiHyFo-1 needs current parameters and their class losses")
        parts = [self.param_ln(self.noisy_encoder(x_t))]  # (B, N, D)
        if self.dihyfo1:
            parts.append(self.param_ln(self.current_encoder(current_params)))
        c = None
        if self.adaln:
            c = self.condition(t, target_losses, current_losses if self.dihyfo1 else None, drop_condition)  # (B, E)
        else:
            parts.append(self._condition_tokens(t, target_losses, current_losses, drop_condition))
        h = self.drop(torch.cat(parts, dim=1) + self.pos_emb)  # (B, L, D)
        for block in self.blocks:
            h = block(h, c)
        h = self.ln_f(h[:, : self.num_tokens])
        if self.adaln:
            shift, scale = self.final_ada(c)[:, None].chunk(2, dim=2)
            h = modulate(h, shift, scale)
        out = self.decoder(h)  # (B, N, k)
        if self.dihyfo1:
            out = out + current_params  # global residual: the network predicts θ* − θ
        return out

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_sample(self) -> float:
        """Forward matmul FLOPs for one sequence (2 per multiply-add), for MFU estimates."""
        d, n, L = self.config.hidden, self.seq_len, self.config.layers
        w = int(self.config.mlp_ratio * d)
        per_layer = 2 * n * (3 * d * d + d * d + 2 * d * w) + 2 * 2 * n * n * d  # projections + attention
        enc = 2 * n * max(self.token_size, 2 * self.config.num_freqs + 1) * d
        dec = 2 * self.num_tokens * d * self.token_size
        ada = 2 * L * self.config.cond_dim * 6 * d if self.adaln else 0
        return float(L * per_layer + enc + dec + ada)

    def no_decay_parameter_names(self) -> set[str]:
        return no_decay_parameter_names(self)


class AdaLNMLP(nn.Module):
    """The MLP backbone: adaLN-Zero residual blocks over the whole normalized parameter vector.

    x_t (B, P) [and θ (B, P) for DiHyFo-1, concatenated] -> Linear -> L × MLPBlock(c) ->
    modulate(LN) -> Linear (zero-initialized) -> x0_hat (B, P); DiHyFo-1 adds θ (global residual),
    so at initialization DiHyFo-2 predicts the mean and DiHyFo-1 predicts θ* = θ.

    Args:
        config: architecture (hidden = block width, layers = blocks, mlp_ratio = inner width / hidden).
        num_params: P, values per parameter vector.
        num_classes: C.
        loss_stats: the zoo's per-class loss quantiles (the condition's loss standardization).
    """

    flat = True  # takes flat (B, P) vectors, not tokens

    def __init__(self, config: DiTConfig, num_params: int, num_classes: int, loss_stats: dict | None = None,
                 spec=None):
        super().__init__()
        self.config, self.num_params, self.num_classes = config, num_params, num_classes
        self.dihyfo1 = config.variant == "dihyfo1"
        d = config.hidden
        self.condition = ConditionEmbedder(config, num_classes, loss_stats)
        self.unit_roles = None
        if config.unit_role_probes > 0:
            if not self.dihyfo1:
                raise HyperForgetError("unit_role_probes describes DiHyFo-1's θ; DiHyFo-2 has none: drop it")
            if spec is None:
                raise HyperForgetError("unit_role_probes needs the MLP family (build the model with its spec)")
            self.unit_roles = UnitRoles(spec, config.unit_role_probes, config.cond_dim)
        self.encoder = nn.Linear(num_params * (2 if self.dihyfo1 else 1), d)
        self.blocks = nn.ModuleList(MLPBlock(config) for _ in range(config.layers))
        self.ln_f = nn.LayerNorm(d, elementwise_affine=False)
        self.final_ada = nn.Linear(config.cond_dim, 2 * d)
        self.decoder = nn.Linear(d, num_params)
        for block in self.blocks:
            nn.init.zeros_(block.ada.weight), nn.init.zeros_(block.ada.bias)
        for layer in (self.final_ada, self.decoder):
            nn.init.zeros_(layer.weight), nn.init.zeros_(layer.bias)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, target_losses: torch.Tensor,
                current_params: torch.Tensor | None = None, current_losses: torch.Tensor | None = None,
                drop_condition: torch.Tensor | None = None) -> torch.Tensor:
        """Flat normalized x_t (B, P), t (B,), raw losses (B, C), θ (B, P) -> normalized x0_hat (B, P)."""
        if self.dihyfo1 and (current_params is None or current_losses is None):
            raise HyperForgetError("DiHyFo-1 needs current parameters and their class losses")
        c = self.condition(t, target_losses, current_losses if self.dihyfo1 else None, drop_condition)  # (B, E)
        if self.unit_roles is not None:
            c = c + self.unit_roles(current_params)
        h = self.encoder(torch.cat([x_t, current_params], dim=1) if self.dihyfo1 else x_t)  # (B, D)
        for block in self.blocks:
            h = block(h, c)
        shift, scale = self.final_ada(c).chunk(2, dim=1)
        out = self.decoder(modulate(self.ln_f(h), shift, scale))  # (B, P)
        return out + current_params if self.dihyfo1 else out

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def flops_per_sample(self) -> float:
        """Forward matmul FLOPs for one vector (2 per multiply-add), for MFU estimates."""
        d, e, L = self.config.hidden, self.config.cond_dim, self.config.layers
        w = int(self.config.mlp_ratio * d)
        blocks = L * (2 * d * w + e * 3 * d)
        io = self.encoder.in_features * d + d * self.num_params + e * 2 * d
        cond = 2 * e * e + self.condition.num_inputs * e + e * e
        return float(2 * (blocks + io + cond))

    def no_decay_parameter_names(self) -> set[str]:
        return no_decay_parameter_names(self)


def no_decay_parameter_names(model: nn.Module) -> set[str]:
    """Biases, LayerNorm weights, positional embedding and null conditions: no weight decay (G.pt)."""
    names = set()
    for mname, module in model.named_modules():
        for pname, _ in module.named_parameters(recurse=False):
            full = f"{mname}.{pname}" if mname else pname
            if pname in ("bias", "pos_emb", "null_condition", "null") or isinstance(module, nn.LayerNorm):
                names.add(full)
    return names


def build_denoiser(config: DiTConfig, num_tokens: int, token_size: int, num_params: int, num_classes: int,
                   loss_stats: dict | None = None, spec=None) -> DiT | AdaLNMLP:
    """The network a config names: the transformer over tokens or the MLP over whole vectors."""
    if config.backbone == "mlp":
        return AdaLNMLP(config, num_params, num_classes, loss_stats, spec)
    if config.unit_role_probes:
        raise HyperForgetError("unit_role_probes is for the MLP backbone (backbone=\"mlp\")")
    return DiT(config, num_tokens, token_size, num_classes, loss_stats)


# ----------------------------------------------------------------------------------------------
# Presets: model architecture, tokenizer and trainer defaults by name (the CLI's choices).
# A preset may be added but not changed once models were trained with it: saved models store the
# resolved configs, so changing a preset does not change them, but it changes what a name means.

PRESETS: dict[str, dict] = {
    # Unit tests: a few seconds on one core.
    "tiny": {"model": dict(hidden=32, layers=2, heads=2, num_freqs=16, freq_max_exp=6.0),
             "tokenizer": dict(token_size=24, normalization="layer"),
             "train": dict(steps=300, batch_size=64, lr=2e-3, warmup_steps=20, ema_decay=0.99, eval_every=0),
             "sample": dict(method="ddim", steps=20, guidance=None)},
    # The in-context DiT on CPU (MNIST-4, 784-2-4: 17 tokens of ≤ 112 values): ~0.2 s/step on 2 idle
    # cores. Its DiHyFo-1 sampler default spreads candidates over guidance scales (row i gets scale
    # i mod 4); DiHyFo-2 did best unguided (docs/experiments.md, "The in-context DiT").
    "cpu-small": {"model": dict(hidden=128, layers=3, heads=4, num_freqs=32, freq_max_exp=8.0),
                  "tokenizer": dict(token_size=112, normalization="layer"),
                  "train": dict(steps=800, batch_size=64, lr=2e-3, warmup_steps=30, ema_decay=0.995,
                                cond_dropout=0.1, eval_every=400, test_every=200, checkpoint_every=200),
                  "sample": dict(method="ddim", steps=10,
                                 guidance={"dihyfo1": [4.0, 8.0, 16.0, 24.0], "dihyfo2": None})},
    # The CPU demo's generator (MNIST-4 and MNIST-10): the adaLN-Zero MLP over whole canonical,
    # per-value standardized vectors, x0 prediction, condition dropout for an unconditional mode;
    # DiHyFo-2 samples unguided (guidance trades its alignment for extremeness; docs/experiments.md).
    "cpu-mlp": {"model": dict(backbone="mlp", hidden=512, layers=4, mlp_ratio=1.0, cond_dim=256),
                "tokenizer": dict(token_size=64, normalization="coordinate", canonical=True),
                "train": dict(steps=3000, batch_size=256, lr=1e-3, warmup_steps=50, ema_decay=0.999,
                              weight_decay=0.0, grad_clip=1.0, loss_weighting="uniform", cond_dropout=0.1,
                              permute=False, eval_every=0, test_every=500, checkpoint_every=500,
                              view={"balanced": {"mode": "cap", "cap": 1500}, "pairs": {"balance": "delta"}}),
                # DiHyFo-1's moves from a trained model fall short of their prompts unguided; its
                # candidates cycle through guidance 1, 2, 4, 8 so that selection sees each.
                "sample": dict(method="ddim", steps=50, guidance={"dihyfo1": [1.0, 2.0, 4.0, 8.0], "dihyfo2": None})},
    # A larger CPU run (tens of minutes), or a quick GPU run.
    "cpu-base": {"model": dict(hidden=256, layers=6, heads=8, num_freqs=64, freq_max_exp=10.0),
                 "tokenizer": dict(token_size=200, normalization="layer"),
                 "train": dict(steps=3000, batch_size=256, lr=6e-4, warmup_steps=200, ema_decay=0.999,
                               cond_dropout=0.1, eval_every=500),
                 "sample": dict(method="ddim", steps=20, guidance={"dihyfo1": [2.0, 4.0, 8.0], "dihyfo2": None})},
    # The reference text's DiT (G.pt's MNIST configuration): hidden 1536, 12 layers, 16 heads, for a GPU.
    "paper": {"model": dict(hidden=1536, layers=12, heads=16, num_freqs=128, freq_max_exp=14.0),
              "tokenizer": dict(token_size=1000, normalization="global"),
              "train": dict(steps=100_000, batch_size=1024, lr=4e-4, warmup_steps=2000, ema_decay=0.9999,
                            weight_decay=0.1, grad_clip=0.75, eval_every=5000),
              "sample": dict(method="ddpm", steps=1000, guidance=None)},
}


PRESETS["cpu-mlp2"] = {
    # cpu-mlp with the MSE weighted by the square root of the layer weights: the 14 values after
    # fc1.weight (fc1.bias, fc2), which decide the class losses, carry 14 % of the MSE instead of
    # 0.9 % (uniform) or 75 % (layer). The CPU demo's generator (docs/experiments.md, rows 4g-4i).
    **PRESETS["cpu-mlp"],
    "train": {**PRESETS["cpu-mlp"]["train"], "loss_weighting": "layer_sqrt"}}


PRESETS["cpu-mlp3"] = {
    # cpu-mlp2 with hidden units matched to a template network instead of sorted by fc1.bias: units
    # that compute similar features share coordinates across the zoo. On MNIST-10 (seven hidden
    # units) it turns DiHyFo-2's class R² from -0.38..0.40 into 0.64..0.83; on MNIST-4 it changes
    # nothing measurable (docs/experiments.md, "Canonical order by matching").
    **PRESETS["cpu-mlp2"],
    "tokenizer": {**PRESETS["cpu-mlp2"]["tokenizer"], "canonical_order": "match"}}


# The CPU demo's generators: cpu-mlp2 / cpu-mlp3 plus the function-matching term (weight 3, 128
# training images a step; hyper/function_match.py). The MSE alone leaves samples that are close value
# by value and wrong on whole classes; with the term DiHyFo-1 follows its prompts on MNIST-10 (Pearson
# 0.97-1.00 where it was -0.48..0.89) and forgets {2} cleanly on MNIST-4 (docs/experiments.md,
# "Function matching").
PRESETS["cpu-mlp2-fn"] = {**PRESETS["cpu-mlp2"], "train": {**PRESETS["cpu-mlp2"]["train"], "function_loss": 3.0}}
PRESETS["cpu-mlp3-fn"] = {**PRESETS["cpu-mlp3"], "train": {**PRESETS["cpu-mlp3"]["train"], "function_loss": 3.0}}

# cpu-mlp2-fn plus class-loss matching (weight 0.01; hyper/function_match.py): the MNIST-4 demo's DiHyFo-1.
# The KL hardly tells a class loss of 8 from one of 15, and samples from the model to unlearn moved a
# class by less than asked at the top of its range. With the term MNIST-4's class 3 reaches Pearson
# 0.92-0.93 over three training seeds (0.88-0.93 without); on MNIST-10 it costs the {2} models their
# forgetting, so that demo keeps cpu-mlp2-fn (docs/experiments.md, "Class-loss matching").
PRESETS["cpu-mlp2-fn-cl"] = {**PRESETS["cpu-mlp2-fn"],
                             "train": {**PRESETS["cpu-mlp2-fn"]["train"], "class_loss_match": 0.01}}


PRESETS["paper-adaln"] = {
    # The paper's DiT size with DiT's adaLN-Zero conditioning over canonical, per-value standardized
    # tokens (a GPU configuration; the in-context "paper" preset stays as G.pt has it).
    "model": dict(hidden=1536, layers=12, heads=16, conditioning="adaln", cond_dim=1536),
    "tokenizer": dict(token_size=1000, normalization="coordinate", canonical=True),
    "train": dict(steps=100_000, batch_size=1024, lr=4e-4, warmup_steps=2000, ema_decay=0.9999, weight_decay=0.1,
                  grad_clip=0.75, loss_weighting="uniform", cond_dropout=0.1, permute=False, eval_every=5000,
                  view={"balanced": {"mode": "cap", "cap": 20_000}, "pairs": {"balance": "delta"}}),
    "sample": dict(method="ddim", steps=100, guidance=None)}


def get_preset(name: str) -> dict:
    if name not in PRESETS:
        raise HyperForgetError(f"unknown hypernetwork preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
