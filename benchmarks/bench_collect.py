"""Benchmark the checkpoint collector against a plain one-model-at-a-time PyTorch loop.

One process run measures, on the same machine and data:

1. the machine's float32 matrix-multiply rate with torch.mm on the collector's own shapes
   (training: (B, D) @ (D, G·H) and (G·H, B) @ (B, D); evaluation: (N_test, D) @ (D, G·H)), one
   thread as in each worker, before and after the collection (the higher counts): the limit;
   and the same products timed inside every group task on its worker's thread, just before and
   after its steps (``--probe-seconds``): the limit where and when the steps ran, which on a
   shared machine can differ by 2× from the one measured before or after;
2. one group trained in the benchmark process (no second worker on the cores), then
   the collector (`hyperforget.zoo.collect.collect`, LocalCluster of W single-thread workers): checkpoints/s,
   run-steps/s, the FLOP rate of its lockstep training steps and of all its work, peak RSS of the
   process tree;
3. the same work done plainly for a few runs (nn.Linear MLP, torch.optim.SGD Nesterov, shuffled
   minibatches of 128, per-class test evaluation of the same share of steps, the kept share of
   checkpoints copied) on one thread, its rate multiplied by the cores (one such loop per core);
4. the ratio between them.

    python benchmarks/bench_collect.py                     # default: 256 runs of MNIST-4 on mnist-5k
    python benchmarks/bench_collect.py --build-200k --out /tmp/zoo200k   # the ≥200k-checkpoint build
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import tempfile
import time

import numpy as np
import torch
import torch.nn.functional as F

from process_rss import TreePeakRSS
from hyperforget.zoo.lockstep import matmul_gflops, step_product_shapes


def _matmul_worker(shapes, seconds, barrier, out) -> None:
    barrier.wait()  # start together, so the processes really share the cores
    out.put(matmul_gflops(shapes, seconds))


def matmul_rate_concurrent(shapes: list[tuple[int, int, int, bool]], processes: int, seconds: float = 2.0) -> float:
    """Mean per-process GFLOP/s (CPU time) of ``processes`` single-thread matmul loops run at once.

    The collector's W workers compute side by side; on cores that share execution units or
    caches (e.g. hyperthreads of one physical core) each gets less than a lone thread does.
    """
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    barrier, out = ctx.Barrier(processes), ctx.Queue()
    procs = [ctx.Process(target=_matmul_worker, args=(shapes, seconds, barrier, out)) for _ in range(processes)]
    for p in procs:
        p.start()
    rates = [out.get() for _ in procs]
    for p in procs:
        p.join()
    return sum(rates) / len(rates)


def plain_loop(task, plans, steps_per_run: int, eval_share: float, keep_share: float, batch_size: int) -> dict:
    """Train the given runs one at a time the ordinary way; returns seconds and counts."""
    from hyperforget.zoo.mlp import MLP

    spec = task.spec
    x, y = torch.as_tensor(task.data.x_train), torch.as_tensor(task.data.y_train)
    x_test, y_test = torch.as_tensor(task.data.x_test), torch.as_tensor(task.data.y_test)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is the plain loop's best; cores run more such loops
    t0, c0 = time.perf_counter(), time.process_time()
    run_steps = evaluated = kept = 0
    rng = np.random.default_rng(0)
    for plan in plans:
        torch.manual_seed(plan.seed)
        model = MLP(spec)
        opt = torch.optim.SGD(model.parameters(), lr=plan.lr, momentum=0.9, nesterov=True, weight_decay=5e-4)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps_per_run)
        class_w = torch.ones(spec.num_classes)
        for k, rate in zip(plan.undersampled, plan.undersample_rates):
            class_w[k] = rate  # the plain loop weights instead of subsampling: same cost
        saved = []
        step = 0
        while step < steps_per_run:
            for idx in torch.randperm(len(y)).split(batch_size):  # a DataLoader's shuffled minibatches
                if step == plan.deletion_step:
                    class_w[list(plan.deleted)] = 0.0
                xb, yb = x[idx], y[idx]
                loss = (F.cross_entropy(model(xb), yb, reduction="none") * class_w[yb]).sum() / class_w[yb].sum()
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
                step += 1
                run_steps += 1
                if rng.random() < eval_share:
                    with torch.no_grad():
                        logits = model(x_test)
                        nll = F.cross_entropy(logits, y_test, reduction="none")
                        hit = (logits.argmax(1) == y_test).float()
                        counts = torch.bincount(y_test, minlength=spec.num_classes)
                        per_class = (torch.bincount(y_test, nll, spec.num_classes) / counts,
                                     torch.bincount(y_test, hit, spec.num_classes) / counts)
                    evaluated += 1
                    if rng.random() < keep_share:
                        saved.append((model.flat_params(), per_class))
                        kept += 1
                if step >= steps_per_run:
                    break
    torch.set_num_threads(old_threads)
    return {"seconds": time.perf_counter() - t0, "cpu_seconds": time.process_time() - c0, "runs": len(plans),
            "run_steps": run_steps,
            "evaluated": evaluated, "kept": kept}


def main() -> None:
    from hyperforget.zoo.collect import CollectConfig

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--preset", default="mnist4")
    ap.add_argument("--dataset", default="mnist-5k")
    ap.add_argument("--runs", type=int, default=256)
    ap.add_argument("--runs-per-group", type=int, default=CollectConfig.runs_per_group)
    ap.add_argument("--augment", type=int, default=0)
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--plain-runs", type=int, default=3, help="runs timed with the plain loop")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="zoo directory (default: a temporary one, deleted)")
    ap.add_argument("--build-200k", action="store_true",
                    help="the ≥200k-checkpoint MNIST-4 build: 1,280 runs with 1 permuted copy each")
    ap.add_argument("--probe-seconds", type=float, default=0.1,
                    help="torch.mm timing on the steps' shapes inside each group task (half before, half after)")
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = ap.parse_args()
    from hyperforget.zoo.collect import collect, plan_run, resolve_task

    if args.build_200k:
        args.runs, args.augment = max(args.runs, 1280), max(args.augment, 1)

    cfg = CollectConfig(preset=args.preset, dataset=args.dataset, runs=args.runs, runs_per_group=args.runs_per_group,
                        augment=args.augment, seed=args.seed)
    task = resolve_task(cfg)
    spec, g = task.spec, min(cfg.runs_per_group, cfg.runs)
    d, h, b, n_test = spec.input_size, spec.hidden, cfg.batch_size, len(task.data.y_test)

    # 1. The limit: torch.mm on the collector's own shapes, one thread (as each worker), times the
    # workers. Training: the forward (B, D) @ (D, G·H) and the weight gradient (G·H, B) @ (B, D);
    # evaluation adds (N_test, D) @ (D, G·H). Measured before and after the collection, and the
    # higher rate is the limit, so a machine that got busier cannot flatter the collector.
    train_shapes = step_product_shapes(spec, g, b)
    eval_shapes = [(n_test, d, g * h, False)]
    load_before = os.getloadavg()[0]
    rate_train_before, rate_eval_before = matmul_gflops(train_shapes), matmul_gflops(eval_shapes)
    cores = min(args.workers, os.cpu_count() or 1)
    side_by_side_before = matmul_rate_concurrent(train_shapes, cores)

    # 2a. One group trained in this process with the workers not yet started: what the lockstep
    # code reaches without a second worker (and other jobs' caches) on the same cores. The
    # second of two runs counts (the first pays one-time costs a long-lived worker pays once).
    from hyperforget.zoo.collect import train_group

    quiet = min((train_group(cfg, 0, probe_seconds=args.probe_seconds) for _ in range(2)),
                key=lambda res: res.train_cpu_seconds)
    quiet_flop = 4.0 * d * h * len(task.data.y_train) * task.epochs * quiet.runs

    # 2b. The collector.
    out = args.out or tempfile.mkdtemp(prefix="bench-zoo-")
    if os.path.exists(os.path.join(out, "zoo.json")):
        shutil.rmtree(out)
    stats = {"train_seconds": 0.0, "train_cpu_seconds": 0.0, "evaluated": 0, "task_seconds": 0.0,
             "task_cpu_seconds": 0.0, "probe_weighted": 0.0, "probes": []}

    def on_commit(res, ids):
        stats["train_seconds"] += res.train_seconds
        stats["train_cpu_seconds"] += res.train_cpu_seconds
        stats["evaluated"] += res.evaluated
        stats["task_seconds"] += res.seconds
        stats["task_cpu_seconds"] += res.cpu_seconds
        stats["probe_weighted"] += res.matmul_gflops * res.train_cpu_seconds
        stats["probes"].append(res.matmul_gflops)

    with TreePeakRSS() as rss:
        t0 = time.perf_counter()
        summary = collect(cfg, out, workers=args.workers, progress=True, on_commit=on_commit,
                          probe_seconds=args.probe_seconds)
        wall = time.perf_counter() - t0
    load_during = os.getloadavg()[0]
    rate_train = max(rate_train_before, matmul_gflops(train_shapes))
    rate_train_side_by_side = max(side_by_side_before, matmul_rate_concurrent(train_shapes, cores))
    rate_eval = max(rate_eval_before, matmul_gflops(eval_shapes))
    rate1 = (rate_train * 2 + rate_eval) / 3  # one thread, all three shapes
    limit = rate1 * cores
    # Forward + first-layer gradient products over the examples really processed (the last
    # minibatch of an epoch is short); the small second-layer and update work is not counted.
    runs_trained = summary.run_steps / task.total_steps
    train_flop = 4.0 * d * h * len(task.data.y_train) * task.epochs * runs_trained
    eval_flop = 2.0 * n_test * d * h * stats["evaluated"]
    coll = {
        "wall_s": wall, "checkpoints": summary.checkpoints, "originals": summary.originals, "runs": cfg.runs,
        "checkpoints_per_s": summary.checkpoints / wall, "run_steps_per_s": summary.run_steps / wall,
        "train_gflops_per_core": train_flop / stats["train_cpu_seconds"] / 1e9,  # CPU time, like the limit
        "train_gflops_per_core_wall": train_flop / stats["train_seconds"] / 1e9,
        "all_gflops": (train_flop + eval_flop) / wall / 1e9, "evaluated": stats["evaluated"],
        "all_gflops_per_cpu_s": (train_flop + eval_flop) / stats["task_cpu_seconds"] / 1e9,
        "task_cpu_seconds": stats["task_cpu_seconds"],
        "run_steps_per_cpu_s": summary.run_steps / stats["task_cpu_seconds"],
        "checkpoints_per_cpu_s": summary.checkpoints / stats["task_cpu_seconds"],
        "peak_rss_gib": rss.peak / 2**30, "per_reason": summary.per_reason, "per_phase": summary.per_phase,
    }

    # The limit inside the tasks: each task's own torch.mm rate on the steps' shapes, weighted by
    # its training time. On a shared machine this is the rate the steps could have had.
    in_task_limit = stats["probe_weighted"] / stats["train_cpu_seconds"]
    in_task_range = [min(stats["probes"]), max(stats["probes"])]

    # 3. The plain loop on a few runs, the same steps, evaluations and kept share per run.
    plans = [plan_run(cfg, task, r) for r in range(min(args.plain_runs, cfg.runs))]
    eval_share = stats["evaluated"] / summary.run_steps
    keep_share = summary.originals / max(stats["evaluated"], 1)
    plain = plain_loop(task, plans, task.total_steps, eval_share, keep_share, b)
    plain_rate = plain["run_steps"] / plain["seconds"]  # one process, one thread
    ratio = coll["run_steps_per_s"] / (plain_rate * cores)  # against one plain loop per core
    # Per CPU-second of the work itself: what a busy machine cannot distort much.
    ratio_cpu = coll["run_steps_per_cpu_s"] / (plain["run_steps"] / plain["cpu_seconds"])

    results = {"machine": {"cpus": os.cpu_count(), "torch_threads_plain": 1,
                           "workers": args.workers, "matmul_gflops_1thread": rate1, "limit_gflops": limit,
                           "matmul_gflops_train_shapes": rate_train, "matmul_gflops_eval_shape": rate_eval,
                           "load_avg_1min_before": load_before, "load_avg_1min_after_collect": load_during,
                           "load_avg_1min": os.getloadavg()[0]},
               "config": cfg.to_dict(), "collector": coll, "plain": {**plain, "run_steps_per_s": plain_rate},
               "ratio_run_steps": ratio, "ratio_run_steps_per_cpu_s": ratio_cpu,
               "train_share_of_limit": coll["train_gflops_per_core"] / rate_train,
               "matmul_gflops_in_tasks": in_task_limit, "matmul_gflops_in_tasks_range": in_task_range,
               "train_share_of_in_task_limit": coll["train_gflops_per_core"] / in_task_limit,
               "matmul_gflops_train_shapes_side_by_side": rate_train_side_by_side,
               "train_share_of_side_by_side_limit": coll["train_gflops_per_core"] / rate_train_side_by_side,
               "one_group_in_process": {"runs": quiet.runs, "train_cpu_seconds": quiet.train_cpu_seconds,
                                        "cpu_seconds": quiet.cpu_seconds,
                                        "train_gflops": quiet_flop / quiet.train_cpu_seconds / 1e9,
                                        "train_share_of_limit": quiet_flop / quiet.train_cpu_seconds / 1e9 / rate_train,
                                        "matmul_gflops_in_task": quiet.matmul_gflops,
                                        "train_share_of_in_task_limit":
                                            quiet_flop / quiet.train_cpu_seconds / 1e9 / quiet.matmul_gflops,
                                        "run_steps_per_cpu_s": quiet.steps / quiet.cpu_seconds},
               "overall_share_of_limit": coll["all_gflops"] / limit,
               "peak_rss_self_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}
    per_ckpt = wall / summary.checkpoints
    results["extrapolated_1_9M_s"] = per_ckpt * 1.9e6

    print(f"matmul limit (torch.mm, 1 thread, higher of before/after the collection): training shapes "
          f"({b}, {d}) @ ({d}, {g * h}) and ({g * h}, {b}) @ ({b}, {d}): {rate_train:.1f} GFLOP/s "
          f"(before {rate_train_before:.1f}); evaluation ({n_test}, {d}) @ ({d}, {g * h}): {rate_eval:.1f}; "
          f"all x {cores} = {limit:.1f} GFLOP/s")
    print(f"load average (1 min): {load_before:.1f} before, {load_during:.1f} after the collection, "
          f"{os.getloadavg()[0]:.1f} at the end, on {os.cpu_count()} CPUs")
    print(f"collector: {summary.checkpoints:,} checkpoints ({summary.originals:,} originals) from {cfg.runs} runs "
          f"in {wall:.1f} s -> {coll['checkpoints_per_s']:,.0f} checkpoints/s, "
          f"{coll['run_steps_per_s']:,.0f} run-steps/s")
    print(f"  lockstep training: {coll['train_gflops_per_core']:.1f} GFLOP/s per core (CPU time of the steps) = "
          f"{results['train_share_of_limit']:.0%} of the matmul limit on its shapes; all work (train + eval): "
          f"{coll['all_gflops']:.1f} GFLOP/s = {results['overall_share_of_limit']:.0%} of {limit:.0f} "
          f"(per task CPU-second: {coll['all_gflops_per_cpu_s']:.1f} GFLOP/s = "
          f"{coll['all_gflops_per_cpu_s'] / rate1:.0%} of one thread's limit)")
    print(f"  the same training FLOP rate against torch.mm timed inside each group task, on its worker's thread "
          f"just before and after its steps ({in_task_limit:.1f} GFLOP/s, weighted by training time; tasks "
          f"{in_task_range[0]:.0f}-{in_task_range[1]:.0f}): {results['train_share_of_in_task_limit']:.0%}")
    print(f"  the same training FLOP rate against {cores} matmul processes running side by side, like the workers "
          f"({rate_train_side_by_side:.1f} GFLOP/s each, the higher of before/after): "
          f"{results['train_share_of_side_by_side_limit']:.0%}")
    q = results["one_group_in_process"]
    print(f"  one group of {q['runs']} runs in this process before the workers start: training "
          f"{q['train_gflops']:.1f} GFLOP/s = {q['train_share_of_limit']:.0%} of the matmul limit on its shapes "
          f"({q['train_share_of_in_task_limit']:.0%} of its in-task {q['matmul_gflops_in_task']:.1f}); "
          f"{q['run_steps_per_cpu_s']:,.0f} run-steps per CPU-second with evaluation and selection")
    print(f"  peak RSS (process tree): {coll['peak_rss_gib']:.2f} GiB (wall rates suffer on a busy machine)")
    print(f"plain loop (1 thread): {plain['runs']} runs, {plain['run_steps']:,} steps in {plain['seconds']:.1f} s -> "
          f"{plain_rate:,.0f} run-steps/s; x {cores} cores = {plain_rate * cores:,.0f}")
    print(f"ratio collector / plain: {ratio:.1f}x (run-steps/s on {cores} cores, same evaluations and kept share)")
    print(f"ratio per CPU-second of the tasks (collector {coll['run_steps_per_cpu_s']:,.0f} run-steps/CPU-s, "
          f"{coll['checkpoints_per_cpu_s']:,.0f} checkpoints/CPU-s; plain "
          f"{plain['run_steps'] / plain['cpu_seconds']:,.0f} run-steps/CPU-s): {ratio_cpu:.1f}x")
    print(f"extrapolated 1.9M checkpoints at this rate: {results['extrapolated_1_9M_s'] / 60:.1f} min")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
    if args.out is None:
        shutil.rmtree(out, ignore_errors=True)


if __name__ == "__main__":
    main()
