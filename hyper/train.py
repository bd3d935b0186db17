"""Train a DiHyFo hypernetwork on a checkpoint zoo (or on in-memory checkpoints).

The trainer follows G.pt's recipe scaled by a preset: AdamW with linear warm-up then cosine
decay, no weight decay on biases / LayerNorm / positional embedding, gradient clipping, an EMA
of the weights (the EMA weights are what gets saved for sampling), bf16 autocast on a GPU, and
DDP when launched under ``torchrun`` (gloo on CPU, NCCL on GPU).

The data the trainer reads are in ``hyper/data.py`` (zoo views through the streaming loader, or
tensors in memory), its resumable state in ``hyper/checkpoint.py``, and what it shares with the
sampler (building the denoiser, the conditioned model function, sampling) in ``hyper/denoise.py``.

Output directory MODEL/:
    config.json      every config, the MLP spec, classes, normalization, dataset and loss statistics
    model.safetensors  EMA weights (what hyper.sample loads)
    curves.json / curves.png   train/test MSE, learning rate, prompt alignment R² and Pearson r
    summary.json     final numbers and timings
    checkpoints/     resumable state (step-N/ dirs + latest.json, written atomically)
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
import torch.distributed as dist
from safetensors.torch import save_file

from hyperforget.hyper.checkpoint import EMA, load_optimizer_state, load_checkpoint, save_checkpoint
from hyperforget.hyper.data import (HyperData, NoiseStarts, coordinate_statistics, data_from_zoo,
                                    jitter_current_losses)
from hyperforget.hyper.denoise import (CONFIG_FORMAT, CONFIG_VERSION, build, check_config_version, make_model_fn,
                                       resolve_zoo_path, sample_params, stored_zoo_path)
from hyperforget.hyper.diffusion import DiffusionConfig, GaussianDiffusion
from hyperforget.hyper.function_match import FunctionMatch
from hyperforget.hyper.model import DiTConfig, get_preset
from hyperforget.hyper.tokenizer import ParamTokenizer, TokenizerConfig
from hyperforget.zoo.errors import HyperForgetError, from_settings
from hyperforget.zoo.files import atomic_path, write_json
from hyperforget.zoo.seeds import ALIGNMENT_SEED, TRAIN_RANK_STRIDE, TRAIN_RESUME_STRIDE

log = logging.getLogger("hyperforget.train")  # step lines at INFO for runs without a progress bar
LOSS_WEIGHTINGS = {"uniform": 0.0, "layer_sqrt": 0.5, "layer": 1.0}  # name -> power of the layer weights


@dataclass
class TrainConfig:
    """Optimization and bookkeeping of one training run (stored in config.json)."""

    steps: int = 600  # optimizer steps
    batch_size: int = 128  # global batch (split evenly across DDP ranks)
    lr: float = 1e-3  # peak learning rate
    min_lr_ratio: float = 0.05  # cosine decays to lr · min_lr_ratio
    warmup_steps: int = 50  # linear warm-up from 0 to lr
    weight_decay: float = 0.1  # AdamW decay on matrices only (G.pt: 0.1)
    beta1: float = 0.9  # AdamW β1
    beta2: float = 0.999  # AdamW β2
    grad_clip: float = 0.75  # max global gradient norm (G.pt: 0.75); 0 disables
    ema_decay: float = 0.995  # EMA of weights; short CPU runs need a short horizon (G.pt: 0.9999)
    # "layer": every layer weighs the same in the MSE; "uniform": every value; "layer_sqrt": the square
    # root of the layer weights (a few output values decide the class losses, ~1 % of the vector).
    loss_weighting: str = "layer"
    cond_dropout: float = 0.0  # probability of dropping the loss conditions (classifier-free guidance)
    amp: str = "auto"  # "auto" (bf16 on CUDA), "bf16", "off"
    seed: int = 0  # seeds model init, timesteps, noise and data order
    log_every: int = 10  # steps between train-MSE log points
    test_every: int = 100  # steps between test-MSE measurements (0: only at the end)
    test_batches: int = 4  # batches of the test view per measurement
    eval_every: int = 200  # steps between generation-quality evaluations (0: only at the end, -1: never)
    eval_prompts: int = 20  # regularly spaced target losses per class (Appendix A.4: 20)
    eval_networks: int = 2  # sampled networks per prompt, averaged
    eval_method: str = "ddim"  # sampler used in evaluation
    eval_steps: int = 20  # DDIM steps in evaluation
    checkpoint_every: int = 200  # steps between resumable checkpoints (0: only at the end)
    num_workers: int = 0  # DataLoader worker processes for the zoo stream
    permute: bool = True  # random hidden-unit permutation of each sample (same for θ and θ*), G.pt's augmentation
    # DiHyFo-1: share of pairs whose θ is replaced by a fresh MLP initialization with its measured test
    # losses. G.pt starts from "potentially random noise"; a zoo saves few step-0 checkpoints, so
    # without this the noise start is off the training distribution.
    noise_start_share: float = 0.0
    # DiHyFo-1: standard deviation of a log-normal factor on the current losses the model sees in
    # training (conditioning augmentation, as in Ho et al. 2021's cascaded diffusion models), so that
    # it reads θ's state from θ rather than lean on one measurement of its losses. 0 turns it off.
    current_loss_jitter: float = 0.0
    # Weight of the function-matching term (hyper/function_match.py): the KL between θ*'s and x̂0's
    # class predictions on training images, weighted by ᾱ_t, added to the diffusion MSE. 0 turns it off.
    function_loss: float = 0.0
    function_probes: int = 128  # class-balanced training images per step for that term
    function_metric: str = "kl"  # "kl" of class predictions or "logits" (MSE of centred logits)
    # Weight of the class-loss matching term (hyper/function_match.py): the squared gap between x̂0's and
    # θ*'s per-class log cross-entropies on the same probes, at every noise level. 0 turns it off.
    class_loss_match: float = 0.0
    # Training-view parameters by view kind (queries.views), e.g. {"balanced": {"mode": "weights"}}.
    view: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.loss_weighting not in LOSS_WEIGHTINGS:
            raise HyperForgetError(f"unknown loss weighting {self.loss_weighting!r}: choose "
                                   f"{', '.join(LOSS_WEIGHTINGS)}")
        if self.amp not in ("auto", "bf16", "off"):
            raise HyperForgetError(f"unknown amp mode {self.amp!r}: choose auto, bf16 or off")
        if self.steps < 1 or self.batch_size < 1:
            raise HyperForgetError(f"steps and batch_size must be ≥ 1, got {self.steps}, {self.batch_size}")
        if not 0 <= self.cond_dropout < 1:
            raise HyperForgetError(f"cond_dropout must be in [0, 1), got {self.cond_dropout}")
        if self.function_loss < 0 or self.class_loss_match < 0 or self.function_probes < 1:
            raise HyperForgetError(f"function_loss and class_loss_match must be ≥ 0 and function_probes ≥ 1, got "
                                   f"{self.function_loss}, {self.class_loss_match}, {self.function_probes}")
        if self.function_metric not in FunctionMatch.METRICS:
            raise HyperForgetError(f"unknown function_metric {self.function_metric!r}: choose "
                                   f"{' or '.join(FunctionMatch.METRICS)}")
        if not 0 <= self.noise_start_share <= 1:
            raise HyperForgetError(f"noise_start_share must be in [0, 1], got {self.noise_start_share}")
        if self.current_loss_jitter < 0:
            raise HyperForgetError(f"current_loss_jitter must be ≥ 0, got {self.current_loss_jitter}")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return from_settings(cls, d, "train")


# ----------------------------------------------------------------------------------------------
# Data: the zoo's streaming loader, or in-memory tensors with the same interface.


# ----------------------------------------------------------------------------------------------
# Building blocks shared with hyper.sample.


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warm-up to cfg.lr, then cosine decay to cfg.lr · min_lr_ratio at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    no_decay = model.no_decay_parameter_names()
    decay_p = [p for n, p in model.named_parameters() if n not in no_decay]
    plain_p = [p for n, p in model.named_parameters() if n in no_decay]
    # The fused kernel updates every tensor in one pass: on one CPU thread the per-tensor loop costs
    # 0.090 s a step for the 12.7M-parameter MNIST-10 DiHyFo-1 denoiser, the fused one 0.013 s (the same
    # AdamW update; docs/benchmarks.md).
    return torch.optim.AdamW([{"params": decay_p, "weight_decay": cfg.weight_decay},
                              {"params": plain_p, "weight_decay": 0.0}], lr=cfg.lr, betas=(cfg.beta1, cfg.beta2),
                             fused=True)


# ----------------------------------------------------------------------------------------------
# Resumable state: safetensors for tensors, JSON for the rest, committed by latest.json.


# ----------------------------------------------------------------------------------------------
# The training loop.


@dataclass
class TrainResult:
    """What a training run produced."""

    out: Path  # the model directory
    steps: int  # steps done in total
    train_mse: float  # mean train MSE over the last log window
    test_mse: float | None  # last test MSE
    alignment: dict | None  # last generation-quality evaluation
    seconds: float  # wall time of this invocation
    samples_per_second: float  # training throughput of this invocation (all ranks)


def _check_override_type(key: str, value) -> None:
    """An override must have its field's kind: a bool for a bool, a number for a number, a dict for a dict."""
    for cls in (DiTConfig, TokenizerConfig, TrainConfig, DiffusionConfig):
        f = cls.__dataclass_fields__.get(key)
        if f is None:
            continue
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
        if isinstance(default, bool):
            ok = isinstance(value, bool)
        elif isinstance(default, (int, float)):
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) \
                and (isinstance(default, float) or float(value).is_integer())
        else:
            ok = default is None or isinstance(value, type(default))
        if not ok:
            raise HyperForgetError(f"training option {key}={value!r} must be a {type(default).__name__} like its "
                                   f"default {default!r}")
        return


