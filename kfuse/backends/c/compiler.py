"""Compile C source to a shared library through the system C compiler, cached on disk.

The cache key is a hash of the source, the compiler's identity and the flags, so a compiler
upgrade or a flag change never reuses a stale library. Writes are atomic (compile to a private
temporary name, then rename), so processes compiling the same kernel at once all succeed.
A cached library that fails to load (truncated, corrupted) is rebuilt.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from ...errors import KfuseError

# -O3 and -march=native for SIMD; -fopenmp for threads; no -ffast-math, so NaN and Inf keep IEEE
# semantics. -fno-math-errno lets gcc call libmvec's vector exp/log/erf (it cannot otherwise).
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=gnu99", "-fno-math-errno",
         "-fno-trapping-math"]
LIBS = ["-lm", "-lmvec"]


class CompileError(KfuseError):
    """The C compiler is missing or rejected a kernel; callers fall back to the reference path."""


def cache_dir() -> Path:
    d = os.environ.get("KFUSE_CACHE_DIR")
    if d:
        return Path(d)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "kfuse"


def compiler() -> str:
    return os.environ.get("CC", "cc")


@functools.lru_cache(maxsize=None)
def _compiler_identity(cc: str) -> str:
    path = shutil.which(cc)
    if path is None:
        raise CompileError(f"C compiler {cc!r} not found (set CC to a working compiler)")
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    except OSError as e:
        raise CompileError(f"C compiler {cc!r} cannot run: {e}") from None
    return path + "\n" + out.stdout


def library_path(source: str, flags=tuple(FLAGS)) -> Path:
    cc = compiler()
    key = hashlib.sha256("\0".join([source, _compiler_identity(cc), *flags, *LIBS]).encode()).hexdigest()[:24]
    return cache_dir() / f"k_{key}.so"


_loaded: dict[Path, ctypes.CDLL] = {}


def load(source: str, flags=tuple(FLAGS)) -> ctypes.CDLL:
    """The shared library built from `source`, compiling it unless a sound cached copy exists."""
    path = library_path(source, flags)
    lib = _loaded.get(path)
    if lib is not None:
        return lib
    if path.exists():
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:          # truncated or corrupted: rebuild it below
            lib = None
    if lib is None:
        _build(source, path, flags)
        try:
            lib = ctypes.CDLL(str(path))
        except OSError as e:
            raise CompileError(f"built {path} but cannot load it: {e}") from None
    _loaded[path] = lib
    return lib


def _build(source: str, path: Path, flags):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".build-") as tmp:
        src, out = Path(tmp) / "kernel.c", Path(tmp) / path.name
        src.write_text(source)
        cmd = [compiler(), *flags, str(src), "-o", str(out), *LIBS]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except OSError as e:
            raise CompileError(f"cannot run C compiler {compiler()!r}: {e}") from None
        if res.returncode != 0:
            raise CompileError(f"C compiler failed ({' '.join(cmd)}):\n{res.stderr[-4000:]}")
        os.replace(out, path)  # atomic: readers see the old file or the whole new one
