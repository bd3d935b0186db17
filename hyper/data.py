"""What a DiHyFo hypernetwork trains on: zoo views through the streaming loader, or tensors in memory.

DiHyFo-2 reads single checkpoints (θ*, its class losses); DiHyFo-1 reads pairs from one run (θ earlier,
θ* later, both with class losses), a share of them with θ replaced by a fresh initialization
(:class:`NoiseStarts`). Also the zoo's loss statistics and per-value normalization statistics.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field
from typing import Iterator, Sequence

import numpy as np
import torch
import torch.distributed as dist

from hyperforget.hyper.tokenizer import compute_coordinate_normalization, compute_normalization
from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.mlp import MLPSpec
from hyperforget.zoo.seeds import EPOCH_SHUFFLE_STRIDE

KNOWN_ACCURACY = 0.9  # a checkpoint "knows every class" when each class's test accuracy reaches this
# Retain profiles (:func:`retain_profiles`) are saved at these fractions of the zoo, for every forget
# set of at most MAX_FORGETTABLE forgettable classes (2^8 - 1 sets).
RETAIN_FRACTIONS = (0.005, 0.01, 0.02, 0.05, 0.1)
MAX_FORGETTABLE = 8


class TensorStream:
    """In-memory stand-in for queries.loader.CheckpointStream (single or pairs mode).

    Batches: {"params" (B, P), "losses" (B, C), "ids" (B,)} and, with ``pairs`` (M, 2) index
    pairs (θ row, θ* row), also "target_params", "target_losses", "target_ids". An epoch is a
    seeded permutation split into full batches, dealt round-robin to ranks.
    """

    def __init__(self, params: torch.Tensor, losses: torch.Tensor, pairs: torch.Tensor | None = None, *,
                 batch_size: int = 128, shuffle: bool = True, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.params = torch.as_tensor(params, dtype=torch.float32)
        self.losses = torch.as_tensor(losses, dtype=torch.float32)
        self.pairs = None if pairs is None else torch.as_tensor(pairs, dtype=torch.long)
        self.batch_size, self.shuffle, self.seed = batch_size, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch, self.offset = 0, 0  # offset: batches of this epoch already yielded to this rank
        n = len(self.pairs) if self.pairs is not None else len(self.params)
        if n < batch_size * world_size:
            raise HyperForgetError(f"{n} training examples cannot fill one batch of {batch_size} on "
                                   f"{world_size} rank(s); lower --batch-size")
        self.num_examples = n

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.offset = epoch, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "offset": self.offset, "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.offset = int(state["epoch"]), int(state["offset"])

    def __len__(self) -> int:
        return self.num_examples // (self.batch_size * self.world_size)

    def __iter__(self) -> Iterator[dict]:
        n = self.num_examples
        order = (torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * EPOCH_SHUFFLE_STRIDE + self.epoch))
                 if self.shuffle else torch.arange(n))
        batches = order[: len(self) * self.batch_size * self.world_size].view(-1, self.batch_size)
        mine = batches[self.rank::self.world_size]
        while self.offset < len(mine):
            idx = mine[self.offset]
            self.offset += 1
            if self.pairs is None:
                yield {"params": self.params[idx], "losses": self.losses[idx], "ids": idx}
            else:
                a, b = self.pairs[idx, 0], self.pairs[idx, 1]
                yield {"params": self.params[a], "losses": self.losses[a], "ids": a,
                       "target_params": self.params[b], "target_losses": self.losses[b], "target_ids": b}
        self.epoch, self.offset = self.epoch + 1, 0


def run_pairs(run_ids: np.ndarray, steps: np.ndarray, max_pairs: int | None = None, seed: int = 0) -> np.ndarray:
    """(M, 2) row pairs (earlier, later) of the same run, as DiHyFo-1 trains on."""
    run_ids, steps = np.asarray(run_ids), np.asarray(steps)
    out = []
    for r in np.unique(run_ids):
        rows = np.flatnonzero(run_ids == r)
        a, b = np.meshgrid(rows, rows, indexing="ij")
        keep = steps[a] < steps[b]
        out.append(np.stack([a[keep], b[keep]], 1))
    pairs = np.concatenate(out) if out else np.zeros((0, 2), dtype=np.int64)
    if max_pairs is not None and len(pairs) > max_pairs:
        pairs = pairs[np.random.default_rng(seed).choice(len(pairs), max_pairs, replace=False)]
    return pairs.astype(np.int64)


@dataclass
class HyperData:
    """Everything the trainer needs to know about its checkpoints besides the streams."""

    spec: MLPSpec  # the MLP family
    classes: list[int]  # original class ids of the task
    normalization: dict  # zoo statistics (global mean/std, gpt_coeff, per-layer mean/std)
    loss_stats: dict  # loss_statistics(): per-class loss quantiles, saved with the hypernetwork
    train_stream: object  # iterable of dict batches (CheckpointStream or TensorStream)
    test_stream: object | None  # the same over held-out runs, or None
    dataset: dict | None = None  # {"name", "classes", "scaling"} for load_dataset, or None
    eval_data: tuple[torch.Tensor, torch.Tensor] | None = None  # (x_test, y_test) when no dataset name
    probe_data: tuple[torch.Tensor, torch.Tensor] | None = None  # (x_train, y_train) when no dataset name
    zoo: str | None = None  # zoo path
    pivots: list[int] = field(default_factory=list)  # the zoo's pivot classes (task labels)

    def test_split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_test (N, D), y_test (N,)) of the task, for evaluating decoded MLPs."""
        if self.eval_data is None:
            if self.dataset is None:
                raise HyperForgetError("no dataset to evaluate generated MLPs on; give the zoo's dataset")
            self.eval_data = load_task_split(self.dataset, "test")
        return self.eval_data

    def train_split(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_train (N, D), y_train (N,)) of the task: the images the zoo's networks learned from."""
        if self.probe_data is None:
            if self.dataset is None:
                raise HyperForgetError("no training images for the function- or class-loss-matching term; give "
                                       "the zoo's dataset or set function_loss=0 and class_loss_match=0")
            self.probe_data = load_task_split(self.dataset, "train")
        return self.probe_data


