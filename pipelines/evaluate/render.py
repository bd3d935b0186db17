"""An evaluation result as Markdown tables and PNG plots (per-example ε histogram, retain vs forget accuracy)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from hyperforget.pipelines import attacks as za
from hyperforget.pipelines.evaluate.config import MIN_EPS_MODELS
from hyperforget.pipelines.metrics import format_stat


def render_markdown(result: dict) -> str:
    """Two Markdown tables (accuracy + attacks; outputs, representations, cost) and the notes."""
    ref = result["reference"]
    ra = ref["retrained_accuracy"]
    lines = [f"## Evaluation, forget set {result['forget']} (retain {result['retain']})", "",
             f"Reference: {ref['n_retrained']} models retrained without the forget classes "
             f"({ref['reference_models']} reference, {ref['negative_models']} attack negatives, "
             f"{ref['floor_models']} floor); {ref['seed_check']}.",
             f"Retrained reference half: retain-train acc {ra['retain_train']:.3f}, retain-class test acc "
             f"{ra['test_retain']:.3f}, forget-class test acc {ra['test_forget']:.3f}.", "",
             "| row | M | acc D_r | acc D_f | test retain | test forget | thr AUC | thr TPR@1% | LiRA AUC "
             "| LiRA TPR@1% | F | F·RA·TA |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        a, at, e = r["accuracy"], r["attacks"], r["epsilon"]
        lira = at["ulira"]
        tag = "" if lira["attack"] == "ulira" else "*"
        few = "†" if r["num_models"] < MIN_EPS_MODELS else ""
        lines.append(f"| {r['name']} | {r['num_models']} | {format_stat(a['retain_train'])} | "
                     f"{format_stat(a['forget_train'])} | {format_stat(a['test_retain'])} | "
                     f"{format_stat(a['test_forget'])} | "
                     f"{at['calibrated_threshold']['auc']:.3f} | {at['calibrated_threshold']['tpr_at_1fpr']:.3f} | "
                     f"{lira['auc']:.3f}{tag} | {lira['tpr_at_1fpr']:.3f}{tag} | {e['F']:.3f}{few} | "
                     f"{e['final_score']:.3f}{few} |")
    lines += ["", "| row | ΔMIA entropy | ΔMIA loss | JSD D_f | JSD test retain | JSD test forget | probe forget acc "
              "| relearn steps | s / model | < 20% retrain |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        m, j, c, rl = r["mia"], r["jsd_to_retrained"], r["cost"], r["relearn"]
        steps = format_stat(rl["steps"], 1) if rl["reached"] else f"> {rl['max_steps']}"
        if 0 < rl["reached"] < rl["tried"]:
            steps += f" ({rl['reached']}/{rl['tried']} reached)"
        cost = "–" if c is None else f"{c['seconds_per_model']:.3g}"
        if c is not None and c.get("amortized_seconds") is not None:
            cost += f" (amortized {c['amortized_seconds']:.3g})"
        under = "–" if c is None else format_stat(c["under_20pct"])
        if c is not None and "amortized_under_20pct" in c:
            under += f" (amortized {format_stat(c['amortized_under_20pct'])})"
        lines.append(f"| {r['name']} | {m['entropy']['minus_retrained']:+.3f} | {m['loss']['minus_retrained']:+.3f} | "
                     f"{format_stat(j['forget_train'])} | {format_stat(j['test_retain'])} | "
                     f"{format_stat(j['test_forget'])} | {format_stat(r['probe_forget_acc'])} | {steps} | {cost} | "
                     f"{under} |")
    lines += ["", f"Retrained models: probe forget acc {ra['probe']:.3f}; one retrain takes "
              f"{ref['retrain_seconds_one_model']:.3g} s (the 20% rule's reference).", "",
              "Columns: attacks compare each row's models with the retrained negatives on D_f, per "
              "(model, example) pair, using the logit-scaled confidence log(p_y/(1−p_y)); AUC 0.5 = "
              "indistinguishable. thr = per-example calibrated confidence threshold (one-sided: more confident "
              "than retrained; AUC < 0.5 is a difference in the other direction). LiRA = U-LiRA likelihood ratio "
              "(* = offline variant, retrained Gaussians only, for rows with < 4 models). F = challenge forgetting "
              "quality from per-example ε (δ = %g), F·RA·TA = F·(RA_U/RA_R)·(TA_U/TA_R) with TA on retain-class "
              "test. ε has a finite-sample floor: compare with the floor row, not with 1; † = fewer than %d models, "
              "where ε reduces to a range test (ε = ∞ only where the model lies outside every retrained model). "
              "ΔMIA = row's MIA − "
              "retrained MIA (entropy: paper Fig. 22; loss: same recipe on −ln p_y). JSD = textbook base-2 JSD per "
              "example to the reference population's mean prediction, batch mean (not F.kl_div's reverse KL "
              "with mean over N·C). Relearn = full-batch SGD steps on %d examples per class until forget-class "
              "test accuracy ≥ %.2f." % (result["config"]["delta"], MIN_EPS_MODELS,
                                         result["config"]["relearn_per_class"],
                                         result["rows"][0]["relearn"]["level"]), ""]
    lines += [f"- {r['name']}: {r['note']}" for r in result["rows"] if r["note"]]
    cs = result["cost_setup"]
    if cs["zoo"] is not None and cs["train"]:
        trains = ", ".join(f"{v} {t:.3g} s" for v, t in cs["train"].items())
        lines.append(f"- amortized cost: zoo {cs['zoo']:.3g} s + hypernetwork training ({trains}), spread over "
                     f"{cs['requests']} forget requests (from {'; '.join(cs['sources'])})")
    else:
        lines.append("- amortized cost: no zoo / hypernetwork timings found (run.json timings or the demo's demo.json)")
    lines += [f"- {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def plot_eps_histogram(result: dict, path: str | Path) -> None:
    """Grouped bars: share of forget examples per ε bin, one colour per row."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    bins = za.EPS_NUM_BINS
    width = 0.8 / max(1, len(rows))
    fig, ax = plt.subplots(figsize=(10, 4))
    for i, r in enumerate(rows):
        h = np.asarray(r["epsilon"]["histogram"], float)
        ax.bar(np.arange(bins) + i * width, h / max(h.sum(), 1), width, label=r["name"], color=plt.cm.tab20(i % 20))
    labels = [f"[{k * za.EPS_BIN_WIDTH:g},{(k + 1) * za.EPS_BIN_WIDTH:g})" for k in range(bins - 1)] + ["≥6 / ∞"]
    ax.set_xticks(np.arange(bins) + 0.4 - width / 2, labels, rotation=45, fontsize=7)
    ax.set_xlabel("per-example ε (bin)")
    ax.set_ylabel("share of forget examples")
    ax.set_title(f"Per-example ε against retrained models, forget {result['forget']}")
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_retain_vs_forget(result: dict, path: str | Path) -> None:
    """Retain-class vs forget-class test accuracy: the retrained population as a grey cloud, every row's
    models as small dots and its mean ± std as a square."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 5))
    markers = {"floor": "o", "ceiling": "*", "method": "s", "control": "X"}
    for i, r in enumerate(result["rows"]):
        a = r["accuracy"]
        x, y = a["test_forget"], a["test_retain"]
        if not (np.isfinite(x["mean"]) and np.isfinite(y["mean"])):
            continue
        line = ax.errorbar(x["mean"], y["mean"], xerr=x["std"], yerr=y["std"], marker=markers.get(r["kind"], "s"),
                           linestyle="none", capsize=3, color=plt.cm.tab20(i % 20),
                           label=f"{r['name']} (M={r['num_models']})")
        pm = r.get("per_model") or {}
        if len(pm.get("test_forget", [])) > 1:
            ax.scatter(pm["test_forget"], pm["test_retain"], s=6, alpha=0.35, color=line[0].get_color())
    cloud = result.get("retrained_cloud")
    if cloud:
        ax.scatter(cloud["test_forget"], cloud["test_retain"], s=8, color="grey", alpha=0.4,
                   label="retrained models")
    ax.set_xlabel("forget-class test accuracy")
    ax.set_ylabel("retain-class test accuracy")
    ax.set_title(f"Retain vs forget, forget {result['forget']}")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
