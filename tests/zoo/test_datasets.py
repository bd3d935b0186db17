"""Datasets: IDX parsing, the bundled MNIST subset, class subsets, scaling and errors."""

from __future__ import annotations

import gzip
import os
import struct

import numpy as np
import pytest

from hyperforget.zoo.datasets import FASHION_MNIST_DIR, load_dataset, load_idx_directory, read_idx
from hyperforget.zoo.errors import HyperForgetError


def idx_bytes(arr: np.ndarray, code: int) -> bytes:
    """Encode an array as IDX by hand (the format's own description), independent of read_idx."""
    dtype = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}[code]
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    return header + arr.astype(dtype).tobytes()


def write(path, data: bytes) -> str:
    path = str(path)
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "wb") as f:
        f.write(data)
    return path


@pytest.mark.parametrize("name", ["imgs-idx3-ubyte", "imgs-idx3-ubyte.gz"])
def test_read_idx_raw_and_gzip(tmp_path, name):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(7, 5, 3), dtype=np.uint8)
    got = read_idx(write(tmp_path / name, idx_bytes(images, 0x08)))
    assert got.dtype == np.uint8 and got.shape == (7, 5, 3)
    np.testing.assert_array_equal(got, images)


def test_read_idx_other_types(tmp_path):
    ints = np.array([[1, -2, 70000], [3, 4, -5]], dtype=np.int32)
    got = read_idx(write(tmp_path / "i.idx", idx_bytes(ints, 0x0C)))
    assert got.dtype == np.int32 and got.dtype.byteorder in "=|<"
    np.testing.assert_array_equal(got, ints)
    floats = np.linspace(-1, 1, 6, dtype=np.float32)
    np.testing.assert_array_equal(read_idx(write(tmp_path / "f.idx", idx_bytes(floats, 0x0D))), floats)


def test_read_idx_errors(tmp_path):
    good = idx_bytes(np.arange(12, dtype=np.uint8).reshape(3, 4), 0x08)
    with pytest.raises(HyperForgetError, match="bad magic number"):
        read_idx(write(tmp_path / "magic.idx", b"\x01\x02" + good[2:]))
    with pytest.raises(HyperForgetError, match="IDX body holds 7 bytes, its header declares 12"):
        read_idx(write(tmp_path / "short.idx", good[:-5]))
    with pytest.raises(HyperForgetError, match="IDX body holds 7 bytes"):
        read_idx(write(tmp_path / "short.idx.gz", good[:-5]))
    with pytest.raises(HyperForgetError, match="truncated IDX header"):
        read_idx(write(tmp_path / "head.idx", good[:9]))
    with pytest.raises(HyperForgetError, match="unknown IDX element type 0x07"):
        read_idx(write(tmp_path / "type.idx", bytes([0, 0, 7]) + good[3:]))
    with pytest.raises(HyperForgetError, match="IDX file not found"):
        read_idx(tmp_path / "absent.idx")
    with pytest.raises(HyperForgetError, match="cannot read IDX file"):
        read_idx(_not_gzip(tmp_path))


def _not_gzip(tmp_path) -> str:
    p = tmp_path / "notgz.idx.gz"
    p.write_bytes(b"this is not gzip data")
    return str(p)


def _write_idx_dir(root, n_train=30, n_test=12, labels=(3, 5, 8), gz=True) -> dict:
    rng = np.random.default_rng(1)
    os.makedirs(root, exist_ok=True)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, size=(n_train, 4, 4), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.choice(labels, n_train).astype(np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, size=(n_test, 4, 4), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.choice(labels, n_test).astype(np.uint8),
    }
    for i, (name, arr) in enumerate(arrays.items()):
        suffix = ".gz" if gz and i % 2 == 0 else ""  # a mix of gzipped and raw files
        write(os.path.join(root, name + suffix), idx_bytes(arr, 0x08))
    return arrays