def load_task_split(dataset: dict, split: str = "test") -> tuple[torch.Tensor, torch.Tensor]:
    """One split ("train" or "test") of the dataset a zoo records (its name, original classes, pixel scaling)."""
    from hyperforget.zoo.datasets import load_dataset

    if split not in ("train", "test"):
        raise HyperForgetError(f"unknown split {split!r}: choose train or test")
    ds = load_dataset(dataset["name"], root=dataset.get("root"), classes=dataset.get("classes"),
                      scaling=dataset.get("scaling", "unit"))
    x, y = (ds.x_train, ds.y_train) if split == "train" else (ds.x_test, ds.y_test)
    return torch.as_tensor(x), torch.as_tensor(y)


# Levels of the saved quantile grid: every level a prompt, the quality sweep or the condition's
# standardization asks for (min, 0.5 %, 5 %, 10 %, 90 %, 95 %, 99.5 %, max, ...) is on it.
LOSS_LEVELS = (0.0, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.975, 0.99,
               0.995, 1.0)


def retain_profiles(losses: np.ndarray, forgettable: Sequence[int],
                    fractions: Sequence[float] = RETAIN_FRACTIONS) -> dict | None:
    """Joint low-loss levels of the retained classes, for every forget set of forgettable classes.

    For a forget set F and a fraction f: the per-class median loss of the zoo checkpoints whose mean
    loss over the classes outside F is among the lowest f of the zoo. Unlike per-class quantiles
    taken one class at a time, which ask for a combination few checkpoints reach (on MNIST-10 no
    checkpoint has all nine other classes at their 5 % quantile), this is a level the zoo's best
    models reach on all retained classes at once.

    Returns {"fractions": [...], "profiles": {"2-3": (len(fractions), C) lists}} keyed by the sorted
    forget set, or None when there are no forgettable classes or more than MAX_FORGETTABLE.
    """
    losses = np.asarray(losses, dtype=np.float64)
    c = losses.shape[1]
    forgettable = sorted({int(k) for k in forgettable})
    if not forgettable or len(forgettable) > MAX_FORGETTABLE:
        return None
    profiles = {}
    keep = max(1, math.ceil(max(fractions) * len(losses)))
    for size in range(1, len(forgettable) + 1):
        for forget in itertools.combinations(forgettable, size):
            retain = [k for k in range(c) if k not in forget]
            if not retain:
                continue
            score = losses[:, retain].mean(1)
            # Only the best max(fractions) are ever read: partition them out, then sort those.
            top = np.argpartition(score, keep - 1)[:keep] if keep < len(score) else np.arange(len(score))
            order = top[np.argsort(score[top], kind="stable")]
            rows = [np.median(losses[order[:max(1, math.ceil(f * len(losses)))]], 0) for f in fractions]
            profiles["-".join(map(str, forget))] = np.asarray(rows).tolist()
    return {"fractions": [float(f) for f in fractions], "profiles": profiles}


