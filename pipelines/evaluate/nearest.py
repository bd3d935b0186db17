"""The "nearest training checkpoint" control: permutation-invariant L2 distance and the zoo's nearest row."""

from __future__ import annotations

import math

import numpy as np
import torch

from hyperforget.zoo.augment import hidden_units, min_cost_assignments
from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.mlp import MLPSpec


def permutation_invariant_distance(spec: MLPSpec, a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    """min over hidden-unit permutations π of ‖a − π(b)‖₂, for one (P,) vector a and (K, P) vectors b.

    Permuting hidden units moves each unit's incoming row, bias and outgoing column together and
    leaves the function unchanged, so
    ‖a − π(b)‖² = Σ_h ‖unit_a(h) − unit_b(π(h))‖² + ‖b2_a − b2_b‖²,
    a linear assignment over an H×H cost matrix, solved exactly. Sorting units into a canonical
    order would be cheaper but is not a minimum: two nearby networks can sort differently.
    """
    ua, ba = hidden_units(spec, a[None].double())
    ub, bb = hidden_units(spec, b.double())
    cost = torch.cdist(ua.expand(ub.shape[0], -1, -1), ub) ** 2  # (K, H, H)
    bias = ((bb - ba) ** 2).sum(-1)  # (K,)
    best = cost.gather(2, min_cost_assignments(cost)[..., None]).squeeze(-1).sum(-1)  # (K,)
    return torch.sqrt((best + bias).clamp_min(0)).numpy()


def nearest_zoo_checkpoint(zoo_path: str, spec: MLPSpec, target: torch.Tensor, *, max_rows: int | None = None,
                           chunk_rows: int = 8192) -> dict:
    """The zoo row nearest to target (P,) in permutation-invariant L2 -> {checkpoint_id, distance, params}.

    Permuted copies (perm_index > 0) are skipped: the distance is already permutation-invariant.
    """
    from hyperforget.zoo.store import open_zoo

    reader = open_zoo(zoo_path)
    if reader.spec != spec:
        raise HyperForgetError(f"zoo {zoo_path} holds {reader.spec} MLPs, the run's models are {spec}")
    stop = reader.num_rows if max_rows is None else min(reader.num_rows, int(max_rows))
    if stop == 0:
        raise HyperForgetError(f"zoo {zoo_path} has no committed checkpoints to compare with")
    meta = reader.metadata()
    original_row = (np.asarray(meta.column("perm_index").to_numpy()) == 0 if "perm_index" in meta.column_names
                    else np.ones(reader.num_rows, bool))
    best_d, best_id, scanned = math.inf, -1, 0
    for first, block in reader.iter_rows(chunk_rows, 0, stop):
        keep = np.flatnonzero(original_row[first:first + len(block)])
        if keep.size == 0:
            continue
        d = permutation_invariant_distance(spec, target, torch.as_tensor(block[keep]))
        scanned += keep.size
        j = int(np.argmin(d))
        if d[j] < best_d:
            best_d, best_id = float(d[j]), first + int(keep[j])
    params = torch.as_tensor(reader.read(np.array([best_id])), dtype=torch.float32)
    return {"checkpoint_id": best_id, "distance": best_d, "params": params, "rows_scanned": scanned}
