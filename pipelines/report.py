"""`hyperforget report RUN_DIR`: the paper's tables, a method comparison and figures, from a run directory.

Reads only what the run's stages wrote (run.json, forget-X/metrics.json, the methods' record.json,
the hypernetworks' curves.json) plus the models for confusion matrices, and writes
RUN/report/report.md, report.json and PNG figures:

- Tables 1/3 layout: accuracy on D_r, D_f and test, MIA, for DiHyFo-1, DiHyFo-2 and the retrained
  models, one column per forget set; Tables 2/4 layout: outputs overlap on D_r, D_f, test and φ.
- A comparison table per forget set with every method side by side, wall time included.
- Figures: observed vs target losses (identity line, the zoo's median loss as the
  high-performance reference), candidate selection, the hypernetworks' learning curves and prompt
  alignment / correlation over training, confusion matrices against a retrained model, and
  retain accuracy vs forget accuracy vs time for all methods.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from hyperforget.pipelines.metrics import format_stat
from hyperforget.pipelines.rundir import (DIHYFO_METHODS, RETRIEVAL_METHOD, Run, forget_dir_name, load_method,
                                          open_run)
from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.files import jsonable, read_json, write_json

# (key in metrics.json, row label, preferred direction) in the paper's order.
PERFORMANCE_ROWS = [("acc_retain", "Accuracy on D_r", "↑"), ("acc_forget", "Accuracy on D_f", "↓"),
                    ("acc_test", "Accuracy on test set", "↑"), ("mia", "MIA", "↓")]
ALIGNMENT_ROWS = [("overlap_retain", "Outputs overlap on D_r", "↑"), ("overlap_forget", "Outputs overlap on D_f", "−"),
                  ("overlap_test", "Outputs overlap on test set", "↑"), ("phi", "Unlearning score (φ)", "↑")]
COMPARISON_COLUMNS = [("acc_retain", "acc D_r"), ("acc_forget", "acc D_f"), ("acc_test", "acc test"), ("mia", "MIA"),
                      ("overlap_retain", "overlap D_r"), ("overlap_forget", "overlap D_f"),
                      ("overlap_test", "overlap test"), ("phi", "φ")]
LABELS = {"dihyfo1": "DiHyFo-1", "dihyfo2": "DiHyFo-2", "zoo_retrieval": "Zoo retrieval", "retrain": "Retrained",
          "original": "Original"}


def _label(method: str) -> str:
    return LABELS.get(method, method)


def _fmt_time(seconds) -> str:
    if seconds is None:
        return "–"
    seconds = float(seconds)
    return f"{seconds * 1000:.0f} ms" if seconds < 1 else f"{seconds:.2f} s"


def _set_label(forget: Sequence[int]) -> str:
    return "D_f={" + ",".join(str(c) for c in forget) + "}"


def _md_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def collect(run: Run) -> dict:
    """Everything the report shows, as JSON-ready data (also written to report.json)."""
    sets = []
    for forget in run.forget_sets:
        path = run.forget_dir(forget) / "metrics.json"
        if not path.exists():
            continue
        metrics = read_json(path)
        sets.append({"forget": list(forget), "dir": forget_dir_name(forget), "methods": metrics["methods"],
                     "num_retrained": metrics.get("num_retrained"), "dihyfo1_start": _dihyfo1_start(run, forget)})
    if not sets:
        raise HyperForgetError(f"run {run.path} has no forget-X/metrics.json yet: run `hyperforget unlearn` and "
                               "`hyperforget retrain` for a forget set first (they write the metrics)")
    return {"run": str(run.path), "config": run.meta.get("config"), "spec": run.meta.get("spec"),
            "classes": list(run.classes), "pivots": list(run.pivots), "dataset": run.meta.get("dataset"),
            "timings": run.meta.get("timings"), "forget_sets": sets}


def paper_tables(data: dict) -> tuple[list[str], list[list[str]], list[str], list[list[str]]]:
    """Tables 1/3 (performance) and 2/4 (alignment): rows are metrics, columns method × forget set."""
    sets = data["forget_sets"]
    perf_methods = [m for m in (*DIHYFO_METHODS, RETRIEVAL_METHOD, "retrain") if any(m in s["methods"] for s in sets)]
    align_methods = [m for m in DIHYFO_METHODS if any(m in s["methods"] for s in sets)]

    def build(methods, rows):
        header = ["metric"] + [f"{_label(m)} {_set_label(s['forget'])}" for m in methods for s in sets]
        body = []
        for key, name, arrow in rows:
            body.append([f"{name} ({arrow})"] + [format_stat(s["methods"].get(m, {}).get(key), 4) for m in methods for s in sets])
        return header, body

    h1, b1 = build(perf_methods, PERFORMANCE_ROWS)
    h2, b2 = build(align_methods, ALIGNMENT_ROWS)
    return h1, b1, h2, b2


def comparison_table(entry: dict) -> tuple[list[str], list[list[str]]]:
    """Every method side by side for one forget set (metrics vs the retrained models, wall time)."""
    header = ["method", "models"] + [name for _, name in COMPARISON_COLUMNS] + ["wall time / model"]
    rows = []
    for method in _method_order(entry["methods"]):
        m = entry["methods"][method]
        rows.append([_label(method), str(m.get("num_models", ""))]
                    + [format_stat(m.get(key), 3) for key, _ in COMPARISON_COLUMNS] + [_fmt_time(m.get("wall_seconds"))])
    return header, rows


def render_comparison(entry: dict) -> tuple[dict, str]:
    """One forget set's side-by-side table as JSON ({"header", "rows"}) and as Markdown.

    ``entry`` has the shape of forget-X/metrics.json ({"forget", "methods": {name: metrics}}); a run's
    report and ``hyperforget compare-baselines`` (whose compare_baselines returns that shape) both
    print their tables through here.
    """
    header, rows = comparison_table(entry)
    return {"header": header, "rows": rows}, _md_table(header, rows)


def _method_order(methods: dict) -> list[str]:
    first = [m for m in (*DIHYFO_METHODS, RETRIEVAL_METHOD) if m in methods]
    last = [m for m in ("logit_mask", "retrain", "original") if m in methods]
    return first + sorted(m for m in methods if m not in first and m not in last) + last


def _mean(stat) -> float:
    if isinstance(stat, dict):
        stat = stat.get("mean")
    return float("nan") if stat is None else float(stat)


# ----------------------------------------------------------------------------------------------
# Figures.


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def fig_losses(record: dict, classes: Sequence[int], pivots: Sequence[int], path: Path) -> None:
    """Observed (test) vs target loss of every candidate, per class, with the identity line and
    the zoo's median loss as the high-performance reference."""
    plt = _plt()
    target = np.asarray(record["candidates"]["target_loss"], dtype=float)  # (N, C)
    observed = np.asarray(record["candidates"]["test_loss"], dtype=float)  # (N, C)
    median = np.asarray(record["zoo_loss_stats"]["median"], dtype=float)  # (C,)
    c = target.shape[1]
    fig, axes = plt.subplots(1, c, figsize=(3.2 * c, 3.2), squeeze=False)
    for k, ax in enumerate(axes[0]):
        ok = np.isfinite(observed[:, k])
        ax.scatter(target[ok, k], observed[ok, k], s=10, alpha=0.6)
        hi = max(np.nanmax(target[:, k]), np.nanmax(np.where(ok, observed[:, k], np.nan)), median[k]) * 1.05
        hi = hi if np.isfinite(hi) and hi > 0 else 1.0
        ax.plot([0, hi], [0, hi], "k--", lw=1, label="identity")
        ax.axhline(median[k], color="tab:green", lw=1, label="zoo median")
        kind = "forget" if k in record["forget"] else ("pivot" if k in pivots else "retain")
        ax.set_title(f"class {classes[k]} ({kind})", fontsize=9)
        ax.set_xlabel("target loss")
        if k == 0:
            ax.set_ylabel("observed test loss")
            ax.legend(fontsize=7)
    fig.suptitle(f"{_label(record['method'])}: observed vs target losses, {_set_label(record['forget'])}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def fig_selection(record: dict, path: Path) -> None:
    """Candidates' validation forget vs retain accuracy; the selected ones marked (paper Figures 3-4)."""
    plt = _plt()
    f = np.asarray(record["candidates"]["forget_acc_val"], dtype=float)
    r = np.asarray(record["candidates"]["retain_acc_val"], dtype=float)
    sel = np.asarray(record["selected"], dtype=int)
    fig, ax = plt.subplots(figsize=(4.2, 3.4))
    ax.scatter(f, r, s=12, alpha=0.5, label="candidates")
    ax.scatter(f[sel], r[sel], s=50, marker="*", color="tab:red", label="selected")
    ax.set_xlabel("forget accuracy (validation)")
    ax.set_ylabel("retain accuracy (validation)")
    ax.set_title(f"{_label(record['method'])} selection, {_set_label(record['forget'])}", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def fig_training(curves: dict, variant: str, classes: Sequence[int], path: Path) -> bool:
    """Learning curves (train / test MSE) and per-class prompt alignment R² and Pearson r over
    training, from a hypernetwork's curves.json ({"train": [{step, mse}], "test": [...],
    "eval": [{step, r2: (C,), pearson: (C,)}]})."""
    train, test, ev = curves.get("train") or [], curves.get("test") or [], curves.get("eval") or []
    if not (train or test or ev):
        return False
    plt = _plt()
    fig, axes = plt.subplots(1, 3, figsize=(14, 3.6))
    ax = axes[0]
    if train:
        ax.plot([p["step"] for p in train], [p["mse"] for p in train], label="train")
    if test:
        ax.plot([p["step"] for p in test], [p["mse"] for p in test], "o-", label="test (EMA)")
    if all(p["mse"] > 0 for p in [*train, *test] if p.get("mse") is not None):
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_title(f"{_label(variant)}: learning curves (MSE, Eq. 5)", fontsize=10)
    ax.legend(fontsize=7)
    for ax, key, title in ((axes[1], "r2", "prompt alignment R² (axis from −1)"), (axes[2], "pearson", "Pearson r")):
        if ev and isinstance(ev[0].get(key), list):
            steps = [p["step"] for p in ev]
            for k in range(len(ev[0][key])):
                vals = [np.nan if p[key][k] is None else p[key][k] for p in ev]
                name = classes[k] if k < len(classes) else k
                ax.plot(steps, vals, "o-", ms=3, label=f"class {name}")
            ax.axhline(0, color="grey", lw=0.8)
            ax.set_ylim(max(-1.05, np.nanmin([v for p in ev for v in p[key] if v is not None] + [0]) - 0.05), 1.05)
            ax.legend(fontsize=6, ncol=2)
        ax.set_xlabel("step")
        ax.set_title(f"{_label(variant)}: {title} over training", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def fig_confusion(matrices: dict[str, np.ndarray], classes: Sequence[int], title: str, path: Path) -> None:
    """Confusion matrices of predictions: unlearned model (columns) vs retrained model (rows)."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(matrices), figsize=(3.6 * len(matrices), 3.4), squeeze=False)
    for ax, (name, m) in zip(axes[0], matrices.items()):
        ax.imshow(m, cmap="Blues")
        for i in range(m.shape[0]):
            for j in range(m.shape[1]):
                ax.text(j, i, str(int(m[i, j])), ha="center", va="center", fontsize=7,
                        color="white" if m[i, j] > m.max() / 2 else "black")
        ax.set_xticks(range(len(classes)), [str(c) for c in classes])
        ax.set_yticks(range(len(classes)), [str(c) for c in classes])
        ax.set_xlabel("unlearned model predicts")
        ax.set_ylabel("retrained model predicts")
        ax.set_title(name, fontsize=9)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def fig_tradeoff(entry: dict, path: Path) -> None:
    """Retain accuracy vs forget accuracy (marker colour: wall time per model, log scale) and time."""
    plt = _plt()
    from matplotlib.colors import LogNorm

    names = [m for m in _method_order(entry["methods"]) if m != "original"]
    f = np.array([_mean(entry["methods"][m].get("acc_forget")) for m in names])
    r = np.array([_mean(entry["methods"][m].get("acc_retain")) for m in names])
    t = np.array([entry["methods"][m].get("wall_seconds") or np.nan for m in names], dtype=float)
    t_plot = np.where(np.isfinite(t) & (t > 0), t, np.nan)
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    finite = np.isfinite(t_plot)
    norm = LogNorm(vmin=np.nanmin(t_plot), vmax=max(np.nanmax(t_plot), np.nanmin(t_plot) * 1.01)) if finite.any() else None
    sc = ax1.scatter(f, r, c=np.where(finite, t_plot, np.nanmin(t_plot) if finite.any() else 1.0), cmap="viridis",
                     norm=norm, s=60, edgecolors="k")
    for name, x, y in zip(names, f, r):
        ax1.annotate(_label(name), (x, y), fontsize=7, xytext=(4, 3), textcoords="offset points")
    ax1.set_xlabel("forget accuracy D_f (↓)")
    ax1.set_ylabel("retain accuracy D_r (↑)")
    ax1.set_title(f"{_set_label(entry['forget'])}: retain vs forget accuracy", fontsize=10)
    if finite.any():
        fig.colorbar(sc, ax=ax1, label="wall time per model (s)")
    ax2.scatter(t_plot, r, marker="o", label="retain acc D_r")
    ax2.scatter(t_plot, f, marker="x", label="forget acc D_f")
    for name, x, y in zip(names, t_plot, r):
        if np.isfinite(x):
            ax2.annotate(_label(name), (x, y), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if finite.any():
        ax2.set_xscale("log")
    ax2.set_xlabel("wall time per model (s)")
    ax2.set_ylabel("accuracy")
    ax2.set_title("accuracy vs time", fontsize=10)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def confusion_matrices(run: Run, forget: Sequence[int], method: str) -> dict[str, np.ndarray]:
    """(C, C) counts: retrained model's prediction (rows) vs the method's first model's (columns),
    on the test split and on D_r (the forget set is left out, as in the paper's Figures 5-8)."""
    import torch

    from hyperforget.pipelines.metrics import confusion_matrix
    from hyperforget.zoo.mlp import model_logits

    params, record = load_method(run, forget, method)
    retrained, _ = load_method(run, forget, "retrain")
    d = run.data()
    retain_rows = ~torch.isin(d.y_fit, torch.as_tensor(list(forget)))
    out = {}
    for name, x in (("test set", d.x_test), ("D_r", d.x_fit[retain_rows])):
        with torch.no_grad():
            pu = model_logits(run.spec, params[:1], x, record.get("output_mask") or ())[0]
            pr = model_logits(run.spec, retrained[:1], x)[0]
        out[name] = confusion_matrix(pr, pu, run.num_classes)
    return out


# ----------------------------------------------------------------------------------------------
# The report.


def _dihyfo1_start(run: Run, forget: Sequence[int]) -> str | None:
    """Where DiHyFo-1 started for a forget set ("model" or "noise"), from its record; None without one."""
    path = run.forget_dir(forget) / "dihyfo1" / "record.json"
    return read_json(path).get("config", {}).get("start", "model") if path.exists() else None


START_TEXT = {"model": "the model to unlearn (its parameters and class losses)",
              "noise": "random MLP initializations (noise) and their class losses"}


def _start_note(sets: list[dict]) -> list[str]:
    """One Markdown line saying where DiHyFo-1 started, per forget set when they differ."""
    starts = {_set_label(s["forget"]): s["dihyfo1_start"] for s in sets if s.get("dihyfo1_start")}
    if not starts:
        return []
    if len(set(starts.values())) == 1:
        return [f"DiHyFo-1 starts from {START_TEXT[next(iter(starts.values()))]}.", ""]
    return ["DiHyFo-1 starts from " + "; ".join(f"{k}: {START_TEXT[v]}" for k, v in starts.items()) + ".", ""]


def write_report(run_dir: str | os.PathLike, out: str | os.PathLike | None = None, *, figures: bool = True) -> Path:
    """Render RUN/report/{report.md, report.json, *.png}; returns the report.md path."""
    run = open_run(run_dir)
    data = collect(run)
    out_dir = Path(out) if out is not None else run.path / "report"
    out_dir.mkdir(parents=True, exist_ok=True)
    figs: list[str] = []
    md = ["# HyperForget unlearning report", "",
          f"Run `{run.path}`: preset {run.config.preset}, dataset {run.config.dataset}, "
          f"MLP {run.spec.input_size}-{run.spec.hidden}-{run.spec.num_classes} ({run.spec.activation}), "
          f"classes {list(run.classes)}, pivots {list(run.pivots)}.", "",
          "Metrics compare each method's models with every retrained model (mean ± std over all pairs). "
          "D_r / D_f: retain / forget examples of the training split the models learned from; test: the "
          "test split. MIA: entropy attack of Figure 22 (compare with the retrained models, not with 0). "
          "φ = 1 − JSD of the softmax outputs. Wall time: per unlearned model (DiHyFo: sampling and "
          "selection, the hypernetwork's training excluded; retrained: per model in a lockstep batch).", ""]

    h1, b1, h2, b2 = paper_tables(data)
    md += ["## Unlearned models' performance (layout of Tables 1 and 3)", "", _md_table(h1, b1), ""]
    md += _start_note(data["forget_sets"])
    if len(h2) > 1:
        md += ["## Output alignment with the retrained models (layout of Tables 2 and 4)", "", _md_table(h2, b2), ""]
    data["tables"] = {"performance": {"header": h1, "rows": b1}, "alignment": {"header": h2, "rows": b2},
                      "comparison": {}}
    md += ["## All methods side by side", ""]
    for entry in data["forget_sets"]:
        table, text = render_comparison(entry)
        data["tables"]["comparison"][entry["dir"]] = table
        md += [f"### {_set_label(entry['forget'])}", "", text, ""]

    if figures:
        md += ["## Figures", ""]
        for entry in data["forget_sets"]:
            forget = tuple(entry["forget"])
            name = f"tradeoff_{entry['dir']}.png"
            fig_tradeoff(entry, out_dir / name)
            figs.append(name)
            md.append(f"![retain vs forget accuracy vs time, {_set_label(forget)}]({name})")
            for method in _method_order(entry["methods"]):
                if method in ("original", "retrain"):
                    continue
                record_path = run.forget_dir(forget) / method / "record.json"
                record = read_json(record_path) if record_path.exists() else {}
                if record.get("kind") == "dihyfo":
                    for kind, fn in (("losses", fig_losses), ("selection", fig_selection)):
                        name = f"{kind}_{entry['dir']}_{method}.png"
                        if kind == "losses":
                            fn(record, run.classes, run.pivots, out_dir / name)
                        else:
                            fn(record, out_dir / name)
                        figs.append(name)
                        md.append(f"![{kind} {method} {_set_label(forget)}]({name})")
                if method in DIHYFO_METHODS:
                    name = f"confusion_{entry['dir']}_{method}.png"
                    fig_confusion(confusion_matrices(run, forget, method), run.classes,
                                  f"{_label(method)} vs retrained, {_set_label(forget)}", out_dir / name)
                    figs.append(name)
                    md.append(f"![confusion {method} {_set_label(forget)}]({name})")
        for variant, model_dir in sorted((run.config.models or {}).items()):
            curves_path = Path(model_dir) / "curves.json"
            if curves_path.exists():
                name = f"training_{variant}.png"
                if fig_training(read_json(curves_path), variant, run.classes, out_dir / name):
                    figs.append(name)
                    md.append(f"![training curves {variant}]({name})")
        md.append("")
    data["figures"] = figs
    write_json(out_dir / "report.json", jsonable(data))
    (out_dir / "report.md").write_text("\n".join(md) + "\n")
    return out_dir / "report.md"
