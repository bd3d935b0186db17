"""`hyperforget demo`: the whole pipeline on embedded defaults, resumable stage by stage.

    DEMO/zoo/               1. collect a zoo (MNIST-4 from the bundled MNIST digits by default)
    DEMO/models/dihyfo1/    2. train both DiHyFo variants on a CPU preset (views built on first use)
    DEMO/models/dihyfo2/
    DEMO/run/               3. the original model, retrained models per forget set,
    DEMO/quality/           4. generation quality of each variant: single samples against their prompts
                               (hyper.quality; DiHyFo-1 from the run's original model and from noise),
    DEMO/run/               5. unlearning with both variants, zoo retrieval and every baseline,
                            6. metrics against the retrained models, and the report
    DEMO/demo.json          the demo's config and each stage's wall time

Each stage skips work whose artifacts exist, so an interrupted demo resumes where it stopped.
``benchmark_unlearning`` runs stages 3-5 for given models (or baselines only) on any preset.
"""

from __future__ import annotations

import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

from hyperforget.pipelines.retrain import init_run
from hyperforget.pipelines.rundir import (DIHYFO_METHODS, RETRIEVAL_METHOD, RunConfig, forget_dir_name,
                                          hypernetwork_zoo, open_run)
from hyperforget.pipelines.unlearn import UnlearnConfig, compute_metrics, unlearn
from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.files import read_json, write_json
from hyperforget.zoo.mlp import get_preset
from hyperforget.zoo.seeds import retraining_seeds

# The hypernetwork preset each variant trains with by default (hyper.model.PRESETS).
HYPER_PRESETS = {"dihyfo1": "cpu-mlp2-fn-cl", "dihyfo2": "cpu-mlp3-fn"}


