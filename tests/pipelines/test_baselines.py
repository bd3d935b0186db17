"""Unlearning baselines on a tiny case: a 64-8-4 MLP on sklearn digits 0-3, forget {2}."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from hyperforget.pipelines import baselines as B
from hyperforget.pipelines import metrics as M
from hyperforget.zoo.datasets import load_dataset
from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.mlp import MLP, MLPSpec

# The published defaults were tuned for CIFAR-sized data (hundreds of steps per epoch); on 540
# digits an epoch is ~5 steps, so the two methods whose defaults are one-to-three epochs at Adam
# 1e-4 get a learning rate scaled for the tiny set. Every other method runs its defaults.
TINY_OVERRIDES = {"random_labels": {"lr": 1e-2, "epochs": 5}, "bad_teacher": {"lr": 1e-2, "epochs": 5}}


@pytest.fixture(scope="module")
def case():
    torch.set_num_threads(1)
    ds = load_dataset("digits", classes=[0, 1, 2, 3])
    x, y = torch.tensor(ds.x_train), torch.tensor(ds.y_train)
    g = torch.Generator().manual_seed(0)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = MLP(MLPSpec(64, 8, 4))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(3):  # a few epochs: good, not saturated
        perm = torch.randperm(len(y), generator=g)
        for i in range(0, len(y), 64):
            b = perm[i:i + 64]
            loss = F.cross_entropy(model(x[b]), y[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    model.zero_grad(set_to_none=True)
    model.eval()
    return model, x, y


def _acc(module, x, y):
    with torch.no_grad():
        return M.split_accuracies(module(x), y, [2])


@pytest.mark.parametrize("name", list(B.BASELINES))
def test_each_baseline_lowers_forget_accuracy_without_touching_the_original(case, name):
    model, x, y = case
    before = {k: v.clone() for k, v in model.state_dict().items()}
    grad_flags = [p.requires_grad for p in model.parameters()]
    acc0 = _acc(model, x, y)
    assert acc0["forget"] > 0.9
    rng_state = torch.random.get_rng_state()
    module, seconds = B.run_baseline(name, model, x, y, [2], seed=0, **TINY_OVERRIDES.get(name, {}))
    assert torch.equal(torch.random.get_rng_state(), rng_state)  # global RNG untouched
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"{name} modified the original's {k}"
    assert [p.requires_grad for p in model.parameters()] == grad_flags
    assert all(p.grad is None for p in model.parameters())
    assert module is not model and seconds >= 0
    acc = _acc(module, x, y)
    assert acc["forget"] < acc0["forget"] - 0.15, (name, acc0, acc)
    if name != "logit_mask":
        assert isinstance(module, MLP)
        assert not torch.equal(module.flat_params(), model.flat_params())


@pytest.mark.parametrize("name", ["random_labels", "bad_teacher", "unsir", "scrub"])
def test_deterministic_for_a_seed(case, name):
    model, x, y = case
    a, _ = B.run_baseline(name, model, x, y, [2], seed=3, **TINY_OVERRIDES.get(name, {}))
    b, _ = B.run_baseline(name, model, x, y, [2], seed=3, **TINY_OVERRIDES.get(name, {}))
    c, _ = B.run_baseline(name, model, x, y, [2], seed=4, **TINY_OVERRIDES.get(name, {}))
    assert torch.equal(a.flat_params(), b.flat_params())
    assert not torch.equal(a.flat_params(), c.flat_params())


def test_logit_mask_is_the_original_with_masked_outputs(case):
    model, x, y = case
    masked = B.logit_mask(model, x, y, [2, 3])
    assert torch.equal(masked.flat_params(), model.flat_params())
    assert masked.forget == [2, 3] and masked.spec == model.spec
    with torch.no_grad():
        out, ref = masked(x), model(x)
    assert torch.isinf(out[:, [2, 3]]).all() and torch.equal(out[:, [0, 1]], ref[:, [0, 1]])
    assert M.split_accuracies(out, y, [2, 3])["forget"] == 0.0
    # Metrics accept the −inf logits.
    p = M.softmax(out.numpy())
    assert p[:, [2, 3]].max() == 0.0 and M.entropy(p).min() >= 0


def test_ssd_dampen_follows_its_formula_on_a_hand_made_fisher():
    theta = {"w": torch.tensor([[1.0, -2.0, 3.0], [4.0, 5.0, -6.0]]), "b": torch.tensor([0.5, -0.5])}
    imp_d = {"w": torch.tensor([[1.0, 1.0, 0.1], [0.0, 2.0, 1.0]]), "b": torch.tensor([0.2, 0.01])}
    imp_f = {"w": torch.tensor([[5.0, 11.0, 4.0], [0.0, 30.0, 0.5]]), "b": torch.tensor([3.0, 0.05])}
    out = B.ssd_dampen(theta, imp_d, imp_f, alpha=10.0, lam=1.0)
    # Selected where imp_f > 10·imp_d: w[0,1] (11 > 10), w[0,2] (4 > 1), w[1,1] (30 > 20), b[0] (3 > 2);
    # β = min(λ·imp_d/imp_f, 1). w[0,0] (5 ≤ 10), w[1,0] (0 ≤ 0), w[1,2], b[1] (0.05 ≤ 0.1) stay.
    expected_w = torch.tensor([[1.0, -2.0 * 1 / 11, 3.0 * 0.1 / 4], [4.0, 5.0 * 2 / 30, -6.0]])
    expected_b = torch.tensor([0.5 * 0.2 / 3, -0.5])
    assert torch.allclose(out["w"], expected_w) and torch.allclose(out["b"], expected_b)
    # λ large enough makes β = 1 everywhere (min(·, 1)).
    same = B.ssd_dampen(theta, imp_d, imp_f, alpha=10.0, lam=100.0)
    assert torch.equal(same["w"], theta["w"]) and torch.equal(same["b"], theta["b"])
    # Inputs untouched.
    assert theta["w"][0, 1] == -2.0
    with pytest.raises(HyperForgetError, match="importance"):
        B.ssd_dampen(theta, {"w": imp_d["w"]}, imp_f)


def test_ssd_importances_match_autograd_by_hand(case):
    model, x, y = case
    xs, ys = x[:7], y[:7]
    per_ex = B.ssd_importances(model, xs, ys, mode="per_example")
    batch = B.ssd_importances(model, xs, ys, batch_size=3, mode="batch")
    ref_ex = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
    ref_b = {k: torch.zeros_like(v) for k, v in model.named_parameters()}
    m = MLP(model.spec)
    m.load_state_dict(model.state_dict())
    for i in range(7):
        grads = torch.autograd.grad(F.cross_entropy(m(xs[i:i + 1]), ys[i:i + 1]), list(m.parameters()))
        for (k, _), g in zip(m.named_parameters(), grads):
            ref_ex[k] += g ** 2 / 7
    for start in (0, 3, 6):  # batches of 3, 3, 1
        grads = torch.autograd.grad(F.cross_entropy(m(xs[start:start + 3]), ys[start:start + 3]), list(m.parameters()))
        for (k, _), g in zip(m.named_parameters(), grads):
            ref_b[k] += g ** 2 / 3
    for k in ref_ex:
        assert torch.allclose(per_ex[k], ref_ex[k], rtol=1e-4, atol=1e-9)
        assert torch.allclose(batch[k], ref_b[k], rtol=1e-4, atol=1e-9)
    assert all(p.grad is None for p in model.parameters())


def test_ssd_per_example_selects_nothing_when_the_forget_set_is_a_quarter_of_d(case):
    # imp_D ≥ (N_f/N)·imp_f ≈ imp_f/4, so imp_f > 10·imp_D never holds: the published α = 10
    # cannot fire on a four-class task with textbook (per-example) importances.
    model, x, y = case
    out = B.ssd(model, x, y, [2], importance="per_example")
    assert torch.equal(out.flat_params(), model.flat_params())


def test_registry_and_input_errors(case):
    model, x, y = case
    assert set(B.BASELINES) == {"finetune", "neggrad_plus", "random_labels", "ssd", "bad_teacher", "scrub", "unsir",
                                "logit_mask"}
    assert B.BASELINES["neggrad_plus"].defaults["alpha"] == 0.95
    assert B.BASELINES["ssd"].defaults["alpha"] == 10.0 and B.BASELINES["ssd"].defaults["lam"] == 1.0
    assert B.BASELINES["scrub"].defaults["msteps"] == 3 and B.BASELINES["scrub"].defaults["kd_temperature"] == 2.0
    assert B.BASELINES["bad_teacher"].defaults["retain_fraction"] == 0.3
    with pytest.raises(HyperForgetError, match="choose one of finetune"):
        B.run_baseline("amnesiac", model, x, y, [2])
    with pytest.raises(HyperForgetError, match="no hyper-parameter lr"):
        B.run_baseline("logit_mask", model, x, y, [2], lr=0.1)
    with pytest.raises(HyperForgetError, match="empty"):
        B.run_baseline("finetune", model, x, y, [])
    with pytest.raises(HyperForgetError, match="every class"):
        B.run_baseline("finetune", model, x, y, [0, 1, 2, 3])
    with pytest.raises(HyperForgetError, match="outside"):
        B.run_baseline("finetune", model, x, y, [4])
    with pytest.raises(HyperForgetError, match=r"\(N, 64\)"):
        B.run_baseline("finetune", model, x[:, :10], y, [2])
    with pytest.raises(HyperForgetError, match="no training example"):
        B.run_baseline("finetune", model, x[y != 2], y[y != 2], [2])
    with pytest.raises(HyperForgetError, match="hyperforget.zoo.mlp.MLP"):
        B.run_baseline("finetune", torch.nn.Linear(64, 4), x, y, [2])


def test_compare_baselines_records_render_through_the_report(case):
    from hyperforget.pipelines.report import render_comparison
    from hyperforget.pipelines.retrain import retrain_without

    model, x, y = case
    params = retrain_without(model.spec, x, y, [2], [1, 2], epochs=3, batch_size=64)  # (2, P)
    retrained = [MLP.from_flat(model.spec, p) for p in params]
    methods = ["logit_mask", "finetune"]
    entry = B.compare_baselines(model, retrained, x, y, x[:97], y[:97], [2], methods=methods, progress=False,
                                retrain_seconds=0.5)
    rows = entry["methods"]
    assert entry["forget"] == [2] and entry["num_retrained"] == 2
    assert list(rows) == ["original", "retrain", *methods]
    assert rows["logit_mask"]["acc_forget"]["mean"] == 0.0
    assert rows["retrain"]["acc_forget"]["max"] == 0.0
    assert rows["retrain"]["phi_test"]["n"] == 2  # seed 1 vs 2 and 2 vs 1, never itself
    assert rows["finetune"]["phi"] == rows["finetune"]["phi_test"] and rows["finetune"]["phi_test"]["n"] == 2
    assert rows["finetune"]["wall_seconds"] > 0 and rows["finetune"]["hparams"]["lr"] == 0.02
    assert rows["original"]["wall_seconds"] is None and rows["retrain"]["wall_seconds"] == 0.5
    # The masked model's test accuracy is the original's on the retain classes, 0 on the forget class.
    with torch.no_grad():
        pred = model(x[:97]).argmax(1)
    expected = float(((pred == y[:97]) & (y[:97] != 2)).float().mean())
    assert rows["logit_mask"]["acc_test"]["mean"] == pytest.approx(expected)
    table, text = render_comparison(entry)
    assert [r[0] for r in table["rows"]] == ["finetune", "logit_mask", "Retrained", "Original"]
    assert text.count("\n") == 1 + len(rows) and "| logit_mask | 1 | " in text and "| 500 ms |" in text
    assert json.loads(json.dumps(entry, default=float))["methods"]["finetune"]["hparams"]["epochs"] == 5
    with pytest.raises(HyperForgetError, match="retrained"):
        B.compare_baselines(model, [], x, y, x, y, [2])


def test_cli_prints_the_comparison_table(tmp_path):
    from typer.testing import CliRunner

    from hyperforget.pipelines.cli import app

    out = tmp_path / "rows.json"
    runner = CliRunner()
    res = runner.invoke(app, ["compare-baselines", "--dataset", "digits", "--hidden", "8", "--epochs", "2",
                              "--retrained", "2", "--json", str(out)])
    assert res.exit_code == 0, res.output + repr(res.exception)
    text = res.output
    assert text.lstrip().startswith("| method | models | acc D_r |") and "| Retrained | 2 |" in text
    for name in B.BASELINES:
        assert f"| {name} | 1 |" in text
    saved = json.loads(out.read_text())
    assert saved["forget"] == [2] and saved["table"]["header"][-1] == "wall time / model"
    assert set(saved["dropped_seeds"]) == {"original", "retrain"}
    res = runner.invoke(app, ["compare-baselines", "--dataset", "digits", "--retrained", "0"])
    assert isinstance(res.exception, HyperForgetError) and "--retrained must be >= 1" in str(res.exception)
    res = runner.invoke(app, ["compare-baselines", "--dataset", "digits", "--forget", "two"])
    assert isinstance(res.exception, HyperForgetError) and "comma-separated" in str(res.exception)