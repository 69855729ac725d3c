"""Progress of a compile, shown on stderr: a first compile captures the model, fuses it, builds its C
libraries (seconds each, one per CPU at a time) and times kernel choices, 10-30 s on a 2-CPU machine.

Shown where stderr is a terminal, or where KFUSE_PROGRESS=1 (KFUSE_PROGRESS=0: never); always logged
to the "kfuse" logger at INFO. Only what takes time is shown: a stage that may be long (building
libraries) when it starts, another when it took a second or more, and the whole compile (or a Dynamo
graph's call that compiled segments) when it took that long, so a compile that finds everything built
stays quiet.
"""
from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time

from . import config

log = logging.getLogger("kfuse")
SLOW_S = 1.0          # a stage (or compile) that took this long is shown when it ends
_local = threading.local()     # the compile this thread is in: (label, start time)


def shown() -> bool:
    setting = config.get().progress
    if setting is not None:
        return setting
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):      # a replaced or closed stderr
        return False


_line = {"open": False, "count": 0}      # whether a shown line awaits its end (a stage running); lines shown


def _show(text: str, end: str = "\n") -> None:
    if _line["open"]:        # a stage's line is open: what another shows goes on a line of its own
        text = "\n" + text
    print(text, end=end, file=sys.stderr, flush=True)
    _line["open"], _line["count"] = end != "\n", _line["count"] + 1


@contextlib.contextmanager
def compiling(label: str):
    """One compile (kfuse.compile's program for a signature): its stages are shown under `label`."""
    outer = getattr(_local, "current", None)
    _local.current = (label, time.perf_counter())
    try:
        yield
        finished(f"compiled {label}", time.perf_counter() - _local.current[1])
    finally:
        _local.current = outer


def finished(what: str, took: float) -> None:
    """Something long done (a compile, a Dynamo graph's first call): logged, and shown when it took
    SLOW_S or more."""
    log.info("%s in %.1f s", what, took)
    if took >= SLOW_S and shown():
        _show(f"kfuse: {what} in {took:.1f} s")


@contextlib.contextmanager
def stage(what: str, long: bool = False, always: str | None = None):
    """A step of the current compile; `long`: shown as it starts (the user waits on it), else shown
    only when it took SLOW_S or more. `always`: shown as it starts and ends wherever it runs, the
    line begun with this text instead of "kfuse: " (the command line's own steps)."""
    show = always is not None or (shown() and getattr(_local, "current", None) is not None)
    head = "kfuse: " if always is None else always
    begun = None
    if show and (long or always is not None):
        _show(f"{head}{what} ...", end="")
        begun = _line["count"]
    t = time.perf_counter()
    ok = False
    try:
        yield
        ok = True
    finally:
        took = time.perf_counter() - t
        log.info("%s: %.1f s", what, took)
        tail = f"{took:.1f} s" if ok else "failed"
        if begun is not None and begun == _line["count"]:     # nothing shown since: end its line
            _line["open"] = False
            print(f" {tail}", file=sys.stderr, flush=True)
        elif begun is not None or (show and took >= SLOW_S):
            _show(f"{head}{what}: {tail}")