@dataclass
class DemoConfig:
    """Sizes of every stage; `for_mode` fills the defaults for a full or a quick demo."""

    out: str = "runs/demo"  # demo directory
    preset: str = "mnist4"  # task preset: mnist4 or mnist10
    dataset: str = "mnist-5k"  # dataset name (mnist-5k, fashion-mnist, digits, idx:DIR, mnist:DIR)
    quick: bool = False  # tiny sizes for tests and smoke runs
    runs: int = 1024  # zoo training runs (~94k checkpoints for mnist4, collected in ~20 s)
    runs_per_group: int = 128  # runs trained in lockstep per zoo commit
    # Share of the main zoo's runs that delete classes mid-training. MNIST-10 takes 0.8: its
    # DiHyFo-2 then sees more checkpoints that forgot one class and know the other nine, the
    # prompts its class-1 sweep asks for (docs/experiments.md, "MNIST-10's last alignment misses").
    zoo_deletion_share: float = 0.4
    holdout: list = field(default_factory=list)  # forget sets kept out of the zoo (zoo/holdout.py), e.g. [[2, 3]]
    zoo_epochs: int | None = None  # epochs per zoo run (None: the preset's)
    workers: int | None = 2  # dask workers for collection (None: CPU count; 0: no dask)
    # Hypernetwork preset per variant (hyper.model.PRESETS): both train with the function-matching term;
    # DiHyFo-2 matches hidden units to a template network (cpu-mlp3-fn), DiHyFo-1 keeps them sorted by
    # fc1.bias and adds class-loss matching (cpu-mlp2-fn-cl; docs/experiments.md, "Canonical order by
    # matching", "Function matching" and "Class-loss matching").
    hyper_presets: dict = field(default_factory=lambda: dict(HYPER_PRESETS))
    train_steps: int | None = None  # hypernetwork steps per variant (None: the preset's)
    train_overrides: dict = field(default_factory=dict)  # more hypernetwork options by name
    variant_overrides: dict = field(default_factory=dict)  # options for one variant, e.g. {"dihyfo1": {"steps": 1500}}
    variants: tuple[str, ...] = DIHYFO_METHODS  # DiHyFo variants to train and use
    dihyfo1_start: str = "model"  # DiHyFo-1 unlearns from: "model" (the model to unlearn) or "noise"
    dihyfo1_noise_share: float = 0.2  # share of DiHyFo-1 training pairs that start from a fresh init
    # DiHyFo-1's pairs come from a second zoo of branch families (zoo collect --branches B --branch-steps S
    # --branch-from-start): runs that share an initialization and minibatch order and delete nothing or
    # one set each, from step 0 when family_from_start (retrained without it: the gold standard) or at
    # one of S steps drawn from the deletion window. Family pairs then go from a checkpoint that knows
    # every class to what retraining from its initialization gives (docs/experiments.md, "Retrained
    # counterparts"). family_runs 0: DiHyFo-1 trains on the main zoo's pairs instead.
    family_runs: int = 1200
    family_branches: int = 4
    family_branch_steps: int = 1
    family_from_start: bool = True
    # Pairs start from checkpoints that know every class: largest class loss at most
    # family_start_max_loss, and at most family_start_loss_factor times that of the zoo's plainly
    # trained runs (the pairs view's start_max_loss / start_loss_factor; -1: no bound). MNIST-4 keeps
    # the absolute 0.5; MNIST-10, whose networks rarely get all ten losses under 0.5, the factor 1.5
    # (docs/experiments.md, "Starts that look like the model to unlearn").
    family_start_max_loss: float = 0.5
    family_start_loss_factor: float = -1.0
    retrieval: bool = True  # also run zoo_retrieval, the SQL-lookup control
    parallel_training: bool = True  # train the two variants at once, one process and one thread each
    quality_targets: int = 8  # generation quality: targets per swept class
    quality_samples: int = 16  # generation quality: samples per target and per forget set
    forget_sets: list | None = None  # forget sets (None: the preset's, e.g. {2} and {2,3} for mnist4)
    candidates: int = 32  # DiHyFo candidates per selected model
    repeats: int = 5  # selected DiHyFo models per forget set (averaged in the tables)
    sample_steps: int = 50  # DDIM steps
    methods: list | None = None  # baselines (None: every one in pipelines.baselines.BASELINES)
    baseline_repeats: int = 1  # runs (seeds) per baseline
    retrain_seeds: int = 5  # retrained models per forget set
    epochs: int | None = None  # epochs of the original / retrained models (None: the preset's)
    seed: int = 0  # master seed

    def hyper_preset(self, variant: str) -> str:
        """The hypernetwork preset a variant trains with."""
        return self.hyper_presets[variant]

    def overrides(self, variant: str) -> dict:
        """Hypernetwork options for a variant: train_overrides, then its variant_overrides, then --train-steps."""
        overrides = {**self.train_overrides, **self.variant_overrides.get(variant, {})}
        if self.train_steps is not None:
            overrides["steps"] = self.train_steps
        return overrides

    @property
    def family_zoo(self) -> bool:
        """True when DiHyFo-1 trains on its own branch-family zoo (OUT/zoo-families)."""
        return bool(self.family_runs) and "dihyfo1" in self.variants

    @classmethod
    def for_mode(cls, *, out: str, preset: str = "mnist4", dataset: str = "mnist-5k", quick: bool = False,
                 runs: int | None = None, train_steps: int | None = None, methods: list | None = None,
                 family_runs: int | None = None, **overrides) -> "DemoConfig":
        if quick:
            base = dict(runs=32, zoo_epochs=6, workers=0, hyper_presets={"dihyfo1": "tiny", "dihyfo2": "tiny"},
                        train_steps=40, family_runs=20,
                        family_branches=4, family_branch_steps=1, family_start_max_loss=-1.0,
                        train_overrides={"eval_every": -1, "test_every": 0, "batch_size": 32, "checkpoint_every": 0},
                        candidates=8, repeats=2, sample_steps=10, retrain_seeds=2, epochs=40, quality_targets=3,
                        quality_samples=2)
        elif preset == "mnist10":
            # Retrained counterparts help MNIST-4's DiHyFo-1, not MNIST-10's: φ 0.914 / 0.807 / 0.785
            # on {2} / {2,3,4} / {0..4} against 0.919 / 0.848 / 0.851 with late, graded deletions
            # (docs/results.md, MNIST-10).
            # DiHyFo-1 trains 1,500 steps so that the demo fits 25 minutes on two cores; with the
            # function-matching term it follows its prompts at 1,500 steps (docs/experiments.md, rows F3-F4).
            # DiHyFo-1 keeps cpu-mlp2-fn: class-loss matching lifts two of MNIST-10's classes and lowers
            # class 4, and the selected {2} models then keep forget accuracy 0.039 (docs/experiments.md,
            # "Class-loss matching").
            base = dict(hyper_presets={**HYPER_PRESETS, "dihyfo1": "cpu-mlp2-fn"},
                        zoo_deletion_share=0.8, family_branches=10, family_branch_steps=3, family_from_start=False,
                        family_start_max_loss=-1.0, family_start_loss_factor=1.5,
                        variant_overrides={"dihyfo1": {"steps": 1500}})
        else:
            base = {}
        base.update({k: v for k, v in dict(runs=runs, train_steps=train_steps, methods=methods,
                                            family_runs=family_runs).items() if v is not None})
        base.update(overrides)
        return cls(out=out, preset=preset, dataset=dataset, quick=quick, **base)


