"""Trainer and sampler end to end on a tiny in-memory zoo, resume, DDP, and the CLI."""

from __future__ import annotations

import json
import os
import socket

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from hyperforget.hyper.sample import load_hypernetwork
from hyperforget.hyper.data import data_from_tensors
from hyperforget.hyper.train import TrainConfig, lr_at, train
from hyperforget.zoo.errors import HyperForgetError


def _data(z, variant, batch_size=64, rank=0, world=1):
    return data_from_tensors(z["spec"], z["params"], z["losses"], variant=variant, run_ids=z["run_ids"],
                             steps=z["steps"], x_test=z["x_test"], y_test=z["y_test"], batch_size=batch_size,
                             rank=rank, world_size=world)


def _with_dataset(model_dir, z):
    # In-memory data has no dataset name; record the digits task so the sampler can measure losses.
    path = os.path.join(model_dir, "config.json")
    cfg = json.load(open(path))
    cfg["dataset"] = z["dataset"]
    json.dump(cfg, open(path, "w"))


@pytest.fixture(scope="module")
def trained2(ckpt_zoo, tmp_path_factory):
    out = tmp_path_factory.mktemp("d2") / "model"
    torch.set_num_threads(1)
    result = train(variant="dihyfo2", out=out, preset="tiny", data=_data(ckpt_zoo, "dihyfo2"),
                   overrides={"steps": 300, "eval_every": 300, "test_every": 100, "eval_networks": 1},
                   progress=False)
    _with_dataset(out, ckpt_zoo)
    return out, result


def test_dihyfo2_learns_and_follows_class_prompts(trained2, ckpt_zoo):
    out, result = trained2
    curves = json.load(open(out / "curves.json"))
    first, last = curves["train"][0]["mse"], curves["train"][-1]["mse"]
    assert last < 0.75 * first, (first, last)
    assert len(curves["test"]) == 3 and len(curves["eval"]) == 1
    assert set(curves["eval"][0]) >= {"r2", "pearson", "step"} and len(curves["eval"][0]["r2"]) == 4
    assert (out / "curves.png").stat().st_size > 1000 and (out / "model.safetensors").exists()
    # Prompts: classes {0,1} low and {2,3} high, then the reverse. Each class must come out with a
    # lower loss when prompted low than when prompted high (medians over 24 samples).
    net = load_hypernetwork(out)
    lo, hi = np.array(net.loss_stats["q10"]), np.array(net.loss_stats["q90"])
    a, b = np.where([1, 1, 0, 0], lo, hi), np.where([0, 0, 1, 1], lo, hi)
    loss_a = np.median(net.evaluate(net.sample(np.tile(a, (24, 1)), seed=1, steps=20)).loss, 0)
    loss_b = np.median(net.evaluate(net.sample(np.tile(b, (24, 1)), seed=2, steps=20)).loss, 0)
    low_when_low = np.r_[loss_a[:2], loss_b[2:]]
    low_when_high = np.r_[loss_b[:2], loss_a[2:]]
    assert (low_when_low < low_when_high).sum() >= 3, (loss_a, loss_b)
    assert np.log(low_when_high / low_when_low).mean() > 0.5, (loss_a, loss_b)


def test_sampling_is_deterministic_for_a_seed(trained2):
    net = load_hypernetwork(trained2[0])
    t = np.tile(np.array(net.loss_stats["q50"]), (3, 1))
    x = net.sample(t, steps=10, seed=7)
    assert x.shape == (3, net.spec.num_params) and torch.isfinite(x).all()
    assert torch.equal(x, net.sample(t, steps=10, seed=7))
    assert not torch.equal(x, net.sample(t, steps=10, seed=8))
    y = net.sample(t[:1], method="ddpm", seed=7)  # all 1000 steps
    assert torch.equal(y, net.sample(t[:1], method="ddpm", seed=7)) and not torch.equal(y, x[:1])
    with pytest.raises(HyperForgetError, match="per class"):
        net.sample(np.zeros((2, 3)))
    with pytest.raises(HyperForgetError, match="DiHyFo-2"):
        net.sample(t, current_params=torch.zeros(3, net.spec.num_params))
    with pytest.raises(HyperForgetError, match="guidance"):
        net.sample(t, guidance=2.0)


