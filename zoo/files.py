"""Local files written whole or not at all, and the project's one JSON writer and reader.

Every writer of a local file goes through ``atomic_path``: the content goes to a temporary name
in the target's directory and is renamed over the target only once complete, so a reader (or a
resumed run) never sees half a file and a crash leaves the old file in place. JSON goes through
``jsonable`` (numpy, torch, paths and dataclasses to plain values) and ``write_json``. Remote
(fsspec) zoo files are written by ``zoo.store``'s locations, which have their own commit rule.
"""

from __future__ import annotations

import contextlib
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch

from hyperforget.zoo.errors import HyperForgetError


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path next to ``path``; rename it over ``path`` when the block succeeds.

    If the block raises, the temporary file is removed and ``path`` is untouched.
    """
    path = os.fspath(path)
    head, tail = os.path.split(path)
    tmp = os.path.join(head, f".{tail}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
        raise


def jsonable(obj: Any) -> Any:
    """Plain JSON values of dicts, lists, numpy and torch values, paths and dataclasses."""
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    if isinstance(obj, (np.ndarray, torch.Tensor)):
        return jsonable(np.asarray(obj).tolist())
    if isinstance(obj, np.bool_):
        return bool(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "__dataclass_fields__"):
        return jsonable(asdict(obj))
    return obj


def write_json(path: str | os.PathLike, obj: Any, *, indent: int | None = 1) -> None:
    """Write ``jsonable(obj)`` atomically (parents created), one trailing newline."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(json.dumps(jsonable(obj), indent=indent, allow_nan=True) + "\n")


def read_json(path: str | os.PathLike) -> dict:
    """A JSON object from a file; a missing, damaged or non-object file is a one-line error."""
    path = Path(path)
    if not path.exists():
        raise HyperForgetError(f"missing {path}; run the stage that writes it first")
    if path.is_dir():
        raise HyperForgetError(f"{path} is a directory, not a JSON file; remove it and re-run its stage")
    try:
        d = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise HyperForgetError(f"{path} is not valid JSON ({exc}); delete it and re-run its stage") from None
    except OSError as exc:
        raise HyperForgetError(f"cannot read {path}: {exc.strerror or exc}") from None
    if not isinstance(d, dict):
        raise HyperForgetError(f"{path} holds a JSON {type(d).__name__}, not an object; delete it and re-run its stage")
    return d