def _stage(state: dict, path: Path, name: str, seconds: float) -> None:
    state.setdefault("stages", {})[name] = round(state.get("stages", {}).get(name, 0.0) + seconds, 3)
    write_json(path, state)


def _say(msg: str) -> None:
    from rich.console import Console

    Console(stderr=True).print(f"[bold]demo[/bold] {msg}")


def collect_config(cfg: DemoConfig, families: bool = False):
    """The main zoo's collection, or (families=True) the branch-family zoo DiHyFo-1 learns from."""
    from hyperforget.zoo.collect import CollectConfig

    common = dict(preset=cfg.preset, dataset=cfg.dataset, epochs=cfg.zoo_epochs, seed=cfg.seed,
                  holdout=list(cfg.holdout))
    if not families:
        return CollectConfig(runs=cfg.runs, runs_per_group=cfg.runs_per_group, deletion_share=cfg.zoo_deletion_share,
                             **common)
    per_group = cfg.family_branches * max(1, cfg.runs_per_group // cfg.family_branches)  # whole families per group
    return CollectConfig(runs=cfg.family_runs, runs_per_group=min(per_group, cfg.family_runs), branches=cfg.family_branches,
                         branch_steps=cfg.family_branch_steps, branch_from_start=cfg.family_from_start,
                         deletion_undersample=False, **common)


def collect_zoo(cfg: DemoConfig, zoo_dir: Path, families: bool = False) -> None:
    """Stage 1: a zoo (resumes a partial collection; skips a complete one)."""
    from hyperforget.zoo.collect import collect

    ccfg = collect_config(cfg, families)
    if (zoo_dir / "manifest.json").exists():
        from hyperforget.zoo.collect import group_key
        from hyperforget.zoo.store import open_zoo

        # A finished collection is an artifact like any other: skip it without re-checking settings.
        if {group_key(g) for g in range(ccfg.num_groups)} <= set(open_zoo(str(zoo_dir)).committed_keys):
            return
    collect(ccfg, str(zoo_dir), use_dask=bool(cfg.workers != 0), workers=cfg.workers or None, progress=True)


def _train_kwargs(cfg: DemoConfig, variant: str, zoo_dir: Path, model_dir: Path) -> dict:
    overrides = cfg.overrides(variant)
    if variant == "dihyfo1":
        overrides.setdefault("noise_start_share", cfg.dihyfo1_noise_share)
        if cfg.family_zoo:
            from hyperforget.hyper.train import resolve_configs

            view = dict(resolve_configs(cfg.hyper_preset(variant), variant, overrides)[3].view)
            view["pairs"] = {**view.get("pairs", {}), "family": cfg.family_branches,
                             "start_max_loss": cfg.family_start_max_loss,
                             "start_loss_factor": cfg.family_start_loss_factor}
            overrides["view"] = view
    resume = (model_dir / "checkpoints" / "latest.json").exists()
    return dict(variant=variant, out=str(model_dir), preset=cfg.hyper_preset(variant), zoo=str(zoo_dir), overrides=overrides,
                resume=resume)


def train_variant(cfg: DemoConfig, variant: str, zoo_dir: Path, model_dir: Path) -> None:
    """Stage 2: one DiHyFo variant (resumes from its checkpoints; skips a finished one)."""
    from hyperforget.hyper.train import train

    train(**_train_kwargs(cfg, variant, zoo_dir, model_dir), progress=True)


def _train_child(kwargs: dict, done, total, threads) -> None:
    """A spawned process training one variant, reporting its step through shared values and taking the
    thread count the parent sets in ``threads`` before its next step."""
    import torch

    from hyperforget.hyper.train import train

    torch.set_num_threads(threads.value)

    def report(step: int, steps: int) -> None:
        done.value, total.value = step, steps
        if threads.value != torch.get_num_threads():
            torch.set_num_threads(threads.value)

    try:
        train(**kwargs, progress=False, on_step=report)
    except HyperForgetError as exc:  # one line, as the CLI prints it; the parent names the failed variant
        print(f"error: {exc}", file=sys.stderr, flush=True)
        sys.exit(2)


def train_variants_in_parallel(cfg: DemoConfig, jobs: list[tuple[str, Path]], zoos: dict[str, Path]) -> None:
    """Stage 2 with one process per variant, one thread each: on a 2-core machine both train at once
    instead of one after the other on two threads (which scale far below 2× on these small products).
    When a process finishes, the ones still training share its thread, so no core idles at the end."""
    import multiprocessing as mp

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from hyperforget.hyper.train import resolve_configs
    from hyperforget.queries.views import VARIANT_KINDS, ensure_training_views

    ctx = mp.get_context("spawn")
    procs = []
    for variant, model_dir in jobs:
        kwargs = _train_kwargs(cfg, variant, zoos[variant], model_dir)
        # Views are built here, before the processes start, so that two never build one at once.
        train_cfg = resolve_configs(kwargs["preset"], variant, kwargs["overrides"])[3]
        ensure_training_views(str(zoos[variant]), variant, seed=train_cfg.seed,
                              **train_cfg.view.get(VARIANT_KINDS[variant], {}))
        done, total, threads = ctx.Value("i", 0), ctx.Value("i", 1), ctx.Value("i", 1)
        p = ctx.Process(target=_train_child, args=(kwargs, done, total, threads), daemon=True)
        p.start()
        procs.append((variant, p, done, total, threads))
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()) as bar:
        tasks = {v: bar.add_task(f"train {v}", total=None) for v, *_ in procs}
        try:
            while alive := [job for job in procs if job[1].is_alive()]:
                for v, p, done, total, threads in procs:
                    bar.update(tasks[v], completed=done.value, total=total.value)
                for *_, threads in alive:
                    threads.value = len(procs) // len(alive)
                time.sleep(0.5)
        finally:
            for _, p, *_ in procs:
                if p.is_alive():
                    p.terminate()
                p.join()
    failed = [v for v, p, *_ in procs if p.exitcode != 0]
    if failed:
        raise HyperForgetError(f"training {', '.join(failed)} failed (see the message above); re-run the demo "
                               "to resume from its last checkpoint")


