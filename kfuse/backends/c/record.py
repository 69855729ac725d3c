"""The C calls of a program's kernels, recorded for the native runner (kfuse/runtime/native.py).

A kernel's Python wrapper calls its C function through `c_call(fn, *args, keep=tensors)` on its fast
path, where the arguments are nothing but its tensors' data pointers, its own weights, plans and
parameters. While a `Recorder` is active in the calling thread, each such call is also appended to the
recorder, with the tensors it was given (`keep`): the recorder holds them, so a pointer in a recorded
call stays valid however the call's wrapper allocated the tensor behind it. A path that copied or
converted a tensor in Python first passes record=False (a replay of the C call alone would read the old
copy): a kernel that records nothing runs from Python in the native program.
"""
from __future__ import annotations

import contextlib
import threading

_active = threading.local()


def c_call(fn, *args, keep=(), record: bool = True):
    """fn(*args), recorded when a Recorder is active in this thread (and `record`: False where the
    wrapper copied a tensor in Python first, which a replay of the C call alone would not redo)."""
    rec = getattr(_active, "recorder", None)
    if rec is not None and record:
        rec.calls.setdefault(rec.kernel, []).append((fn, args))
        rec.kept.setdefault(rec.kernel, []).extend(keep)
    return fn(*args)


@contextlib.contextmanager
def paused():
    """No recording in this thread inside (a kernel called on copies its wrapper made: a replay of its C
    calls alone would read the old copies)."""
    rec = getattr(_active, "recorder", None)
    _active.recorder = None
    try:
        yield
    finally:
        _active.recorder = rec


class Recorder:
    """`with Recorder() as r:` records the c_call calls made in this thread: r.calls[kernel index] is the
    list of (function, arguments) made while r.kernel was that index; r.kept[index] the tensors they were given."""

    def __init__(self):
        self.calls: dict[int, list] = {}
        self.kept: dict[int, list] = {}
        self.kernel = -1

    def __enter__(self):
        _active.recorder = self
        return self

    def __exit__(self, *exc):
        _active.recorder = None
