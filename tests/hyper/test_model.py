"""The DiT: shapes per variant, zero-initialized positional embeddings and decoders, the residual path."""

import pytest
import torch

from hyperforget.hyper.model import DiT, DiTConfig, PRESETS, get_preset
from hyperforget.hyper.tokenizer import ParamTokenizer, TokenizerConfig, compute_normalization
from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.mlp import MLPSpec

SPEC = MLPSpec(37, 3, 5)


def _setup(variant, token_size=16, **kw):
    torch.manual_seed(0)
    p = torch.randn(9, SPEC.num_params)
    tok = ParamTokenizer(SPEC, TokenizerConfig(token_size), compute_normalization(SPEC, p))
    cfg = DiTConfig(variant=variant, hidden=32, layers=2, heads=4, num_freqs=8, **kw)
    return DiT(cfg, tok.num_tokens, token_size, SPEC.num_classes), tok, p


@pytest.mark.parametrize("variant", ["dihyfo1", "dihyfo2"])
def test_shapes_and_sequence_layout(variant):
    model, tok, p = _setup(variant)
    b, n, c = 9, tok.num_tokens, SPEC.num_classes
    expected_len = (2 * n + 1 + 3 * c) if variant == "dihyfo1" else (n + 1 + c)
    assert model.seq_len == expected_len and model.pos_emb.shape == (1, expected_len, 32)
    x = tok.tokenize(p)
    cur = (x, torch.rand(b, c)) if variant == "dihyfo1" else (None, None)
    out = model(torch.randn_like(x), torch.randint(0, 1000, (b,)), torch.rand(b, c), *cur)
    assert out.shape == (b, n, 16)
    assert tok.detokenize(out).shape == (b, SPEC.num_params)


def test_zero_init_positional_embedding_and_decoder():
    for variant in ("dihyfo1", "dihyfo2"):
        model, _, _ = _setup(variant)
        assert torch.count_nonzero(model.pos_emb) == 0
        assert torch.count_nonzero(model.decoder.weight) == 0 and torch.count_nonzero(model.decoder.bias) == 0


def test_dihyfo1_at_init_returns_theta_and_dihyfo2_returns_zero():
    model, tok, p = _setup("dihyfo1")
    theta = tok.tokenize(p)
    out = model(torch.randn_like(theta), torch.randint(0, 1000, (9,)), torch.rand(9, 5), theta, torch.rand(9, 5))
    assert torch.equal(out, theta)  # θ* = θ exactly: the network learns θ* − θ
    model2, _, _ = _setup("dihyfo2")
    out2 = model2(torch.randn_like(theta), torch.randint(0, 1000, (9,)), torch.rand(9, 5))
    assert torch.count_nonzero(out2) == 0


def test_conditions_reach_the_output_after_a_step():
    model, tok, p = _setup("dihyfo2")
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = tok.tokenize(p)
    for _ in range(3):
        loss = (model(x, torch.zeros(9, dtype=torch.long), torch.rand(9, 5)) - x).pow(2).mean()
        opt.zero_grad(), loss.backward(), opt.step()
    t = torch.zeros(2, dtype=torch.long)
    a = model(x[:2], t, torch.zeros(2, 5))
    b = model(x[:2], t, torch.full((2, 5), 3.0))
    assert not torch.allclose(a, b)  # target losses change the prediction
    drop = torch.ones(2, dtype=torch.bool)
    torch.testing.assert_close(model(x[:2], t, torch.zeros(2, 5), drop_condition=drop),
                               model(x[:2], t, torch.full((2, 5), 3.0), drop_condition=drop))


def test_no_weight_decay_set():
    model, _, _ = _setup("dihyfo1")
    names = model.no_decay_parameter_names()
    assert "pos_emb" in names and "null_condition" in names and "blocks.0.ln1.weight" in names
    assert "blocks.0.attn.qkv.bias" in names and "blocks.0.attn.qkv.weight" not in names


def test_errors_and_presets():
    with pytest.raises(HyperForgetError, match="token_size"):
        _setup("dihyfo2", token_size=40)
    with pytest.raises(HyperForgetError, match="variant"):
        DiTConfig(variant="dihyfo3")
    with pytest.raises(HyperForgetError, match="divisible"):
        DiTConfig(hidden=30, heads=4)
    with pytest.raises(HyperForgetError, match="preset"):
        get_preset("huge")
    model, tok, p = _setup("dihyfo1")
    with pytest.raises(HyperForgetError, match="current"):
        model(tok.tokenize(p), torch.zeros(9, dtype=torch.long), torch.rand(9, 5))
    paper = DiTConfig(**PRESETS["paper"]["model"])
    assert (paper.hidden, paper.layers, paper.heads) == (1536, 12, 16)
    for name, preset in PRESETS.items():  # every preset builds a consistent config
        assert preset["tokenizer"]["token_size"] < preset["model"]["hidden"], name
