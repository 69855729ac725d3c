"""Generated Triton kernels as real files: written into the kfuse cache, imported from there.

`@triton.jit` reads its function's source through `inspect`, so a kernel must live in a file. The
file is `<cache_dir>/triton/kt_<hash>.py`, the hash over the source and the Triton version; it is
written atomically (a private temporary name, then a rename), so processes writing the same kernel
at once all succeed, and a file whose text does not match its name is rewritten.

Triton is imported here, lazily: kfuse imports without it, and `available()` says whether it can
run (it needs a CUDA device, or the interpreter: TRITON_INTERPRET=1 with CPU tensors).
"""
from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from ... import config
from ...errors import KfuseError


class TritonUnavailable(KfuseError):
    """Triton is not installed, or there is neither a CUDA device nor the interpreter."""


@functools.cache
def triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available() -> bool:
    """Whether generated Triton kernels can run here: Triton installed, and CUDA or the interpreter."""
    return triton_version() is not None and (interpreting() or torch.cuda.is_available())


def require():
    if triton_version() is None:
        raise TritonUnavailable("backend='triton' needs Triton: pip install triton")


def cache_dir() -> Path:
    return config.get().cache_dir / "triton"


def source_key(source: str) -> str:
    h = hashlib.sha256()
    h.update(f"triton {triton_version()} interpret={interpreting()}\n".encode())
    h.update(source.encode())
    return h.hexdigest()[:24]


_modules: dict[str, object] = {}
_by_text: dict[str, object] = {}     # the same, by the source text itself: no hash of it per call


def load(source: str):
    """The module defined by `source`, from a file in the cache (written first if absent)."""
    mod = _by_text.get(source)
    if mod is not None:
        return mod
    require()
    key = source_key(source)
    mod = _modules.get(key)
    if mod is not None:
        _by_text[source] = mod
        return mod
    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    path = d / f"kt_{key}.py"
    try:
        current = path.read_text()
    except OSError:
        current = None
    if current != source:
        fd, tmp = tempfile.mkstemp(dir=d, prefix=f".kt_{key}.", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(source)
        os.replace(tmp, path)
    name = f"kfuse_triton_{key}"
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod          # triton looks its functions' globals up through the module
    spec.loader.exec_module(mod)
    _modules[key] = mod
    _by_text[source] = mod
    return mod


class Launch:
    """Launches of one jit function on one grid with fixed constexpr (keyword) arguments: the first
    through `fn[grid](...)` (which binds the arguments, specialises on each pointer's 16-byte alignment
    and on integer values, and compiles), the later ones straight through the compiled kernel with every
    parameter's value in the signature's order (what Triton's own call passes it) while the pointers'
    alignments and the integers are those it was built for (any other call goes through `fn[grid]`
    again). Why: on an H200 a one-kernel program's call cost 55 us of host time against its 37 us kernel
    (RMSNorm [8192, 4096] bf16), and Triton's call path (binding, specialisation, cache key) is part of
    that; 26-52 us a call after, in a noisier run (not an A/B)."""

    def __init__(self, fn, grid: tuple, num_warps: int, num_stages: int | None = None, **constexprs):
        self.fn, self.grid, self.constexprs = fn, grid, constexprs
        self.options = {"num_warps": num_warps, **({} if num_stages is None else {"num_stages": num_stages})}
        # (runner, the _spec of each argument it was compiled for, the constexprs' values after the
        # positional arguments in signature order), or None; replaced whole, so threads see one or the other
        self.fast = None

    def __call__(self, args):
        if interpreting():          # masked lanes compute on zeros (log 0, 0 / 0): NumPy's warnings are noise
            with quiet():
                self.fn[self.grid](*args, **self.constexprs, **self.options)
            return
        key = tuple(map(_spec, args))
        fast = self.fast
        if fast is not None and key == fast[1]:
            fast[0](*args, *fast[2])
            return
        compiled = self.fn[self.grid](*args, **self.constexprs, **self.options)
        try:
            rest = self.fn.arg_names[len(args):]
            if sorted(rest) != sorted(self.constexprs):     # a default or a misnamed keyword: Triton's path
                return
            # the compiled kernel's runner takes the grid in three dims
            self.fast = (compiled[(tuple(self.grid) + (1, 1))[:3]], key, [self.constexprs[n] for n in rest])
        except Exception:        # noqa: BLE001 - a Triton without CompiledKernel[grid] or arg_names: its own path
            self.fast = None


def _spec(a):
    """An argument as a compiled kernel's runner must see it again: a tensor's device, dtype and 16-byte
    alignment (what Triton specialises a pointer on), an integer's value (stricter than Triton's classes:
    1, multiples of 16, int32 range), a float's type only."""
    if isinstance(a, torch.Tensor):
        return a.device, a.dtype, a.data_ptr() % 16 == 0
    return float if isinstance(a, float) else a


def as_arg(t: torch.Tensor) -> torch.Tensor:
    """A tensor as a kernel argument: bool travels as uint8 (same bytes)."""
    return t.view(torch.uint8) if t.dtype == torch.bool else t


def device_of(tensors, default=None):
    for t in tensors:
        if isinstance(t, torch.Tensor):
            return t.device
    return default or torch.device("cpu")


def quiet():
    """NumPy's floating-point warnings off (the interpreter computes masked lanes too)."""
    import numpy as np
    return np.errstate(all="ignore")


def autotune_enabled() -> bool:
    """KFUSE_TRITON_AUTOTUNE=0 turns timing of block sizes off (always off in the interpreter)."""
    return os.environ.get("KFUSE_TRITON_AUTOTUNE", "1") != "0" and not interpreting()


def fastest(candidates: list, launch, problem: str, reps: int = 5):
    """The candidate whose `launch(candidate)` runs fastest on the GPU: each compiled and warmed by one
    call, then timed over `reps`; one that fails to compile for this GPU (shared memory, registers)
    is skipped. The choice is kept in the kfuse cache's autotune file under the GPU's name, the Triton
    version and `problem` (a text naming the kernel and its shapes), so a later process times nothing.
    The first candidate where none runs."""
    from ..c import autotune
    names = [str(c) for c in candidates]
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "interpreter"
    key = "triton " + hashlib.sha256("\0".join([gpu, str(triton_version()), problem, *names]).encode()).hexdigest()[:32]
    hit = autotune.cached(key, names)
    if hit is not None:
        return candidates[hit]
    ms = []
    for c in candidates:
        try:
            launch(c)
        except Exception:           # noqa: BLE001 - triton's OutOfResources, a compile error: not this one
            ms.append(float("inf"))
            continue
        ms.append(seconds(lambda: launch(c), reps) * 1e3)
    best = min(range(len(ms)), key=ms.__getitem__)
    if ms[best] != float("inf"):
        autotune.remember(key, best, names, ms)
    return candidates[best]


def seconds(fn, reps: int = 5) -> float:
    """Seconds per call of `fn` over `reps` calls, the GPU synchronised before and after (no GPU in the
    interpreter: nothing to wait for)."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t) / reps


_chosen: dict = {}      # (kernel, problem) -> the candidate chosen, once per process


def choice(kernel: str, source: str, problem: tuple, candidates: list, launch, reps: int = 5):
    """The candidate to launch for `problem` of the kernel in `source`: the first where tuning is off,
    else the `fastest`, remembered for the process (a call looks it up without hashing the source)."""
    memo = (kernel, problem)
    if memo not in _chosen:
        _chosen[memo] = fastest(candidates, launch, f"{kernel} {source_key(source)} {problem}", reps) \
            if autotune_enabled() else candidates[0]
    return _chosen[memo]