def _resume_overrides(out: Path, overrides: dict | None, saved: tuple) -> "TrainConfig":
    """The saved TrainConfig with the one setting a resume may change (``steps``, to extend a run).

    Any other override must equal the saved value: a resumed run keeps the configuration its
    checkpoints were made with, and a different one is refused by name rather than ignored.
    """
    cfg = saved[-1]
    given = {k: v for k, v in (overrides or {}).items() if v is not None}
    differs = []
    for key, value in given.items():
        if key == "steps":
            continue
        held = [getattr(c, key) for c in saved if key in c.__dataclass_fields__]
        if not held:
            raise HyperForgetError(f"unknown setting {key!r} for a resumed run of {out}")
        if held[0] != value and not (isinstance(held[0], tuple) and tuple(held[0]) == tuple(value)):
            differs.append(f"{key}={value!r} (saved {held[0]!r})")
    if differs:
        raise HyperForgetError(f"resuming {out} keeps its saved settings; only --steps may change, not "
                               f"{', '.join(differs)}: drop them or train into a new --out")
    if "steps" in given and int(given["steps"]) != cfg.steps:
        log.info("resuming %s with steps %d (saved %d)", out, int(given["steps"]), cfg.steps)
        cfg = replace(cfg, steps=int(given["steps"]))
    return cfg


