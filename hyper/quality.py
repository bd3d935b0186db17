"""Generation quality: what single samples of a trained DiHyFo do against their prompts.

Two measurements, both on the test split of the zoo's task, with sampling seeds disjoint from
training (the trainer seeds from ``TrainConfig.seed``) and from unlearning's selection (seeds
from ``UnlearnConfig.seed``): every seed here is ``QUALITY_SEED_BASE + seed``.

1. **Alignment sweep** per non-pivot class k: ``targets`` target losses for class k evenly
   spaced over the zoo's [q05, q95] of that class, every other class held at a low loss
   (``hold``): by default "joint", the level of the zoo's best 1 % on the other classes together
   (hyper.data.retain_profiles), as unlearning's prompts ask; or a per-class quantile such as
   "q10", which few checkpoints reach on all classes at once; or "known_median", the median loss
   of the zoo's checkpoints that know every class,
   ``samples`` independent samples per target. Scores, pooled over all target × sample pairs:
       R² = 1 − Σ(L*_i − L̂_i)² / Σ(L*_i − mean L*)²      (Eq. 6 of the reference text)
       Pearson r between L* and L̂.
   DiHyFo-1 starts from a given model (``start``: the model to unlearn) or, without one, from
   fresh random initializations (one per sample), each with its measured class losses.
2. **Clean single-sample share** per forget set: ``samples`` samples prompted with the forget
   classes at their q95 loss and the others at the hold level (for "joint": the best 1 % on the
   classes outside the forget set); a sample is clean when every forget class
   has test accuracy ≤ ``forget_acc_max`` and every other class ≥ ``retain_acc_min``.

No selection happens here: every number is over all samples.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from hyperforget.hyper.alignment import pearson, prompt_alignment_r2
from hyperforget.hyper.data import retain_profile
from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.mlp import TASK_PRESETS, MLPSpec, init_params
from hyperforget.zoo.seeds import QUALITY_SEED_BASE

JOINT_HOLD_FRACTION = 0.01  # hold "joint": the zoo's best 1 % on the held classes together


@dataclass
class QualityConfig:
    """What the generation-quality measurement samples (stored in its JSON)."""

    targets: int = 8  # target losses per swept class, evenly spaced over [low_quantile, high_quantile]
    samples: int = 16  # samples per target (and per forget set for the clean share)
    low_quantile: str = "q05"  # lowest swept target: a zoo loss quantile name of the hypernetwork's loss_stats
    high_quantile: str = "q95"  # highest swept target
    hold: str = "joint"  # what the other classes are asked for: "joint" or a loss_stats name ("q10", "known_median")
    forget_sets: list | None = None  # forget sets for the clean share (task labels); None: the paper's for the task
    forget_acc_max: float = 0.02  # a clean sample's highest forget-class test accuracy
    retain_acc_min: float = 0.9  # a clean sample's lowest retain-class test accuracy
    method: str = "ddim"  # sampler
    steps: int = 50  # DDIM steps
    guidance: float | None = None  # classifier-free guidance scale (None: unguided)
    seed: int = 0  # offset of the sampling seeds (QUALITY_SEED_BASE + seed + ...)
    batch: int = 256  # samples per sampler call

    def __post_init__(self) -> None:
        if self.targets < 3 or self.samples < 1:
            raise HyperForgetError(f"need ≥ 3 targets and ≥ 1 sample per target, got {self.targets}, {self.samples}")
        if self.steps < 1:
            raise HyperForgetError(f"sampling steps must be ≥ 1, got {self.steps}")
        if not (0 <= self.forget_acc_max <= 1 and 0 <= self.retain_acc_min <= 1):
            raise HyperForgetError("forget_acc_max and retain_acc_min are accuracies in [0, 1]")


def paper_forget_sets(spec: MLPSpec, pivots: list[int]) -> list[list[int]]:
    """The forget sets the paper evaluates for the task a hypernetwork's MLPs solve ({2} and {2,3}
    for MNIST-4's four classes with pivots {0,1}), found by classes and pivots; none for another task."""
    for preset in TASK_PRESETS.values():
        if (preset.spec.num_classes, list(preset.pivots)) == (spec.num_classes, list(pivots)):
            return [list(f) for f in preset.forget_sets]
    return []


def _stat(net, name: str) -> np.ndarray:
    stats = net.loss_stats
    if name not in stats:
        raise HyperForgetError(f"{net.dir}/config.json has no loss quantile {name!r} (has {sorted(stats)}); "
                               "retrain the hypernetwork")
    return np.asarray(stats[name], dtype=np.float32)


def _hold(net, name: str, swept: list[int]) -> np.ndarray:
    """(C,) what the classes outside ``swept`` are asked for while ``swept`` is swept or forgotten."""
    if name == "joint":
        return retain_profile(net.loss_stats, swept, JOINT_HOLD_FRACTION).astype(np.float32)
    return _stat(net, name)


def _sample(net, targets: np.ndarray, start: torch.Tensor | None, cfg: QualityConfig, seed: int) -> torch.Tensor:
    """Sample len(targets) models in batches; DiHyFo-1 starts from ``start`` (P,) or fresh inits."""
    out = []
    for i0 in range(0, len(targets), cfg.batch):
        tg = targets[i0:i0 + cfg.batch]
        cur = None
        if net.variant == "dihyfo1":
            cur = (start[None].expand(len(tg), -1) if start is not None
                   else init_params(net.spec, [QUALITY_SEED_BASE + seed + i0 + i for i in range(len(tg))]))
        out.append(torch.as_tensor(net.sample(tg, cur, method=cfg.method, steps=cfg.steps, seed=seed + i0,
                                              guidance=cfg.guidance)))
    return torch.cat(out)


