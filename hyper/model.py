"""The diffusion transformer (DiT) behind DiHyFo-1 and DiHyFo-2, and its presets.

A minGPT-style transformer without a causal mask (pre-LayerNorm blocks, MLP ratio 4, GELU),
fed a sequence of tokens as in G.pt (Peebles et al. 2022) and Section 3 of the reference text:

    DiHyFo-1: [noisy θ* tokens (N), θ tokens (N), t, Δloss_1..C, target loss_1..C, current loss_1..C]
    DiHyFo-2: [noisy θ* tokens (N), t, target loss_1..C]

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

from hyper.tokenizer import frequency_encode, loss_transform
from zoo.errors import HyperForgetError

VARIANTS = ("dihyfo1", "dihyfo2")


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

    def __post_init__(self) -> None:
        if self.variant not in VARIANTS:
            raise HyperForgetError(f"unknown variant {self.variant!r}: choose dihyfo1 or dihyfo2")
        if self.hidden % self.heads:
            raise HyperForgetError(f"hidden {self.hidden} is not divisible by heads {self.heads}")
        if self.loss_transform not in ("log", "raw"):
            raise HyperForgetError(f"unknown loss transform {self.loss_transform!r}: choose log or raw")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "DiTConfig":
        return cls(**{k: d[k] for k in cls.__dataclass_fields__ if k in d})


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
    """Pre-LN transformer block: x + attn(LN(x)), then x + MLP(LN(x))."""

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        self.ln1 = nn.LayerNorm(cfg.hidden)
        self.attn = SelfAttention(cfg)
        self.ln2 = nn.LayerNorm(cfg.hidden)
        width = int(cfg.mlp_ratio * cfg.hidden)
        self.mlp = nn.Sequential(nn.Linear(cfg.hidden, width), nn.GELU(), nn.Linear(width, cfg.hidden),
                                 nn.Dropout(cfg.dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


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
    """The DiHyFo network: predicts normalized θ* (x0) from a noisy θ*_t and the conditions.

    Args:
        config: architecture.
        num_tokens: parameter tokens per checkpoint (N, from the tokenizer).
        token_size: values per (padded) token.
        num_classes: C, one loss token per class and kind.
    """

    def __init__(self, config: DiTConfig, num_tokens: int, token_size: int, num_classes: int):
        super().__init__()
        if token_size >= config.hidden:
            raise HyperForgetError(f"token_size {token_size} must be smaller than hidden {config.hidden}: "
                                   "lower --token-size or pick a wider preset")
        self.config, self.num_tokens, self.token_size, self.num_classes = config, num_tokens, token_size, num_classes
        d, n, c = config.hidden, num_tokens, num_classes
        self.dihyfo1 = config.variant == "dihyfo1"
        # Scalar tokens: t, then per class Δloss, target, current (DiHyFo-1) or only target (DiHyFo-2).
        self.num_loss_tokens = 3 * c if self.dihyfo1 else c
        self.num_scalars = 1 + self.num_loss_tokens
        self.seq_len = n * (2 if self.dihyfo1 else 1) + self.num_scalars
        feat = 2 * config.num_freqs + 1

        self.noisy_encoder = TokenLinear(n, token_size, d, shared=config.shared_encoder, bias=False)
        self.param_ln = nn.LayerNorm(d)
        if self.dihyfo1:
            self.current_encoder = TokenLinear(n, token_size, d, shared=config.shared_encoder, bias=False)
        self.scalar_encoder = TokenLinear(self.num_scalars, feat, d)
        self.scalar_ln = nn.LayerNorm(d)
        # Learned "no condition" tokens replace the loss tokens under classifier-free guidance dropout.
        self.null_condition = nn.Parameter(torch.zeros(self.num_loss_tokens, d))
        self.pos_emb = nn.Parameter(torch.zeros(1, self.seq_len, d))
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.layers))
        self.ln_f = nn.LayerNorm(d)
        self.decoder = TokenLinear(n, d, token_size, shared=config.shared_encoder)
        self._init_weights()

    def _init_weights(self) -> None:
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear):
                # minGPT: N(0, 0.02), residual projections scaled by 1/√(2·layers) (GPT-2).
                std = 0.02 / math.sqrt(2 * self.config.layers) if name.endswith(("attn.proj", "mlp.2")) else 0.02
                nn.init.normal_(module.weight, std=std)
                nn.init.zeros_(module.bias)
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
            drop_condition: (B,) bool, True replaces the loss tokens by the null condition (guidance).
        Returns:
            (B, N, k) predicted normalized θ* tokens (padding positions carry no meaning).
        """
        if self.dihyfo1 and (current_params is None or current_losses is None):
            raise HyperForgetError("DiHyFo-1 needs current parameters and their class losses")
        scalars = self.scalar_tokens(t, target_losses, current_losses)  # (B, S)
        feats = frequency_encode(scalars, self.config.num_freqs, self.config.freq_max_exp)  # (B, S, 2F+1)
        s_tok = self.scalar_ln(self.scalar_encoder(feats))  # (B, S, D)
        if drop_condition is not None:
            loss_tok = torch.where(drop_condition[:, None, None], self.null_condition.to(s_tok.dtype)[None],
                                   s_tok[:, 1:])
            s_tok = torch.cat([s_tok[:, :1], loss_tok], dim=1)
        parts = [self.param_ln(self.noisy_encoder(x_t))]  # (B, N, D)
        if self.dihyfo1:
            parts.append(self.param_ln(self.current_encoder(current_params)))
        parts.append(s_tok)
        h = self.drop(torch.cat(parts, dim=1) + self.pos_emb)  # (B, L, D)
        for block in self.blocks:
            h = block(h)
        out = self.decoder(self.ln_f(h[:, : self.num_tokens]))  # (B, N, k)
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
        return float(L * per_layer + enc + dec)

    def no_decay_parameter_names(self) -> set[str]:
        """Biases, LayerNorm weights, positional embedding and null condition: no weight decay (G.pt)."""
        names = set()
        for mname, module in self.named_modules():
            for pname, _ in module.named_parameters(recurse=False):
                full = f"{mname}.{pname}" if mname else pname
                if pname == "bias" or isinstance(module, nn.LayerNorm) or pname in ("pos_emb", "null_condition"):
                    names.add(full)
        return names


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
    # The CPU demo (MNIST-4, 784-2-4: 17 tokens of ≤ 112 values): ~0.2 s/step on 2 idle cores.
    # Condition dropout enables classifier-free guidance, which DiHyFo-1's measured unlearning needs:
    # after 600-800 steps it moves in the right direction but too little without it. Its sampler
    # default spreads candidates over guidance scales (row i gets scale i mod 4); DiHyFo-2 did best
    # unguided (docs/readme/hyper.md).
    "cpu-small": {"model": dict(hidden=128, layers=3, heads=4, num_freqs=32, freq_max_exp=8.0),
                  "tokenizer": dict(token_size=112, normalization="layer"),
                  "train": dict(steps=800, batch_size=64, lr=2e-3, warmup_steps=30, ema_decay=0.995,
                                cond_dropout=0.1, eval_every=400, test_every=200, checkpoint_every=200),
                  "sample": dict(method="ddim", steps=10,
                                 guidance={"dihyfo1": [4.0, 8.0, 16.0, 24.0], "dihyfo2": None})},
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


def get_preset(name: str) -> dict:
    if name not in PRESETS:
        raise HyperForgetError(f"unknown hypernetwork preset {name!r}: choose one of {', '.join(PRESETS)}")
    return PRESETS[name]
