"""Load a trained DiHyFo and sample MLP parameters for target class losses.

    net = load_hypernetwork("MODEL")
    params = net.sample(targets, current_params=theta, current_losses=losses)   # (K, P) raw θ*

The architecture, tokenizer, normalization and diffusion schedule come from MODEL/config.json;
the weights are the EMA weights in MODEL/model.safetensors.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

from hyperforget.hyper.data import load_task_split
from hyperforget.hyper.denoise import build, check_config_version, resolve_zoo_path, sample_params
from hyperforget.hyper.diffusion import DiffusionConfig, GaussianDiffusion
from hyperforget.hyper.model import DiTConfig
from hyperforget.hyper.tokenizer import TokenizerConfig
from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.mlp import ClassMetrics, MLPSpec, evaluate_per_class, init_params
from hyperforget.zoo.seeds import SAMPLE_INIT_STRIDE

METHODS = ("ddim", "ddpm")


class Hypernetwork:
    """A trained DiHyFo-1 or DiHyFo-2, ready to sample.

    Attributes:
        variant: "dihyfo1" or "dihyfo2".
        spec: the MLP family it generates.
        classes: original class ids of the task (task label k = classes[k]).
        config: the full config.json dict.
    """

    def __init__(self, model_dir: str | Path, device: str | None = None):
        model_dir = Path(model_dir)
        cfg_path, weights = model_dir / "config.json", model_dir / "model.safetensors"
        if not cfg_path.exists() or not weights.exists():
            raise HyperForgetError(f"{model_dir} is not a trained hypernetwork (needs config.json and "
                                   "model.safetensors); train one with `hyperforget train`")
        self.config = json.loads(cfg_path.read_text())
        check_config_version(self.config, cfg_path)
        self.dir = model_dir
        self.variant: str = self.config["variant"]
        self.spec = MLPSpec.from_dict(self.config["mlp_spec"])
        self.classes: list[int] = list(self.config["classes"])
        self.device = torch.device(device or "cpu")
        self.model, self.tokenizer = build(self.variant, self.spec, self.config["normalization"],
                                           DiTConfig.from_dict(self.config["model"]),
                                           TokenizerConfig.from_dict(self.config["tokenizer"]),
                                           self.config.get("loss_stats"))
        try:
            state = load_file(str(weights))
        except Exception as exc:  # safetensors raises several types for damaged files
            raise HyperForgetError(f"cannot read {weights}: {exc}") from None
        missing = set(self.model.state_dict()) ^ set(state)
        if missing:
            raise HyperForgetError(f"{weights} does not match its config.json (differing tensors "
                                   f"{sorted(missing)[:3]}); the model directory is damaged")
        self.model.load_state_dict(state)
        self.model.to(self.device).eval()
        self.diffusion = GaussianDiffusion(DiffusionConfig.from_dict(self.config["diffusion"]))
        self._test: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def sampling(self) -> dict:
        """Recommended sampler settings from the preset: {"method", "steps", "guidance"}.

        "guidance" is None, one scale, or a list of scales that candidate rows cycle through.
        """
        return dict(self.config.get("sampling") or {"method": "ddim", "steps": 50, "guidance": None})

    def auto_guidance(self, k: int) -> torch.Tensor | None:
        """The recommended guidance for K rows: None, or (K,) scales (a list cycles over the rows)."""
        g = self.sampling.get("guidance")
        if g is None:
            return None
        scales = torch.as_tensor(np.atleast_1d(np.asarray(g, dtype=np.float32)))
        return scales[torch.arange(k) % len(scales)]

    @property
    def zoo(self) -> str | None:
        """The zoo it was trained on (config.json's path, relative to the model directory), or None."""
        return resolve_zoo_path(self.config.get("zoo"), self.dir)

    @property
    def loss_stats(self) -> dict:
        """Per-class loss quantiles of the training zoo ({"min", "q05", "q10", "q50", "q95", "max"} -> (C,))."""
        return self.config.get("loss_stats") or {}

    def test_split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_test (N, D), y_test (N,)) of the task the zoo was collected on."""
        if self._test is None:
            if not self.config.get("dataset"):
                raise HyperForgetError(f"{self.dir}/config.json names no dataset; pass the data explicitly")
            self._test = load_task_split(self.config["dataset"], "test")
        return self._test

    def evaluate(self, params: torch.Tensor | np.ndarray) -> ClassMetrics:
        """Per-class test loss/accuracy of (K, P) raw parameter vectors."""
        x, y = self.test_split()
        return evaluate_per_class(self.spec, params, x, y)

    def sample(self, target_losses, current_params=None, current_losses=None, *, method: str = "ddim",
               steps: int = 50, seed: int = 0, guidance="auto", eta: float = 0.0,
               progress=None) -> torch.Tensor:
        """Sample K parameter vectors.

        Args:
            target_losses: (K, C) or (C,) raw target class losses.
            current_params: DiHyFo-1 only: (K, P) or (P,) raw θ to start from; None starts from
                random initializations (seeded by ``seed``).
            current_losses: (K, C) class losses of ``current_params``; None measures them on the
                zoo's test split.
            method: "ddim" (``steps`` steps, ``eta``) or "ddpm" (all T steps, fixed variance).
            guidance: classifier-free guidance: "auto" (default) uses the preset's recommendation in
                ``self.sampling`` (for cpu-small DiHyFo-1, rows cycle through scales 4, 8, 16, 24 so a
                best-of-K selection sees all; DiHyFo-2 unguided); None or 1 turns it off; a number
                applies to all rows; a (K,) sequence gives one scale per row. Scales other than 1
                need a model trained with cond_dropout > 0.
        Returns:
            (K, P) float32 raw MLP parameters; deterministic for a seed.
        """
        if method not in METHODS:
            raise HyperForgetError(f"unknown sampling method {method!r}: choose ddim or ddpm")
        c, p = self.spec.num_classes, self.spec.num_params
        targets = torch.as_tensor(np.asarray(target_losses, dtype=np.float32))
        targets = targets[None] if targets.ndim == 1 else targets
        if targets.ndim != 2 or targets.shape[1] != c:
            raise HyperForgetError(f"target losses must be (K, {c}) (one per class), got {tuple(targets.shape)}")
        if not torch.isfinite(targets).all() or (targets < 0).any():
            raise HyperForgetError("target losses must be finite and ≥ 0")
        k = targets.shape[0]
        if isinstance(guidance, str):
            if guidance != "auto":
                raise HyperForgetError(f"guidance {guidance!r} is not a scale: give a number, one per row, "
                                       "None or 'auto'")
            guidance = self.auto_guidance(k)
        if guidance is not None:
            g = torch.as_tensor(np.asarray(guidance, dtype=np.float32))
            if g.ndim > 1 or (g.ndim == 1 and len(g) != k) or not torch.isfinite(g).all():
                raise HyperForgetError(f"guidance must be one finite scale or one per target row ({k}), "
                                       f"got shape {tuple(g.shape)}")
            if float(self.config["train"].get("cond_dropout", 0)) == 0 and not bool((g == 1).all()):
                raise HyperForgetError("guidance needs a model trained with cond_dropout > 0; drop --guidance")
            guidance = g
        cur = cur_l = None
        if self.variant == "dihyfo1":
            if current_params is None:
                cur = init_params(self.spec, [seed * SAMPLE_INIT_STRIDE + i for i in range(k)])
            else:
                cur = torch.as_tensor(np.asarray(current_params, dtype=np.float32))
                cur = cur[None] if cur.ndim == 1 else cur
                if cur.shape[-1] != p:
                    raise HyperForgetError(f"current parameters have {cur.shape[-1]} values, the MLP needs {p}")
                if cur.shape[0] == 1 and k > 1:
                    cur = cur.expand(k, -1)
                if cur.shape[0] != k:
                    raise HyperForgetError(f"{cur.shape[0]} current parameter vectors for {k} targets")
            if current_losses is None:
                cur_l = torch.as_tensor(self.evaluate(cur).loss)
            else:
                cur_l = torch.as_tensor(np.asarray(current_losses, dtype=np.float32))
                cur_l = cur_l[None].expand(k, -1) if cur_l.ndim == 1 else cur_l
                if tuple(cur_l.shape) != (k, c):
                    raise HyperForgetError(f"current losses must be ({k}, {c}), got {tuple(cur_l.shape)}")
        elif current_params is not None:
            raise HyperForgetError("DiHyFo-2 samples from target losses only; drop the current parameters")
        return sample_params(self.model, self.tokenizer, self.diffusion, targets, cur, cur_l, method=method,
                             steps=steps, eta=eta, seed=seed, guidance=guidance, device=self.device,
                             progress=progress)


def load_hypernetwork(model_dir: str | Path, device: str | None = None) -> Hypernetwork:
    """Rebuild a trained hypernetwork from MODEL/ (config.json + model.safetensors)."""
    return Hypernetwork(model_dir, device)
