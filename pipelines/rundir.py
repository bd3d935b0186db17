"""The unlearning run directory: run.json, the original model, one folder per forget set and method.

A run directory (layout in docs/format.md, "Unlearning run directory") holds one model to
unlearn, the models retrained without each forget set (the gold standard) and, per forget set,
one folder per unlearning method. Every artifact stores the configuration that made it.

This module is the layer the flows share (pipelines.retrain, pipelines.unlearn,
pipelines.evaluate, pipelines.report, pipelines.demo): :class:`RunConfig`, :class:`Run`,
:func:`create_run` / :func:`open_run`, the run's splits (:func:`carve_validation`,
:func:`eval_split`), the methods' folders and records (:func:`method_dirs`, :func:`load_method`)
and the small helpers that name forget sets and hash parameters. It imports only the zoo layer.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import torch

from hyperforget.zoo.errors import HyperForgetError, from_settings
from hyperforget.zoo.files import read_json, write_json
from hyperforget.zoo.mlp import MLPSpec, evaluate_per_class, get_preset, load_mlps
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


def eval_split(run: Run, params: torch.Tensor, split: str):
    d = run.data()
    x, y = {"val": (d.x_val, d.y_val), "test": (d.x_test, d.y_test), "fit": (d.x_fit, d.y_fit)}[split]
    return evaluate_per_class(run.spec, params, x, y)


# ----------------------------------------------------------------------------------------------
# Method folders and their records.


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
