"""The collector: many MLP training runs, selected checkpoints, streamed into a zoo.

Runs are numbered 0..runs−1 and run r's configuration (seed, learning rate, undersampled
classes and rates, run kind, deleted classes and deletion step) is drawn from (seed, r) alone.
Consecutive runs form groups of ``runs_per_group``; a group is trained in lockstep
(:mod:`hyperforget.zoo.lockstep`) on one minibatch sequence drawn from (seed, group), its candidate
checkpoints evaluated per class in one vectorized pass and filtered by the Appendix A.5
heuristics (:mod:`hyperforget.zoo.selection`), then augmented with permuted copies (:mod:`hyperforget.zoo.augment`).

Groups are dask tasks (a LocalCluster by default, or an existing cluster). The client is the
zoo's single committer: it commits each group under the key ``group-NNNNNN`` in group order,
so checkpoint ids do not depend on the number of workers or the order tasks finish in. A task
that fails is retried; a re-run of an interrupted collection skips committed groups and ends
with exactly the requested runs. At most ``max_in_flight`` group results are held at once,
so memory stays bounded whatever the zoo size.

The package, one job per module (``from hyperforget.zoo.collect import X`` keeps working for
every name below):

- ``config``: :class:`CollectConfig` (saved in zoo.json), its bounds, :func:`group_key`
- ``plan``: :class:`Task`, :func:`resolve_task`, :class:`RunPlan`, :func:`plan_run` (:func:`plan_single`,
  :func:`plan_branch`, :func:`deletion_sets`)
- ``group``: :func:`train_group` (one group's lockstep training and selection), :class:`GroupResult`
- ``schedule``: group results in group order, in this process or as dask tasks
- ``driver``: :func:`collect` (create or resume, commit, normalize, compact), :class:`CollectSummary`
"""

from hyperforget.zoo.collect.config import COLLECTION_FORMAT, MAX_RUNS, MAX_RUNS_PER_GROUP, CollectConfig, group_key
from hyperforget.zoo.collect.driver import CollectSummary, collect
from hyperforget.zoo.collect.group import GroupResult, train_group
from hyperforget.zoo.collect.plan import RunPlan, Task, deletion_sets, plan_branch, plan_run, plan_single, resolve_task

__all__ = [
    "COLLECTION_FORMAT", "MAX_RUNS", "MAX_RUNS_PER_GROUP", "CollectConfig", "CollectSummary", "GroupResult", "RunPlan",
    "Task", "collect", "deletion_sets", "group_key", "plan_branch", "plan_run", "plan_single", "resolve_task",
    "train_group",
]
