"""Dataset registry: embedded digits, clear errors for missing files, offline downloads that fail
fast, and the torchvision paths on tiny files the tests write themselves."""

from __future__ import annotations

import gzip
import os
import pickle
import socket
import struct
import time

import numpy as np
import pytest
import torch

from ddlib import data
from ddlib.data import DATASETS, DatasetNotFoundError, load_dataset, sample_per_class


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


# --------------------------------------------------------------------------- digits


def test_digits_shapes_dtypes_and_normalisation(digits):
    assert digits.x_train.shape == (1347, 1, 8, 8) and digits.x_test.shape == (450, 1, 8, 8)
    assert digits.x_train.dtype == torch.float32 and digits.y_train.dtype == torch.int64
    assert digits.x_train.is_contiguous()
    assert digits.info.input_shape == (1, 8, 8) and digits.info.num_classes == 10
    assert digits.info.class_names == tuple("0123456789")
    assert abs(digits.x_train.mean().item()) < 1e-4
    assert abs(digits.x_train.std().item() - 1) < 1e-3
    pixels = digits.denormalise(digits.x_train)
    assert pixels.min() > -1e-5 and pixels.max() < 1 + 1e-5
    # values were 0..16, scaled by 1/16
    torch.testing.assert_close(torch.round(pixels * 16), pixels * 16, atol=1e-4, rtol=0)
    torch.testing.assert_close(digits.normalise(pixels), digits.x_train, atol=1e-5, rtol=0)


def test_digits_split_is_stratified_and_deterministic(digits):
    again = load_dataset("Digits", device=torch.device("cpu"))
    assert torch.equal(again.x_train, digits.x_train) and torch.equal(again.y_test, digits.y_test)
    counts = torch.bincount(digits.y_test, minlength=10)
    assert counts.min() >= 43 and counts.max() <= 47  # ~450/10 per class


def test_train_and_test_limits_are_balanced_and_deterministic(digits):
    small = load_dataset("digits", train_limit=50, test_limit=20)
    assert torch.bincount(small.y_train, minlength=10).tolist() == [5] * 10
    assert torch.bincount(small.y_test, minlength=10).tolist() == [2] * 10
    assert small.info == digits.info  # normalisation constants of the full train split
    again = load_dataset("digits", train_limit=50, test_limit=20)
    assert torch.equal(small.x_train, again.x_train)


def test_sample_per_class_blocks_and_determinism(digits):
    x, y = digits.x_train, digits.y_train
    xs, ys = sample_per_class(x, y, 3, 10, torch.Generator().manual_seed(0))
    assert xs.shape == (30, 1, 8, 8)
    assert torch.equal(ys, torch.arange(10).repeat_interleave(3))
    xs2, _ = sample_per_class(x, y, 3, 10, torch.Generator().manual_seed(0))
    xs3, _ = sample_per_class(x, y, 3, 10, torch.Generator().manual_seed(1))
    assert torch.equal(xs, xs2) and not torch.equal(xs, xs3)
    # each chosen row is a real train example of its class
    for row, label in zip(xs, ys):
        hits = (x == row).flatten(1).all(1)
        assert hits.any() and (y[hits] == label).all()
    with pytest.raises(ValueError, match="fewer"):
        sample_per_class(x, y, 1000, 10)


# --------------------------------------------------------------------------- names and roots


def test_names_aliases_and_unknown_name():
    assert data.canonical_name("Fashion-MNIST") == "fashion_mnist"
    assert data.canonical_name("fashionmnist") == "fashion_mnist"
    assert data.canonical_name("CIFAR-10") == "cifar10"
    assert data.canonical_name("cifar_100") == "cifar100"
    with pytest.raises(ValueError) as err:
        load_dataset("cifar11")
    msg = str(err.value)
    assert all(name in msg for name in DATASETS)
    assert "Did you mean" in msg


def test_data_root_precedence(monkeypatch, tmp_path):
    monkeypatch.delenv("DDLIB_DATA", raising=False)
    assert data.data_root().name == "data"
    monkeypatch.setenv("DDLIB_DATA", str(tmp_path / "env"))
    assert data.data_root() == tmp_path / "env"
    assert data.data_root(tmp_path / "arg") == tmp_path / "arg"


# --------------------------------------------------------------------------- missing files


@pytest.mark.parametrize("name, folder, filename", [
    ("mnist", os.path.join("MNIST", "raw"), "train-images-idx3-ubyte.gz"),
    ("fashion_mnist", os.path.join("FashionMNIST", "raw"), "t10k-labels-idx1-ubyte.gz"),
    ("cifar10", "cifar-10-batches-py", "data_batch_1"),
    ("cifar100", "cifar-100-python", "meta"),
    ("svhn", "", "train_32x32.mat"),
    ("usps", "", "usps.t.bz2"),
])
def test_missing_files_name_folder_and_files(tmp_path, name, folder, filename):
    with pytest.raises(DatasetNotFoundError) as err:
        load_dataset(name, root=tmp_path)
    msg = str(err.value)
    assert str(tmp_path / folder) in msg and filename in msg
    assert "download=True" in msg and "DDLIB_DATA" in msg
    assert isinstance(err.value, FileNotFoundError)