def test_dihyfo1_learns_updates_from_theta(ckpt_zoo, tmp_path):
    out = tmp_path / "d1"
    train(variant="dihyfo1", out=out, preset="tiny", data=_data(ckpt_zoo, "dihyfo1"),
          overrides={"steps": 300, "eval_every": -1, "test_every": 300}, progress=False)
    _with_dataset(out, ckpt_zoo)
    curves = json.load(open(out / "curves.json"))
    assert curves["train"][-1]["mse"] < 0.8 * curves["train"][0]["mse"]
    net = load_hypernetwork(out)
    # From the zoo's initializations (step 0): prompting a class low gives it a lower loss than prompting it high.
    theta = ckpt_zoo["params"][ckpt_zoo["steps"] == 0][:16]
    lo, hi = np.array(net.loss_stats["q10"]), np.array(net.loss_stats["q90"])
    a, b = np.where([1, 1, 0, 0], lo, hi), np.where([0, 0, 1, 1], lo, hi)
    xa = net.sample(np.tile(a, (16, 1)), current_params=theta, steps=20, seed=1)
    xb = net.sample(np.tile(b, (16, 1)), current_params=theta, steps=20, seed=1)
    assert xa.shape == theta.shape and torch.isfinite(xa).all()
    loss_a, loss_b = np.median(net.evaluate(xa).loss, 0), np.median(net.evaluate(xb).loss, 0)
    assert (np.r_[loss_a[:2], loss_b[2:]] < np.r_[loss_b[:2], loss_a[2:]]).sum() >= 3, (loss_a, loss_b)
    with pytest.raises(HyperForgetError, match="current"):
        net.sample(np.zeros((2, 4)), current_params=torch.zeros(3, net.spec.num_params))


