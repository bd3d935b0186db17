"""The function-matching term: each metric against an explicit forward, its probes, the trainer's use."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from hyperforget.hyper.data import data_from_tensors
from hyperforget.hyper.function_match import FunctionMatch
from hyperforget.hyper.train import train
from hyperforget.zoo.datasets import load_dataset
from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.mlp import MLP, MLPSpec, init_params

SPEC = MLPSpec(13, 5, 3)


def _images(n: int = 61, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(n, SPEC.input_size, generator=g)
    y = torch.arange(n) % SPEC.num_classes
    return x, y


def _explicit_kl(zp: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
    return F.kl_div(F.log_softmax(zq, -1), F.log_softmax(zp, -1), log_target=True, reduction="batchmean")


def _explicit_logit_mse(zp: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
    return ((zp - zp.mean(1, keepdim=True)) - (zq - zq.mean(1, keepdim=True))).pow(2).mean()


@pytest.mark.parametrize("metric,explicit", [("kl", _explicit_kl), ("logits", _explicit_logit_mse)])
def test_each_metric_equals_an_explicit_forward_and_ignores_a_shift_of_every_logit(metric, explicit):
    x, y = _images()
    matcher = FunctionMatch(SPEC, x, y, probes=17, metric=metric)
    target, predicted = init_params(SPEC, range(7)), init_params(SPEC, range(100, 107))
    w = torch.linspace(0.1, 1.0, 7)
    got = matcher.terms(predicted, target, w, torch.Generator().manual_seed(3))["function"]
    probes = x[matcher.draw_rows(torch.Generator().manual_seed(3))]
    expected = [explicit(MLP.from_flat(SPEC, p)(probes), MLP.from_flat(SPEC, q)(probes))
                for p, q in zip(target, predicted)]
    assert torch.allclose(got, (w * torch.stack(expected)).mean(), rtol=1e-4, atol=1e-6)
    shifted = target.clone()
    bias = SPEC.layout.slot("fc2.bias")
    shifted[:, bias.offset:bias.stop] += 7.0  # softmax and centred logits ignore a common shift
    same = matcher.terms(shifted, target, w, torch.Generator().manual_seed(3))["function"]
    assert float(same) == pytest.approx(0.0, abs=1e-4)


def test_logit_metric_tells_apart_class_losses_the_kl_hardly_sees():
    """Two networks that differ only in how wrong they are on one class: loss ≈ 8 against ≈ 15."""
    x, y = _images()
    kl, logits = FunctionMatch(SPEC, x, y, probes=30), FunctionMatch(SPEC, x, y, probes=30, metric="logits")
    a = init_params(SPEC, [0])
    b = a.clone()
    bias = SPEC.layout.slot("fc2.bias")
    a[:, bias.offset:bias.stop] = torch.tensor([0.0, 0.0, -8.0])
    b[:, bias.offset:bias.stop] = torch.tensor([0.0, 0.0, -15.0])
    w, g = torch.ones(1), lambda: torch.Generator().manual_seed(0)
    assert float(kl.terms(b, a, w, g())["function"]) < 5e-3
    assert float(logits.terms(b, a, w, g())["function"]) > 5.0
    with pytest.raises(HyperForgetError, match="unknown function-matching metric"):
        FunctionMatch(SPEC, x, y, metric="l2")


def test_identical_networks_match_and_probes_are_class_balanced():
    x, y = _images()
    matcher = FunctionMatch(SPEC, x, y, probes=30)
    p = init_params(SPEC, range(4))
    same = matcher.terms(p, p, torch.ones(4), torch.Generator().manual_seed(0))["function"]
    assert float(same) == pytest.approx(0.0, abs=1e-6)
    probes = x[matcher.draw_rows(torch.Generator().manual_seed(1))]
    labels = y[[int(torch.nonzero((x == row).all(1))[0]) for row in probes]]
    assert torch.bincount(labels, minlength=3).tolist() == [10, 10, 10]


def test_class_losses_equal_an_explicit_forward_and_tell_8_from_15():
    x, y = _images()
    matcher = FunctionMatch(SPEC, x, y, probes=30)
    a = init_params(SPEC, [0, 1])
    rows = matcher.draw_rows(torch.Generator().manual_seed(2))
    got = matcher.log_class_losses(MLP.from_flat(SPEC, a[0])(x[rows])[None], y[rows])[0]
    net = MLP.from_flat(SPEC, a[0])
    expected = [F.cross_entropy(net(x[rows][y[rows] == c]), y[rows][y[rows] == c]) for c in range(3)]
    assert torch.allclose(got, torch.log(torch.stack(expected) + 0.01), rtol=1e-4, atol=1e-5)
    b = a.clone()
    bias = SPEC.layout.slot("fc2.bias")
    a[:, bias.offset:bias.stop] = torch.tensor([0.0, 0.0, -8.0])
    b[:, bias.offset:bias.stop] = torch.tensor([0.0, 0.0, -15.0])
    w, g = torch.ones(2), lambda: torch.Generator().manual_seed(0)
    terms = matcher.terms(b, a, w, g(), class_loss=True)
    assert float(terms["function"]) < 5e-3 < 0.1 < float(terms["class_loss"])  # the KL hardly sees it
    assert float(matcher.terms(a, a, w, g(), class_loss=True)["class_loss"]) == pytest.approx(0.0, abs=1e-8)


def _zoo_data(z: dict, with_images: bool = True):
    """The tiny checkpoint zoo as DiHyFo-2 training data, with or without the training images."""
    images = {}
    if with_images:
        ds = load_dataset("digits", classes=(0, 1, 2, 3))
        images = dict(x_train=ds.x_train, y_train=ds.y_train)
    return data_from_tensors(z["spec"], z["params"], z["losses"], variant="dihyfo2", run_ids=z["run_ids"],
                             steps=z["steps"], x_test=z["x_test"], y_test=z["y_test"], batch_size=32, **images)


def _train_curves(data, out, **overrides) -> list:
    train(variant="dihyfo2", out=out, preset="tiny", data=data, progress=False,
          overrides={"steps": 10, "eval_every": -1, "test_every": 0, "function_probes": 40, **overrides})
    return json.loads((out / "curves.json").read_text())["train"]


def test_the_trainer_adds_the_term_and_records_it(ckpt_zoo, tmp_path):
    curves = _train_curves(_zoo_data(ckpt_zoo), tmp_path / "m", steps=20, function_loss=1.0)
    kl = [point["function_kl"] for point in curves]
    assert all(k >= 0 and k == k for k in kl)
    assert json.loads((tmp_path / "m" / "config.json").read_text())["train"]["function_loss"] == 1.0


def test_the_trainer_records_the_logit_metric_under_its_name(ckpt_zoo, tmp_path):
    data = _zoo_data(ckpt_zoo)
    curves = _train_curves(data, tmp_path / "m", function_loss=0.1, function_metric="logits")
    assert all(point["function_logits"] >= 0 and "function_kl" not in point for point in curves)
    with pytest.raises(HyperForgetError, match="unknown function_metric"):
        _train_curves(data, tmp_path / "n", steps=2, function_loss=1.0, function_metric="l1")


def test_the_trainer_adds_class_loss_matching_alone_and_records_it(ckpt_zoo, tmp_path):
    curves = _train_curves(_zoo_data(ckpt_zoo), tmp_path / "m", class_loss_match=0.5)
    assert all(point["class_loss"] >= 0 and point["class_loss"] == point["class_loss"] for point in curves)


def test_the_term_without_training_images_is_a_one_line_error(ckpt_zoo, tmp_path):
    data = _zoo_data(ckpt_zoo, with_images=False)
    with pytest.raises(HyperForgetError, match="function_loss=0"):
        train(variant="dihyfo2", out=tmp_path / "m", preset="tiny", data=data, progress=False,
              overrides={"steps": 2, "function_loss": 1.0})
    for name in ("function_loss", "class_loss_match"):
        with pytest.raises(HyperForgetError, match="must be ≥ 0"):
            train(variant="dihyfo2", out=tmp_path / name, preset="tiny", data=data, progress=False,
                  overrides={"steps": 2, name: -1.0})
