"""The collection's settings (:class:`CollectConfig`, saved in zoo.json) and the key each group commits under."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from hyperforget.zoo.errors import HyperForgetError, from_settings
from hyperforget.zoo.holdout import FORGET_ACC, RETAIN_ACC, check_holdout
from hyperforget.zoo.mlp import get_preset
from hyperforget.zoo.selection import SelectionConfig

COLLECTION_FORMAT = 1  # version of the "collection" block the collector writes into zoo.json


# Upper bounds that keep a mistyped count from planning billions of groups or one task's memory.
MAX_RUNS = 10_000_000
MAX_RUNS_PER_GROUP = 65_536


@dataclass
class CollectConfig:
    """What a collection builds; saved in zoo.json ("collection") and checked when resuming."""

    preset: str = "mnist4"  # TASK_PRESETS name: MLP, classes, pivots, budget per run, epochs
    dataset: str = "mnist-5k"  # zoo.datasets.load_dataset name (mnist-5k, mnist, fashion-mnist, digits, idx:DIR)
    data_root: str | None = None  # directory of the IDX files for "mnist" / "idx" datasets
    scaling: str = "unit"  # pixel scaling: "unit" (x/255) or "standard"
    runs: int = 64  # training runs, numbered 0..runs-1
    runs_per_group: int = 128  # runs trained in lockstep by one task (one commit)
    augment: int = 0  # K permuted copies stored after each checkpoint
    seed: int = 0  # master seed; run r's configuration derives from (seed, r)
    epochs: int | None = None  # epochs per run; None: the preset's (25)
    batch_size: int = 128  # minibatch shared by the runs of a group
    lr_min: float = 0.05  # per-run base learning rate, log-uniform in [lr_min, lr_max]
    lr_max: float = 0.2  # (G.pt used 0.1, cosine-annealed per step to 0)
    momentum: float = 0.9  # SGD momentum (Nesterov)
    weight_decay: float = 5e-4  # SGD weight decay
    undersample_rate_min: float = 0.005  # kept fraction of an undersampled class, log-uniform in [min, max]
    undersample_rate_max: float = 0.5
    undersample_pivots: bool = False  # may pivot classes be undersampled too
    deletion_share: float = 0.4  # share of runs that delete non-pivot classes mid-training
    deletion_window: tuple[float, float] = (0.3, 0.6)  # deletion step as a fraction of the run's steps
    forgetting_lr: float = 0.0  # > 0: a deletion restarts the run's cosine lr at this multiple of its base lr
    deletion_undersample: bool = True  # may deletion runs undersample classes too (False: they learn all first)
    # > 1: runs come in families of this many branches that share initialization, learning rate,
    # undersampling, minibatch order and deletion step, and differ only in what they delete: branch 0
    # nothing, the others distinct non-empty sets of non-pivots. From one checkpoint before the
    # deletion, the family's futures then differ only by their class losses, which is what DiHyFo-1
    # must learn to read (deletion_share is not used).
    branches: int = 1
    # > 1: a family deletes each of its sets at this many different steps (drawn from deletion_window),
    # so that at one step its branches differ in how long ago a set was deleted, not only in which:
    # a forgotten class's loss then varies while the retained classes' training time is the same.
    branch_steps: int = 1
    # With branches: the earliest of a family's deletion steps is 0, so that each set also has a
    # branch that never sees it: the model retrained without it from the family's initialization,
    # the gold standard of unlearning. Family pairs then go from a checkpoint that knows every
    # class straight to what retraining gives, not only to what training on after a late deletion gives.
    branch_from_start: bool = False
    # Forget sets kept out of the zoo (zoo/holdout.py): no run lowers all of a set's classes, and no
    # checkpoint with every class of a set at accuracy <= holdout_forget_acc and every other class
    # >= holdout_retain_acc is saved.
    holdout: list = field(default_factory=list)
    holdout_forget_acc: float = FORGET_ACC
    holdout_retain_acc: float = RETAIN_ACC
    max_param_abs: float = 10.0  # checkpoints with a larger |parameter| are not kept (G.pt drops them)
    selection: SelectionConfig = field(default_factory=SelectionConfig)  # Appendix A.5 heuristics

    def __post_init__(self) -> None:
        if isinstance(self.selection, dict):
            self.selection = SelectionConfig.from_dict(self.selection)
        self.deletion_window = tuple(float(v) for v in self.deletion_window)
        preset = get_preset(self.preset)
        self.holdout = check_holdout(self.holdout, preset.spec.num_classes, preset.pivots)
        checks = [
            (self.runs >= 1, f"runs must be ≥ 1, got {self.runs}"),
            (self.runs <= MAX_RUNS, f"runs must be ≤ {MAX_RUNS:,} (one zoo's collection), got {self.runs:,}; "
                                    "collect fewer runs"),
            (self.runs_per_group >= 1, f"runs_per_group must be ≥ 1, got {self.runs_per_group}"),
            (self.runs_per_group <= MAX_RUNS_PER_GROUP,
             f"runs_per_group must be ≤ {MAX_RUNS_PER_GROUP:,} (a group's runs train in one task's memory), "
             f"got {self.runs_per_group:,}"),
            (self.augment >= 0, f"augment (permuted copies) must be ≥ 0, got {self.augment}"),
            (self.epochs is None or self.epochs >= 1, f"epochs must be ≥ 1, got {self.epochs}"),
            (self.batch_size >= 1, f"batch_size must be ≥ 1, got {self.batch_size}"),
            (0 < self.lr_min <= self.lr_max, f"need 0 < lr_min ≤ lr_max, got {self.lr_min}, {self.lr_max}"),
            (0 < self.undersample_rate_min <= self.undersample_rate_max <= 1,
             "need 0 < undersample_rate_min ≤ undersample_rate_max ≤ 1"),
            (0 <= self.deletion_share <= 1, f"deletion_share is a share in [0, 1], got {self.deletion_share}"),
            (len(self.deletion_window) == 2 and 0 < self.deletion_window[0] <= self.deletion_window[1] < 1,
             f"deletion_window must be two fractions 0 < a ≤ b < 1, got {self.deletion_window}"),
            (self.max_param_abs > 0, "max_param_abs must be > 0"),
            (self.forgetting_lr >= 0, f"forgetting_lr must be ≥ 0, got {self.forgetting_lr}"),
            (self.branches >= 1, f"branches must be ≥ 1, got {self.branches}"),
            (self.branch_steps >= 1, f"branch_steps must be ≥ 1, got {self.branch_steps}"),
            (self.branch_steps == 1 or self.branches > self.branch_steps,
             f"branch_steps {self.branch_steps} needs more branches than steps (branch 0 deletes nothing), "
             f"got --branches {self.branches}"),
            (not self.branch_from_start or self.branches > 1,
             "branch_from_start needs families: add --branches"),
            (self.branches <= 1 or self.runs_per_group % self.branches == 0,
             f"runs_per_group ({self.runs_per_group}) must be a multiple of branches ({self.branches}) so that "
             "a family trains in one group, on one minibatch order"),
            (0 <= self.holdout_forget_acc < self.holdout_retain_acc <= 1,
             f"need 0 ≤ holdout_forget_acc < holdout_retain_acc ≤ 1, got {self.holdout_forget_acc}, "
             f"{self.holdout_retain_acc}"),
        ]
        for ok, msg in checks:
            if not ok:
                raise HyperForgetError(msg)

    @property
    def num_groups(self) -> int:
        return math.ceil(self.runs / self.runs_per_group)

    def group_runs(self, g: int) -> range:
        return range(g * self.runs_per_group, min((g + 1) * self.runs_per_group, self.runs))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["deletion_window"] = list(self.deletion_window)
        d["selection"] = self.selection.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "CollectConfig":
        return from_settings(cls, d, "collection")


def group_key(g: int) -> str:
    return f"group-{g:06d}"