def _trained(model_dir: Path, steps: int | None) -> bool:
    summary = model_dir / "summary.json"
    if not summary.exists() or not (model_dir / "model.safetensors").exists():
        return False
    if steps is None:
        return True
    return int(read_json(summary).get("steps", 0)) >= steps


def unlearn_all(run, forget_sets: Sequence[Sequence[int]], *, models: dict[str, str], methods: Sequence[str],
                candidates: int, repeats: int, sample_steps: int, baseline_repeats: int, retrain_seeds: Sequence[int],
                seed: int = 0, dihyfo1: dict | None = None, retrieval: bool = False) -> None:
    """Stages 3, 5, 6 on a run: retrain, every method per forget set (skipping finished ones), metrics.

    ``dihyfo1``: UnlearnConfig fields for DiHyFo-1 only (e.g. its start and prompts).
    """
    from hyperforget.pipelines.retrain import retrain_into

    for forget in forget_sets:
        forget = run.check_forget(forget)
        t0 = time.perf_counter()
        retrain_into(run, forget, seeds=retrain_seeds)
        _say(f"retrained {len(retrain_seeds)} models without {list(forget)} ({time.perf_counter() - t0:.1f} s)")
        todo = [(v, models[v]) for v in DIHYFO_METHODS if v in models] + [(m, None) for m in methods]
        if retrieval:
            todo.insert(len(models), (RETRIEVAL_METHOD, None))
        for method, model_dir in todo:
            if method in DIHYFO_METHODS and set(forget) & set(run.pivots):
                _say(f"skip {method} for {list(forget)}: pivots cannot be forgotten by DiHyFo")
                continue
            folder = run.forget_dir(forget) / method
            if (folder / "record.json").exists() and (folder / "model.safetensors").exists():
                continue
            extra = dict(dihyfo1 or {}) if method == "dihyfo1" else {}
            ucfg = UnlearnConfig(method=method, candidates=candidates, steps=sample_steps, seed=seed,
                                 repeats=repeats if model_dir or method == RETRIEVAL_METHOD else baseline_repeats,
                                 **extra)
            rec = unlearn(run, forget, ucfg, model_dir=model_dir)
            _say(f"{method} {list(forget)}: {rec['wall_seconds']:.2f} s per model")
        compute_metrics(run, forget)


