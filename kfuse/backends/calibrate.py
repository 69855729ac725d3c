"""The machine's rates for the cost model, measured once per machine and thread count through the
paths the kernels use (a 64 MB copy; a 512³ GEMM through kfuse's GEMM library path), cached on disk."""
from __future__ import annotations

import functools
import json
import os
import platform
import time

import torch

from .. import config
from ..cost import Machine
from .library import pack_linear


def machine() -> Machine:
    return _measured(config.threads())


@functools.lru_cache(maxsize=None)
def _measured(threads: int) -> Machine:
    key = f"v3-{platform.node()}-{platform.processor()}-{os.cpu_count()}-{threads}"
    path = config.get().cache_dir / "machine.json"
    try:
        data = json.loads(path.read_text())
        if data.get("key") == key:
            return Machine(data["bandwidth_gbs"], data["gemm_gflops"], threads)
    except (OSError, ValueError, KeyError):
        pass
    src = torch.empty(16 << 20)
    dst = torch.empty_like(src)
    bw = 2 * src.nbytes / _fastest(lambda: dst.copy_(src)) / 1e9
    a = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))   # the global generator untouched
    gemm = pack_linear(a, None)
    gflops = 2 * 512 ** 3 / _fastest(lambda: gemm(a)) / 1e9
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "bandwidth_gbs": bw, "gemm_gflops": gflops}))
        os.replace(tmp, path)
    except OSError:
        pass
    return Machine(bw, gflops, threads)


def _fastest(fn, reps: int = 10) -> float:
    """Seconds of the fastest of `reps` calls: the machine's rate, not another process's share of it."""
    fn()
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best
