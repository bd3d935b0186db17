"""Class unlearning runs: the run directory, prompts, sampling, selection, baselines and metrics.

A run directory (layout in docs/format.md, "Unlearning run directory") holds one model to
unlearn, the models retrained without each forget set (the gold standard) and, per forget set,
one folder per unlearning method. Every artifact stores the configuration that made it.

DiHyFo unlearning (paper, Section 3 and Appendix A.1):

1. Prompts: high loss on the forget classes, a loss near the best found in the zoo on the retain
   classes (:func:`build_prompts`; the options are those the paper and G.pt discuss).
2. Sample K candidate parameter vectors in one batch with the hypernetwork; DiHyFo-1 starts from
   the model to unlearn (its parameters and per-class losses) or from noise.
3. Evaluate every candidate on a validation split carved from the training split (never the
   test split) and keep the one with the lowest forget accuracy, then the highest retain accuracy
   (:func:`select_best`).
4. Save the selected vector exactly as sampled: selection chooses, nothing edits, clips or
   fine-tunes it afterwards (record.json keeps its SHA-256 to show it).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from hyperforget.hyper.data import loss_quantile, loss_statistics
from hyperforget.pipelines.retrieval import unlearn_by_retrieval
from hyperforget.zoo.errors import HyperForgetError, from_settings
from hyperforget.zoo.files import jsonable, read_json, write_json
from hyperforget.zoo.mlp import MLP, MLPSpec, evaluate_per_class, get_preset, load_mlps, model_logits, save_mlps
from hyperforget.zoo.seeds import retraining_seeds

RUN_FORMAT = "hyperforget-run"
RUN_VERSION = 1
DIHYFO_METHODS = ("dihyfo1", "dihyfo2")
RETRIEVAL_METHOD = "zoo_retrieval"  # the zoo's own answer, chosen by SQL (pipelines/retrieval.py)


# ----------------------------------------------------------------------------------------------
# Small helpers shared by the pipeline modules.


def parse_classes(text: str | Sequence[int]) -> tuple[int, ...]:
    """'2,3' or [2, 3] -> (2, 3), sorted; a label given twice is refused."""
    if isinstance(text, str):
        parts = [p.strip() for p in text.replace(" ", ",").split(",") if p.strip()]
        try:
            values = [int(p) for p in parts]
        except ValueError:
            raise HyperForgetError(f"forget set {text!r} is not a comma-separated list of class labels, "
                                   "e.g. --forget 2,3") from None
    else:
        values = [int(v) for v in text]
    if not values:
        raise HyperForgetError("empty forget set: give at least one class label, e.g. --forget 2")
    twice = sorted({v for v in values if values.count(v) > 1})
    if twice:
        raise HyperForgetError(f"forget set {text!r} names class {', '.join(map(str, twice))} more than once; "
                               f"give each label once, e.g. --forget {','.join(map(str, sorted(set(values))))}")
    return tuple(sorted(values))


def forget_dir_name(forget: Sequence[int]) -> str:
    """(2, 3) -> 'forget-2-3'."""
    return "forget-" + "-".join(str(int(c)) for c in sorted(forget))


def params_sha256(params: torch.Tensor | np.ndarray) -> str:
    """SHA-256 of a float32 parameter vector's bytes: proves a saved model is the sampled one."""
    return hashlib.sha256(np.ascontiguousarray(np.asarray(params, dtype=np.float32)).tobytes()).hexdigest()