def resolve_configs(preset: str, variant: str, overrides: dict | None = None
                    ) -> tuple[DiTConfig, TokenizerConfig, DiffusionConfig, TrainConfig]:
    """Preset -> configs, with overrides keyed by field name (model, tokenizer or train fields)."""
    p = get_preset(preset)
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    model_kw = {**p["model"], "variant": variant}
    tok_kw, train_kw, diff_kw = dict(p["tokenizer"]), dict(p["train"]), {}
    for k, v in overrides.items():
        _check_override_type(k, v)
        if k in DiTConfig.__dataclass_fields__:
            model_kw[k] = v
        elif k in TokenizerConfig.__dataclass_fields__:
            tok_kw[k] = v
        elif k in TrainConfig.__dataclass_fields__:
            train_kw[k] = v
        elif k in DiffusionConfig.__dataclass_fields__:
            diff_kw[k] = v
        else:
            raise HyperForgetError(f"unknown training option {k!r}")
    return DiTConfig(**model_kw), TokenizerConfig(**tok_kw), DiffusionConfig(**diff_kw), TrainConfig(**train_kw)


def sampling_defaults(preset: str, variant: str, cfg: TrainConfig) -> dict:
    """The preset's sampler recommendation for a variant: {"method", "steps", "guidance"}.

    "guidance" is None, one scale, or a list of scales that candidates cycle through; never set
    for a model trained without condition dropout (it has no unconditional mode).
    """
    d = dict(get_preset(preset).get("sample") or {})
    g = d.get("guidance")
    if isinstance(g, dict):
        g = g.get(variant)
    return {"method": d.get("method", "ddim"), "steps": int(d.get("steps", 50)),
            "guidance": g if cfg.cond_dropout > 0 else None}


