"""Evaluation that unlearning researchers trust: every method against a population of retrained models.

For each forget set of a run directory (docs/format.md, "Unlearning run directory") this:

1. Trains ``n_retrained`` (default 128) MLPs from scratch without the forget classes, in lockstep
   (zoo.lockstep.train_models, several data orders), from seeds in a range disjoint from the run's
   and the zoo's seeds (checked against the zoo's metadata when the zoo is reachable). Half is the
   *reference* population (per-example Gaussians, mean prediction, MIA reference), the other half
   the *evaluation* population, split again: one quarter plays the negatives of every attack, the
   other quarter is the retrain-vs-retrain floor.
2. Builds the rows of every table: the floor (retrained quarter), the ceiling (the original model),
   each method found in RUN/forget-X (DiHyFo candidates and selected model, baselines with their
   repeats, topped up to ``baseline_seeds`` with pipelines.baselines.run_baseline), the logit-masking
   control, and the "nearest training checkpoint" control (the zoo checkpoint closest to each
   selected DiHyFo model, permutation-invariant L2).
3. Scores each row (pipelines.attacks, pipelines.metrics): accuracies; calibrated-threshold and U-LiRA attacks
   (AUC, TPR at 1% FPR); the challenge's ε score F and F·(RA_U/RA_R)·(TA_U/TA_R); entropy and loss
   MIA minus the retrained value; batch-mean JSD to the retrained mean prediction on D_f,
   retain-class test and forget-class test; a linear probe for the forget classes on the hidden
   layer; relearn steps; cost against retrain time and the challenge's 20% rule.
4. Writes RUN/evaluation/forget-X.{json,md}, eps_hist_forget-X.png, retain_vs_forget_forget-X.png.

Data: D_r / D_f are the retain / forget examples of the run's fit split (what the models trained
on); "test retain" / "test forget" split the dataset's test split by class.

The package, one job per module (the names below are importable from ``hyperforget.pipelines.evaluate``):

- ``flow``: :func:`evaluate` (every forget set, files written) and :func:`evaluate_forget_set` (steps 1–3)
- ``config``: :class:`EvalConfig`, :class:`Population` (one row), the result's format constants
- ``reference``: reference seeds past every used seed, the retrained populations (step 1)
- ``rows``: the rows a run directory gives (methods, baselines topped up, nearest-checkpoint controls)
  and the zoo and hypernetwork setup time (step 2)
- ``nearest``: :func:`permutation_invariant_distance`, :func:`nearest_zoo_checkpoint`
- ``scoring``: the context of one forget set and :func:`~.scoring.score_population` (step 3)
- ``representation``: the hidden-layer probe and relearning steps (step 3)
- ``render``: :func:`render_markdown`, :func:`plot_eps_histogram`, :func:`plot_retain_vs_forget` (step 4)
"""

from hyperforget.pipelines.evaluate.config import EVAL_FORMAT, EVAL_VERSION, SEED_BASE, EvalConfig, Population
from hyperforget.pipelines.evaluate.flow import evaluate, evaluate_forget_set
from hyperforget.pipelines.evaluate.nearest import nearest_zoo_checkpoint, permutation_invariant_distance
from hyperforget.pipelines.evaluate.render import plot_eps_histogram, plot_retain_vs_forget, render_markdown

__all__ = [
    "EVAL_FORMAT", "EVAL_VERSION", "SEED_BASE", "EvalConfig", "Population", "evaluate", "evaluate_forget_set",
    "nearest_zoo_checkpoint", "permutation_invariant_distance", "plot_eps_histogram", "plot_retain_vs_forget",
    "render_markdown",
]