def test_download_offline_fails_fast(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "_network_reachable", lambda host, **kw: False)
    start = time.perf_counter()
    with pytest.raises(DatasetNotFoundError, match="download was requested but failed"):
        load_dataset("cifar10", root=tmp_path, download=True)
    assert time.perf_counter() - start < 3
    assert not any(tmp_path.iterdir())  # nothing was written


def test_reachability_probe_without_network(monkeypatch):
    def refused(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(socket, "create_connection", refused)
    assert data._network_reachable("example.invalid") is False

    def hangs(*args, **kwargs):  # e.g. a DNS lookup that takes far longer than the timeout
        time.sleep(2)
        raise TimeoutError("timed out")

    monkeypatch.setattr(socket, "create_connection", hangs)
    start = time.perf_counter()
    assert data._network_reachable("example.invalid", timeout=0.3) is False
    assert time.perf_counter() - start < 1.5


# --------------------------------------------------------------------------- tiny MNIST (idx files)


def _idx_bytes(array: np.ndarray) -> bytes:
    """The idx-ubyte format: magic (0, 0, dtype 0x08, ndim), big-endian dims, raw uint8 data."""
    header = struct.pack(">BBBB", 0, 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_tiny_mnist(root, gz: bool, cls="MNIST"):
    rng = np.random.default_rng(0)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (20, 28, 28)),
        "train-labels-idx1-ubyte": np.arange(20) % 10,
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (10, 28, 28)),
        "t10k-labels-idx1-ubyte": rng.permutation(10),
    }
    raw = root / cls / "raw"
    raw.mkdir(parents=True)
    for name, array in arrays.items():
        payload = _idx_bytes(array)
        if gz:
            with gzip.open(raw / (name + ".gz"), "wb") as f:
                f.write(payload)
        else:
            (raw / name).write_bytes(payload)
    return arrays


@pytest.mark.parametrize("gz", [True, False], ids=["gz-only", "extracted"])
def test_tiny_mnist_from_idx_files(tmp_path, monkeypatch, gz):
    monkeypatch.setenv("DDLIB_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "data"
    arrays = _write_tiny_mnist(root, gz)
    before = sorted(os.listdir(root / "MNIST" / "raw"))
    ds = load_dataset("mnist", root=root)
    assert ds.x_train.shape == (20, 1, 28, 28) and ds.x_test.shape == (10, 1, 28, 28)
    assert ds.y_train.tolist() == arrays["train-labels-idx1-ubyte"].tolist()
    assert ds.y_test.tolist() == arrays["t10k-labels-idx1-ubyte"].tolist()
    pixels = torch.round(ds.denormalise(ds.x_test) * 255).squeeze(1)
    assert torch.equal(pixels, torch.as_tensor(arrays["t10k-images-idx3-ubyte"], dtype=torch.float32))
    # the data root is never written to: .gz files are extracted into the cache
    assert sorted(os.listdir(root / "MNIST" / "raw")) == before
    assert (tmp_path / "cache").exists() == gz
    # a second load reuses the cache
    assert torch.equal(load_dataset("mnist", root=root).x_train, ds.x_train)


def test_tiny_fashion_mnist(tmp_path, monkeypatch):
    monkeypatch.setenv("DDLIB_CACHE", str(tmp_path / "cache"))
    _write_tiny_mnist(tmp_path, gz=True, cls="FashionMNIST")
    ds = load_dataset("fashion-mnist", root=tmp_path, train_limit=10)
    assert ds.x_train.shape == (10, 1, 28, 28) and ds.info.class_names[0] == "T-shirt/top"


# --------------------------------------------------------------------------- tiny CIFAR-10 (pickle batches)


def test_tiny_cifar10_in_torchvision_layout(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    batches = {}
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch"]:
        # CIFAR rows: 1024 red, then 1024 green, then 1024 blue values, row-major
        rows = rng.integers(0, 256, (4, 3072)).astype(np.uint8)
        labels = rng.integers(0, 10, 4).tolist()
        batches[name] = (rows, labels)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rows, "labels": labels}, f)
    names = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names}, f)

    ds = load_dataset("cifar-10", root=tmp_path)
    assert ds.x_train.shape == (20, 3, 32, 32) and ds.x_test.shape == (4, 3, 32, 32)
    assert ds.info.class_names == tuple(names) and ds.info.num_classes == 10
    assert ds.y_test.tolist() == batches["test_batch"][1]
    assert ds.y_train[:4].tolist() == batches["data_batch_1"][1]
    assert len(ds.info.mean) == 3
    pixels = torch.round(ds.denormalise(ds.x_test) * 255)
    expected = torch.as_tensor(batches["test_batch"][0].reshape(4, 3, 32, 32), dtype=torch.float32)
    assert torch.equal(pixels, expected)  # channels in CHW order, not scrambled


def test_cifar_reader_refuses_pickles_that_carry_code(tmp_path):
    """A batch file that would call a function when unpickled is refused before anything runs."""
    import os as _os

    class Exploit:
        def __reduce__(self):
            return (_os.system, ("echo pwned > " + str(tmp_path / "pwned"),))

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in ["data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5", "test_batch",
                 "batches.meta"]:
        with open(folder / name, "wb") as f:
            pickle.dump({"data": Exploit(), "labels": [0]}, f)
    with pytest.raises(Exception, match="refusing to load"):
        load_dataset("cifar10", root=tmp_path)
    assert not (tmp_path / "pwned").exists()
