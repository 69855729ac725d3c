"""bench/bench_memory.py's heap tracker (bench/memtrack.c, loaded with LD_PRELOAD): a tensor allocated
in the child shows in full in the bytes in use and their peak, one freed is gone, one allocated on
another thread is counted."""
from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

import pytest

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None, reason="the tracker is built with gcc")

CHILD = r"""
import ctypes, json, threading, torch
mem = ctypes.CDLL(None)
mem.kf_mem_current.restype = mem.kf_mem_peak.restype = ctypes.c_long
before = mem.kf_mem_current()
mem.kf_mem_reset_peak()
a = torch.empty(10_000_000, dtype=torch.uint8)
held = mem.kf_mem_current() - before
del a
box = []
t = threading.Thread(target=lambda: box.append(torch.empty(5_000_000, dtype=torch.uint8)))
t.start()
t.join()
print(json.dumps({"held": held, "peak": mem.kf_mem_peak() - before, "after": mem.kf_mem_current() - before}))
"""


def _bench():
    spec = importlib.util.spec_from_file_location("bench_memory", Path(__file__).parents[2] / "bench" / "bench_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_tracker_counts_a_known_tensor(tmp_path):
    bench = _bench()
    r = bench.measure(bench.build_tracker(tmp_path), "eager", "unused", 1, 1, code=CHILD)
    slack = 1 << 20        # malloc's rounding, and the small blocks Python and a new thread allocate
    assert 10_000_000 <= r["held"] < 10_000_000 + slack
    assert 10_000_000 <= r["peak"] < 10_000_000 + slack      # the 5 MB tensor came after the 10 MB one was freed
    assert 5_000_000 <= r["after"] < 5_000_000 + slack