def _dist_info() -> tuple[int, int]:
    """Initialize torch.distributed under torchrun (WORLD_SIZE > 1) and return (rank, world_size)."""
    if dist.is_available() and not dist.is_initialized() and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def train(*, variant: str, out: str | os.PathLike, preset: str = "cpu-small", zoo: str | None = None,
          data: HyperData | None = None, overrides: dict | None = None, resume: bool = False,
          progress: bool = True, device: str | None = None,
          on_step: Callable[[int, int], None] | None = None) -> TrainResult:
    """Train a DiHyFo-1 or DiHyFo-2 hypernetwork and write MODEL/ (see module docstring).

    Give either ``zoo`` (a zoo path; views are built on first use) or ``data`` (in memory).
    ``overrides`` replaces preset fields by name (e.g. {"steps": 50, "hidden": 64}).
    With ``resume`` the run continues from MODEL/checkpoints with the configs saved there.
    ``on_step(step, total)`` is called after every optimizer step (progress of a caller's own display).
    """
    # Set up: distributed context, configs, data, model.
    rank, world = _dist_info()
    out = Path(out)
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type == "cuda" and world > 1:
        dev = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
        torch.cuda.set_device(dev)
    saved = None
    if resume and (out / "config.json").exists():
        saved = json.loads((out / "config.json").read_text())
        check_config_version(saved, out)
        model_cfg, tok_cfg = DiTConfig.from_dict(saved["model"]), TokenizerConfig.from_dict(saved["tokenizer"])
        diff_cfg, cfg = DiffusionConfig.from_dict(saved["diffusion"]), TrainConfig.from_dict(saved["train"])
        cfg = _resume_overrides(out, overrides, (model_cfg, tok_cfg, diff_cfg, cfg))
        if saved["variant"] != variant:
            raise HyperForgetError(f"{out} holds a {saved['variant']} model; resume it with --variant {saved['variant']}")
        zoo = zoo or resolve_zoo_path(saved.get("zoo"), out)
        preset = saved.get("preset", preset)
    else:
        if out.exists() and (out / "checkpoints" / "latest.json").exists() and not resume:
            raise HyperForgetError(f"{out} already holds a training run; pass --resume or choose another --out")
        model_cfg, tok_cfg, diff_cfg, cfg = resolve_configs(preset, variant, overrides)
    if cfg.batch_size % world:
        raise HyperForgetError(f"batch size {cfg.batch_size} is not divisible by {world} ranks")
    if data is None:
        if zoo is None:
            raise HyperForgetError("give a zoo (--zoo ZOO) to train on")
        data = data_from_zoo(zoo, variant, cfg.batch_size, cfg.seed, rank, world, cfg.permute, cfg.view)
    if saved is not None:
        # The resumed network was built on the saved statistics; a zoo that grew since must not change them.
        data.normalization, data.loss_stats = saved["normalization"], saved["loss_stats"]
    torch.manual_seed(cfg.seed)
    if tok_cfg.normalization == "coordinate" and "coordinate" not in data.normalization:
        data.normalization = {**data.normalization,
                              "coordinate": coordinate_statistics(data, variant, tok_cfg.canonical,
                                                                  order=tok_cfg.canonical_order)}
    model, tokenizer = build(variant, data.spec, data.normalization, model_cfg, tok_cfg, data.loss_stats)
    if getattr(model, "unit_roles", None) is not None:
        model.unit_roles.set_probes(*data.train_split())  # before the EMA copies the buffers
    model.to(dev)
    diffusion = GaussianDiffusion(diff_cfg)
    opt = make_optimizer(model, cfg)
    ema = EMA(model, cfg.ema_decay)
    gen = torch.Generator().manual_seed(cfg.seed * TRAIN_RANK_STRIDE + rank)
    power = LOSS_WEIGHTINGS[cfg.loss_weighting]
    weights = tokenizer.layer_weights(power).to(dev) if power else None
    matcher = FunctionMatch(data.spec, *data.train_split(), cfg.function_probes, cfg.function_metric) \
        if cfg.function_loss > 0 or cfg.class_loss_match > 0 else None
    step, epoch, curves = 0, 0, {"train": [], "test": [], "eval": []}
    config = {"format": CONFIG_FORMAT, "version": CONFIG_VERSION, "variant": variant, "preset": preset,
              "model": model_cfg.to_dict(), "tokenizer": tok_cfg.to_dict(), "diffusion": diff_cfg.to_dict(),
              "train": cfg.to_dict(), "zoo": stored_zoo_path(data.zoo, out), "mlp_spec": data.spec.to_dict(), "classes": data.classes,
              "pivots": data.pivots, "normalization": data.normalization, "loss_stats": data.loss_stats,
              "dataset": data.dataset, "tokens": tokenizer.describe(), "world_size": world,
              "sampling": sampling_defaults(preset, variant, cfg),
              "model_parameters": model.num_parameters()}
    if resume:
        ck = load_checkpoint(out)
        if ck is not None:
            model.load_state_dict(ck["model"])
            ema.shadow = {k: v.to(dev) for k, v in ck["ema"].items()}
            ema.num_updates = ck["state"]["ema_updates"]
            gen.set_state(ck["optimizer"].pop("rng.generator"))
            if rank > 0:  # only rank 0's generator was saved; other ranks need their own stream of noise
                gen.manual_seed(cfg.seed * TRAIN_RANK_STRIDE + rank + TRAIN_RESUME_STRIDE * ck["state"]["step"])
            load_optimizer_state(opt, ck["optimizer"], ck["state"]["optimizer"])
            step, epoch, curves = ck["state"]["step"], ck["state"]["epoch"], ck["state"]["curves"]
            if ck["state"].get("loader") is not None and hasattr(data.train_stream, "load_state_dict"):
                data.train_stream.load_state_dict(ck["state"]["loader"])
    ema.shadow = {k: v.to(dev) for k, v in ema.shadow.items()}
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / "config.json", config)
    net = model
    if world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP

        net = DDP(model, device_ids=[dev.index] if dev.type == "cuda" else None)
    amp = cfg.amp == "bf16" or (cfg.amp == "auto" and dev.type == "cuda")

    # Train.
    resumed_stream = [resume and step > 0]

    def batches() -> Iterator[dict]:
        nonlocal epoch
        while True:
            # set_epoch restarts an epoch: skip it once after resuming, the stream continues mid-epoch.
            if hasattr(data.train_stream, "set_epoch") and not resumed_stream[0]:
                data.train_stream.set_epoch(epoch)
            resumed_stream[0] = False
            n = 0
            for b in _iterate(data.train_stream, cfg.num_workers):
                n += 1
                yield b
            if n == 0:
                raise HyperForgetError("the training view yields no batch; lower --batch-size or grow the zoo")
            epoch += 1

    test_state0 = (data.test_stream.state_dict()
                   if data.test_stream is not None and hasattr(data.test_stream, "state_dict") else None)
    start_step, t0, window = step, time.perf_counter(), []
    last_test, last_eval = (curves["test"][-1]["mse"] if curves["test"] else None), \
        (curves["eval"][-1] if curves["eval"] else None)
    prog = _progress(progress and rank == 0)
    task = prog.add_task(f"train {variant}", total=cfg.steps, completed=step, info="") if prog else None
    it = batches()
    noise_starts = NoiseStarts(data, cfg.noise_start_share) if variant == "dihyfo1" and cfg.noise_start_share > 0 \
        else None
    try:
        if prog:
            prog.start()
        while step < cfg.steps:
            batch = next(it)
            if noise_starts is not None:
                batch = noise_starts(batch, gen)
            if variant == "dihyfo1" and cfg.current_loss_jitter > 0:
                batch = jitter_current_losses(batch, cfg.current_loss_jitter, gen)
            batch = _to_device(batch, dev)
            lr = lr_at(step, cfg)
            for g in opt.param_groups:
                g["lr"] = lr
            net.train()
            with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
                terms = _loss_terms(net, tokenizer, diffusion, batch, variant, gen, dev, weights, cfg.cond_dropout,
                                    matcher, cfg.function_loss, cfg.class_loss_match)
            opt.zero_grad(set_to_none=True)
            terms["loss"].backward()
            if cfg.grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            ema.update(model)
            step += 1
            if on_step is not None:
                on_step(step, cfg.steps)
            window.append((float(terms["mse"]), float(terms.get("function", float("nan"))),
                           float(terms.get("class_loss", float("nan")))))
            if step % cfg.log_every == 0 or step == cfg.steps:
                point = {"step": step, "mse": float(np.mean([w[0] for w in window])), "lr": lr}
                if matcher is not None:
                    point[f"function_{cfg.function_metric}"] = float(np.mean([w[1] for w in window]))
                if cfg.class_loss_match > 0:
                    point["class_loss"] = float(np.mean([w[2] for w in window]))
                curves["train"].append(point)
                window = []
            if cfg.test_every > 0 and step % cfg.test_every == 0 or step == cfg.steps:
                if data.test_stream is not None:
                    last_test = _test_mse(model, ema, tokenizer, diffusion, data.test_stream, test_state0, variant, cfg,
                                          dev, world)
                    curves["test"].append({"step": step, "mse": last_test})
            do_eval = (cfg.eval_every > 0 and step % cfg.eval_every == 0) or (cfg.eval_every >= 0 and step == cfg.steps)
            if do_eval and rank == 0:
                last_eval = {"step": step, **_evaluate(model, ema, tokenizer, diffusion, data, variant, cfg, dev)}
                curves["eval"].append(last_eval)
            if rank == 0 and (step == cfg.steps or (cfg.checkpoint_every > 0 and step % cfg.checkpoint_every == 0)):
                save_checkpoint(out, step, model, ema, opt, gen, data.train_stream, epoch, curves)
                _save_outputs(out, ema, curves)
            if rank == 0 and step % (10 * cfg.log_every) == 0 and curves["train"]:
                log.info("step %d/%d  mse %.4f  test %s  %.3f s/step", step, cfg.steps, curves["train"][-1]["mse"],
                         "-" if last_test is None else f"{last_test:.4f}",
                         (time.perf_counter() - t0) / max(1, step - start_step))
            if prog:
                info = f"mse {curves['train'][-1]['mse']:.4f}" if curves["train"] else ""
                if last_test is not None:
                    info += f"  test {last_test:.4f}"
                if last_eval is not None:
                    info += f"  R² {last_eval['r2_mean']:.2f}  r {last_eval['pearson_mean']:.2f}"
                prog.update(task, completed=step, info=info)
    finally:
        if prog:
            prog.stop()
    seconds = time.perf_counter() - t0
    done = step - start_step
    result = TrainResult(out, step, curves["train"][-1]["mse"] if curves["train"] else float("nan"), last_test,
                         last_eval, seconds, done * cfg.batch_size / seconds if seconds > 0 else 0.0)
    if rank == 0:
        summary = {"variant": variant, "steps": step, "train_mse": result.train_mse, "test_mse": last_test,
                   "alignment": last_eval, "seconds": seconds, "samples_per_second": result.samples_per_second,
                   "world_size": world, "device": str(dev), "model_parameters": model.num_parameters()}
        write_json(out / "summary.json", summary)
    if world > 1:
        dist.barrier()
    return result


