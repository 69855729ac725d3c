"""Kernel outputs the caller owns (no planned buffer): those of POOL_MIN bytes or more recycled between
calls (OutputPool), the smaller made fresh."""
from __future__ import annotations

import math
import sys

import torch


class OutputPool:
    """A kernel output the caller owns (no planned buffer): of POOL_MIN bytes or more, recycled, since a
    fresh one of 32 MB is mmapped by malloc and page-faulted in on every call (8193 faults, ~20 ms on this
    VM); the previous call's tensor is reused once nothing but the pool refers to it or its storage.
    Smaller ones are made fresh."""

    def __init__(self, shape, dtype):
        self.shape, self.dtype = tuple(shape), dtype
        self.pooled = math.prod(self.shape) * dtype.itemsize >= POOL_MIN and POOLING
        self.pool: list = []

    def take(self) -> torch.Tensor:
        if not self.pooled:
            return torch.empty(self.shape, dtype=self.dtype)
        pool, probe = self.pool, _PROBE[0]
        for _ in range(len(pool)):
            try:
                t = pool.pop(0)           # atomic: a tensor is out of the pool while it is checked
            except IndexError:
                break
            pool.append(t)
            if _unshared(t, probe):       # held as the probe is: by a list and this frame only
                return t
        t = torch.empty(self.shape, dtype=self.dtype)
        pool.append(t)
        if len(pool) > POOL_KEEP:         # y = cm(x) in a loop holds the last output during the call
            pool.pop(0)
        return t


POOL_MIN = 1 << 20      # bytes: smaller outputs come from malloc's free lists cheaply
POOL_KEEP = 2           # outputs kept per kernel output: the one the caller still holds, and one more
# _unshared counts references: CPython 3.14 may borrow stack references (sys.getrefcount lower than
# the references that exist), so the pool is used only where the count is exact
POOLING = sys.version_info < (3, 14)


_PROBE = [torch.empty(0)]    # held like a pooled tensor: by one list and the caller's local


def _unshared(t, probe) -> bool:
    """Nothing refers to tensor `t` but the pool and the caller's one reference (a view holds its base,
    an array from .numpy() the tensor), no C++ owner holds its TensorImpl, and no other tensor shares
    its storage (.detach(), .data, set_). The count is compared with the probe's, held the same way,
    not with a constant: the interpreter's own references to a frame's locals are not the same in
    every process state (one more after transformers' generate() under torch.compile ran)."""
    return sys.getrefcount(t) == sys.getrefcount(probe) and t._use_count() == 1 and \
        torch._C._storage_Use_Count(t.untyped_storage()._cdata) == 2
