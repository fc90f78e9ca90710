"""ddlib.alloc.heap_reuse: freed CPU memory is reused instead of faulted in again, and goes back to the system
after the block (that distillation results do not change: tests/test_mtt.py).

The scenario runs in a fresh interpreter: what glibc does with a freed block depends on the whole heap's layout
(a block freed below a live allocation stays in glibc's bins instead of being unmapped), so a heap shaped by a
few hundred earlier tests gives other page-fault counts than the same code in a new process (CI saw this).
"""

import json
import os
import subprocess
import sys

import pytest

from ddlib import alloc

SCENARIO = r"""
import json, resource
import torch
from ddlib import alloc

BLOCK = 64 << 20  # bytes: above glibc's largest dynamic mmap threshold (32 MiB), so mmapped by default
PAGE = resource.getpagesize()

def faults_of_cycles(cycles=8):
    # minor page faults of allocating, writing and freeing a 64 MiB tensor `cycles` times
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(cycles):
        t = torch.ones(BLOCK // 4)
        del t
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

def resident_bytes():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * PAGE

out = {"pages": BLOCK // PAGE, "block": BLOCK}
out["outside"] = faults_of_cycles()
with alloc.heap_reuse("cpu") as active:
    out["active"] = active
    # the heap grows for the first few cycles (a freed block is 64 bytes short of an aligned request of the
    # same size until freed neighbours coalesce), then serves every request from freed memory
    faults_of_cycles(12)
    out["inside"] = faults_of_cycles()
    out["resident_inside"] = resident_bytes()
out["resident_after"] = resident_bytes()
out["after"] = faults_of_cycles()
with alloc.heap_reuse("cpu"):
    faults_of_cycles(12)
    for _ in range(3):  # nested blocks (one per distill call) do not give the heap back when they end
        with alloc.heap_reuse("cpu"):
            faults_of_cycles(1)
    out["nested"] = faults_of_cycles()
print(json.dumps(out))
"""

needs_glibc = pytest.mark.skipif(alloc._glibc() is None or not os.path.exists("/proc/self/statm"),
                                 reason="glibc malloc on Linux only")


@needs_glibc
def test_freed_blocks_are_reused_inside_and_returned_after():
    env = {k: v for k, v in os.environ.items() if k not in alloc._ENV_VARS and k != "DDLIB_HEAP_REUSE"}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([sys.executable, "-c", SCENARIO], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    r = json.loads(done.stdout.strip().splitlines()[-1])
    pages = r["pages"]
    assert r["active"]
    assert r["outside"] > 6 * pages         # glibc's defaults: every cycle maps and faults the block in again
    assert r["inside"] < 0.5 * pages        # steady state: not even one block's worth over eight cycles
    assert r["nested"] < 0.5 * pages
    # leaving the block gives the freed block's pages back to the system (malloc_trim) ...
    assert r["resident_inside"] - r["resident_after"] > 0.75 * r["block"]
    # ... so the next allocation faults them in again, at least once (later cycles may reuse the address range
    # from glibc's bins without faulting, when the freed block does not sit at the top of the heap)
    assert r["after"] > 0.9 * pages


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
