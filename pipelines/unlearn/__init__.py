"""Class unlearning runs: prompts, sampling, selection, baselines and metrics.

A run directory (layout in docs/format.md, "Unlearning run directory"; :mod:`hyperforget.pipelines.rundir`)
holds one model to unlearn, the models retrained without each forget set (the gold standard) and,
per forget set, one folder per unlearning method. Every artifact stores the configuration that made it.

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

The package, one job per module (``from hyperforget.pipelines.unlearn import X`` keeps working for
every name below, the run directory's included):

- ``prompts``: :class:`PromptConfig`, :class:`LossStats`, :func:`build_prompts` (step 1)
- ``selection``: :func:`select_best`, :func:`split_accuracy`, :func:`per_class_accuracy` (step 3)
- ``flow``: :class:`UnlearnConfig`, :func:`unlearn` (DiHyFo steps 2–4, zoo retrieval, baselines)
- ``metrics``: :func:`compute_metrics`, :func:`refresh_metrics` (forget-X/metrics.json)

The run directory itself (:class:`~hyperforget.pipelines.rundir.Run`, :func:`create_run`,
:func:`open_run`, method records) lives one layer below, in :mod:`hyperforget.pipelines.rundir`.
"""

from hyperforget.pipelines.rundir import (DIHYFO_METHODS, PATHS_RELATIVE, RETRIEVAL_METHOD, RUN_FORMAT, RUN_VERSION,
                                          Run, RunConfig, RunData, carve_validation, create_run, eval_split,
                                          forget_dir_name, hypernetwork_zoo, load_method, method_dirs, open_run,
                                          params_sha256, parse_classes, zoo_identity, zoo_task)
from hyperforget.pipelines.unlearn.flow import UnlearnConfig, unlearn
from hyperforget.pipelines.unlearn.metrics import compute_metrics, refresh_metrics
from hyperforget.pipelines.unlearn.prompts import LossStats, PromptConfig, build_prompts
from hyperforget.pipelines.unlearn.selection import per_class_accuracy, select_best, split_accuracy

__all__ = [
    "DIHYFO_METHODS", "PATHS_RELATIVE", "RETRIEVAL_METHOD", "RUN_FORMAT", "RUN_VERSION", "LossStats",
    "PromptConfig", "Run", "RunConfig", "RunData", "UnlearnConfig", "build_prompts", "carve_validation",
    "compute_metrics", "create_run", "eval_split", "forget_dir_name", "hypernetwork_zoo", "load_method",
    "method_dirs", "open_run", "params_sha256", "parse_classes", "per_class_accuracy", "refresh_metrics",
    "select_best", "split_accuracy", "unlearn", "zoo_identity", "zoo_task",
]
