"""ddlib.alloc.heap_reuse: freed CPU memory is reused instead of faulted in again, and glibc's behaviour comes
back after the block (that distillation results do not change: tests/test_mtt.py)."""

import resource

import pytest
import torch

from ddlib import alloc

BLOCK = 64 << 20  # bytes: above glibc's largest dynamic mmap threshold (32 MiB), so mmapped by default


def faults_of_cycles(cycles: int = 8) -> int:
    """Minor page faults of allocating, writing and freeing a 64 MiB tensor ``cycles`` times."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(cycles):
        t = torch.ones(BLOCK // 4)
        del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


needs_glibc = pytest.mark.skipif(alloc._glibc() is None, reason="glibc malloc only")


@needs_glibc
def test_freed_blocks_are_reused_inside_and_returned_after(monkeypatch):
    for var in alloc._ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("DDLIB_HEAP_REUSE", raising=False)
    pages = BLOCK // resource.getpagesize()
    outside = faults_of_cycles()
    with alloc.heap_reuse("cpu") as active:
        assert active
        # the heap grows for the first few cycles (a freed block is 64 bytes short of an aligned request of the
        # same size until freed neighbours coalesce), then serves every request from freed memory
        faults_of_cycles(12)
        inside = faults_of_cycles()
    after = faults_of_cycles()
    with alloc.heap_reuse("cpu"):
        faults_of_cycles(12)
        for _ in range(3):  # nested blocks (one per distill call) do not give the heap back when they end
            with alloc.heap_reuse("cpu"):
                faults_of_cycles(1)
        nested = faults_of_cycles()
    assert nested < 0.5 * pages
    assert outside > 6 * pages              # default: every cycle maps and faults the block in again
    assert inside < 0.5 * pages             # steady state: not even one block's worth over eight cycles
    assert after > 6 * pages                # defaults back: memory went back to the system


def test_does_nothing_where_it_does_not_apply(monkeypatch):
    with alloc.heap_reuse("meta") as active:
        assert not active                   # not a malloc device
    with alloc.heap_reuse("cpu", enabled=False) as active:
        assert not active
    monkeypatch.setenv("DDLIB_HEAP_REUSE", "0")
    assert not alloc.heap_reuse_applies("cpu")
    monkeypatch.delenv("DDLIB_HEAP_REUSE")
    monkeypatch.setenv("MALLOC_MMAP_MAX_", "0")  # the process's own tuning wins
    assert not alloc.heap_reuse_applies("cpu")

