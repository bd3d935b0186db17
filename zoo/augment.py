"""Permutation augmentation: the same function under a different order of hidden units.

Swapping hidden units of a two-layer MLP — rows of fc1.weight and entries of fc1.bias, with
the matching columns of fc2.weight — leaves every output unchanged; fc2.bias is untouched.
Adding permuted copies teaches a hypernetwork this symmetry (G.pt, Section A.5 of the paper).
"""

from __future__ import annotations

import numpy as np
import torch

from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.mlp import MLPSpec


def random_permutations(hidden: int, k: int, seed: int) -> np.ndarray:
    """(k, hidden) int64 permutations of range(hidden), deterministic for the seed.

    The identity is never drawn when hidden > 1 (a copy equal to its source adds nothing);
    with hidden = 2 every copy is therefore the one swap. Drawn in one batch (argsort of
    uniform keys, identities redrawn), since the collector asks for one per checkpoint.
    """
    if k < 0:
        raise HyperForgetError(f"the number of permuted copies must be ≥ 0, got {k}")
    rng = np.random.default_rng(seed)
    perms = rng.random((k, hidden)).argsort(1)
    ident = np.arange(hidden)
    while hidden > 1 and (same := (perms == ident).all(1)).any():
        perms[same] = rng.random((int(same.sum()), hidden)).argsort(1)
    return perms


def permutation_index(spec: MLPSpec, perms: np.ndarray) -> np.ndarray:
    """(B, H) hidden-unit permutations -> (B, P) gather indices into flat parameter vectors.

    New hidden unit j is old unit perms[b, j]: fc1.weight rows, fc1.bias entries and fc2.weight
    columns move together, which leaves the network's function unchanged. The one implementation
    of the symmetry: augmentation, canonical order and the loader's on-the-fly permutations use it.
    """
    perms = np.asarray(perms, dtype=np.int64)
    lay = spec.layout
    b, h = perms.shape
    d, c = spec.input_size, spec.num_classes
    idx = np.broadcast_to(np.arange(lay.num_params, dtype=np.int64), (b, lay.num_params)).copy()
    w1, b1, w2 = lay.slot("fc1.weight"), lay.slot("fc1.bias"), lay.slot("fc2.weight")
    idx[:, w1.offset:w1.stop] = (w1.offset + perms[:, :, None] * d + np.arange(d)).reshape(b, h * d)
    idx[:, b1.offset:b1.stop] = b1.offset + perms
    idx[:, w2.offset:w2.stop] = (w2.offset + np.arange(c)[None, :, None] * h + perms[:, None, :]).reshape(b, c * h)
    return idx


def permute_hidden(spec: MLPSpec, params: torch.Tensor | np.ndarray, perms: torch.Tensor | np.ndarray) -> torch.Tensor:
    """Apply one hidden-unit permutation per vector.

    Args:
        params: (n, P) flat parameter vectors.
        perms: (n, H) permutations; new hidden unit j is old unit perms[i, j].
    Returns:
        (n, P) permuted vectors computing the same functions (on params' device).
    """
    params = torch.as_tensor(params, dtype=torch.float32)
    spec.layout.check(params)
    perms = torch.as_tensor(perms, dtype=torch.long).cpu()
    n, h = params.shape[0], spec.hidden
    if tuple(perms.shape) != (n, h):
        raise HyperForgetError(f"perms must be ({n}, {h}), got {tuple(perms.shape)}")
    idx = torch.from_numpy(permutation_index(spec, perms.numpy())).to(params.device)
    return torch.gather(params, 1, idx)