def loss_statistics(losses: np.ndarray, accuracies: np.ndarray | None = None,
                    forgettable: Sequence[int] | None = None) -> dict:
    """Per-class statistics of the class losses (N, C) of a zoo's checkpoints: the one source of
    them, saved with every hypernetwork and read by unlearning's prompts and the quality sweep.

    Returns {"rows", "levels" (L,), "quantiles" (L, C), and by name "min", "q05", "q10", "q50",
    "q90", "q95", "max" (C,)}; NaN rows are left out. With per-class accuracies (N, C), also
    "known_median": the per-class median loss of the checkpoints that know every class (accuracy
    ≥ KNOWN_ACCURACY on each): a low loss that the zoo's models reach on all classes at once,
    unlike the per-class q10, which few checkpoints reach jointly. With the forgettable classes
    (the non-pivots), also "retain_profiles" (:func:`retain_profiles`).
    """
    losses = np.asarray(losses, dtype=np.float64)
    finite = np.isfinite(losses).all(1)
    if losses.ndim != 2 or not finite.any():
        raise HyperForgetError("the zoo holds no finite per-class losses; check it with `hyperforget zoo verify`")
    grid = np.quantile(losses[finite], LOSS_LEVELS, axis=0)  # (L, C)
    stats = {"rows": int(finite.sum()), "levels": list(LOSS_LEVELS), "quantiles": grid.tolist()}
    named = {"min": 0.0, "q05": 0.05, "q10": 0.10, "q50": 0.50, "q90": 0.90, "q95": 0.95, "max": 1.0}
    stats.update({k: grid[LOSS_LEVELS.index(q)].tolist() for k, q in named.items()})
    if accuracies is not None:
        known = (np.asarray(accuracies) >= KNOWN_ACCURACY).all(1) & finite
        if known.any():
            stats["known_median"] = np.median(losses[known], axis=0).astype(float).tolist()
            stats["known_rows"] = int(known.sum())
    if forgettable is not None:
        stats["retain_profiles"] = retain_profiles(losses[finite], forgettable)  # None: too many classes
    return stats


def retain_profile(stats: dict, forget: Sequence[int], fraction: float) -> np.ndarray:
    """(C,) per-class median loss of the zoo's best ``fraction`` of checkpoints on the classes outside
    ``forget``, from saved statistics (:func:`retain_profiles`), linear between the saved fractions."""
    if "retain_profiles" not in stats:
        raise HyperForgetError("these loss statistics have no joint retain profiles (a hypernetwork saved by an "
                               "older version); retrain it with `hyperforget train`, or ask for per-class quantiles "
                               "(`unlearn --retain-mode quantile`, `quality --hold q10`)")
    saved = stats["retain_profiles"]
    if saved is None:  # loss_statistics saves None when there are too many forget sets
        raise HyperForgetError(f"no joint retain profiles: the zoo has more than {MAX_FORGETTABLE} non-pivot classes "
                               "(too many forget sets to save); ask for per-class quantiles "
                               "(`unlearn --retain-mode quantile`, `quality --hold q10`)")
    key = "-".join(str(k) for k in sorted(int(k) for k in forget))
    if key not in saved["profiles"]:
        raise HyperForgetError(f"no retain profile for forget set {{{key.replace('-', ',')}}}: profiles exist for "
                               "forget sets of the zoo's non-pivot classes only")
    return _interp_columns(fraction, saved["fractions"], saved["profiles"][key])


def zoo_loss_statistics(reader) -> dict:
    """:func:`loss_statistics` of a zoo's checkpoints (a ZooReader), permuted copies left out (they
    repeat their source's losses)."""
    meta = reader.metadata()
    c = reader.config.spec.num_classes
    losses = np.stack([meta.column(f"loss_{k}").to_numpy(zero_copy_only=False) for k in range(c)], 1)
    accs = np.stack([meta.column(f"acc_{k}").to_numpy(zero_copy_only=False) for k in range(c)], 1)
    if "perm_index" in meta.column_names:
        original = meta.column("perm_index").to_numpy(zero_copy_only=False) == 0
        losses, accs = losses[original], accs[original]
    pivots = set(getattr(reader.config, "pivots", None) or [])
    return loss_statistics(losses, accs, forgettable=[k for k in range(c) if k not in pivots])