def check_demo(cfg: DemoConfig) -> tuple[list[tuple[int, ...]], list[str]]:
    """Refuse a demo configuration that a later stage would refuse; returns (forget sets, methods)."""
    from hyperforget.pipelines.baselines import BASELINES
    preset = get_preset(cfg.preset)
    collect_config(cfg)  # raises on a bad count or set
    if cfg.family_zoo:
        if cfg.family_runs < 0 or cfg.family_runs % cfg.family_branches:
            raise HyperForgetError(f"family_runs ({cfg.family_runs}) must be a multiple of family_branches "
                                   f"({cfg.family_branches}), or 0 to train DiHyFo-1 on the main zoo")
        collect_config(cfg, families=True)
    methods = list(cfg.methods) if cfg.methods is not None else list(BASELINES)
    unknown = [m for m in methods if m not in BASELINES]
    if unknown:
        raise HyperForgetError(f"unknown baselines {unknown}: choose among {', '.join(BASELINES)}")
    unknown = [v for v in cfg.variants if v not in DIHYFO_METHODS]
    if unknown:
        raise HyperForgetError(f"unknown DiHyFo variants {unknown}: use dihyfo1 and/or dihyfo2")
    from hyperforget.hyper.model import get_preset as get_hyper_preset  # zoo.mlp.get_preset is the MLP preset

    for variant in cfg.variants:
        if variant not in cfg.hyper_presets:
            raise HyperForgetError(f"no hypernetwork preset for {variant}: name one in hyper_presets")
        get_hyper_preset(cfg.hyper_preset(variant))  # raises on an unknown name
    odd = [k for k, v in cfg.variant_overrides.items() if k not in DIHYFO_METHODS or not isinstance(v, dict)]
    if odd:
        raise HyperForgetError(f"variant_overrides keys must be {' or '.join(DIHYFO_METHODS)} with a dict of "
                               f"options each, got {odd}")
    counts = {"--train-steps": cfg.train_steps, "candidates": cfg.candidates, "repeats": cfg.repeats,
              "sample_steps": cfg.sample_steps, "baseline_repeats": cfg.baseline_repeats,
              "retrain_seeds": cfg.retrain_seeds, "epochs": cfg.epochs}
    for name, value in counts.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise HyperForgetError(f"{name} must be a whole number >= 1, got {value!r}")
    if cfg.dihyfo1_start not in ("noise", "model"):
        raise HyperForgetError(f"unknown DiHyFo-1 start {cfg.dihyfo1_start!r}: use noise or model")
    forget_sets = [tuple(s) for s in (cfg.forget_sets or preset.forget_sets)]
    c = preset.spec.num_classes
    for fs in forget_sets:
        if not fs or any(not 0 <= k < c for k in fs) or len(set(fs)) != len(fs) or len(fs) >= c:
            raise HyperForgetError(f"forget set {list(fs)} must name distinct task labels in [0, {c}) and keep one")
        if cfg.variants and set(fs) & set(preset.pivots):
            raise HyperForgetError(f"forget set {list(fs)} holds pivots {sorted(set(fs) & set(preset.pivots))}, "
                                   "which DiHyFo cannot forget; choose non-pivot classes")
    return forget_sets, methods