def _iterate(stream, num_workers: int):
    if num_workers > 0:
        from hyperforget.queries.loader import make_loader

        return make_loader(stream, num_workers=num_workers)
    return stream


def _to_device(batch: dict, dev: torch.device) -> dict:
    return {k: torch.as_tensor(v).to(dev, non_blocking=True) for k, v in batch.items()}


def _loss_terms(net, tokenizer: ParamTokenizer, diffusion: GaussianDiffusion, batch: dict, variant: str,
                gen: torch.Generator, dev: torch.device, weights, cond_dropout: float,
                matcher: FunctionMatch | None = None, function_loss: float = 0.0,
                class_loss_match: float = 0.0) -> dict:
    """One batch -> Equation 5 terms (+ the function- and class-loss-matching terms with a ``matcher``).

    DiHyFo-2 learns θ* from single checkpoints, DiHyFo-1 from pairs.

    With a canonical tokenizer, θ is put in canonical order and θ* follows θ's order (the hidden
    units of one run keep their identity, and at sampling time only θ is known); a noise start's
    θ* has nothing to do with its θ, so it takes its own canonical order.
    """
    if variant == "dihyfo1":
        theta, theta_star = batch["params"].float(), batch["target_params"].float()
        perms = tokenizer.canonical_permutations(theta)
        if perms is not None and "noise_start" in batch:
            own = tokenizer.canonical_permutations(theta_star)
            perms_star = torch.where(batch["noise_start"].bool()[:, None], own, perms)
        else:
            perms_star = perms
        x0 = tokenizer.normalize(tokenizer.permute(theta_star, perms_star))
        target_losses = batch["target_losses"].float()
        current = tokenizer.normalize(tokenizer.permute(theta, perms))
        current_losses = batch["losses"].float()
    else:
        x0 = tokenizer.normalize(tokenizer.canonicalize(batch["params"].float()))
        target_losses, current, current_losses = batch["losses"].float(), None, None
    b = x0.shape[0]
    t = diffusion.sample_timesteps(b, gen, dev)
    noise = torch.randn(x0.shape, generator=gen).to(dev)
    # Always pass a mask (all False without dropout) so every parameter gets a gradient: DDP requires it.
    drop = (torch.rand(b, generator=gen) < cond_dropout).to(dev) if cond_dropout > 0 else \
        torch.zeros(b, dtype=torch.bool, device=dev)
    fn = make_model_fn(net, tokenizer, target_losses, current, current_losses, drop)
    terms = diffusion.training_losses(fn, x0, t, noise, weights, batch.get("weights"))
    if matcher is not None:
        match = matcher.diffusion_terms(tokenizer, diffusion, t, terms["x0_hat"], x0, gen, function_loss,
                                        class_loss_match)
        terms["loss"] = terms["loss"] + match.pop("loss")
        terms.update(match)  # the detached terms, for the curves
    return terms