def loss_quantile(stats: dict, q: float) -> np.ndarray:
    """(C,) per-class q-quantile from saved statistics: exact on the grid, linear between its levels."""
    if "quantiles" not in stats:
        raise HyperForgetError("these loss statistics have no quantile grid (a hypernetwork saved by an older "
                               "version); retrain it with `hyperforget train`")
    if not 0.0 <= q <= 1.0:
        raise HyperForgetError(f"a loss quantile is a level in [0, 1], got {q}")
    return _interp_columns(q, stats["levels"], stats["quantiles"])


def _interp_columns(x: float, levels, grid) -> np.ndarray:
    """(C,) each column of a saved (L, C) grid read at x, linear between its L levels."""
    levels, grid = np.asarray(levels, dtype=np.float64), np.asarray(grid, dtype=np.float64)
    return np.array([np.interp(x, levels, grid[:, k]) for k in range(grid.shape[1])])


def data_from_tensors(spec: MLPSpec, params: torch.Tensor, losses: torch.Tensor, *, variant: str,
                      run_ids: np.ndarray | None = None, steps: np.ndarray | None = None,
                      x_test: torch.Tensor, y_test: torch.Tensor, batch_size: int, seed: int = 0,
                      test_fraction: float = 0.1, rank: int = 0, world_size: int = 1,
                      classes: list[int] | None = None, x_train: torch.Tensor | None = None,
                      y_train: torch.Tensor | None = None) -> HyperData:
    """HyperData over in-memory checkpoints (N, P) with class losses (N, C); runs split train/test.

    ``x_train``/``y_train`` are the task's training images, needed only by the function-matching term.
    """
    params = torch.as_tensor(params, dtype=torch.float32)
    losses = torch.as_tensor(losses, dtype=torch.float32)
    n = len(params)
    run_ids = np.arange(n) if run_ids is None else np.asarray(run_ids)
    steps = np.zeros(n, dtype=np.int64) if steps is None else np.asarray(steps)
    runs = np.unique(run_ids)
    rng = np.random.default_rng(seed)
    test_runs = set(rng.choice(runs, max(1, int(round(len(runs) * test_fraction))), replace=False).tolist())
    is_test = np.isin(run_ids, list(test_runs))
    train_rows, test_rows = np.flatnonzero(~is_test), np.flatnonzero(is_test)

    def stream(rows: np.ndarray, shuffle: bool, bs: int) -> TensorStream:
        sub_p, sub_l = params[rows], losses[rows]
        pairs = None
        if variant == "dihyfo1":
            pairs = torch.as_tensor(run_pairs(run_ids[rows], steps[rows], seed=seed))
        return TensorStream(sub_p, sub_l, pairs, batch_size=bs, shuffle=shuffle, seed=seed, rank=rank,
                            world_size=world_size)

    per_rank = batch_size // world_size
    return HyperData(spec=spec, classes=list(classes or range(spec.num_classes)),
                     normalization=compute_normalization(spec, params[train_rows]),
                     loss_stats=loss_statistics(losses[train_rows].numpy(), forgettable=range(spec.num_classes)),
                     train_stream=stream(train_rows, True, per_rank),
                     test_stream=stream(test_rows, True, min(per_rank, max(1, len(test_rows) // world_size))),
                     eval_data=(torch.as_tensor(x_test), torch.as_tensor(y_test)),
                     probe_data=None if x_train is None else (torch.as_tensor(x_train), torch.as_tensor(y_train)))


def data_from_zoo(zoo: str, variant: str, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                  permute: bool = True, view: dict | None = None) -> HyperData:
    """HyperData over a zoo's training/test views (built on first use by queries.views)."""
    from hyperforget.queries.loader import CheckpointStream
    from hyperforget.queries.views import ensure_training_views
    from hyperforget.zoo.store import open_zoo

    reader = open_zoo(zoo)
    cfg = reader.config
    norm = getattr(cfg, "normalization", None)
    if not norm:
        raise HyperForgetError(f"zoo {zoo} has no normalization statistics; run `hyperforget zoo stats {zoo}` "
                               "(or finish its collection) first")
    from hyperforget.queries.views import VARIANT_KINDS

    train_view, test_view = ensure_training_views(zoo, variant, seed=seed, **(view or {}).get(VARIANT_KINDS[variant], {}))
    _check_view_fills_a_batch(zoo, train_view, batch_size)
    per_rank = batch_size // world_size
    # Full, equal batches on every rank: a short or missing batch on one rank would hang DDP.
    even = "pad" if world_size > 1 else False
    train_stream = CheckpointStream(zoo, train_view, batch_size=per_rank, shuffle=True, seed=seed,
                                    permute=permute, drop_last=True, rank=rank, world_size=world_size,
                                    even_ranks=even)
    test_stream = CheckpointStream(zoo, test_view, batch_size=per_rank, shuffle=True, seed=seed + 1,
                                   rank=rank, world_size=world_size, even_ranks=even)
    dataset = _dataset_description(cfg)
    return HyperData(spec=cfg.spec, classes=list(cfg.classes), normalization=dict(norm),
                     loss_stats=zoo_loss_statistics(reader), train_stream=train_stream, test_stream=test_stream,
                     dataset=dataset, zoo=str(zoo), pivots=list(getattr(cfg, "pivots", []) or []))


def _check_view_fills_a_batch(zoo: str, name: str, batch_size: int) -> None:
    """A one-line error naming the view's filters when its rows cannot fill one training batch."""
    from hyperforget.queries.views import describe_filters, view_record

    rec = view_record(zoo, name)
    if rec["rows"] >= batch_size:
        return
    raise HyperForgetError(f"training view {name} of {zoo} has {rec['rows']} rows, fewer than one batch of "
                           f"{batch_size} ({describe_filters(rec)}): loosen its filters, lower --batch-size or "
                           "grow the zoo")


def coordinate_statistics(data: HyperData, variant: str, canonical: bool, max_rows: int = 20_000,
                          order: str = "bias") -> dict:
    """Per-value mean/std of the training stream's targets (θ*), from up to ``max_rows`` of them.

    Reads the first batches of the stream and restores its position, so training sees the same
    data order with or without this pass.
    """
    stream = data.train_stream
    state = stream.state_dict() if hasattr(stream, "state_dict") else None
    key = "target_params" if variant == "dihyfo1" else "params"
    rows, n = [], 0
    for batch in stream:
        rows.append(torch.as_tensor(batch[key], dtype=torch.float32))
        n += len(rows[-1])
        if n >= max_rows:
            break
    if state is not None:
        stream.load_state_dict(state)
    if not rows:
        raise HyperForgetError("the training view yields no batch; lower --batch-size or grow the zoo")
    # Under DDP every rank sees its own slice: the sums of all ranks make one set of statistics.
    reduce = dist.all_reduce if dist.is_available() and dist.is_initialized() else None
    return compute_coordinate_normalization(data.spec, torch.cat(rows)[:max_rows], canonical, reduce, order)


def _dataset_description(cfg) -> dict:
    ds = getattr(cfg, "dataset", None)
    if isinstance(ds, str):
        ds = {"name": ds}
    ds = dict(ds or {})
    if "name" not in ds:
        raise HyperForgetError("the zoo's config names no dataset; it cannot be evaluated")
    ds.setdefault("classes", list(cfg.classes))
    return {k: ds[k] for k in ("name", "classes", "scaling", "root") if k in ds}


class NoiseStarts:
    """Replace a share of DiHyFo-1 pairs' θ by fresh MLP initializations and their test-split losses.

    The losses are measured exactly as the zoo measures its checkpoints' (per-class mean cross-entropy
    on the task's test split), so a noise start at sampling time (hyper.sample: current_params=None)
    looks like what the network saw in training.
    """

    def __init__(self, data: "HyperData", share: float):
        from hyperforget.zoo.mlp import PerClassEvaluator

        self.spec, self.share = data.spec, share
        x, y = data.test_split()
        self.evaluate = PerClassEvaluator(data.spec, x, y)

    def __call__(self, batch: dict, gen: torch.Generator) -> dict:
        from hyperforget.zoo.mlp import init_params

        rows = torch.nonzero(torch.rand(batch["params"].shape[0], generator=gen) < self.share).flatten()
        if len(rows) == 0:
            return batch
        seeds = torch.randint(0, 2**31 - 1, (len(rows),), generator=gen).tolist()
        starts = init_params(self.spec, seeds)
        batch = dict(batch)
        batch["params"], batch["losses"] = batch["params"].clone(), batch["losses"].clone()
        batch["params"][rows] = starts.to(batch["params"].dtype)
        batch["losses"][rows] = torch.as_tensor(self.evaluate(starts).loss, dtype=batch["losses"].dtype)
        batch["noise_start"] = torch.zeros(batch["params"].shape[0], dtype=torch.bool)
        batch["noise_start"][rows] = True
        return batch


def jitter_current_losses(batch: dict, sigma: float, gen: torch.Generator) -> dict:
    """DiHyFo-1's batch with its current losses ("losses") times exp(σ·N(0, 1)), one factor per value."""
    losses = batch["losses"].float()
    factor = torch.exp(sigma * torch.randn(losses.shape, generator=gen)).to(losses.device)
    return {**batch, "losses": losses * factor}