def _finite_metrics(net, params: torch.Tensor):
    """Test-split class losses/accuracies; NaN parameter rows count as loss 1e3, accuracy 0."""
    finite = torch.isfinite(params).all(1)
    m = net.evaluate(torch.where(finite[:, None], params, torch.zeros_like(params)))
    loss, acc = np.array(m.loss, dtype=np.float64), np.array(m.acc, dtype=np.float64)
    loss[~finite.numpy()], acc[~finite.numpy()] = 1e3, 0.0
    return np.nan_to_num(loss, nan=1e3, posinf=1e3), acc


def generation_quality(net, cfg: QualityConfig | None = None, start: torch.Tensor | None = None) -> dict:
    """Alignment per non-pivot class and clean single-sample share per forget set (module docstring).

    Args:
        net: a loaded hyper.sample.Hypernetwork.
        start: DiHyFo-1 only: (P,) raw parameters of the model to unlearn, or None for fresh inits.
    Returns a JSON-ready dict: {"config", "start", "classes": {k: {"r2", "pearson", "targets",
    "observed" (targets × samples), "median"}}, "forget_sets": {name: {"clean", "share", ...}}}.
    """
    cfg = cfg or QualityConfig()
    c = net.spec.num_classes
    if start is not None and net.variant != "dihyfo1":
        raise HyperForgetError("only DiHyFo-1 starts from a model; drop --start for DiHyFo-2")
    if start is not None:
        start = torch.as_tensor(start, dtype=torch.float32).reshape(-1)
        net.spec.layout.check(start)
    pivots = set(net.config.get("pivots") or [])
    chosen = cfg.forget_sets if cfg.forget_sets is not None else paper_forget_sets(net.spec, sorted(pivots))
    sets = [sorted(int(f) for f in forget) for forget in chosen]
    for forget in sets:
        if not forget or any(not 0 <= f < c for f in forget) or set(forget) & pivots or len(forget) >= c:
            raise HyperForgetError(f"forget set {forget} must name non-pivot classes of 0..{c - 1} and keep one "
                                   f"(pivots {sorted(pivots)}: the zoo never forgets them, so DiHyFo cannot)")
    hold_name = cfg.hold
    low, high = _stat(net, cfg.low_quantile), _stat(net, cfg.high_quantile)
    swept = [k for k in range(c) if k not in pivots]
    holds = {tuple(s): _hold(net, hold_name, s) for s in [[k] for k in swept] + sets}
    report: dict = {"config": asdict(cfg), "variant": net.variant, "model_dir": str(net.dir),
                    "hold": {"-".join(map(str, s)): h.tolist() for s, h in holds.items()}, "hold_name": hold_name,
                    "start": "model" if start is not None else ("noise" if net.variant == "dihyfo1" else None),
                    "classes": {}, "forget_sets": {}}
    for k in swept:
        levels = np.linspace(low[k], high[k], cfg.targets, dtype=np.float32)  # (T,)
        targets = np.repeat(holds[(k,)][None], cfg.targets * cfg.samples, 0)  # (T·S, C)
        targets[:, k] = np.repeat(levels, cfg.samples)
        params = _sample(net, targets, start, cfg, QUALITY_SEED_BASE + cfg.seed + 1000 * k)
        loss, _ = _finite_metrics(net, params)
        observed = loss[:, k].reshape(cfg.targets, cfg.samples)
        report["classes"][str(k)] = {
            "r2": prompt_alignment_r2(targets[:, k], loss[:, k]), "pearson": pearson(targets[:, k], loss[:, k]),
            "targets": levels.tolist(), "observed": observed.tolist(), "median": np.median(observed, 1).tolist()}
    for i, forget in enumerate(sets):
        retain = [j for j in range(c) if j not in forget]
        targets = np.repeat(holds[tuple(forget)][None], cfg.samples, 0)
        targets[:, forget] = high[forget]
        params = _sample(net, targets, start, cfg, QUALITY_SEED_BASE + cfg.seed + 100_000 + 1000 * i)
        _, acc = _finite_metrics(net, params)
        clean = (acc[:, forget].max(1) <= cfg.forget_acc_max) & (acc[:, retain].min(1) >= cfg.retain_acc_min)
        report["forget_sets"]["-".join(map(str, forget))] = {
            "forget": forget, "clean": int(clean.sum()), "samples": cfg.samples, "share": float(clean.mean()),
            "forget_acc_mean": float(acc[:, forget].mean()), "retain_acc_min_mean": float(acc[:, retain].min(1).mean())}
    return report


def plot_quality(report: dict, path: str | Path) -> None:
    """Observed vs target loss per swept class, every sample a dot, the identity line (Figure 2)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    classes = report["classes"]
    fig, axes = plt.subplots(1, max(1, len(classes)), figsize=(4.2 * max(1, len(classes)), 4), squeeze=False)
    for ax, (k, rec) in zip(axes[0], classes.items()):
        tg, ob = np.asarray(rec["targets"]), np.asarray(rec["observed"])
        ax.scatter(np.repeat(tg, ob.shape[1]), ob.reshape(-1), s=6, alpha=0.35, label="samples")
        ax.plot(tg, rec["median"], "o-", color="C1", label="median")
        lim = [0, float(max(tg.max(), np.percentile(ob, 98)) * 1.05)]
        ax.plot(lim, lim, "k--", lw=1, label="identity")
        ax.set_xlim(lim), ax.set_ylim(lim)
        ax.set_xlabel(f"target loss, class {k}"), ax.set_ylabel("obtained test loss")
        ax.set_title(f"class {k}: R² {rec['r2']:.2f}, r {rec['pearson']:.2f}")
        ax.legend(fontsize=7)
    fig.suptitle(f"{report['variant']} ({'start: ' + report['start'] if report['start'] else 'targets only'})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
