"""Tokenizer: exact round trip, layer-respecting chunks, normalization, the frequency encoder."""

import math

import pytest
import torch

from hyperforget.hyper.tokenizer import (ParamTokenizer, TokenizerConfig, compute_normalization, frequency_encode,
                                         loss_transform)
from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.mlp import MLPSpec

SPEC = MLPSpec(37, 3, 5)  # 37·3 + 3 + 15 + 5 = 134 values, nothing divides evenly


def _params(n=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    p = torch.randn(n, SPEC.num_params, generator=g)
    p[:, SPEC.layout.slot("fc2.bias").offset:] += 3.0  # a layer with its own mean and scale
    return p


@pytest.mark.parametrize("normalization", ["global", "layer"])
@pytest.mark.parametrize("token_size", [1, 7, 16, 200])
def test_round_trip(normalization, token_size):
    p = _params()
    tok = ParamTokenizer(SPEC, TokenizerConfig(token_size, normalization), compute_normalization(SPEC, p))
    tokens = tok.tokenize(p)
    assert tokens.shape == (11, tok.num_tokens, token_size)
    # Token <-> flat is an exact permutation; normalization is exact up to float rounding.
    assert torch.equal(tok.from_tokens(tok.to_tokens(p)), p)
    torch.testing.assert_close(tok.detokenize(tokens), p, rtol=0, atol=2e-6)


def test_chunks_follow_layers_and_pad_with_zeros():
    tok = ParamTokenizer(SPEC, TokenizerConfig(16, "global"), compute_normalization(SPEC, _params()))
    # fc1.weight 111 -> 7 tokens (6×16 + 15), fc1.bias 3, fc2.weight 15, fc2.bias 5: one token each.
    assert tok.chunk_sizes == [16] * 6 + [15, 3, 15, 5]
    assert [c[0] for c in tok.chunks] == ["fc1.weight"] * 7 + ["fc1.bias", "fc2.weight", "fc2.bias"]
    tokens = tok.to_tokens(torch.arange(SPEC.num_params, dtype=torch.float32)[None] + 1)
    assert tokens[0, 6, 15] == 0 and tokens[0, 7, 3:].abs().sum() == 0  # padding
    assert tokens[0, 7, 0] == SPEC.layout.slot("fc1.bias").offset + 1  # a bias token starts at its layer


def test_normalization_statistics():
    p = _params(n=400)
    stats = compute_normalization(SPEC, p)
    glob = ParamTokenizer(SPEC, TokenizerConfig(16, "global", target_std=0.538), stats).normalize(p)
    assert glob.std().item() == pytest.approx(0.538, rel=1e-3)
    assert stats["gpt_coeff"] == pytest.approx(0.538 / p.double().std().item())
    layer = ParamTokenizer(SPEC, TokenizerConfig(16, "layer", target_std=1.0), stats).normalize(p)
    for s in SPEC.layout.slots:
        v = layer[:, s.offset:s.stop]
        assert v.mean().item() == pytest.approx(0.0, abs=1e-4) and v.std().item() == pytest.approx(1.0, rel=1e-3)


def test_layer_weights_balance_layers():
    tok = ParamTokenizer(SPEC, TokenizerConfig(16), compute_normalization(SPEC, _params()))
    w = tok.layer_weights()
    assert w.mean().item() == pytest.approx(1.0)
    sums = [w[s.offset:s.stop].sum().item() for s in SPEC.layout.slots]
    assert max(sums) == pytest.approx(min(sums))


def test_bad_config_and_stats():
    with pytest.raises(HyperForgetError, match="normalization"):
        TokenizerConfig(16, "median")
    with pytest.raises(HyperForgetError, match="layer"):
        ParamTokenizer(SPEC, TokenizerConfig(16, "layer"), {"std": 1.0, "mean": 0.0})
    with pytest.raises(HyperForgetError, match="values"):
        ParamTokenizer(SPEC, TokenizerConfig(16), {"std": 1.0}).normalize(torch.zeros(2, 5))


def test_frequency_encoder_matches_gpt_formula():
    x = torch.tensor([0.0, 0.3, 999.0])
    enc = frequency_encode(x, num_freqs=128, max_exp=14.0)
    assert enc.shape == (3, 257)
    f = 2.0 ** torch.linspace(0, 14, 128)
    torch.testing.assert_close(enc[1], torch.cat([torch.sin(0.3 * f), torch.cos(0.3 * f), torch.tensor([0.3])]))
    assert torch.equal(enc[:, -1], x)


def test_loss_transform_is_finite_at_zero():
    out = loss_transform(torch.tensor([0.0, 1.0]), "log", 0.01)
    assert torch.isfinite(out).all() and out[0].item() == pytest.approx(math.log(0.01))
    with pytest.raises(HyperForgetError):
        loss_transform(torch.tensor([1.0]), "sqrt")


def test_layer_sqrt_weights_lie_between_uniform_and_layer():
    tok = ParamTokenizer(SPEC, TokenizerConfig(16), compute_normalization(SPEC, _params()))
    full, half = tok.layer_weights(1.0), tok.layer_weights(0.5)
    assert half.mean().item() == pytest.approx(1.0)
    # per value, the square-root weight is the geometric middle of uniform (1) and layer weights, up to the mean
    ratio = half / full.sqrt()
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-5)
    assert half.max() < full.max() and half.min() > full.min()