def _ema_model(model: torch.nn.Module, ema: EMA) -> torch.nn.Module:
    import copy

    m = copy.deepcopy(model)
    m.load_state_dict(ema.shadow)
    return m.eval()


@torch.no_grad()
def _test_mse(model, ema, tokenizer, diffusion, stream, state0, variant, cfg, dev, world) -> float:
    """Mean Eq. 5 MSE of the EMA model over a few test batches (fixed timesteps and noise)."""
    m = _ema_model(model, ema)
    gen = torch.Generator().manual_seed(ALIGNMENT_SEED)
    total, n = 0.0, 0
    if state0 is not None:
        stream.load_state_dict(state0)  # the same test batches every time, so the curve is comparable
    for i, batch in enumerate(stream):
        if i >= cfg.test_batches:
            break
        terms = _loss_terms(m, tokenizer, diffusion, _to_device(batch, dev), variant, gen, dev, None, 0.0)
        total, n = total + float(terms["mse"]), n + 1
    if world > 1:
        t = torch.tensor([total, float(n)], dtype=torch.float64)
        dist.all_reduce(t)
        total, n = float(t[0]), int(t[1])
    return total / max(n, 1)


def _evaluate(model, ema, tokenizer, diffusion, data: HyperData, variant, cfg: TrainConfig, dev) -> dict:
    """Prompt alignment R² and Pearson r per class (hyper.alignment) with the EMA weights."""
    from hyperforget.hyper.alignment import evaluate_alignment

    m = _ema_model(model, ema)
    x_test, y_test = data.test_split()
    stats = data.loss_stats
    low, high, good = np.asarray(stats["q05"]), np.asarray(stats["q95"]), np.asarray(stats["q10"])

    def sample(targets, current, current_losses, seed):
        return sample_params(m, tokenizer, diffusion, targets, current, current_losses, method=cfg.eval_method,
                             steps=cfg.eval_steps, seed=seed, device=dev)

    res = evaluate_alignment(sample, data.spec, x_test, y_test, low, high, good, variant=variant,
                             n_prompts=cfg.eval_prompts, n_networks=cfg.eval_networks, seed=cfg.seed)
    return res.to_dict()


