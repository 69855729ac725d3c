"""The OpenMP thread count of the calling thread, which every kernel kfuse runs obeys.

kfuse's C kernels, oneDNN and torch's own CPU ops all run on one OpenMP runtime (torch's libgomp:
the generated libraries link libgomp.so.1, which resolves to the copy torch already loaded), and a
parallel region with no explicit count uses the *calling thread's* setting (`omp_set_num_threads`
sets it for that thread only; `torch.get_num_threads()` reads it). So the runtime sets the count
for the duration of a call, in the thread that makes the call, and puts it back afterwards: a
user's `torch.set_num_threads` is never changed, and several callers can each use a share of the
cores instead of all of them at once.
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


_GOMP = _libgomp()


def threads() -> int:
    """The calling thread's OpenMP thread count (torch initialises it on first use in a thread)."""
    return torch.get_num_threads()


def set_threads(n: int):
    """Set the calling thread's OpenMP thread count (no other thread's, and no global setting)."""
    if _GOMP is not None:
        _GOMP.omp_set_num_threads(max(1, int(n)))


@contextlib.contextmanager
def using(n: int):
    """Run the block with n OpenMP threads in this thread, then restore the thread's own setting."""
    before = threads()
    if n != before:
        set_threads(n)
    try:
        yield
    finally:
        if n != before:
            set_threads(before)