def test_resume_reproduces_an_uninterrupted_run(ckpt_zoo, tmp_path):
    over = {"steps": 12, "eval_every": -1, "test_every": 0, "checkpoint_every": 6, "log_every": 3}
    train(variant="dihyfo2", out=tmp_path / "full", preset="tiny", data=_data(ckpt_zoo, "dihyfo2"),
          overrides=over, progress=False)
    train(variant="dihyfo2", out=tmp_path / "part", preset="tiny", data=_data(ckpt_zoo, "dihyfo2"),
          overrides={**over, "steps": 6}, progress=False)
    with pytest.raises(HyperForgetError, match="resume"):
        train(variant="dihyfo2", out=tmp_path / "part", preset="tiny", data=_data(ckpt_zoo, "dihyfo2"),
              overrides=over, progress=False)
    # A resume may extend the run; any other setting that differs from the saved one is refused by name.
    with pytest.raises(HyperForgetError, match=r"only --steps may change, not lr=0\.5"):
        train(variant="dihyfo2", out=tmp_path / "part", preset="tiny", data=_data(ckpt_zoo, "dihyfo2"),
              overrides={"steps": 12, "lr": 0.5}, resume=True, progress=False)
    train(variant="dihyfo2", out=tmp_path / "part", preset="tiny", data=_data(ckpt_zoo, "dihyfo2"),
          overrides={**over, "steps": 12}, resume=True, progress=False)  # the same settings pass
    a, b = load_file(str(tmp_path / "full/model.safetensors")), load_file(str(tmp_path / "part/model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    ca, cb = json.load(open(tmp_path / "full/curves.json")), json.load(open(tmp_path / "part/curves.json"))
    assert ca["train"] == cb["train"]


def test_lr_schedule_warms_up_then_decays():
    cfg = TrainConfig(steps=100, lr=1.0, warmup_steps=10, min_lr_ratio=0.1)
    assert lr_at(0, cfg) == pytest.approx(0.1) and lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(55, cfg) == pytest.approx(0.55) and lr_at(100, cfg) == pytest.approx(0.1)


@pytest.mark.parametrize("preset", ["tiny", "cpu-mlp"])
def test_two_process_gloo_ddp(ckpt_zoo, tmp_path, preset):
    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ddp_worker, args=(2, port, ckpt_zoo, str(tmp_path / "ddp"), preset), nprocs=2, join=True)
    a = load_file(str(tmp_path / "ddp/rank0.safetensors"))
    b = load_file(str(tmp_path / "ddp/rank1.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
    cfg = json.load(open(tmp_path / "ddp/config.json"))
    assert cfg["world_size"] == 2
    summary = json.load(open(tmp_path / "ddp/summary.json"))
    assert summary["steps"] == 4 and summary["world_size"] == 2


def _ddp_worker(rank: int, world: int, port: int, z: dict, out: str, preset: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist
    from safetensors.torch import save_file

    import hyperforget.hyper.train as ht

    captured = {}
    original = ht.make_optimizer

    def spy(model, cfg):  # keep a handle on this rank's replica
        captured["model"] = model
        return original(model, cfg)

    original_build = ht.build

    def build_spy(*args, **kwargs):  # and on its tokenizer: every rank must normalize alike
        model, tok = original_build(*args, **kwargs)
        captured["tokenizer"] = tok
        return model, tok

    ht.make_optimizer, ht.build = spy, build_spy
    small = {"hidden": 32, "layers": 1, "cond_dim": 16} if preset == "cpu-mlp" else {}
    ht.train(variant="dihyfo1", out=out, preset=preset, data=_data(z, "dihyfo1", 32, rank, world),
             overrides={"steps": 4, "batch_size": 32, "eval_every": -1, "test_every": 4, **small}, progress=False,
             device="cpu")
    tensors = {k: v.detach().contiguous() for k, v in captured["model"].state_dict().items()}
    tensors["tokenizer.scale"], tensors["tokenizer.shift"] = captured["tokenizer"].scale, captured["tokenizer"].shift
    save_file(tensors, f"{out}/rank{rank}.safetensors")
    dist.destroy_process_group()


def test_classifier_free_guidance_per_row(ckpt_zoo, tmp_path):
    out = tmp_path / "cfg"
    train(variant="dihyfo2", out=out, preset="tiny", data=_data(ckpt_zoo, "dihyfo2"),
          overrides={"steps": 30, "eval_every": -1, "test_every": 0, "cond_dropout": 0.3}, progress=False)
    _with_dataset(out, ckpt_zoo)
    net = load_hypernetwork(out)
    t = np.tile(np.array(net.loss_stats["q50"]), (3, 1))
    plain = net.sample(t, steps=5, seed=3)
    swept = net.sample(t, steps=5, seed=3, guidance=[1.0, 3.0, 3.0])
    torch.testing.assert_close(swept[0], plain[0], atol=1e-4, rtol=1e-4)  # scale 1 is the conditional model
    assert not torch.allclose(swept[1], plain[1], atol=1e-3)
    torch.testing.assert_close(swept[1:], net.sample(t, steps=5, seed=3, guidance=3.0)[1:])
    with pytest.raises(HyperForgetError, match="one per target row"):
        net.sample(t, guidance=[1.0, 2.0])
    assert net.sampling["method"] == "ddim" and net.sampling["guidance"] is None  # tiny: unguided
    # "auto" (the default) follows the recommendation saved with the model; a list cycles over rows.
    net.config["sampling"]["guidance"] = [1.0, 3.0]
    torch.testing.assert_close(net.sample(t, steps=5, seed=3), net.sample(t, steps=5, seed=3, guidance=[1.0, 3.0, 1.0]))
    torch.testing.assert_close(net.sample(t, steps=5, seed=3, guidance=None), plain)
    with pytest.raises(HyperForgetError, match="not a scale"):
        net.sample(t, guidance="strong")


def test_noise_starts_replace_theta_by_inits_with_their_measured_losses(ckpt_zoo):
    from hyperforget.hyper.data import NoiseStarts

    data = _data(ckpt_zoo, "dihyfo1")
    batch = next(iter(data.train_stream))
    spec, (x, y) = ckpt_zoo["spec"], data.test_split()
    gen = torch.Generator().manual_seed(0)
    out = NoiseStarts(data, 1.0)(batch, gen)
    assert not torch.equal(out["params"], batch["params"])
    assert torch.equal(out["target_params"], batch["target_params"])  # θ* and its losses stay
    assert torch.equal(out["target_losses"], batch["target_losses"])
    # Independent check: nn.Linear forward + F.cross_entropy per class on the test split.
    for theta, losses in zip(out["params"][:3], out["losses"][:3]):
        h, d, c = spec.hidden, spec.input_size, spec.num_classes
        w1, b1 = theta[:h * d].view(h, d), theta[h * d:h * d + h]
        w2, b2 = theta[h * d + h:h * d + h + c * h].view(c, h), theta[h * d + h + c * h:]
        logits = torch.relu(torch.as_tensor(x).float() @ w1.T + b1) @ w2.T + b2
        ce = torch.nn.functional.cross_entropy(logits, torch.as_tensor(y), reduction="none")
        expected = torch.stack([ce[torch.as_tensor(y) == k].mean() for k in range(c)])
        torch.testing.assert_close(losses.float(), expected, rtol=1e-4, atol=1e-5)
    # Fresh inits are near chance: every class loss close to log C.
    assert (out["losses"] - np.log(spec.num_classes)).abs().max() < 1.0
    untouched = NoiseStarts(data, 0.0)(batch, gen)
    assert torch.equal(untouched["params"], batch["params"])
    # About the requested share is replaced.
    half = NoiseStarts(data, 0.5)(batch, torch.Generator().manual_seed(1))
    replaced = (half["params"] != batch["params"]).any(1).float().mean()
    assert 0.2 < float(replaced) < 0.8


def test_current_loss_jitter_scales_only_the_current_losses_log_normally():
    from hyperforget.hyper.data import jitter_current_losses

    batch = {"losses": torch.full((4000, 5), 0.5), "target_losses": torch.full((4000, 5), 3.0),
             "params": torch.zeros(4000, 7)}
    out = jitter_current_losses(batch, 0.3, torch.Generator().manual_seed(0))
    log_factor = torch.log(out["losses"] / 0.5)
    assert abs(float(log_factor.mean())) < 0.02 and abs(float(log_factor.std()) - 0.3) < 0.02
    assert (out["losses"] > 0).all()
    assert out["target_losses"] is batch["target_losses"] and out["params"] is batch["params"]
    assert torch.equal(batch["losses"], torch.full((4000, 5), 0.5))  # the input batch is not modified
    with pytest.raises(HyperForgetError, match="current_loss_jitter"):
        TrainConfig(current_loss_jitter=-0.1)


def test_the_zoo_path_is_recorded_relative_to_the_model_directory(tmp_path, monkeypatch):
    from hyperforget.hyper.denoise import resolve_zoo_path, stored_zoo_path

    stored = stored_zoo_path(str(tmp_path / "demo" / "zoo"), tmp_path / "demo" / "models" / "dihyfo2")
    assert stored == os.path.join("..", "..", "zoo")
    # The whole demo directory moved, then used from another working directory.
    monkeypatch.chdir(tmp_path)
    moved = tmp_path / "elsewhere" / "demo"
    assert resolve_zoo_path(stored, moved / "models" / "dihyfo2") == str(moved / "zoo")
    assert stored_zoo_path("s3://bucket/zoo", tmp_path) == "s3://bucket/zoo"
    assert resolve_zoo_path("/abs/zoo", moved) == "/abs/zoo" and resolve_zoo_path(None, moved) is None


@pytest.mark.parametrize("cls, what", [("TrainConfig", "train"), ("DiTConfig", "model"),
                                       ("TokenizerConfig", "tokenizer"), ("DiffusionConfig", "diffusion")])
def test_saved_configs_refuse_unknown_keys(cls, what):
    import hyperforget.hyper.diffusion as hd
    import hyperforget.hyper.model as hm
    import hyperforget.hyper.tokenizer as htok
    import hyperforget.hyper.train as htr

    config = {"TrainConfig": htr.TrainConfig, "DiTConfig": hm.DiTConfig, "TokenizerConfig": htok.TokenizerConfig,
              "DiffusionConfig": hd.DiffusionConfig}[cls]
    assert config.from_dict({}) == config()
    with pytest.raises(HyperForgetError, match=f"unknown {what} settings \\['stepz'\\]"):
        config.from_dict({"stepz": 3})


def test_a_training_view_too_small_for_one_batch_names_its_filters(normalized_zoo):
    from hyperforget.hyper.data import data_from_zoo

    with pytest.raises(HyperForgetError, match="fewer than one batch of 8 .*start_max_loss 0.0001"):
        data_from_zoo(normalized_zoo, "dihyfo1", batch_size=8, view={"pairs": {"start_max_loss": 0.0001}})
