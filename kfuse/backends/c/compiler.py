"""Compile C source to a shared library through the system C compiler, cached on disk.

The cache key is a hash of the source, the compiler's identity and the flags, so a compiler
upgrade or a flag change never reuses a stale library. Writes are atomic (compile to a private
temporary name, then rename), so processes compiling the same kernel at once all succeed.
A cached library that is truncated (its ELF section table does not end at the end of the file)
or fails to load (corrupted) is rebuilt; a truncated file is never handed to dlopen.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shlex
import shutil
import struct
import subprocess
import tempfile
from pathlib import Path

from ... import config
from ...errors import KfuseError

# -O3 and -march=native for SIMD; -fopenmp for threads; no -ffast-math, so NaN and Inf keep IEEE
# semantics. -fno-math-errno lets gcc call libmvec's vector log/log1p/sin/cos/pow (exp, erf, tanh are inline).
# -ffp-contract=off: gcc's default (fast) fuses a * b + c into an FMA wherever it sees one, so a value
# recomputed in a later pass of a row kernel may round differently from the same value in pass 0
# (x - mean(x) over a row of one element was not 0: tests/unit/test_fuzz.py::
# test_norm_of_a_norm_over_rows_of_one). The vecmath polynomials in vecmath.py call fmaf explicitly,
# which still compiles to FMA instructions (bit-identical to the contracted code over all 2^32 inputs).
# -fwrapv: int64 arithmetic wraps (ONNX's uint64 carried as int64 relies on it; torch's int64 ops wrap
# too); bench_norm/softmax/swiglu/gelu timed the same with it.
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fPIC", "-shared", "-std=gnu99", "-fno-math-errno",
         "-fno-trapping-math", "-ffp-contract=off", "-fwrapv"]
LIBS = ["-lm", "-lmvec"]


class CompileError(KfuseError):
    """The C compiler is missing or rejected a kernel; callers fall back to the reference path."""


def cache_dir() -> Path:
    return config.get().cache_dir


def compiler() -> str:
    return config.get().cc


def _cc_argv() -> list[str]:
    """CC may carry arguments ("gcc -m64"), as make allows."""
    return shlex.split(compiler()) or ["cc"]


@functools.lru_cache(maxsize=None)
def _compiler_identity(cc: str) -> str:
    argv = shlex.split(cc) or ["cc"]
    path = shutil.which(argv[0])
    if path is None:
        raise CompileError(f"C compiler {cc!r} not found (set CC to a working compiler)")
    try:
        out = subprocess.run([path, *argv[1:], "--version"], capture_output=True, text=True, timeout=30)
    except OSError as e:
        raise CompileError(f"C compiler {cc!r} cannot run: {e}") from None
    return " ".join([path, *argv[1:]]) + "\n" + out.stdout


def _complete_elf(path: Path) -> bool:
    """True if the file is an ELF64 whose section header table ends exactly at the end of the file
    (where the linker puts it): a truncated write fails this before dlopen ever sees it."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            size = os.fstat(f.fileno()).st_size
    except OSError:
        return False
    if len(head) < 64 or head[:4] != b"\x7fELF" or head[4] != 2:
        return False
    shoff, = struct.unpack_from("<Q", head, 0x28)
    shentsize, shnum = struct.unpack_from("<HH", head, 0x3A)
    return shoff + shentsize * shnum == size


def library_path(source: str, flags=tuple(FLAGS)) -> Path:
    cc = compiler()
    key = hashlib.sha256("\0".join([source, _compiler_identity(cc), *flags, *LIBS]).encode()).hexdigest()[:24]
    return cache_dir() / f"k_{key}.so"


def identity() -> str:
    """The C compiler's path, arguments and --version text (CompileError if it cannot run)."""
    return _compiler_identity(compiler())


_loaded: dict[Path, ctypes.CDLL] = {}
_provided: dict[str, Path] = {}      # source hash -> a library built from it elsewhere (an artifact's)
_library_of: dict[str, Path] = {}    # source hash -> the library this process loaded for it


def _key(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()


def provide(libraries: dict[str, Path]):
    """Use these prebuilt libraries ({source: path}, from an artifact whose hashes were checked) for
    their sources (default flags), instead of the cache or the compiler."""
    _provided.update({_key(src): Path(p) for src, p in libraries.items()})


def is_provided(source: str) -> bool:
    """Whether an artifact's prebuilt library serves `source` (see provide)."""
    return _key(source) in _provided


def library_of(source: str) -> Path:
    """The file of the library this process loaded for `source` (default flags)."""
    return _library_of[_key(source)]


def load(source: str, flags=tuple(FLAGS)) -> ctypes.CDLL:
    """The shared library built from `source`, compiling it unless a sound cached copy exists."""
    key = _key(source)
    given = _provided.get(key) if tuple(flags) == tuple(FLAGS) else None
    if given is not None:
        try:
            lib = _loaded.get(given) or ctypes.CDLL(str(given))
        except OSError:          # the artifact is gone: build or find it as usual
            del _provided[key]
        else:
            _loaded[given], _library_of[key] = lib, given
            return lib
    path = library_path(source, flags)
    lib = _loaded.get(path)
    if lib is not None:
        return lib
    if _complete_elf(path):
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
    if tuple(flags) == tuple(FLAGS):
        _library_of[key] = path
    return lib


def _build(source: str, path: Path, flags):
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent, prefix=".build-") as tmp:
        src, out = Path(tmp) / "kernel.c", Path(tmp) / path.name
        src.write_text(source)
        cmd = [*_cc_argv(), *flags, str(src), "-o", str(out), *LIBS]
        try:
            res = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
        except OSError as e:
            raise CompileError(f"cannot run C compiler {compiler()!r}: {e}") from None
        if res.returncode != 0:
            raise CompileError(f"C compiler failed ({' '.join(cmd)}):\n{res.stderr[-4000:]}")
        os.replace(out, path)  # atomic: readers see the old file or the whole new one