def test_idx_directory_dataset(tmp_path):
    arrays = _write_idx_dir(tmp_path / "d")
    ds = load_dataset(f"idx:{tmp_path / 'd'}")
    assert ds.classes == (3, 5, 8) and ds.input_size == 16
    np.testing.assert_allclose(ds.x_train, arrays["train-images-idx3-ubyte"].reshape(30, 16) / 255.0, rtol=1e-6)
    lookup = np.array([-1, -1, -1, 0, -1, 1, -1, -1, 2])
    np.testing.assert_array_equal(ds.y_train, lookup[arrays["train-labels-idx1-ubyte"]])
    np.testing.assert_array_equal(ds.y_test, lookup[arrays["t10k-labels-idx1-ubyte"]])
    assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int64
    sub = load_dataset("mnist", root=str(tmp_path / "d"), classes=[8, 3])
    assert sub.classes == (8, 3)
    np.testing.assert_array_equal(sub.y_train, np.where(arrays["train-labels-idx1-ubyte"][
        np.isin(arrays["train-labels-idx1-ubyte"], [3, 8])] == 8, 0, 1))


def test_idx_directory_missing_files(tmp_path):
    _write_idx_dir(tmp_path / "d")
    os.remove(tmp_path / "d" / "t10k-labels-idx1-ubyte")
    with pytest.raises(HyperForgetError, match=r"lacks t10k-labels-idx1-ubyte\[.gz\]; download"):
        load_dataset("mnist", root=str(tmp_path / "d"))
    with pytest.raises(HyperForgetError, match="apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist", root=str(tmp_path / "empty"))
    with pytest.raises(HyperForgetError, match="needs a directory"):
        load_dataset("mnist")
    with pytest.raises(HyperForgetError, match="unknown dataset 'cifar'"):
        load_dataset("cifar")
    with pytest.raises(HyperForgetError, match="unknown pixel scaling"):
        load_dataset("digits", scaling="zscore")


@pytest.fixture(scope="module")
def mnist5k():
    return load_dataset("mnist-5k")


def test_mnist_5k_stratified_deterministic(mnist5k):
    ds = mnist5k
    assert ds.name == "mnist-5k" and ds.classes == tuple(range(10)) and ds.input_size == 784
    assert ds.x_train.shape == (4000, 784) and ds.x_test.shape == (1000, 784)
    np.testing.assert_array_equal(np.bincount(ds.y_train), np.full(10, 400))
    np.testing.assert_array_equal(np.bincount(ds.y_test), np.full(10, 100))
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0 and ds.x_train.max() > 0.99
    again = load_dataset("mnist-5k")
    np.testing.assert_array_equal(again.x_test, ds.x_test)
    np.testing.assert_array_equal(again.y_train, ds.y_train)
    # Train and test are disjoint: no test image occurs among the training images of its class.
    train_keys = {row.tobytes() for row in ds.x_train}
    overlap = sum(row.tobytes() in train_keys for row in ds.x_test)
    assert overlap <= 2  # the raw subset holds a handful of byte-identical digits at most
    # Pixels are real digits: the class mean images differ clearly.
    means = np.stack([ds.x_train[ds.y_train == c].mean(0) for c in range(10)])
    assert np.linalg.norm(means[0] - means[1]) > 3


def test_class_subset_mnist4(mnist5k):
    ds = mnist5k.subset([0, 1, 2, 3])
    assert ds.classes == (0, 1, 2, 3) and ds.num_classes == 4
    assert ds.x_train.shape == (1600, 784) and ds.x_test.shape == (400, 784)
    swapped = mnist5k.subset([3, 1])
    np.testing.assert_array_equal(swapped.x_train[swapped.y_train == 0], mnist5k.x_train[mnist5k.y_train == 3])
    assert swapped.describe()["classes"] == [3, 1]
    with pytest.raises(HyperForgetError, match=r"unknown classes \[10, 12\]"):
        mnist5k.subset([1, 10, 12])
    with pytest.raises(HyperForgetError, match="repeat a class"):
        mnist5k.subset([1, 1])
    with pytest.raises(HyperForgetError, match="unknown classes"):
        load_dataset("digits", classes=[11])


def test_standard_scaling_and_digits():
    ds = load_dataset("digits", classes=[0, 1, 2, 3], scaling="standard")
    assert ds.input_size == 64 and ds.scaling == "standard"
    assert abs(float(load_dataset("digits", scaling="standard").x_train.mean())) < 1e-4
    assert ds.info["pixel_std"] > 0 and set(np.unique(ds.y_test)) == {0, 1, 2, 3}


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_from_system_package():
    ds = load_idx_directory(FASHION_MNIST_DIR, "fashion-mnist")
    assert ds.x_train.shape == (60000, 784) and ds.x_test.shape == (10000, 784)
    np.testing.assert_array_equal(np.bincount(ds.y_test), np.full(10, 1000))