def augment(spec: MLPSpec, params: torch.Tensor | np.ndarray, k: int, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """K permuted copies of each of n checkpoints, interleaved after their source.

    Args:
        params: (n, P) originals.
    Returns:
        rows (n·(K+1), P): original i at row i·(K+1), its copy j (1..K) at row i·(K+1) + j;
        perm_index (n·(K+1),) int16: 0 for originals, j for the j-th copy.
    Each checkpoint gets its own permutations, all drawn in one batch from the seed.
    """
    params = torch.as_tensor(params, dtype=torch.float32)
    spec.layout.check(params)
    n = params.shape[0]
    if k < 0:
        raise HyperForgetError(f"the number of permuted copies must be ≥ 0, got {k}")
    perm_index = np.tile(np.arange(k + 1, dtype=np.int16), n)
    if k == 0 or n == 0:
        return params.clone(), perm_index
    perms = random_permutations(spec.hidden, n * k, seed)  # (n·K, H): copy j of row i at i·K + j
    copies = permute_hidden(spec, params.repeat_interleave(k, dim=0), perms)
    out = torch.cat([params[:, None, :], copies.view(n, k, -1)], dim=1)  # (n, K+1, P)
    return out.reshape(n * (k + 1), -1), perm_index


CANONICAL_ORDERS = ("bias", "match")  # hidden units sorted by fc1.bias, or matched to a template network


def canonical_permutations(spec: MLPSpec, params: torch.Tensor | np.ndarray) -> torch.Tensor:
    """(n, H) permutations that sort each vector's hidden units by fc1.bias (ascending).

    Sorting is one canonical form of the permutation symmetry: every permuted copy of a network
    maps to the same vector, so a generator trained on canonical vectors sees one mode per
    function instead of H! of them. Ties keep their order (a stable sort).
    """
    params = torch.as_tensor(params, dtype=torch.float32)
    spec.layout.check(params)
    bias = params[:, spec.layout.slot("fc1.bias").offset:spec.layout.slot("fc1.bias").stop]  # (n, H)
    return torch.argsort(bias, dim=1, stable=True)


def canonicalize(spec: MLPSpec, params: torch.Tensor | np.ndarray) -> torch.Tensor:
    """The canonical copy of each vector (hidden units sorted by fc1.bias): (n, P), same functions."""
    return permute_hidden(spec, params, canonical_permutations(spec, params))


# ----------------------------------------------------------------------------------------------
# Canonical order by matching to a template network (weight matching, Ainsworth et al. 2023,
# "Git Re-Basin", for one hidden layer, where one linear assignment solves it exactly).


def hidden_units(spec: MLPSpec, params: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(n, P) -> hidden units (n, H, D + 1 + C) [incoming weights, bias, outgoing weights] and fc2.bias
    (n, C): what a permutation moves together, and what it leaves in place."""
    w = spec.layout.unflatten(params)
    units = torch.cat([w["fc1.weight"], w["fc1.bias"][..., None], w["fc2.weight"].transpose(-1, -2)], -1)
    return units, w["fc2.bias"]


def min_cost_assignments(cost: torch.Tensor) -> torch.Tensor:
    """(n, H, H) costs -> (n, H) permutations π minimizing Σ_h cost[i, h, π(h)], exactly (the Hungarian
    method, scipy's linear_sum_assignment, row by row: a few µs each for the hidden sizes here)."""
    from scipy.optimize import linear_sum_assignment

    n, h, _ = cost.shape
    c = cost.detach().cpu().double().numpy()
    perms = np.stack([linear_sum_assignment(ci)[1] for ci in c]) if n else np.zeros((0, h), dtype=np.int64)
    return torch.as_tensor(perms, dtype=torch.long)


def matching_permutations(spec: MLPSpec, params: torch.Tensor | np.ndarray, template: torch.Tensor) -> torch.Tensor:
    """(n, H) permutations that bring each vector's hidden units closest to a template network's.

    π minimizes ‖template − π(θ)‖², i.e. Σ_h ‖unit_T(h) − unit_θ(π(h))‖²: new unit h is the old unit
    that best matches the template's unit h. Like sorting, this is a canonical form (every permuted
    copy of a network maps to the same vector, ties aside), but it also puts units that compute
    similar features in the same place across networks, so each coordinate varies less across a zoo.
    """
    params = torch.as_tensor(params, dtype=torch.float32)
    spec.layout.check(params)
    units, _ = hidden_units(spec, params)  # (n, H, F)
    ref, _ = hidden_units(spec, torch.as_tensor(template, dtype=torch.float32).to(params.device))  # (H, F)
    # ‖a − b‖² = ‖a‖² + ‖b‖² − 2⟨a, b⟩, and every unit's norm enters the sum once whatever π is:
    # the inner products alone decide the assignment.
    return min_cost_assignments(-torch.einsum("hf,njf->nhj", ref, units))


def unit_template(spec: MLPSpec, params: torch.Tensor | np.ndarray, iterations: int = 10,
                  all_reduce=None) -> torch.Tensor:
    """A template network (P,) for :func:`matching_permutations`: the mean of the vectors matched to it.

    Starts from the first vector and alternates matching every vector to the template with
    averaging them (Lloyd's iteration with one centre, under the permutation symmetry), a fixed
    number of times, so that the same rows give the same template. (A start from an average, such as
    the mean in fc1.bias order, would give every template unit nearly the same features, and the
    matching nothing to go by.) ``all_reduce``
    (in place, summing) combines the sums of several DDP ranks, so every rank gets one template.
    """
    p = torch.as_tensor(params, dtype=torch.float32)
    spec.layout.check(p)

    def mean(x: torch.Tensor) -> torch.Tensor:
        packed = torch.cat([x.double().sum(0), torch.tensor([float(len(x))], dtype=torch.float64)])
        if all_reduce is not None:
            all_reduce(packed)
        return (packed[:-1] / packed[-1].clamp_min(1)).float()

    template = p[0].clone()  # under DDP each rank's own first vector; the first mean is shared by all
    for _ in range(iterations):
        template = mean(permute_hidden(spec, p, matching_permutations(spec, p, template)))
    return template
