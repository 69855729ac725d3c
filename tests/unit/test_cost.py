"""The cost model's predictions as the report gives them: a memory-bound kernel costs its bytes over
a memory bandwidth plus a launch, a GEMM its FLOPs over a GEMM rate; both rates in a sane range."""
from __future__ import annotations

import pytest
import torch

from kfuse.ir import Graph
from kfuse.runtime import build_program

F32 = torch.float32


def only_kernel(build, *shapes):
    g = Graph()
    g.outputs = list(build(g, *[g.input(s, F32) for s in shapes]))
    (k,) = build_program(g, {"backend": "cpu"}).report.kernels
    return k


@pytest.fixture(scope="module")
def memory_bound():
    """(ms per byte, launch ms) of an elementwise add, from two sizes: t = launch + bytes / bandwidth."""
    small, big = (only_kernel(lambda g, x, y: [g.add("add", x, y)], (rows, 1024), (rows, 1024)) for rows in (1024, 2048))
    for k, rows in ((small, 1024), (big, 2048)):
        assert k.ops == ["add"] and k.bytes_after == 3 * rows * 1024 * 4      # two inputs read, one output written
    per_byte = (big.predicted_ms - small.predicted_ms) / (big.bytes_after - small.bytes_after)
    return per_byte, small.predicted_ms - per_byte * small.bytes_after


def test_memory_bound_kernel_costs_its_bytes_over_a_bandwidth(memory_bound):
    per_byte, launch = memory_bound
    bandwidth_gbs = 1 / (per_byte * 1e6)
    assert 0.5 <= bandwidth_gbs <= 5000, bandwidth_gbs          # a memory system, not free and not a disk
    assert 0 < launch < 0.1, launch                             # a kernel launch: microseconds, not zero


def test_gemm_costs_its_flops_over_a_gemm_rate(memory_bound):
    per_byte, launch = memory_bound
    k = only_kernel(lambda g, x: [g.add("matmul", x, g.const(torch.randn(1024, 1024)))], (1024, 1024))
    assert k.flops == 2 * 1024 ** 3
    compute_ms = k.predicted_ms - launch
    assert compute_ms > 1.2 * k.bytes_after * per_byte          # compute-bound: above its bytes' time
    gflops = k.flops / (compute_ms * 1e6)
    assert 1 <= gflops <= 1e6, gflops


def test_the_machines_rates_are_measured_per_cpu_and_thread_count(cache, monkeypatch):
    """The cost model's rates are cached per CPU (autotune.machine_key) and thread count, not per host
    name: a cache that outlives its machine (a VM moved to another CPU) measures the new one afresh, and
    going back to an earlier CPU or thread count reads its entry without measuring again."""
    import json

    from kfuse import config
    from kfuse.backends import calibrate

    measured = []
    real = calibrate._fastest
    monkeypatch.setattr(calibrate, "_fastest", lambda fn, reps=10: measured.append(fn) or real(fn, 1))
    for cpu, threads in [("zen4", 2), ("sapphire rapids", 2), ("zen4", 1), ("zen4", 2), ("sapphire rapids", 2)]:
        calibrate._measured.cache_clear()
        monkeypatch.setattr(calibrate, "machine_key", lambda cpu=cpu: cpu)
        m = calibrate._measured(threads)
        assert m.threads == threads and m.bandwidth_gbs > 0 and m.gemm_gflops > 0
    calibrate._measured.cache_clear()
    assert len(measured) == 3 * 2                   # a copy and a GEMM for each of the three new keys
    assert len(json.loads((config.get().cache_dir / "machine.json").read_text())["machines"]) == 3
