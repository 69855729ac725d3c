"""kfuse's settings, read from the environment once (the first time they are needed).

    KFUSE_CACHE_DIR    compiled kernels and the machine calibration (default ~/.cache/kfuse, or
                       $XDG_CACHE_HOME/kfuse)
    KFUSE_NUM_THREADS  threads of kfuse's own OpenMP kernels (default: torch.get_num_threads() when a
                       model is compiled); kfuse never changes torch's own setting
    CC                 the C compiler, possibly with arguments ("gcc -m64") (default: cc)
    KFUSE_DUMP         comma-separated pipeline step names (or "all") whose result is printed to stderr
    KFUSE_AUTOTUNE     "0" (or "off", "false", "no") turns off the timing of schedule variants of the C
                       kernels at compile time (kfuse/backends/c/autotune.py); default on
    KFUSE_HUGEPAGES    "0" leaves packed weights in the pages they were allocated in (default: their
                       regions collapsed into 2 MB pages on Linux, kfuse/backends/hugepages.py)
    KFUSE_NATIVE       "0" runs every call of a CPU program kernel by kernel from Python (default: its C
                       kernels called from generated C, kfuse/runtime/native.py)
    KFUSE_PROGRESS     "1" shows the progress of long compiles on stderr, "0" never; default: where
                       stderr is a terminal (kfuse/progress.py)

Code reads `config.get()`; a test that changes the environment installs a fresh `from_env()`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import KfuseError


@dataclass(frozen=True)
class Config:
    cache_dir: Path
    threads: int | None          # None: follow torch.get_num_threads()
    cc: str
    dump: frozenset[str]
    autotune: bool = True        # time schedule variants of the larger C kernels, keep the fastest
    progress: bool | None = None   # show compile progress on stderr; None: where stderr is a terminal
    hugepages: bool = True       # packed weights collapsed into 2 MB pages (Linux)
    native: bool = True          # CPU programs' C kernels called from generated C (runtime/native.py)


def from_env(env=None) -> Config:
    env = os.environ if env is None else env
    cache = env.get("KFUSE_CACHE_DIR")
    if not cache:
        base = env.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        cache = os.path.join(base, "kfuse")
    threads = env.get("KFUSE_NUM_THREADS") or None
    if threads is not None:
        try:
            threads = int(threads)
        except ValueError:
            threads = 0
        if threads < 1:
            raise KfuseError(f"KFUSE_NUM_THREADS={env['KFUSE_NUM_THREADS']!r}: expected a positive integer")
    dump = frozenset(s.strip() for s in env.get("KFUSE_DUMP", "").split(",") if s.strip())
    autotune = _flag(env, "KFUSE_AUTOTUNE")
    progress = _flag(env, "KFUSE_PROGRESS") if env.get("KFUSE_PROGRESS", "").strip() else None
    return Config(Path(cache), threads, env.get("CC") or "cc", dump, autotune, progress, _flag(env, "KFUSE_HUGEPAGES"),
                  _flag(env, "KFUSE_NATIVE"))


def _flag(env, name: str) -> bool:
    """An on/off setting: "0", "off", "false" or "no" is off, anything else (or unset) on."""
    return env.get(name, "1").strip().lower() not in ("0", "off", "false", "no")


_config: Config | None = None


def get() -> Config:
    global _config
    if _config is None:
        _config = from_env()
    return _config


def threads() -> int:
    """Threads for kfuse's kernels now: KFUSE_NUM_THREADS, else torch's current count."""
    n = get().threads
    if n is None:
        n = torch.get_num_threads()
    return max(1, n)