def _save_outputs(out: Path, ema: EMA, curves: dict) -> None:
    with atomic_path(out / "model.safetensors") as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in ema.shadow.items()}, tmp,
                  metadata={"format": CONFIG_FORMAT, "version": str(CONFIG_VERSION), "weights": "ema"})
    write_json(out / "curves.json", curves)
    plot_curves(curves, out / "curves.png")


def plot_curves(curves: dict, path: Path) -> None:
    """Train/test MSE, learning rate and generation quality over steps -> PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 3.8))
    ax = axes[0]
    if curves["train"]:
        ax.plot([p["step"] for p in curves["train"]], [p["mse"] for p in curves["train"]], label="train")
    if curves["test"]:
        ax.plot([p["step"] for p in curves["test"]], [p["mse"] for p in curves["test"]], "o-", label="test (EMA)")
    ax.set_yscale("log"), ax.set_xlabel("step"), ax.set_title("MSE (Eq. 5)"), ax.legend()
    ax = axes[1]
    if curves["train"]:
        ax.plot([p["step"] for p in curves["train"]], [p["lr"] for p in curves["train"]])
    ax.set_xlabel("step"), ax.set_title("learning rate")
    ax = axes[2]
    ev = curves["eval"]
    if ev:
        steps = [p["step"] for p in ev]
        for c in range(len(ev[0]["r2"])):
            ax.plot(steps, [p["r2"][c] for p in ev], "o-", label=f"R² class {c}")
            ax.plot(steps, [p["pearson"][c] for p in ev], "x--", label=f"r class {c}")
        ax.set_ylim(-1.05, 1.05)
        ax.legend(fontsize=6, ncol=2)
    ax.set_xlabel("step"), ax.set_title("prompt alignment / Pearson")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _progress(enabled: bool):
    if not enabled:
        return None
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
        TimeRemainingColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    TimeRemainingColumn(), TextColumn("{task.fields[info]}"))
