"""Packed weights in 2 MB pages (Linux transparent huge pages, collapsed in place).

A kernel that streams its weights from memory (a GEMV per linear in a decode step, a batch-1 CNN
whose weights do not stay in the last-level cache) reads them at the rate the TLB and the hardware
prefetchers allow, and both stop at every 4 KB page; in a virtual machine each TLB miss walks two page
tables. Reading a 64 MB tensor on this project's machine (a Zen 4 VM, 2 threads): 36-45 GB/s in 4 KB
pages, 52-55 GB/s once its pages are collapsed into 2 MB ones.

`back(t)` asks the kernel to move the 2 MB-aligned regions wholly inside a packed weight into huge
pages now (madvise MADV_COLLAPSE, Linux 6.1+: a synchronous copy, ~0.1-0.25 s per 100 MB, values and
addresses unchanged, so kernels holding raw pointers keep them). Where the kernel, the allocator or the
system does not allow it (no THP, not Linux, a file mapping), nothing happens. KFUSE_HUGEPAGES=0 turns
it off.
"""
from __future__ import annotations

import ctypes
import sys

import torch

from .. import config

PAGE = 2 << 20
MADV_COLLAPSE = 25

_madvise = None


def _libc_madvise():
    global _madvise
    if _madvise is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).madvise
            fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
            _madvise = fn
        except (OSError, AttributeError):
            _madvise = False
    return _madvise


def regions(address: int, nbytes: int) -> list[int]:
    """The 2 MB-aligned regions [r, r + PAGE) wholly inside [address, address + nbytes): a region shared
    with other allocations would be split again when they are freed."""
    first = -(-address // PAGE) * PAGE
    return list(range(first, (address + nbytes) // PAGE * PAGE, PAGE))


def back(*tensors) -> int:
    """Collapse the regions of these CPU tensors into huge pages; the number collapsed."""
    if not sys.platform.startswith("linux") or not config.get().hugepages:
        return 0
    madvise = _libc_madvise()
    if not madvise:
        return 0
    done = 0
    for t in tensors:
        if not isinstance(t, torch.Tensor) or t.device.type != "cpu" or t.is_mkldnn or t.is_sparse:
            continue
        try:
            storage = t.untyped_storage()
            address, nbytes = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):     # no plain storage (a wrapper subclass)
            continue
        for r in regions(address, nbytes):
            done += madvise(r, PAGE, MADV_COLLAPSE) == 0
    return done


def back_object(obj, depth: int = 2) -> int:
    """back() of the tensors a packed kernel object holds: its attributes (__slots__ included), those
    in lists, tuples and dicts among them, and those of the kernel objects it holds (a fused pair's
    halves), `depth` levels down."""
    if obj is None:
        return 0
    tensors, inner = [], []
    names = [*getattr(obj, "__dict__", ()), *(n for c in type(obj).__mro__ for n in getattr(c, "__slots__", ()))]
    for v in (getattr(obj, n, None) for n in names):
        for item in v.values() if isinstance(v, dict) else v if isinstance(v, (list, tuple)) else (v,):
            if isinstance(item, torch.Tensor):
                tensors.append(item)
            elif depth > 1 and type(item).__module__.startswith("kfuse."):
                inner.append(item)
    return back(*tensors) + sum(back_object(o, depth - 1) for o in inner)
