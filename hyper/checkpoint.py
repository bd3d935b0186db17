"""The trainer's resumable state: EMA weights, optimizer tensors and step-N checkpoint directories.

Everything is safetensors plus JSON (no pickle); a checkpoint directory is written under a temporary
name and renamed, then ``latest.json`` points at it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.files import jsonable, write_json


class EMA:
    """Exponential moving average of a model's floating-point state (params and buffers).

    The decay ramps up as min(decay, (1 + n) / (10 + n)) so early averages are not dominated
    by the random initialization.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay, self.num_updates = decay, 0
        self.shadow = {k: v.detach().clone().float() for k, v in model.state_dict().items()}

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.num_updates += 1
        d = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for k, v in model.state_dict().items():
            self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)


def _optimizer_tensors(opt: torch.optim.Optimizer) -> tuple[dict, dict]:
    sd = opt.state_dict()
    tensors = {f"state.{pid}.{k}": v.detach().cpu().contiguous() if torch.is_tensor(v) else torch.tensor(v)
               for pid, st in sd["state"].items() for k, v in st.items()}
    return tensors, {"param_groups": sd["param_groups"]}


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for key, v in tensors.items():
        _, pid, k = key.split(".", 2)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(out: Path, step: int, model: torch.nn.Module, ema: EMA, opt: torch.optim.Optimizer,
                    gen: torch.Generator, stream, epoch: int, curves: dict, keep: int = 2) -> None:
    root = out / "checkpoints"
    d = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
    save_file({k: v.contiguous() for k, v in ema.shadow.items()}, str(tmp / "ema.safetensors"))
    opt_t, opt_meta = _optimizer_tensors(opt)
    opt_t["rng.generator"] = gen.get_state()
    save_file(opt_t, str(tmp / "optimizer.safetensors"))
    state = {"step": step, "epoch": epoch, "ema_updates": ema.num_updates, "optimizer": opt_meta,
             "loader": stream.state_dict() if hasattr(stream, "state_dict") else None, "curves": curves}
    (tmp / "trainer.json").write_text(json.dumps(jsonable(state)))
    shutil.rmtree(d, ignore_errors=True)
    os.replace(tmp, d)
    write_json(root / "latest.json", {"step": step, "dir": d.name})
    for old in sorted(p for p in root.glob("step-*") if p.name != d.name)[:-max(0, keep - 1) or None]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(out: Path) -> dict | None:
    latest = out / "checkpoints" / "latest.json"
    if not latest.exists():
        return None
    info = json.loads(latest.read_text())
    d = out / "checkpoints" / info["dir"]
    if not (d / "trainer.json").exists():
        raise HyperForgetError(f"checkpoint {d} is incomplete; delete {out / 'checkpoints'} to start over")
    return {"dir": d, "state": json.loads((d / "trainer.json").read_text()),
            "model": load_file(str(d / "model.safetensors")), "ema": load_file(str(d / "ema.safetensors")),
            "optimizer": load_file(str(d / "optimizer.safetensors"))}