def run_demo(cfg: DemoConfig) -> Path:
    """Run every stage (skipping finished ones) and write the report; returns report.md's path."""
    from hyperforget.pipelines.cost import amortized_cost
    from hyperforget.pipelines.report import write_report

    # Check every setting before any work or any file.
    forget_sets, methods = check_demo(cfg)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    state_path = out / "demo.json"
    state = read_json(state_path) if state_path.exists() else {}
    state["config"] = asdict(cfg)
    write_json(state_path, state)
    total = time.perf_counter()

    # 1. Collect the zoo.
    zoo_dir = out / "zoo"
    t0 = time.perf_counter()
    _say(f"collecting a {cfg.preset} zoo of {cfg.runs} runs on {cfg.dataset} -> {zoo_dir}")
    collect_zoo(cfg, zoo_dir)
    _stage(state, state_path, "collect", time.perf_counter() - t0)
    zoos = {v: zoo_dir for v in cfg.variants}
    collect_s = {v: state["stages"]["collect"] for v in cfg.variants}
    if cfg.family_zoo:
        zoos["dihyfo1"] = out / "zoo-families"
        t0 = time.perf_counter()
        _say(f"collecting {cfg.family_runs // cfg.family_branches} branch families of {cfg.family_branches} runs "
             f"for DiHyFo-1 -> {zoos['dihyfo1']}")
        collect_zoo(cfg, zoos["dihyfo1"], families=True)
        _stage(state, state_path, "collect_families", time.perf_counter() - t0)
        collect_s["dihyfo1"] += state["stages"]["collect_families"]

    # 2. Train the hypernetworks (views are built on first use), both at once when there are two.
    models = {v: str(out / "models" / v) for v in cfg.variants}
    todo = [(v, Path(d)) for v, d in models.items() if not _trained(Path(d), cfg.overrides(v).get("steps"))]
    t0 = time.perf_counter()
    if len(todo) > 1 and cfg.parallel_training:
        _say(f"training {', '.join(f'{v} ({cfg.hyper_preset(v)})' for v, _ in todo)} in parallel -> {out / 'models'}")
        train_variants_in_parallel(cfg, todo, zoos)
        _stage(state, state_path, "train_" + "_".join(v for v, _ in todo), time.perf_counter() - t0)
    else:
        for variant, model_dir in todo:
            t0 = time.perf_counter()
            _say(f"training {variant} ({cfg.hyper_preset(variant)}) -> {model_dir}")
            train_variant(cfg, variant, zoos[variant], model_dir)
            _stage(state, state_path, f"train_{variant}", time.perf_counter() - t0)

    # 3. The original model (and the run directory).
    t0 = time.perf_counter()
    run = init_run(out / "run", RunConfig(preset=cfg.preset, dataset=cfg.dataset, zoo=str(zoo_dir), models=models,
                                          seed=cfg.seed, epochs=cfg.epochs,
                                          retrain_seeds=retraining_seeds(cfg.retrain_seeds)),
                   forget_sets=forget_sets)
    _stage(state, state_path, "original", time.perf_counter() - t0)

    # 4. Generation quality: single samples against their prompts, on seeds nothing else uses.
    t0 = time.perf_counter()
    quality = measure_quality(cfg, models, run, forget_sets, out / "quality")
    state["quality"] = quality
    _stage(state, state_path, "quality", time.perf_counter() - t0)

    # 5-6. Retrained models, unlearning with every method, metrics.
    t0 = time.perf_counter()
    unlearn_all(run, forget_sets, models=models, methods=methods, candidates=cfg.candidates, repeats=cfg.repeats,
                sample_steps=cfg.sample_steps, baseline_repeats=cfg.baseline_repeats,
                retrain_seeds=run.config.retrain_seeds, seed=cfg.seed, retrieval=cfg.retrieval,
                dihyfo1=dict(start=cfg.dihyfo1_start, guidance="auto"))
    _stage(state, state_path, "unlearn", time.perf_counter() - t0)
    state["cost"] = amortized_cost(run, forget_sets, models, collect_s)
    for variant, c in state["cost"].items():
        k = c["break_even"]
        _say(f"{variant}: {c['fixed_s']:.0f} s to collect and train, {c['request_s']:.3f} s per request against "
             f"{c['retrain_s']:.3f} s per retrained model: " + (f"cheaper than retraining from {k} requests"
                                                                 if k else "never cheaper than retraining"))

    # 6. Report.
    t0 = time.perf_counter()
    report = write_report(run.path)
    _stage(state, state_path, "report", time.perf_counter() - t0)
    state["last_call_seconds"] = round(time.perf_counter() - total, 3)
    write_json(state_path, state)
    _say(f"done in {state['last_call_seconds']:.0f} s: {report}")
    return report


