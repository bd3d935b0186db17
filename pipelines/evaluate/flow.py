"""The evaluation's top-level flow: every forget set of a run, its populations and rows, the files written."""

from __future__ import annotations

import time
from dataclasses import asdict
from pathlib import Path
from typing import Sequence

import torch

from hyperforget.pipelines.evaluate.config import EVAL_FORMAT, EVAL_VERSION, EvalConfig, Population
from hyperforget.pipelines.evaluate.reference import reference_seeds, train_reference, used_seeds
from hyperforget.pipelines.evaluate.render import plot_eps_histogram, plot_retain_vs_forget, render_markdown
from hyperforget.pipelines.evaluate.rows import method_populations, nearest_controls, setup_seconds
from hyperforget.pipelines.evaluate.scoring import accuracies, build_context, score_population
from hyperforget.pipelines.rundir import forget_dir_name, open_run, parse_classes
from hyperforget.zoo.errors import HyperForgetError


def evaluate(run_dir: str | Path, forget_sets: Sequence[Sequence[int]] | None = None, n_retrained: int = 128,
             *, baseline_seeds: int = 3, config: EvalConfig | None = None) -> dict:
    """Evaluate every method of a run against retrained populations -> {forget dir name: result}.

    Writes RUN/evaluation/forget-X.json, forget-X.md, eps_hist_forget-X.png and
    retain_vs_forget_forget-X.png for each forget set (default: every forget set in run.json).
    """
    from hyperforget.zoo.files import write_json

    cfg = config or EvalConfig(n_retrained=n_retrained, baseline_seeds=baseline_seeds)
    run = open_run(run_dir)
    if run.config.epochs is None:
        raise HyperForgetError(f"{run_dir}/run.json has no training epochs; re-create the run with the pipeline")
    sets = [run.check_forget(parse_classes(f)) for f in forget_sets] if forget_sets else run.forget_sets
    if not sets:
        raise HyperForgetError(f"run {run_dir} has no forget sets yet: unlearn one first, or pass --forget 2")
    out_dir = Path(run_dir) / "evaluation"
    out_dir.mkdir(parents=True, exist_ok=True)
    results = {}
    for forget in sets:
        name = forget_dir_name(forget)
        if not run.forget_dir(forget).exists():
            raise HyperForgetError(f"{run.forget_dir(forget)} does not exist: run `hyperforget unlearn --forget "
                                   f"{','.join(map(str, forget))}` first or drop that --forget")
        result = evaluate_forget_set(run, forget, cfg)
        write_json(out_dir / f"{name}.json", result)
        (out_dir / f"{name}.md").write_text(render_markdown(result))
        plot_eps_histogram(result, out_dir / f"eps_hist_{name}.png")
        plot_retain_vs_forget(result, out_dir / f"retain_vs_forget_{name}.png")
        results[name] = result
    return results


def evaluate_forget_set(run, forget: tuple[int, ...], cfg: EvalConfig) -> dict:
    """Build the populations of one forget set and score every row (no files written)."""
    from contextlib import nullcontext

    t_start = time.perf_counter()
    spec = run.spec
    retain = tuple(c for c in range(spec.num_classes) if c not in forget)
    notes: list[str] = []
    log = notes.append
    progress = None
    if cfg.progress:
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        progress = Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                            TimeElapsedColumn(), transient=True)
    with progress or nullcontext():
        what = f"evaluate forget {list(forget)}"
        task = progress.add_task(f"{what}: retrained population", total=None) if progress else None

        # Reference populations, from seeds no other model of the run or its zoo used.
        used, seed_check = used_seeds(run)
        seeds = reference_seeds(cfg.n_retrained, used, cfg.seed_base)
        retrained, train_wall = train_reference(run, forget, seeds, cfg.retrain_groups)
        # Interleaved splits: every part holds models of every lockstep group (data order).
        ref, evaluation = retrained[0::2], retrained[1::2]
        neg, floor = evaluation[1::2], evaluation[0::2]
        # One model alone, with the same settings: the retrain time a user would otherwise pay.
        # Best of three on one thread, as timeit does: on a shared machine the minimum is the least
        # disturbed, and a lone tiny MLP gains nothing from more threads but suffers their contention.
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            retrain_seconds = min(train_reference(run, forget, [seeds[-1] + 1 + k], 1)[1] for k in range(3))
        finally:
            torch.set_num_threads(threads)

        ctx = build_context(run, forget, retain, ref, neg, floor, retrain_seconds, cfg)
        cloud = accuracies(ctx, retrained, ())

        # Rows: floor, ceiling, methods, controls.
        original = run.original_params()[None]
        pops = [Population("retrain (floor)", "floor", floor,
                           note="retrain vs retrain: a quarter of the retrained evaluation half, scored like a method")]
        pops.append(Population("original (ceiling)", "ceiling", original, note="no unlearning: the model to unlearn"))
        methods, selected = method_populations(run, forget, cfg, log)
        pops += methods
        pops.append(Population("logit_mask (control)", "control", original, masked=tuple(forget),
                               seconds_per_model=0.0,
                               note="original model with the forget logits set to −∞; "
                                    "probe and relearn use its weights"))
        if cfg.nearest_checkpoint and selected:
            pops += nearest_controls(run, selected, cfg, log)
        if progress:
            progress.update(task, description=f"{what}: scoring", total=len(pops), completed=0)
        rows = []
        for pop in pops:
            rows.append(score_population(ctx, pop))
            if progress:
                progress.advance(task)

    setup = setup_seconds(run)
    n_requests = max(1, len(run.forget_sets))
    for row in rows:
        variant = row["name"].split(" ")[0]
        if row["cost"] is None or variant not in setup["train"] or setup["zoo"] is None:
            continue
        # The zoo and the hypernetwork are paid once and serve every forget request of the run.
        amortized = row["cost"]["seconds_per_model"] + (setup["zoo"] + setup["train"][variant]) / n_requests
        row["cost"]["amortized_seconds"] = amortized
        row["cost"]["amortized_fraction_of_retrain"] = amortized / retrain_seconds
        row["cost"]["amortized_under_20pct"] = bool(amortized / retrain_seconds < 0.2)
    return {
        "format": EVAL_FORMAT, "version": EVAL_VERSION, "run": str(run.path), "forget": list(forget),
        "retain": list(retain), "config": asdict(cfg),
        "reference": {
            "n_retrained": cfg.n_retrained, "seeds": [seeds[0], seeds[-1]], "reference_models": int(ref.shape[0]),
            "negative_models": int(neg.shape[0]), "floor_models": int(floor.shape[0]),
            "seed_check": f"none of the {len(seeds)} reference seeds ({seeds[0]}..{seeds[-1]}) appears among "
                          f"{len(used)} seeds used elsewhere; {seed_check}",
            "train_seconds": train_wall, "retrain_seconds_one_model": retrain_seconds,
            "retrained_accuracy": ctx.retrained_acc, "retrained_mia": ctx.retrained_mia,
            "examples": {k: int(len(v)) for k, v in ctx.y.items()},
        },
        "cost_setup": {**setup, "requests": n_requests},
        "retrained_cloud": {k: cloud[k].tolist() for k in ("test_retain", "test_forget")},
        "rows": rows, "notes": notes, "wall_seconds": time.perf_counter() - t_start,
    }
