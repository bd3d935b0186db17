"""Fixtures for the queries tests: a tiny zoo (117 checkpoints, 9 runs, chunks of 8 rows)."""

from __future__ import annotations

import pytest


@pytest.fixture
def qzoo(normalized_zoo):
    """Path of a 117-row zoo of the 64-3-4 MLP (pivots 0, 1), with normalization statistics."""
    return normalized_zoo


@pytest.fixture
def zoo_params(qzoo):
    """(rows, P) parameters of qzoo, read back through zarr (the loader's shard reads are checked against it)."""
    from hyperforget.zoo.store import open_zoo

    r = open_zoo(qzoo, fast_reads=False)
    return r.read_rows(0, r.num_rows)


@pytest.fixture
def zoo_meta(qzoo):
    """qzoo's metadata as a pandas DataFrame, ordered by checkpoint_id."""
    from hyperforget.zoo.store import open_zoo

    return open_zoo(qzoo).metadata().to_pandas()