def carve_validation(y: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split of training indices into (fit, validation).

    Args:
        y: (N,) labels. fraction: share of each class moved to validation (at least one example
        per class when the class has two or more). seed: permutation seed.
    Returns:
        fit_idx (N - V,), val_idx (V,), both sorted int64.
    """
    if not 0.0 < fraction < 1.0:
        raise HyperForgetError(f"validation fraction must lie in (0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    val = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        k = int(round(len(members) * fraction))
        k = min(max(k, 1 if len(members) > 1 else 0), len(members) - 1)
        val.append(rng.permutation(members)[:k])
    val_idx = np.sort(np.concatenate(val)).astype(np.int64) if val else np.zeros(0, np.int64)
    is_val = np.zeros(len(y), dtype=bool)
    is_val[val_idx] = True
    return np.flatnonzero(~is_val).astype(np.int64), val_idx


# ----------------------------------------------------------------------------------------------
# The run directory.


@dataclass
class RunConfig:
    """What a run unlearns from: the task, its data, the original model and the retrained models."""

    preset: str = "mnist4"  # task preset (zoo.mlp.TASK_PRESETS); a zoo's own spec/classes/pivots win
    dataset: str = "mnist-5k"  # dataset name for zoo.datasets.load_dataset
    data_root: str | None = None  # directory of IDX files for datasets that need one
    scaling: str = "unit"  # pixel scaling, the zoo's when a zoo is given
    zoo: str | None = None  # zoo the hypernetworks learned from (prompt statistics); None without DiHyFo
    models: dict = field(default_factory=dict)  # DiHyFo variant -> hypernetwork directory
    seed: int = 0  # seed of the original model
    epochs: int | None = None  # training epochs of the original and retrained models (None: the preset's)
    lr: float = 0.1  # SGD learning rate, as in the zoo's runs
    batch_size: int = 128  # minibatch size
    val_fraction: float = 0.1  # share of the training split held out for selecting candidates
    val_seed: int = 0  # seed of that split
    retrain_seeds: tuple[int, ...] = retraining_seeds(5)  # seeds of the retrained models
    # A 784-2-4 ReLU net trained from scratch loses a class to a dead hidden unit in about one seed
    # of five: such a failed training is no gold standard. Models whose validation accuracy (retain
    # classes) is more than failure_margin below the best seed's are replaced by spare seeds.
    failure_margin: float | None = 0.1  # None keeps every seed
    spare_seeds: int = 5  # extra seeds trained (in the same lockstep pass) to replace failed ones

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        d = dict(d)
        if "retrain_seeds" in d:
            d["retrain_seeds"] = tuple(int(s) for s in d["retrain_seeds"])
        return from_settings(cls, d, "run")


@dataclass
class RunData:
    """The run's splits as tensors (labels are task labels 0..C-1)."""

    x_fit: torch.Tensor  # (N_fit, D) training split minus validation: what models train on
    y_fit: torch.Tensor  # (N_fit,)
    x_val: torch.Tensor  # (N_val, D) validation split: candidate selection only
    y_val: torch.Tensor  # (N_val,)
    x_test: torch.Tensor  # (N_test, D) the dataset's test split: metrics and the zoo's losses
    y_test: torch.Tensor  # (N_test,)


def zoo_task(zoo_path: str) -> dict:
    """What a zoo says about its task: spec, classes, pivots, dataset name and scaling, preset."""
    from hyperforget.zoo.store import open_zoo

    cfg = open_zoo(zoo_path).config
    ds = dict(cfg.dataset or {})
    collection = dict(cfg.collection or {})
    return {"spec": cfg.spec, "classes": tuple(int(c) for c in cfg.classes),
            "pivots": tuple(int(p) for p in cfg.pivots), "dataset": ds.get("name"),
            "data_root": ds.get("root"), "scaling": ds.get("scaling", "unit"),
            "preset": collection.get("preset") or (collection.get("config") or {}).get("preset")}


def zoo_identity(zoo_path: str) -> str:
    """A content hash naming a zoo wherever it lies: its creation time, MLP, task and dataset.

    Copies and moves of a zoo share it; normalizing or growing a zoo keeps it; two zoos collected
    separately differ in ``created_at`` (or settings).
    """
    from hyperforget.zoo.store import open_zoo

    cfg = open_zoo(zoo_path).config
    collection = json.loads(json.dumps(cfg.collection or {}))
    (collection.get("config") or {}).pop("runs", None)  # a collection may be grown by more runs
    key = {"created_at": cfg.created_at, "mlp": cfg.spec.to_dict(), "classes": list(cfg.classes),
           "pivots": list(cfg.pivots), "dataset": cfg.dataset, "collection": collection}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


# run.json "paths": how the config's paths are stored. "run-relative": relative to the run
# directory (so a moved run, or one used from another working directory, still finds them),
# with the absolute path at recording time in "locations" for a run copied away on its own.
PATHS_RELATIVE = "run-relative"
_PATH_FIELDS = ("zoo", "data_root")


def _is_url(p: str) -> bool:
    return "://" in p


def _stored(p: str | None, run_dir: Path) -> str | None:
    """A path as run.json stores it: relative to the run directory (URLs as given)."""
    if p is None or _is_url(str(p)):
        return p
    return os.path.relpath(os.path.abspath(p), os.path.abspath(run_dir))


def _resolved(stored: str | None, fallback: str | None, run_dir: Path) -> str | None:
    """A stored path as a usable one: next to the run if it is there, else where it was recorded."""
    if stored is None or _is_url(stored) or os.path.isabs(stored):
        return stored
    here = os.path.normpath(os.path.join(os.path.abspath(run_dir), stored))
    if not os.path.exists(here) and fallback and os.path.exists(fallback):
        return fallback
    return here


def _record_paths(config: dict, run_dir: Path, locations: dict) -> dict:
    """config (asdict(RunConfig)) with run-relative paths; absolute ones noted in ``locations``."""
    out = dict(config)
    for name in _PATH_FIELDS:
        if out.get(name) is not None and not _is_url(str(out[name])):
            locations[name] = os.path.abspath(out[name])
            out[name] = _stored(out[name], run_dir)
    models = {}
    for variant, d in (out.get("models") or {}).items():
        locations[f"models/{variant}"] = os.path.abspath(d)
        models[variant] = _stored(str(d), run_dir)
    out["models"] = models
    return out


class Run:
    """An unlearning run directory: run.json, the original model, one folder per forget set."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta = read_json(self.path / "run.json")
        if meta.get("format") != RUN_FORMAT:
            raise HyperForgetError(f"{self.path}/run.json is not a hyperforget run (format {meta.get('format')!r})")
        if meta.get("version") != RUN_VERSION:
            raise HyperForgetError(f"{self.path}/run.json has version {meta.get('version')}, expected {RUN_VERSION}")
        self.meta = meta
        self.config = self._config_of(meta)
        self.spec = MLPSpec.from_dict(meta["spec"])
        self.classes = tuple(meta["classes"])
        self.pivots = tuple(meta["pivots"])
        self._data: RunData | None = None

    def _config_of(self, meta: dict) -> RunConfig:
        """The run's config with its paths usable from here (see PATHS_RELATIVE)."""
        config = RunConfig.from_dict(meta["config"])
        if meta.get("paths") != PATHS_RELATIVE:
            return config  # paths recorded as given, relative to the working directory of the time
        loc = meta.get("locations") or {}
        config.zoo = _resolved(config.zoo, loc.get("zoo"), self.path)
        config.data_root = _resolved(config.data_root, loc.get("data_root"), self.path)
        config.models = {v: _resolved(d, loc.get(f"models/{v}"), self.path) for v, d in (config.models or {}).items()}
        return config

    @property
    def num_classes(self) -> int:
        return self.spec.num_classes

    def data(self) -> RunData:
        if self._data is None:
            from hyperforget.zoo.datasets import load_dataset

            c = self.config
            ds = load_dataset(c.dataset, root=c.data_root, classes=self.classes, scaling=c.scaling)
            if ds.input_size != self.spec.input_size:
                raise HyperForgetError(f"dataset {c.dataset!r} has {ds.input_size} features, the run's MLP "
                                       f"expects {self.spec.input_size}")
            fit, val = carve_validation(ds.y_train, c.val_fraction, c.val_seed)
            t = lambda a, dt=torch.float32: torch.as_tensor(np.ascontiguousarray(a), dtype=dt)  # noqa: E731
            self._data = RunData(t(ds.x_train[fit]), t(ds.y_train[fit], torch.long), t(ds.x_train[val]),
                                 t(ds.y_train[val], torch.long), t(ds.x_test), t(ds.y_test, torch.long))
        return self._data

    def check_forget(self, forget: Sequence[int], *, dihyfo: bool = False) -> tuple[int, ...]:
        """Validate a forget set of task labels; DiHyFo cannot forget pivots."""
        forget = parse_classes(forget)
        bad = [c for c in forget if not 0 <= c < self.num_classes]
        if bad:
            raise HyperForgetError(f"forget classes {bad} are not in the task: use labels 0..{self.num_classes - 1} "
                                   f"(task classes {list(self.classes)})")
        if len(forget) == self.num_classes:
            raise HyperForgetError("the forget set holds every class: keep at least one class to retain")
        pivots = sorted(set(forget) & set(self.pivots))
        if dihyfo and pivots:
            allowed = [c for c in range(self.num_classes) if c not in self.pivots]
            raise HyperForgetError(f"classes {pivots} are pivots of the zoo, which DiHyFo cannot forget by design: "
                                   f"choose among {allowed}")
        return forget

    def forget_dir(self, forget: Sequence[int]) -> Path:
        return self.path / forget_dir_name(forget)

    def original_params(self) -> torch.Tensor:
        """(P,) the model to unlearn."""
        spec, params, _ = load_mlps(str(self.path / "original" / "model.safetensors"))
        if spec != self.spec:
            raise HyperForgetError(f"original model spec {spec} differs from the run's {self.spec}")
        return params[0]

    def note(self, forget: Sequence[int] | None = None, timing: tuple[str, float] | None = None,
             model: tuple[str, str] | None = None) -> None:
        """Record a forget set, a timing or a hypernetwork in run.json (re-read first: stages append)."""
        meta = read_json(self.path / "run.json")
        if forget is not None:
            sets = [list(s) for s in meta.setdefault("forget_sets", [])]
            if list(forget) not in sets:
                sets.append(list(forget))
            meta["forget_sets"] = sorted(sets, key=lambda s: (len(s), s))
        if timing is not None:
            meta.setdefault("timings", {})[timing[0]] = round(float(timing[1]), 4)
        if model is not None:
            stored = _stored(model[1], self.path) if meta.get("paths") == PATHS_RELATIVE else model[1]
            meta["config"].setdefault("models", {})[model[0]] = stored
            if meta.get("paths") == PATHS_RELATIVE:
                meta.setdefault("locations", {})[f"models/{model[0]}"] = os.path.abspath(model[1])
        write_json(self.path / "run.json", meta)
        self.meta = meta
        self.config = self._config_of(meta)

    @property
    def forget_sets(self) -> list[tuple[int, ...]]:
        return [tuple(s) for s in self.meta.get("forget_sets", [])]


def create_run(path: str | os.PathLike, config: RunConfig, *, forget_sets: Iterable[Sequence[int]] = ()) -> Run:
    """Create (or reopen) a run directory, without training anything (pipelines.retrain.init_run
    also trains its original model).

    A run that exists keeps its own configuration (the same directory must not mix tasks);
    a conflicting spec or dataset raises HyperForgetError.
    """
    path = Path(path)
    run_json = path / "run.json"
    if run_json.exists():
        run = Run(path)
        if config.zoo and (run.config.zoo or run.meta.get("zoo_identity")):
            _check_same_zoo(run, config.zoo)
        if config.zoo and (not run.config.zoo or not os.path.exists(run.config.zoo)):
            # A run that had no zoo, or whose zoo moved: record the one given (the same zoo, checked above).
            meta = read_json(run_json)
            if meta.get("paths") == PATHS_RELATIVE:
                meta["config"]["zoo"] = _stored(config.zoo, path)
                if not _is_url(config.zoo):
                    meta.setdefault("locations", {})["zoo"] = os.path.abspath(config.zoo)
            else:
                meta["config"]["zoo"] = config.zoo
            meta["zoo_identity"] = zoo_identity(config.zoo)
            write_json(run_json, meta)
            run = Run(path)
        for variant, model_dir in (config.models or {}).items():
            run.note(model=(variant, str(model_dir)))
    else:
        # Set up: the task comes from the zoo when there is one (the hypernetwork learned that task).
        preset = get_preset(config.preset)
        spec, classes, pivots = preset.spec, preset.classes, preset.pivots
        if config.zoo:
            task = zoo_task(config.zoo)
            spec, classes, pivots = task["spec"], task["classes"], task["pivots"]
            config.dataset = task["dataset"] or config.dataset
            config.data_root = task["data_root"] if task["data_root"] is not None else config.data_root
            config.scaling = task["scaling"] or config.scaling
            config.preset = task["preset"] or config.preset
        from hyperforget.zoo.datasets import load_dataset

        ds = load_dataset(config.dataset, root=config.data_root, classes=classes, scaling=config.scaling)
        if not config.zoo and ds.input_size != spec.input_size:
            spec = preset.with_input_size(ds.input_size).spec
        if config.epochs is None:
            config.epochs = preset.epochs
        path.mkdir(parents=True, exist_ok=True)
        locations: dict = {}
        stored = _record_paths(asdict(config), path, locations)
        write_json(run_json, {"format": RUN_FORMAT, "version": RUN_VERSION, "paths": PATHS_RELATIVE,
                              "config": stored, "locations": locations,
                              "zoo_identity": zoo_identity(config.zoo) if config.zoo else None,
                              "spec": spec.to_dict(), "classes": list(classes), "pivots": list(pivots),
                              "dataset": ds.describe(), "forget_sets": [], "timings": {}})
        run = Run(path)
    for forget in forget_sets:
        run.note(forget=run.check_forget(forget))
    return run


def _check_same_zoo(run: Run, zoo: str) -> None:
    """The zoo given for an existing run must be the run's own (by content, wherever it lies)."""
    recorded = run.meta.get("zoo_identity")
    if recorded is None and run.config.zoo and os.path.exists(run.config.zoo):
        recorded = zoo_identity(run.config.zoo)
    if recorded is None:
        # The run's zoo is gone and its identity unknown: only the path can tell.
        if os.path.abspath(zoo) != os.path.abspath(run.config.zoo or zoo):
            raise HyperForgetError(f"run {run.path} was made with zoo {run.config.zoo}, which is not there, and "
                                   f"cannot be matched with {zoo}: use another --run directory")
        return
    if zoo_identity(zoo) != recorded:
        raise HyperForgetError(f"run {run.path} was made with zoo {run.config.zoo}, a different zoo from {zoo} "
                               "(another collection): use another --run directory or that zoo")


def open_run(path: str | os.PathLike) -> Run:
    if not (Path(path) / "run.json").exists():
        raise HyperForgetError(f"{path} is not a run directory (no run.json): create it with "
                               "`hyperforget unlearn ... --run DIR --zoo ZOO` or `hyperforget demo`")
    return Run(path)


# ----------------------------------------------------------------------------------------------
# Prompts.


@dataclass
class PromptConfig:
    """How target losses are chosen from the zoo's per-class test losses (the hypernetwork's units)."""

    forget_mode: str = "quantile"  # "quantile": spread over forget_quantiles; "max": highest seen; "fixed": forget_value
    forget_quantiles: tuple[float, float] = (0.9, 0.995)  # low/high quantile of each forget class's zoo loss
    forget_value: float = 5.0  # target loss on forget classes for "fixed"
    retain_mode: str = "quantile"  # "quantile": spread over retain_quantiles; "min": best seen; "fixed": retain_value
    retain_quantiles: tuple[float, float] = (0.0, 0.05)  # low/high quantile of each retain class's zoo loss
    retain_value: float = 0.05  # target loss on retain classes for "fixed"
    retain_scale: float = 1.0  # multiplies retain targets: slightly below (<1) or above (>1) the best (G.pt)
    seed: int = 0  # decorrelates retain levels from forget levels across candidates

    def __post_init__(self) -> None:
        if self.forget_mode not in ("quantile", "max", "fixed"):
            raise HyperForgetError(f"unknown forget prompt mode {self.forget_mode!r}: use quantile, max or fixed")
        if self.retain_mode not in ("quantile", "min", "fixed"):
            raise HyperForgetError(f"unknown retain prompt mode {self.retain_mode!r}: use quantile, min or fixed")
        for name in ("forget_quantiles", "retain_quantiles"):
            lo, hi = getattr(self, name)
            if not 0.0 <= lo <= hi <= 1.0:
                raise HyperForgetError(f"{name} must satisfy 0 <= low <= high <= 1, got {(lo, hi)}")
            setattr(self, name, (float(lo), float(hi)))
        if self.retain_scale <= 0:
            raise HyperForgetError(f"retain_scale must be positive, got {self.retain_scale}")


class LossStats:
    """Per-class loss quantiles that prompts are built from: the statistics a hypernetwork saved
    (hyper.data.loss_statistics over its zoo), or those of an (N, C) array of losses."""

    def __init__(self, stats: dict):
        self.stats = stats
        self.num_classes = len(stats["max"])

    @classmethod
    def of_losses(cls, losses: np.ndarray) -> "LossStats":
        return cls(loss_statistics(losses))

    def quantile(self, q: float) -> np.ndarray:
        """(C,) per-class q-quantile."""
        return loss_quantile(self.stats, q)

    def summary(self) -> dict:
        return {"rows": self.stats.get("rows"), "min": self.quantile(0.0), "q05": self.quantile(0.05),
                "median": self.quantile(0.5), "q95": self.quantile(0.95), "max": self.quantile(1.0)}


def build_prompts(stats: "LossStats | np.ndarray", forget: Sequence[int], n: int,
                  options: PromptConfig | None = None) -> np.ndarray:
    """Target per-class losses for n candidates: high on forget classes, near the best on the rest.

    Args:
        stats: LossStats (a hypernetwork's saved statistics) or an (N, C) array of zoo losses.
        forget: task labels to forget. n: number of prompts.
    Returns:
        (n, C) float32 targets. With quantile modes the n candidates spread evenly over the
        quantile range (the paper prompts "different high losses values"); retain levels follow a
        seeded permutation so that each candidate pairs a different forget and retain level.
    """
    options = options or PromptConfig()
    if not isinstance(stats, LossStats):
        stats = LossStats.of_losses(stats)
    c = stats.num_classes
    forget = list(forget)
    if any(not 0 <= k < c for k in forget):
        raise HyperForgetError(f"forget classes {forget} are outside the zoo's labels 0..{c - 1}")
    if n < 1:
        raise HyperForgetError(f"need at least one prompt, got n={n}")
    retain = [k for k in range(c) if k not in forget]
    pos = np.linspace(0.0, 1.0, n) if n > 1 else np.array([0.5])  # (n,)
    retain_pos = np.random.default_rng(options.seed).permutation(pos)

    def spread(quantiles: tuple[float, float], where: np.ndarray) -> np.ndarray:
        lo, hi = stats.quantile(quantiles[0]), stats.quantile(quantiles[1])  # (C,)
        return lo[None, :] + where[:, None] * (hi - lo)[None, :]  # (n, C)

    out = np.zeros((n, c), dtype=np.float64)
    if options.forget_mode == "quantile":
        out[:, forget] = spread(options.forget_quantiles, pos)[:, forget]
    elif options.forget_mode == "max":
        out[:, forget] = stats.quantile(1.0)[forget]
    else:
        out[:, forget] = options.forget_value
    if options.retain_mode == "quantile":
        out[:, retain] = spread(options.retain_quantiles, retain_pos)[:, retain]
    elif options.retain_mode == "min":
        out[:, retain] = stats.quantile(0.0)[retain]
    else:
        out[:, retain] = options.retain_value
    out[:, retain] *= options.retain_scale
    return out.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Selection (Appendix A.1).


def select_best(forget_acc: np.ndarray, retain_acc: np.ndarray, tolerance: float = 0.0) -> int:
    """Index of the best candidate: lowest forget accuracy, then highest retain accuracy.

    Args:
        forget_acc, retain_acc: (K,) mean per-class accuracies on the validation split.
        tolerance: candidates whose forget accuracy is within this of the lowest count as tied
            (0 = the paper's strict rule). Remaining ties go to the lowest index.
    """
    forget_acc = np.asarray(forget_acc, dtype=np.float64)
    retain_acc = np.asarray(retain_acc, dtype=np.float64)
    if forget_acc.shape != retain_acc.shape or forget_acc.ndim != 1 or len(forget_acc) == 0:
        raise HyperForgetError(f"selection needs two (K,) arrays, got {forget_acc.shape} and {retain_acc.shape}")
    f = np.where(np.isfinite(forget_acc), forget_acc, np.inf)
    r = np.where(np.isfinite(retain_acc), retain_acc, -np.inf)
    tied = np.flatnonzero(f <= f.min() + tolerance)
    return int(tied[np.argmax(r[tied])])  # argmax returns the first maximum


def split_accuracy(acc: np.ndarray, forget: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """(M, C) per-class accuracy -> (M,) mean over forget classes, (M,) mean over retain classes."""
    acc = np.asarray(acc, dtype=np.float64)
    retain = [k for k in range(acc.shape[1]) if k not in set(forget)]
    return np.nanmean(acc[:, list(forget)], axis=1), np.nanmean(acc[:, retain], axis=1)


# ----------------------------------------------------------------------------------------------
# Unlearning.


@dataclass
class UnlearnConfig:
    """How one unlearning method is applied to the run's original model."""

    method: str = "dihyfo1"  # dihyfo1, dihyfo2, zoo_retrieval or a name in pipelines.baselines.BASELINES
    candidates: int = 32  # K candidates sampled per selected model (DiHyFo)
    repeats: int = 5  # selected models per method (the paper averages 5 sampled unlearned models)
    start: str = "model"  # DiHyFo-1 starting point: "model" (the model to unlearn) or "noise"
    guidance: str | float | list | None = "auto"  # classifier-free guidance: "auto" (the model's default), None, scale(s)
    sampler: str = "ddim"  # sampling method of the hypernetwork
    steps: int = 50  # denoising steps
    sample_batch: int = 64  # candidates per sampler call (bounds memory)
    seed: int = 0  # sampling / baseline seed
    tolerance: float = 0.0  # forget-accuracy tie tolerance in selection (0 = strict, Appendix A.1)
    prompts: PromptConfig = field(default_factory=PromptConfig)  # target losses
    overrides: dict = field(default_factory=dict)  # baseline hyper-parameters that replace defaults

    def __post_init__(self) -> None:
        if isinstance(self.prompts, dict):
            self.prompts = PromptConfig(**self.prompts)
        if self.candidates < 1 or self.repeats < 1:
            raise HyperForgetError(f"candidates and repeats must be >= 1, got {self.candidates}, {self.repeats}")
        if self.start not in ("model", "noise"):
            raise HyperForgetError(f"unknown DiHyFo-1 start {self.start!r}: use model or noise")
        if isinstance(self.guidance, str) and self.guidance != "auto":
            raise HyperForgetError(f"guidance {self.guidance!r}: use 'auto', None, a scale or a list of scales")
        if isinstance(self.guidance, (list, tuple)) and not self.guidance:
            raise HyperForgetError("guidance lists need at least one scale")


def _row_guidance(guidance, rows: slice):
    """The guidance for one sampler call: a list gives scales cycled over all candidate rows."""
    if isinstance(guidance, (list, tuple)):
        return [float(guidance[i % len(guidance)]) for i in range(rows.start, rows.stop)]
    return guidance


def _progress():
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                    TimeElapsedColumn(), transient=True)


def unlearn(run: Run, forget: Sequence[int], config: UnlearnConfig, *, model_dir: str | None = None,
            out: str | os.PathLike | None = None) -> dict:
    """Apply one method to the run's original model and save it under RUN/forget-X/METHOD (or out).

    Returns the method's record (also written to record.json).
    """
    method = config.method
    forget = run.check_forget(forget, dihyfo=method in DIHYFO_METHODS or model_dir is not None)
    run.note(forget=forget)
    out_dir = Path(out) if out is not None else run.forget_dir(forget) / method
    if method in DIHYFO_METHODS or model_dir is not None:
        record = _unlearn_dihyfo(run, forget, config, model_dir, out_dir)
    elif method == RETRIEVAL_METHOD:
        record = unlearn_by_retrieval(run, forget, config, out_dir, select_best=select_best,
                                      split_accuracy=split_accuracy, write_json=write_json,
                                      params_sha256=params_sha256)
    else:
        record = _unlearn_baseline(run, forget, config, out_dir)
    return record


def eval_split(run: Run, params: torch.Tensor, split: str):
    d = run.data()
    x, y = {"val": (d.x_val, d.y_val), "test": (d.x_test, d.y_test), "fit": (d.x_fit, d.y_fit)}[split]
    return evaluate_per_class(run.spec, params, x, y)


def _unlearn_dihyfo(run: Run, forget: tuple[int, ...], config: UnlearnConfig, model_dir: str | None,
                    out_dir: Path) -> dict:
    from hyperforget.hyper.sample import load_hypernetwork

    t_start = time.perf_counter()
    if model_dir is None:
        model_dir = run.config.models.get(config.method)
        if model_dir is None:
            raise HyperForgetError(f"run {run.path} has no {config.method} hypernetwork: pass --model MODEL_DIR")
    net = load_hypernetwork(str(model_dir))
    variant = str(net.variant)
    if config.method in DIHYFO_METHODS and variant != config.method:
        raise HyperForgetError(f"{model_dir} holds a {variant} hypernetwork, not {config.method}: "
                               f"pass --method {variant} or the other model directory")
    config.method = variant
    if net.spec != run.spec:
        raise HyperForgetError(f"hypernetwork {model_dir} makes {net.spec} MLPs, the run needs {run.spec}: "
                               "use a run made from the same zoo")
    if out_dir == run.forget_dir(forget) / "dihyfo" or out_dir.name in DIHYFO_METHODS:
        out_dir = out_dir.parent / variant
    run.note(model=(variant, str(model_dir)))
    t_load = time.perf_counter() - t_start

    # Prompts from the loss statistics the hypernetwork saved of its zoo (per-class test losses).
    t0 = time.perf_counter()
    stats = LossStats(net.loss_stats)
    prompts = build_prompts(stats, forget, config.candidates, config.prompts)  # (K, C)
    t_prompts = time.perf_counter() - t0

    k, r = config.candidates, config.repeats
    targets = torch.as_tensor(np.tile(prompts, (r, 1)))  # (R*K, C)
    original = run.original_params()  # (P,)
    current_params = current_losses = None
    original_test = eval_split(run, original[None], "test")
    if variant == "dihyfo1" and config.start == "model":
        current_params = original[None].expand(r * k, -1).contiguous()  # (R*K, P)
        current_losses = torch.as_tensor(original_test.loss).expand(r * k, -1).contiguous()  # (R*K, C)

    # Sample all candidates in a few batched calls.
    t0 = time.perf_counter()
    chunks = []
    with _progress() as progress:
        task = progress.add_task(f"sampling {variant} {forget_dir_name(forget)}", total=r * k)
        for i0 in range(0, r * k, config.sample_batch):
            sl = slice(i0, min(i0 + config.sample_batch, r * k))
            chunk = net.sample(targets[sl], None if current_params is None else current_params[sl],
                               None if current_losses is None else current_losses[sl],
                               method=config.sampler, steps=config.steps, seed=config.seed + i0,
                               guidance=_row_guidance(config.guidance, sl))
            chunks.append(torch.as_tensor(chunk, dtype=torch.float32).detach().cpu())
            progress.advance(task, sl.stop - sl.start)
    candidates = torch.cat(chunks)  # (R*K, P)
    t_sample = time.perf_counter() - t0
    if candidates.shape != (r * k, run.spec.num_params):
        raise HyperForgetError(f"the sampler returned shape {tuple(candidates.shape)}, expected {(r * k, run.spec.num_params)}")

    # Select on the validation split; the test losses only feed the report's alignment figure.
    t0 = time.perf_counter()
    finite = torch.isfinite(candidates).all(1)
    safe = torch.where(finite[:, None], candidates, torch.zeros_like(candidates))
    val = eval_split(run, safe, "val")
    f_acc, r_acc = split_accuracy(val.acc, forget)
    f_acc[~finite.numpy()] = np.nan
    r_acc[~finite.numpy()] = np.nan
    chosen = [g * k + select_best(f_acc[g * k:(g + 1) * k], r_acc[g * k:(g + 1) * k], config.tolerance)
              for g in range(r)]
    t_select = time.perf_counter() - t0
    selected = candidates[chosen]  # (R, P), exactly as sampled
    if not torch.isfinite(selected).all():
        raise HyperForgetError(f"every {variant} candidate in a group had NaN parameters; retrain the hypernetwork")
    test = eval_split(run, safe, "test")
    wall = t_load + t_prompts + t_sample + t_select

    out_dir.mkdir(parents=True, exist_ok=True)
    save_mlps(str(out_dir / "model.safetensors"), run.spec, selected, {"method": variant, "forget": list(forget)})
    save_mlps(str(out_dir / "candidates.safetensors"), run.spec, candidates, {"method": variant, "forget": list(forget)})
    record = {
        "method": variant, "kind": "dihyfo", "forget": list(forget),
        "retain": [c for c in range(run.num_classes) if c not in forget],
        "model_dir": str(model_dir), "zoo": run.config.zoo, "config": asdict(config),
        "prompts": prompts, "zoo_loss_stats": stats.summary(),
        "original_test_loss": original_test.loss[0],
        "candidates": {"val_acc": val.acc, "val_loss": val.loss, "test_loss": test.loss, "test_acc": test.acc,
                       "forget_acc_val": f_acc, "retain_acc_val": r_acc, "finite": finite.numpy(),
                       "target_loss": targets.numpy()},
        "selected": chosen, "selected_sha256": [params_sha256(p) for p in selected],
        "selected_val": {"forget_acc": f_acc[chosen], "retain_acc": r_acc[chosen]},
        "timings": {"load_s": t_load, "prompts_s": t_prompts, "sample_s": t_sample, "select_s": t_select,
                    "per_model_s": wall / r},
        "wall_seconds": wall / r,
        "note": "selected parameters are saved exactly as sampled (no edit, clip or fine-tune)",
    }
    write_json(out_dir / "record.json", record)
    return record


def _unlearn_baseline(run: Run, forget: tuple[int, ...], config: UnlearnConfig, out_dir: Path) -> dict:
    from hyperforget.pipelines.baselines import BASELINES, run_baseline

    if config.method not in BASELINES:
        names = ", ".join([*DIHYFO_METHODS, *BASELINES])
        raise HyperForgetError(f"unknown unlearning method {config.method!r}: choose one of {names}")
    d = run.data()
    original = run.original_params()
    models, walls, masks = [], [], set()
    with _progress() as progress:
        task = progress.add_task(f"{config.method} {forget_dir_name(forget)}", total=config.repeats)
        for i in range(config.repeats):
            model = MLP.from_flat(run.spec, original)
            module, wall = run_baseline(config.method, model, d.x_fit, d.y_fit, list(forget),
                                        config.seed + i, **config.overrides)
            params, mask = _module_params(module)
            models.append(params)
            masks.update(mask)
            walls.append(float(wall))
            progress.advance(task)
    if not torch.equal(run.original_params(), original):
        raise AssertionError("a baseline changed the original model on disk")
    params = torch.stack(models)  # (R, P)
    output_mask = sorted(masks)
    with torch.no_grad():
        val_logits = model_logits(run.spec, params, d.x_val, output_mask)  # (R, N_val, C)
    val_acc = per_class_accuracy(val_logits, d.y_val, run.num_classes)
    f_acc, r_acc = split_accuracy(val_acc, forget)
    out_dir.mkdir(parents=True, exist_ok=True)
    save_mlps(str(out_dir / "model.safetensors"), run.spec, params, {"method": config.method, "forget": list(forget),
                                                                     "output_mask": output_mask})
    spec_entry = BASELINES[config.method]
    record = {
        "method": config.method, "kind": "baseline", "forget": list(forget),
        "retain": [c for c in range(run.num_classes) if c not in forget],
        "config": asdict(config),
        "hyperparameters": {"defaults": spec_entry.defaults, "overrides": config.overrides,
                            "effective": {**spec_entry.defaults, **config.overrides}},
        "reference": spec_entry.reference, "notes": spec_entry.notes,
        # Classes whose logits the method masks to -inf at inference (the logit_mask control); the
        # saved parameters are then the original's and every evaluation applies the mask.
        "output_mask": output_mask,
        "wall_seconds": float(np.mean(walls)), "timings": {"wall_s": walls},
        "selected_sha256": [params_sha256(p) for p in params],
        "metrics_val": {"acc": val_acc, "forget_acc": f_acc, "retain_acc": r_acc},
    }
    write_json(out_dir / "record.json", record)
    return record


def _module_params(module) -> tuple[torch.Tensor, list[int]]:
    """A baseline's module -> ((P,) parameters, classes whose logits it masks)."""
    from hyperforget.pipelines.baselines import LogitMaskedMLP

    if isinstance(module, LogitMaskedMLP):
        return module.flat_params().detach().clone(), list(module.forget)
    if isinstance(module, MLP):
        return module.flat_params().detach().clone(), []
    raise HyperForgetError(f"baseline returned a {type(module).__name__}, which is not an MLP; "
                           "it cannot be saved as a parameter vector")


def per_class_accuracy(logits: torch.Tensor, y: torch.Tensor, num_classes: int) -> np.ndarray:
    """(M, N, C) logits, (N,) labels -> (M, C) accuracy per true class (NaN for absent classes)."""
    hit = (logits.argmax(-1) == y).double()  # (M, N)
    onehot = torch.nn.functional.one_hot(y, num_classes).double()  # (N, C)
    counts = onehot.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return ((hit @ onehot) / counts).numpy()


# ----------------------------------------------------------------------------------------------
# Metrics against the retrained models.


def method_dirs(run: Run, forget: Sequence[int]) -> list[Path]:
    """Folders of forget-X that hold an unlearned model (retrain excluded), DiHyFo first."""
    base = run.forget_dir(forget)
    if not base.exists():
        return []
    found = [p for p in base.iterdir() if p.is_dir() and p.name != "retrain" and (p / "model.safetensors").exists()]
    order = {m: i for i, m in enumerate((*DIHYFO_METHODS, RETRIEVAL_METHOD))}
    return sorted(found, key=lambda p: (order.get(p.name, len(order)), p.name))


def load_method(run: Run, forget: Sequence[int], method: str) -> tuple[torch.Tensor, dict]:
    """(M, P) models and record of one method ('retrain' for the retrained models)."""
    base = run.forget_dir(forget) / method
    name = "models.safetensors" if method == "retrain" else "model.safetensors"
    spec, params, _ = load_mlps(str(base / name))
    if spec != run.spec:
        raise HyperForgetError(f"{base / name} holds {spec} MLPs, the run needs {run.spec}")
    return params, read_json(base / "record.json")


def compute_metrics(run: Run, forget: Sequence[int], methods: Sequence[str] | None = None) -> dict:
    """Every method's metrics against the retrained models -> forget-X/metrics.json.

    D_r / D_f are the retain / forget examples of the training split the models learned from
    (minus validation); "test" is the dataset's test split. Each method's M models are compared
    with each of the S retrained models and summarized as mean / std / min / max.
    """
    from hyperforget.pipelines import metrics as zm

    forget = run.check_forget(forget)
    retrained, _ = load_method(run, forget, "retrain")  # (S, P)
    d = run.data()
    names = list(methods) if methods else [p.name for p in method_dirs(run, forget)]
    out = {"forget": list(forget), "retain": [c for c in range(run.num_classes) if c not in forget],
           "reference": "retrain", "num_retrained": int(retrained.shape[0]), "methods": {}}
    original = run.original_params()[None]
    entries = [("original", original, {"wall_seconds": None}), ("retrain", retrained, read_json(
        run.forget_dir(forget) / "retrain" / "record.json"))]
    for name in names:
        params, record = load_method(run, forget, name)
        entries.append((name, params, record))
    with torch.no_grad():
        ref_fit = model_logits(run.spec, retrained, d.x_fit)  # (S, N_fit, C)
        ref_test = model_logits(run.spec, retrained, d.x_test)  # (S, N_test, C)
    for name, params, record in entries:
        mask = record.get("output_mask") or ()
        with torch.no_grad():
            fit_logits = model_logits(run.spec, params, d.x_fit, mask)  # (M, N_fit, C)
            test_logits = model_logits(run.spec, params, d.x_test, mask)  # (M, N_test, C)
        summary = zm.unlearning_metrics(fit_logits, test_logits, d.y_fit, d.y_test, list(forget), ref_fit, ref_test,
                                        distinct_pairs=name == "retrain")
        # The paper computes φ "across the entire dataset": the test split's value is the table's φ.
        summary["phi"] = summary.get("phi_test")
        out["methods"][name] = {"wall_seconds": record.get("wall_seconds"), **jsonable(summary)}
    write_json(run.forget_dir(forget) / "metrics.json", out)
    return out


def refresh_metrics(run: Run, forget: Sequence[int]) -> dict | None:
    """Recompute forget-X/metrics.json when the retrained models exist (None otherwise)."""
    forget = run.check_forget(forget)
    if not (run.forget_dir(forget) / "retrain" / "models.safetensors").exists():
        return None
    return compute_metrics(run, forget)


def hypernetwork_zoo(model_dir: str) -> str | None:
    """The zoo a hypernetwork was trained on, as its saved training config says (None if unknown).

    A relative path is tried against the model directory first, then the working directory.
    """
    for name in ("config.json", "train.json", "model.json"):
        path = Path(model_dir) / name
        if path.exists():
            cfg = read_json(path)
            for d in (cfg, cfg.get("config", {}), cfg.get("train", {}), cfg.get("train_config", {})):
                if isinstance(d, dict) and isinstance(d.get("zoo"), str):
                    zoo = d["zoo"]
                    if _is_url(zoo) or os.path.isabs(zoo):
                        return zoo
                    beside = os.path.normpath(os.path.join(os.path.abspath(model_dir), zoo))
                    return beside if os.path.exists(beside) or not os.path.exists(zoo) else zoo
    return None
