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
