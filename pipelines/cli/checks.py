"""Checks of command-line paths and values, run before a command does any work.

Each raises HyperForgetError naming the option and the fix; ``main`` prints it as one line and
exits 2. They keep outputs out of zoos (only the zoo's own writers write there), away from
existing files unless ``--force``, and away from directories that cannot take them.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from hyperforget.zoo.errors import HyperForgetError

ZOO_MARKERS = ("zoo.json", "manifest.json")


def _text(path: str | os.PathLike, option: str) -> str:
    s = os.fspath(path)
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise HyperForgetError(f"{option} {s!r} is not a UTF-8 path; choose a path of UTF-8 characters") from None
    if not s.strip():
        raise HyperForgetError(f"{option} is empty; give a path")
    return s


def enclosing_zoo(path: str | os.PathLike) -> str | None:
    """The zoo directory at or above ``path`` (a directory holding zoo.json or manifest.json), or None."""
    p = os.path.abspath(os.fspath(path))
    while True:
        if os.path.isdir(p) and any(os.path.exists(os.path.join(p, m)) for m in ZOO_MARKERS):
            return p
        parent = os.path.dirname(p)
        if parent == p:
            return None
        p = parent


def _writable_parent(p: str, option: str) -> None:
    parent = os.path.dirname(os.path.abspath(p)) or "."
    if not os.path.exists(parent):
        raise HyperForgetError(f"{option} {p}: directory {parent} does not exist; create it first or choose "
                               "another path")
    if not os.path.isdir(parent):
        raise HyperForgetError(f"{option} {p}: {parent} is a file, not a directory; choose another path")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise HyperForgetError(f"{option} {p}: directory {parent} is not writable; choose a writable location")


def output_file(path: str | os.PathLike, *, force: bool = False, option: str = "--out") -> Path:
    """A file a command is about to write: outside any zoo, new (or ``force``), in a writable directory."""
    s = _text(path, option)
    zoo = enclosing_zoo(os.path.dirname(os.path.abspath(s)))
    if zoo is not None:
        raise HyperForgetError(f"{option} {s} lies inside the zoo {zoo}; only the zoo's own writers write there: "
                               "choose a path outside the zoo")
    if os.path.isdir(s):
        raise HyperForgetError(f"{option} {s} is a directory; give a file name")
    if os.path.lexists(s) and not force:
        raise HyperForgetError(f"{option} {s} already exists; pass --force to overwrite it or choose another path")
    _writable_parent(s, option)
    return Path(s)


def output_dir(path: str | os.PathLike, *, option: str = "--out", zoo_ok: bool = False) -> Path:
    """A directory a command creates or fills: not a file, not inside a zoo, creatable.

    ``zoo_ok``: the directory may itself be a zoo (``zoo collect`` resuming one), though not lie
    inside another.
    """
    s = _text(path, option)
    if os.path.lexists(s) and not os.path.isdir(s):
        raise HyperForgetError(f"{option} {s} is a file, not a directory; choose a directory path")
    above = enclosing_zoo(os.path.dirname(os.path.abspath(s)))
    here = enclosing_zoo(s) if os.path.isdir(s) else None
    if above is not None or (here is not None and not zoo_ok):
        raise HyperForgetError(f"{option} {s} lies inside the zoo {above or here}; only the zoo's own writers "
                               "write there: choose a directory outside the zoo")
    # The nearest existing ancestor must be a writable directory.
    p = os.path.abspath(s)
    while not os.path.exists(p):
        p = os.path.dirname(p)
    if not os.path.isdir(p):
        raise HyperForgetError(f"{option} {s}: {p} is a file, not a directory; choose another path")
    if not os.access(p, os.W_OK | os.X_OK):
        raise HyperForgetError(f"{option} {s}: {p} is not writable; choose a writable location")
    return Path(s)


MADE_BY = {"hypernetwork": "`hyperforget train`", "run": "`hyperforget unlearn` or `hyperforget demo`"}


def input_dir(path: str | os.PathLike, *, option: str, what: str) -> Path:
    """An existing directory a command reads (a hypernetwork, a run)."""
    s = _text(path, option)
    made = f" (made by {MADE_BY[what]})" if what in MADE_BY else ""
    if not os.path.exists(s):
        raise HyperForgetError(f"{option} {s} does not exist; give an existing {what} directory{made}")
    if not os.path.isdir(s):
        raise HyperForgetError(f"{option} {s} is a file, not a {what} directory; give the directory{made}")
    return Path(s)


def positive(value: int | float | None, option: str, *, zero_ok: bool = False) -> None:
    """An integer or number option that must be > 0 (or >= 0)."""
    if value is None:
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise HyperForgetError(f"{option} must be a finite number, got {value}")
    if value < 0 or (value == 0 and not zero_ok):
        raise HyperForgetError(f"{option} must be {'>= 0' if zero_ok else '> 0'}, got {value}")


def at_most(value: int | None, option: str, limit: int, why: str) -> None:
    if value is not None and value > limit:
        raise HyperForgetError(f"{option} {value:,} is more than {limit:,} ({why}); choose a smaller value")
