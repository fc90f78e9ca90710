"""Seeding and device selection: the only place either happens.

Every notebook calls :func:`seed_everything` once with its ``seed`` parameter and
:func:`get_device` once with its ``device`` parameter, then passes the device down
explicitly. Nothing in ``ddlib`` reads a global device or reseeds behind the caller's back.
"""

from __future__ import annotations

import os
import random

import numpy as np
import torch

DEVICE_CHOICES = ("auto", "cpu", "cuda", "mps")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and torch (all devices); return a CPU generator seeded the same way.

    On CPU, runs with the same seed and thread count are bit-for-bit deterministic
    (we ask torch to use deterministic kernels and warn where none exists).
    """
    seed = int(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)
    # cuBLAS needs this for deterministic matmuls; harmless elsewhere.
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    return torch.Generator().manual_seed(seed)


def get_device(device: str = "auto") -> torch.device:
    """Resolve ``"auto" | "cpu" | "cuda" | "cuda:N" | "mps"`` to a ``torch.device``.

    ``auto`` picks CUDA when present, else CPU. On CUDA, TF32 matmuls are enabled: they keep
    about 10 mantissa bits, ample for training and distillation, and are several times faster.
    """
    name = str(device).strip().lower()
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    base = name.split(":")[0]
    if base not in DEVICE_CHOICES:
        raise ValueError(f"device={device!r} is not one of {DEVICE_CHOICES} (or 'cuda:N'); change the `device` parameter")
    if base == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} asked for CUDA but torch sees no GPU; set device='auto' or 'cpu'")
    if base == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError(f"device={device!r} asked for MPS but it is not available; set device='auto' or 'cpu'")
    if base == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return torch.device(name)


def describe_device(device: torch.device) -> str:
    """One line naming the device, for the first printed cell of a notebook."""
    if device.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(device)})"
    return f"{device.type} ({torch.get_num_threads()} threads)"
