"""Tiny datasets in the torchvision on-disk layouts, written by the tests themselves.

They let the paper-scale configs (CIFAR, ...) be checked to *start* on a machine that has none
of the real files; the pixel values are random, so only shapes and plumbing are exercised.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def write_cifar10(root: Path, per_batch: int = 30, test: int = 20, seed: int = 0) -> Path:
    """``root/cifar-10-batches-py`` with five train batches, a test batch and the meta file."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        n = test if name == "test_batch" else per_batch
        rows = rng.integers(0, 256, (n, 3072)).astype(np.uint8)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rows, "labels": [i % 10 for i in range(n)]}, f)
    classes = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": classes}, f)
    return Path(root)


# --------------------------------------------------------------------------- CIFAR-100, Tiny ImageNet, ImageNet


def write_cifar100(root: Path, train: int = 200, test: int = 100, seed: int = 0) -> Path:
    """``root/cifar-100-python`` with ``train``, ``test`` and ``meta`` (fine and coarse labels; the
    fine label of row i is ``i % 100``, the coarse one ``(i % 100) // 5``)."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", train), ("test", test)):
        rows = rng.integers(0, 256, (n, 3072)).astype(np.uint8)
        fine = [i % 100 for i in range(n)]
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rows, "fine_labels": fine, "coarse_labels": [c // 5 for c in fine]}, f)
    with open(folder / "meta", "wb") as f:
        pickle.dump({"fine_label_names": [f"fine{i:02d}" for i in range(100)],
                     "coarse_label_names": [f"coarse{i:02d}" for i in range(20)]}, f)
    return Path(root)


def _write_jpeg(path: Path, rng: np.random.Generator, size: tuple[int, int], mode: str = "RGB") -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    channels = {"RGB": 3, "L": 1}[mode]
    pixels = rng.integers(0, 256, (size[1], size[0], channels), dtype=np.uint8)
    Image.fromarray(pixels.squeeze(-1) if channels == 1 else pixels, mode).save(path, "JPEG", quality=90)


def tiny_wnids(num_classes: int) -> list[str]:
    """The fake Tiny ImageNet wnids, deliberately not written in sorted order to wnids.txt."""
    return [f"n{9000000 + 7 * i:08d}" for i in range(num_classes)]


def write_tinyimagenet(root: Path, num_classes: int = 10, train_per_class: int = 3, val_per_class: int = 2,
                       seed: int = 0) -> Path:
    """``root/tiny-imagenet-200`` in the official layout: ``wnids.txt``, ``words.txt``,
    ``train/<wnid>/images/<wnid>_<k>.JPEG`` and ``val/images/val_<k>.JPEG`` with
    ``val/val_annotations.txt``. 64x64 random-pixel JPEGs; one train image per class is greyscale
    (the real archive has a few). The real dataset has 200 classes, 500 train and 50 val each."""
    rng = np.random.default_rng(seed)
    folder = Path(root) / "tiny-imagenet-200"
    wnids = tiny_wnids(num_classes)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "wnids.txt").write_text("\n".join(reversed(wnids)) + "\n")
    (folder / "words.txt").write_text("".join(f"{w}\tthing {i}, other name\n" for i, w in enumerate(wnids)))
    for w in wnids:
        for k in range(train_per_class):
            _write_jpeg(folder / "train" / w / "images" / f"{w}_{k}.JPEG", rng, (64, 64), "L" if k == 0 else "RGB")
        (folder / "train" / w / f"{w}_boxes.txt").write_text("")
    lines = []
    val_classes = rng.permutation(np.arange(val_per_class * num_classes) % num_classes)  # interleaved
    for k, c in enumerate(val_classes):
        w = wnids[int(c)]
        _write_jpeg(folder / "val" / "images" / f"val_{k}.JPEG", rng, (64, 64))
        lines.append(f"val_{k}.JPEG\t{w}\t0\t0\t63\t63")
    (folder / "val" / "val_annotations.txt").write_text("\n".join(lines) + "\n")
    return Path(root)


def write_imagenet(root: Path, class_indices, train_per_class: int = 3, val_per_class: int = 2,
                   seed: int = 0, num_classes: int = 1000) -> Path:
    """``root/imagenet/{train,val}`` with ``num_classes`` wnid folders ``n%08d`` (so sorted order
    is index order): empty except for the classes in ``class_indices``, which get random-pixel
    JPEGs of assorted non-square sizes."""
    rng = np.random.default_rng(seed)
    base = Path(root) / "imagenet"
    wanted = set(int(i) for i in class_indices)
    for i in range(num_classes):
        for split, count in (("train", train_per_class), ("val", val_per_class)):
            d = base / split / f"n{i:08d}"
            d.mkdir(parents=True, exist_ok=True)
            if i in wanted:
                for k in range(count):
                    size = (int(rng.integers(140, 200)), int(rng.integers(130, 190)))
                    _write_jpeg(d / f"n{i:08d}_{k}.JPEG", rng, size)
    return Path(root)


def write_mnist(root: Path, train: int = 60, test: int = 30, seed: int = 0, name: str = "MNIST") -> Path:
    """``root/<name>/raw`` with the four idx files, gzipped as distributed (28x28 uint8, labels i % 10)."""
    import gzip
    import struct

    rng = np.random.default_rng(seed)
    folder = Path(root) / name / "raw"
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", train), ("t10k", test)):
        images = rng.integers(0, 256, (n, 28, 28)).astype(np.uint8)
        labels = (np.arange(n) % 10).astype(np.uint8)
        with gzip.open(folder / f"{prefix}-images-idx3-ubyte.gz", "wb") as f:
            f.write(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        with gzip.open(folder / f"{prefix}-labels-idx1-ubyte.gz", "wb") as f:
            f.write(struct.pack(">II", 2049, n) + labels.tobytes())
    return Path(root)


def write_usps(root: Path, train: int = 60, test: int = 30, seed: int = 0) -> Path:
    """``root/usps.bz2`` and ``root/usps.t.bz2`` in the libsvm text format torchvision reads: one line per
    image, ``label 1:v1 ... 256:v256`` with labels 1..10 (digit = label - 1) and 16x16 pixels in [-1, 1]."""
    import bz2

    rng = np.random.default_rng(seed)
    Path(root).mkdir(parents=True, exist_ok=True)
    for filename, n in (("usps.bz2", train), ("usps.t.bz2", test)):
        pixels = rng.uniform(-1, 1, (n, 256))
        lines = [f"{i % 10 + 1} " + " ".join(f"{j + 1}:{v:.6f}" for j, v in enumerate(row)) for i, row in enumerate(pixels)]
        with bz2.open(Path(root) / filename, "wt") as f:
            f.write("\n".join(lines) + "\n")
    return Path(root)


def write_svhn(root: Path, train: int = 60, test: int = 30, seed: int = 0) -> Path:
    """``root/{train,test}_32x32.mat`` as distributed: ``X`` (32, 32, 3, N) uint8, ``y`` (N, 1) in 1..10
    (10 stands for the digit 0). Needs scipy."""
    from scipy.io import savemat

    rng = np.random.default_rng(seed)
    Path(root).mkdir(parents=True, exist_ok=True)
    for split, n in (("train", train), ("test", test)):
        x = rng.integers(0, 256, (32, 32, 3, n)).astype(np.uint8)
        y = (np.arange(n) % 10 + 1).astype(np.uint8).reshape(n, 1)
        savemat(str(Path(root) / f"{split}_32x32.mat"), {"X": x, "y": y})
    return Path(root)
