"""The rows a run directory gives: its methods (baselines topped up), nearest-checkpoint controls, setup time."""

from __future__ import annotations

from pathlib import Path

import torch

from hyperforget.pipelines.evaluate.config import EvalConfig, Population
from hyperforget.pipelines.evaluate.nearest import nearest_zoo_checkpoint, permutation_invariant_distance
from hyperforget.pipelines.rundir import DIHYFO_METHODS, load_method, method_dirs
from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.mlp import MLPSpec


def method_populations(run, forget, cfg: EvalConfig, log) -> tuple[list[Population], list[tuple[str, torch.Tensor]]]:
    """Rows of the methods in RUN/forget-X, and the selected DiHyFo models (for the nearest-checkpoint control)."""
    pops, selected = [], []
    for path in method_dirs(run, forget):
        name = path.name
        params, record = load_method(run, forget, name)
        secs = record.get("wall_seconds")
        if name in DIHYFO_METHODS or record.get("kind") in ("dihyfo", "retrieval"):
            cand_path = path / "candidates.safetensors"
            if cand_path.exists():
                cands = _load_candidates(cand_path, run.spec)
                finite = torch.isfinite(cands).all(1)
                what = "retrieved" if record.get("kind") == "retrieval" else "sampled"
                pops.append(Population(f"{name} (candidates)", "method", cands[finite], seconds_per_model=secs,
                                       note=f"{name}: all {int(finite.sum())} {what} candidates"))
            pops.append(Population(f"{name} (selected)", "method", params, seconds_per_model=secs,
                                   note=f"{name}: the selected model(s), chosen on the validation split"))
            selected.append((name, params[0]))
            continue
        if name == "logit_mask" or record.get("method") == "logit_mask":
            continue  # the evaluation builds its own exact logit-masking control
        params = _top_up_baseline(run, forget, name, params, record, cfg, log)
        pops.append(Population(name, "method", params, seconds_per_model=secs,
                               note=f"{name}: {params.shape[0]} runs with different seeds"))
    return pops, selected


def _load_candidates(path: Path, spec: MLPSpec) -> torch.Tensor:
    """(K, P) candidates as sampled. zoo.mlp.load_mlps rejects NaN rows, which a sampler may produce;
    those rows are dropped by the caller instead."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            params = f.get_tensor("params")
    except Exception as exc:  # safetensors raises several types for damaged files
        raise HyperForgetError(f"cannot read candidates {path}: {exc}; re-run the unlearning stage") from None
    spec.layout.check(params)
    return params.reshape(-1, spec.num_params).float()


def _top_up_baseline(run, forget, name, params, record, cfg: EvalConfig, log) -> torch.Tensor:
    if cfg.baseline_seeds == 0:
        return params  # keep the saved repeats as they are
    if params.shape[0] >= cfg.baseline_seeds:
        return params[:cfg.baseline_seeds]
    try:
        from hyperforget.pipelines.baselines import BASELINES, run_baseline
    except ImportError:
        log(f"hyperforget.pipelines.baselines is not available: {name} keeps its {params.shape[0]} saved model(s)")
        return params
    if name not in BASELINES:
        return params
    from hyperforget.zoo.mlp import MLP

    d = run.data()
    overrides = (record.get("hyperparameters") or {}).get("overrides") or {}
    base_seed = int((record.get("config") or {}).get("seed", 0)) + 10_000  # away from the saved repeats' seeds
    extra = []
    for i in range(cfg.baseline_seeds - params.shape[0]):
        module, _ = run_baseline(name, MLP.from_flat(run.spec, run.original_params()), d.x_fit, d.y_fit,
                                 list(forget), base_seed + i, **overrides)
        if not hasattr(module, "flat_params"):
            raise HyperForgetError(f"baseline {name} returned a {type(module).__name__} without flat_params(); "
                                   "it cannot be evaluated as an MLP")
        extra.append(torch.as_tensor(module.flat_params()).detach().float().reshape(-1))
    return torch.cat([params, torch.stack(extra)])


def nearest_controls(run, selected, cfg: EvalConfig, log) -> list[Population]:
    """A control row per selected DiHyFo model: the zoo checkpoint nearest to it (skipped, logged, without a zoo)."""
    zoo = run.config.zoo
    if not zoo:
        log("nearest training checkpoint: the run names no zoo, control skipped")
        return []
    pops = []
    for name, params in selected:
        try:
            near = nearest_zoo_checkpoint(zoo, run.spec, params, max_rows=cfg.max_zoo_rows)
        except (HyperForgetError, ImportError) as exc:
            log(f"nearest training checkpoint for {name}: zoo {zoo} unavailable ({exc}); control skipped")
            continue
        to_original = float(permutation_invariant_distance(run.spec, params, run.original_params()[None])[0])
        pops.append(Population(
            f"nearest zoo checkpoint ({name})", "control", near["params"],
            note=f"zoo checkpoint {near['checkpoint_id']} nearest to {name}'s selected model "
                 f"(permutation-invariant L2 {near['distance']:.3f}; that model is {to_original:.3f} "
                 f"from the original; "
                 f"{near['rows_scanned']} zoo rows scanned)",
            extra={"nearest": {"checkpoint_id": near["checkpoint_id"], "distance": near["distance"],
                               "selected_to_original": to_original, "rows_scanned": near["rows_scanned"]}}))
    return pops


def setup_seconds(run) -> dict:
    """Seconds spent on the zoo and on each hypernetwork: run.json timings, else the demo's demo.json.

    Keys naming "collect" or "zoo" count as zoo time; keys naming a DiHyFo variant as its
    hypernetwork's training time. Returns {"zoo": s or None, "train": {variant: s}, "sources": [...]}.
    """
    from hyperforget.zoo.files import read_json

    sources = [("run.json timings", run.meta.get("timings") or {})]
    demo = run.path.parent / "demo.json"
    if demo.exists():
        sources.append((str(demo) + " stages", (read_json(demo).get("stages") or {})))
    zoo, train, used = None, {}, []
    for label, timings in sources:
        for key, value in timings.items():
            k = key.lower()
            if any(w in k for w in ("retrain", "unlearn", "baseline", "report", "eval", "original")):
                continue
            if zoo is None and ("collect" in k or "zoo" in k):
                zoo = float(value)
                used.append(f"{label}: {key}")
            for variant in DIHYFO_METHODS:
                if variant in k and variant not in train:
                    train[variant] = float(value)
                    used.append(f"{label}: {key}")
    return {"zoo": zoo, "train": train, "sources": used}