def measure_quality(cfg: DemoConfig, models: dict[str, str], run, forget_sets, out_dir: Path) -> dict:
    """Stage 4: hyper.quality for every variant (DiHyFo-1 from the original model and from noise).

    Writes OUT/quality/<name>.json and .png; returns {name: {"r2", "pearson" per class, "clean" per set}}.
    """
    from hyperforget.hyper.quality import QualityConfig, generation_quality, plot_quality
    from hyperforget.hyper.sample import load_hypernetwork

    qcfg = QualityConfig(targets=cfg.quality_targets, samples=cfg.quality_samples, steps=cfg.sample_steps,
                         seed=cfg.seed, forget_sets=[list(f) for f in forget_sets])
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {}
    for variant, model_dir in models.items():
        net = load_hypernetwork(model_dir)
        starts = [("model", run.original_params()), ("noise", None)] if variant == "dihyfo1" else [(None, None)]
        for start_name, start in starts:
            name = variant if start_name is None else f"{variant}-from-{start_name}"
            report = generation_quality(net, qcfg, start)
            write_json(out_dir / f"{name}.json", report)
            plot_quality(report, out_dir / f"{name}.png")
            summary[name] = {"r2": {k: r["r2"] for k, r in report["classes"].items()},
                             "pearson": {k: r["pearson"] for k, r in report["classes"].items()},
                             "clean": {k: r["share"] for k, r in report["forget_sets"].items()}}
            _say(f"quality {name}: " + "; ".join(
                [f"class {k} R² {r['r2']:.2f} r {r['pearson']:.2f}" for k, r in report["classes"].items()]
                + [f"clean {{{k}}} {r['clean']}/{r['samples']}" for k, r in report["forget_sets"].items()]))
    return summary


