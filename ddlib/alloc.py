"""Heap reuse for long CPU unrolls: glibc malloc's settings for the duration of one loop.

An unrolled MTT iteration allocates and frees the same large activations at every student step. Under
glibc's defaults a block above the mmap threshold (at most 32 MiB, e.g. one 100-image x 128-channel x 32x32
feature map of 52 MB) is mapped fresh on every allocation and unmapped on every free, and freed memory at the
top of the heap is trimmed back to the kernel: each step then page-faults its activations in again, which is
where about a third of the CPU time of the official-style loop goes (benchmarks/README.md, mtt_alloc).

:func:`heap_reuse` sets, for the duration of a ``with`` block, what the environment variables
``MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=<huge> MALLOC_TOP_PAD_=256 MiB`` set for a whole process: no
mmap for large blocks, no trimming, so freed activations stay in the heap and are reused by the next step. It
changes no result (only where memory comes from), costs a fifth to a quarter more peak RSS, and on leaving the
block puts glibc's documented defaults back and returns the free memory to the system (``malloc_trim``).
One thing cannot be put back through ``mallopt``: glibc's *dynamic* mmap threshold, which any of these
settings switches off, stays off (the static default of 128 KiB applies after the block).

It does nothing on CUDA or MPS (their memory does not come from malloc), off glibc, when the process was
started with any ``MALLOC_*`` tuning variable of its own (the user's choice wins, e.g. the Makefile's
``MALLOC_TUNING``), or when ``DDLIB_HEAP_REUSE=0``.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
from collections.abc import Iterator

import torch

# mallopt parameter numbers (glibc malloc.h)
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_MAX = -1, -2, -4
# -1 as the trim threshold: never trim (mallopt(3); glibc reads it as the largest size_t)
TUNED = {M_MMAP_MAX: 0, M_TRIM_THRESHOLD: -1, M_TOP_PAD: 256 << 20}
# glibc's documented defaults (mallopt(3)), restored on exit
DEFAULTS = {M_MMAP_MAX: 65536, M_TRIM_THRESHOLD: 128 * 1024, M_TOP_PAD: 128 * 1024}
_ENV_VARS = ("MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_THRESHOLD_")


def _glibc():
    """The process's C library if it is glibc (has ``mallopt`` and ``malloc_trim``), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):
        return None


def heap_reuse_applies(device: torch.device | str) -> bool:
    """Whether :func:`heap_reuse` would change anything for work on ``device`` in this process."""
    if torch.device(device).type != "cpu" or os.environ.get("DDLIB_HEAP_REUSE", "1") == "0":
        return False
    if any(v in os.environ for v in _ENV_VARS):
        return False
    return _glibc() is not None


def _set(libc, values: dict[int, int]) -> None:
    for param, value in values.items():
        libc.mallopt(param, value)


_depth = [0]  # open heap_reuse blocks in this process (the allocator is process-wide, so is this count)


@contextlib.contextmanager
def heap_reuse(device: torch.device | str = "cpu", enabled: bool = True) -> Iterator[bool]:
    """Keep freed CPU memory in the heap for the duration of the block (module docstring); yields whether it did.

    Nested blocks (several ``distill`` calls inside one outer block) share the outermost block's setting: only
    the outermost one sets and restores, so the heap is not given back between the inner calls."""
    if not (enabled and heap_reuse_applies(device)):
        yield False
        return
    libc = _glibc()
    if _depth[0] == 0:
        _set(libc, TUNED)
    _depth[0] += 1
    try:
        yield True
    finally:
        _depth[0] -= 1
        if _depth[0] == 0:
            _set(libc, DEFAULTS)
            libc.malloc_trim(0)
