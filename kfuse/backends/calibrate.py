"""The machine's rates for the cost model, measured once per machine and thread count through the
paths the kernels use (a 64 MB copy; a 512³ GEMM through kfuse's GEMM library path), cached on disk."""
from __future__ import annotations

import functools
import hashlib
import json
import os
import time

import torch

from .. import config
from ..cost import Machine
from .c.autotune import machine_key
from .library import pack_linear


def machine() -> Machine:
    return _measured(config.threads())


@functools.lru_cache(maxsize=None)
def _measured(threads: int) -> Machine:
    # keyed by the CPU itself (autotune.machine_key: model, ISA, compiler, CPU count), not the host name:
    # a cache directory that outlives a machine (a VM moved to another CPU under the same name) must not
    # hand the new one the old one's rates; one entry per CPU and thread count
    key = hashlib.sha256(f"v4\n{machine_key()}\n{threads}".encode()).hexdigest()[:24]
    path = config.get().cache_dir / "machine.json"
    try:
        entries = json.loads(path.read_text()).get("machines", {})
    except (OSError, ValueError, AttributeError):
        entries = {}
    entries = entries if isinstance(entries, dict) else {}      # a file of another shape is measured over
    if key in entries:
        try:
            return Machine(entries[key]["bandwidth_gbs"], entries[key]["gemm_gflops"], threads)
        except (KeyError, TypeError):
            pass
    src = torch.empty(16 << 20)
    dst = torch.empty_like(src)
    bw = 2 * src.nbytes / _fastest(lambda: dst.copy_(src)) / 1e9
    a = torch.randn(512, 512, generator=torch.Generator().manual_seed(0))   # the global generator untouched
    gemm = pack_linear(a, None)
    gflops = 2 * 512 ** 3 / _fastest(lambda: gemm(a)) / 1e9
    entries[key] = {"bandwidth_gbs": bw, "gemm_gflops": gflops}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"machines": entries}))
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
