"""Constants shared between programs: one copy of a weight, packed once.

Each program of a model (a prompt length's prefill, the decode step, every Dynamo graph of one
model) captures the same weights as its own constants, and each of its kernels packed its own copy
(oneDNN's blocked layout, our GEMM's 16-column panels): a Llama-style model of 96 MB took ~165 MB more
per prefill length. `intern` maps a constant to the first live tensor of equal content, and `shared`
builds a packed form once per (canonical tensors, arguments), kept weakly on the first tensor: a
weight used by several programs is stored and packed once, and freed with the last program using it.
"""
from __future__ import annotations

import threading
import weakref

import torch

from ..ir import bits, fingerprint, has_bits
from .c import compiler

MIN_NUMEL = 4096        # smaller constants are not worth the lookup
_lock = threading.RLock()     # reentrant: a weak reference's callback may run inside a locked section (GC)
_canonical: dict[tuple, list] = {}      # fingerprint -> weak references to tensors of that content


def _forget(key: tuple, ref) -> None:
    with _lock:
        refs = _canonical.get(key)
        if refs is not None:
            refs[:] = [r for r in refs if r is not ref]
            if not refs:
                del _canonical[key]


def intern(t: torch.Tensor) -> torch.Tensor:
    """The first live tensor with t's dtype, shape, strides and bits, else t."""
    if not isinstance(t, torch.Tensor) or t.numel() < MIN_NUMEL or t.requires_grad or not has_bits(t):
        return t
    key = fingerprint(t)
    with _lock:
        refs = _canonical.setdefault(key, [])
        for r in refs:
            c = r()
            if c is not None and c.device == t.device and torch.equal(bits(c), bits(t)):
                return c
        refs.append(weakref.ref(t, lambda r: _forget(key, r)))
    return t


def first_claim(t: torch.Tensor, tag: str, value):
    """The value first claimed under `tag` for t's owner tensor (this one where none was): kept on the owner,
    so every program of a model reading that weight sees the same."""
    owner = _owner(t)
    with _lock:
        claims = getattr(owner, "_kfuse_claims", None)
        if claims is None:
            claims = owner._kfuse_claims = {}
        return claims.setdefault(tag, value)


def _owner(t: torch.Tensor) -> torch.Tensor:
    return t._base if t._base is not None else t


def _key(a):
    """An argument as a key: a tensor by its owner's identity and version and its view of it (one
    too small to intern, by its bits)."""
    if isinstance(a, torch.Tensor) and a.numel() < MIN_NUMEL and has_bits(a):
        return ("small", a.dtype, str(a.device), tuple(a.shape), tuple(bits(a).reshape(-1).tolist()))
    if isinstance(a, torch.Tensor):
        o = _owner(a)
        return ("tensor", id(o), o._version, a.dtype, tuple(a.shape), tuple(a.stride()), a.storage_offset())
    if isinstance(a, (list, tuple)):
        return (type(a).__name__, *map(_key, a))
    if isinstance(a, dict):
        return ("dict", *((k, _key(v)) for k, v in a.items()))
    return ("value", type(a).__name__, repr(a))


def shared(build, first: torch.Tensor, *args, **kwargs):
    """build(first, *args, **kwargs), or the object an earlier identical call built while it is still
    alive. Identical: the same owner tensors (by identity, unchanged since: their version counters)
    viewed the same way, and equal other arguments. Kept weakly, on `first`'s owner; not kept if it was
    made with a stand-in for a library not built yet (compiler.collecting)."""
    owner = _owner(first)
    key = (build.__module__, build.__qualname__, _key(first), _key(args), _key(kwargs))
    others = [_owner(a) for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor) and a.numel() >= MIN_NUMEL]
    with _lock:
        memo = getattr(owner, "_kfuse_packed", None)
        if memo is None:
            memo = owner._kfuse_packed = {}
        hit = memo.get(key)
        obj = hit[1]() if hit is not None else None
    if obj is not None:
        return obj
    before = compiler.stand_ins()
    obj = build(first, *args, **kwargs)
    if compiler.stand_ins() != before:
        return obj
    with _lock:
        memo[key] = (others, weakref.ref(obj))    # `others` held: their ids in the key stay theirs
    return obj
