"""The OpenMP thread count of the calling thread, which every kernel kfuse runs obeys.

kfuse's C kernels, oneDNN and torch's own CPU ops all run on one OpenMP runtime (torch's libgomp:
the generated libraries link libgomp.so.1, which resolves to the copy torch already loaded), and a
parallel region with no explicit count uses the *calling thread's* setting (`omp_set_num_threads`
sets it for that thread only; `torch.get_num_threads()` reads it). So the runtime sets the count
for the duration of a call, in the thread that makes the call, and puts it back afterwards: a
user's `torch.set_num_threads` is never changed, and several callers can each use a share of the
cores instead of all of them at once. MKL (torch's, under a packed GEMM kfuse may choose) keeps a count of
its own, so `using` sets MKL's count for the thread as well and gives it back after.
"""
from __future__ import annotations

import contextlib
import ctypes
from pathlib import Path

import torch


def _libgomp():
    """torch's libgomp (already loaded by torch), or None where torch does not use OpenMP."""
    for path in [*sorted(Path(torch.__file__).parent.joinpath("lib").glob("libgomp*.so*")), "libgomp.so.1"]:
        try:
            lib = ctypes.CDLL(str(path))
            lib.omp_set_num_threads.argtypes = [ctypes.c_int]
            return lib
        except (OSError, AttributeError):
            continue
    return None


def _mkl_local():
    """MKL's per-thread count (`mkl_set_num_threads_local`, Fortran ABI: the count by pointer; it returns
    the thread's previous one, 0 for "MKL's global count"), where torch links MKL, else None. MKL does not
    read the calling thread's OpenMP count: it takes its own, which torch.set_num_threads sets for every
    thread (a packed MKL GEMM under `using(1)` ran on both threads of this machine)."""
    try:
        fn = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so")).mkl_set_num_threads_local_
    except (OSError, AttributeError):
        return None
    fn.argtypes, fn.restype = [ctypes.POINTER(ctypes.c_int)], ctypes.c_int
    return fn


_GOMP = _libgomp()
_MKL_LOCAL = _mkl_local()
MKL_THREADS = _MKL_LOCAL is not None      # whether MKL's calls obey `using` too


def threads() -> int:
    """The calling thread's OpenMP thread count (torch initialises it on first use in a thread)."""
    return torch.get_num_threads()


def set_threads(n: int, mkl: int | None = None) -> int:
    """Set the calling thread's OpenMP thread count (no other thread's, and no global setting), and MKL's
    count for the thread to `mkl` (default n; 0: MKL's global count again). Returns MKL's count for the
    thread before (0 where it had none of its own, or MKL cannot be told)."""
    if _GOMP is not None:
        _GOMP.omp_set_num_threads(max(1, int(n)))
    if _MKL_LOCAL is None:
        return 0
    return _MKL_LOCAL(ctypes.byref(ctypes.c_int(max(1, int(n)) if mkl is None else int(mkl))))


@contextlib.contextmanager
def using(n: int):
    """Run the block with n OpenMP threads in this thread, then restore the thread's own setting."""
    before = threads()
    if n == before:
        yield
        return
    mkl_before = set_threads(n)
    try:
        yield
    finally:
        set_threads(before, mkl=mkl_before)
