"""The one atomic writer and JSON helper: all or nothing, numpy and torch values, named errors."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from hyperforget.zoo.errors import HyperForgetError
from hyperforget.zoo.files import atomic_path, jsonable, read_json, write_json


def test_atomic_path_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            Path(tmp).write_text("half")
            raise RuntimeError("killed")
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]
    with atomic_path(target) as tmp:
        Path(tmp).write_text("new")
    assert target.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["f.txt"]


@dataclass
class _Point:
    x: int
    y: float


def test_write_json_round_trip_of_array_values(tmp_path):
    obj = {"a": np.float32(0.5), "b": np.arange(3), "c": torch.tensor([1.5, 2.0]), "d": _Point(1, 2.0),
           "e": Path("x/y"), 3: (np.int64(4),), "nan": float("nan")}
    write_json(tmp_path / "sub" / "o.json", obj)
    back = read_json(tmp_path / "sub" / "o.json")
    assert back["a"] == 0.5 and back["b"] == [0, 1, 2] and back["c"] == [1.5, 2.0]
    assert back["d"] == {"x": 1, "y": 2.0} and back["e"] == "x/y" and back["3"] == [4]
    assert np.isnan(back["nan"]) and jsonable({"k": np.bool_(True)}) == {"k": True}
    assert (tmp_path / "sub" / "o.json").read_text().endswith("}\n")


@pytest.mark.parametrize("content, match", [(None, "missing"), ("{", "not valid JSON"), ("[1]", "JSON list")])
def test_read_json_names_the_problem(tmp_path, content, match):
    path = tmp_path / "x.json"
    if content is not None:
        path.write_text(content)
    with pytest.raises(HyperForgetError, match=match):
        read_json(path)
    with pytest.raises(HyperForgetError, match="is a directory"):
        read_json(tmp_path)