def benchmark_unlearning(*, out: str | None = None, preset: str = "mnist4", dataset: str = "mnist-5k",
                         forget_sets: Sequence[Sequence[int]] | None = None, zoo: str | None = None,
                         models: Sequence[str] = (), methods: Sequence[str] | None = None, seeds: int = 5,
                         repeats: int = 3, candidates: int = 32, seed: int = 0) -> Path:
    """Every method on the same original model for each forget set; returns report.md's path.

    Without a zoo the task comes from the preset and the dataset, and only baselines run.
    """
    from hyperforget.hyper.sample import load_hypernetwork
    from hyperforget.pipelines.baselines import BASELINES
    from hyperforget.pipelines.report import write_report

    out_dir = Path(out or f"bench-out/unlearning-{preset}")
    variants = {}
    for m in models:
        variants[str(load_hypernetwork(m).variant)] = str(m)
    if variants and zoo is None:
        zoo = hypernetwork_zoo(next(iter(variants.values())))
    methods = list(methods) if methods is not None else list(BASELINES)
    unknown = [m for m in methods if m not in BASELINES]
    if unknown:
        raise HyperForgetError(f"unknown baselines {unknown}: choose among {', '.join(BASELINES)}")
    sets = [tuple(s) for s in (forget_sets or get_preset(preset).forget_sets)]
    run = init_run(out_dir, RunConfig(preset=preset, dataset=dataset, zoo=zoo, models=variants, seed=seed,
                                      retrain_seeds=retraining_seeds(seeds)), forget_sets=sets)
    unlearn_all(run, sets, models=variants, methods=methods, candidates=candidates, repeats=repeats, sample_steps=50,
                baseline_repeats=repeats, retrain_seeds=run.config.retrain_seeds, seed=seed)
    return write_report(run.path)


def compare_runs(run_a: str | Path, run_b: str | Path, tolerance: float = 0.05) -> tuple[int, list[str]]:
    """Compare two runs' metrics (RUN/forget-X/metrics.json) number by number, within a tolerance.

    Two runs of the same command agree bit for bit on one machine; on another CPU float rounding
    changes the zoo, the hypernetworks and every sampled model, so their metrics agree only up
    to sampling noise. This is the check for that: every number both files hold (means of
    accuracies, MIA, φ, ...; wall times and counts left out) must differ by at most
    ``tolerance``. Returns (numbers compared, one line per difference).
    """
    a, b = open_run(run_a), open_run(run_b)
    if not 0 <= tolerance < 1e9:
        raise HyperForgetError(f"--tolerance must be a number >= 0, got {tolerance}")
    shared = [f for f in a.forget_sets if f in b.forget_sets]
    if not shared:
        raise HyperForgetError(f"{run_a} and {run_b} have no forget set in common")
    compared, diffs = 0, []

    def walk(x, y, where: str) -> None:
        nonlocal compared
        if isinstance(x, dict) and isinstance(y, dict):
            for key in sorted(set(x) & set(y)):
                if key in ("wall_seconds", "seconds", "num_models", "num_retrained", "std", "timings"):
                    continue
                walk(x[key], y[key], f"{where}.{key}")
        elif isinstance(x, (int, float)) and isinstance(y, (int, float)) and not isinstance(x, bool):
            compared += 1
            if not (abs(float(x) - float(y)) <= tolerance or (x != x and y != y)):  # NaN equals NaN here
                diffs.append(f"{where}: {float(x):.4f} vs {float(y):.4f}")

    for forget in shared:
        name = forget_dir_name(forget)
        pa_, pb_ = a.forget_dir(forget) / "metrics.json", b.forget_dir(forget) / "metrics.json"
        if pa_.exists() and pb_.exists():
            walk(read_json(pa_).get("methods", {}), read_json(pb_).get("methods", {}), name)
    if compared == 0:
        raise HyperForgetError(f"{run_a} and {run_b} share no metrics.json numbers; run the demo to the end first")
    return compared, diffs
