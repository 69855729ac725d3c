"""Compile C source to a shared library through the system C compiler, cached on disk.

The cache key is a hash of the source, the compiler's identity and the flags, so a compiler
upgrade or a flag change never reuses a stale library. Writes are atomic (compile to a private
temporary name, then rename), so processes compiling the same kernel at once all succeed.
A cached library that is truncated (its ELF section table does not end at the end of the file)
or fails to load (corrupted) is rebuilt; a truncated file is never handed to dlopen.

A program's first compile used to build its libraries one after another as its kernels were made and
timed. `collecting()` lets backends.prebuild make the kernels once with stand-ins for the libraries not
built yet, recording their sources, and `build_all` then runs the C compiler on them at once, one
process per CPU, before anything is timed (timings beside a running compiler would be wrong).
"""
from __future__ import annotations

import contextlib
import contextvars
import ctypes
import functools
import hashlib
import os
import shlex
import shutil
import struct
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ... import config, progress
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
# prepended to a kernel's source for its portable path (tests): without the AVX-512 and AVX2 code
PORTABLE = "#undef __AVX512F__\n#undef __AVX2__\n"
MAX_BUILDS = 8          # C compilers run at once by build_all (each takes up to a few hundred MB)


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
    wanted, complete = _wanted.get(), _complete_elf(path)
    if wanted is not None and not complete:
        wanted.add((source, tuple(flags)))
        wanted.stand_ins += 1
        return _StandIn()
    if complete:
        try:
            lib = ctypes.CDLL(str(path))
        except OSError:          # truncated or corrupted: rebuild it below
            lib = None
    if lib is None:
        with progress.stage("building a C kernel library", long=True):
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


class Wanted(set):
    """The (source, flags) pairs load() met with no library on disk while collecting, and the number of
    stand-ins it handed out."""
    stand_ins = 0


_wanted = contextvars.ContextVar("kfuse_wanted", default=None)    # a Wanted while collecting


@contextlib.contextmanager
def collecting():
    """Within it, load() of a source with no library on disk records (source, flags) in the Wanted this
    yields and returns a stand-in, whose functions raise if called. Caches keep only what was made
    without a stand-in (`stand_ins` before and after: `keeps_built`, backends.constants.shared), so no
    stand-in outlives it."""
    wanted = Wanted()
    token = _wanted.set(wanted)
    try:
        yield wanted
    finally:
        _wanted.reset(token)


def is_collecting() -> bool:
    return _wanted.get() is not None


def stand_ins() -> int:
    """The stand-ins load() has handed out while collecting (0 when not collecting)."""
    wanted = _wanted.get()
    return 0 if wanted is None else wanted.stand_ins


class _StandInFunction:
    def __init__(self, name: str):
        self.name = name

    def __call__(self, *args):
        raise RuntimeError(f"kfuse: C function {self.name} called while its library was only being collected")


class _StandIn:
    """A library not built yet, while collecting: its functions take argtypes and restype as ctypes'
    do, and raise if called."""

    def __getattr__(self, name: str):
        return _StandInFunction(name)


def keeps_built(fn):
    """functools.lru_cache for a function returning a library's C functions, except that a result made
    with a stand-in (while collecting) is not kept."""
    memo: dict = {}

    @functools.wraps(fn)
    def cached(*args, **kwargs):
        key = (args, tuple(sorted(kwargs.items()))) if kwargs else args      # attention.library: per call
        if key in memo:
            return memo[key]
        before = stand_ins()
        out = fn(*args, **kwargs)
        if stand_ins() == before:
            memo[key] = out
        return out
    cached.cache_clear = memo.clear
    return cached


def build_all(wanted) -> int:
    """Build the libraries of `wanted` ((source, flags) pairs, as collecting() gathers them) that are not
    on disk, as many at once as there are CPUs; the number built. A build that fails is left for load()
    to repeat and report where the kernel is made (a missing compiler: nothing is built here)."""
    try:
        todo = {library_path(src, flags): (src, flags) for src, flags in wanted}
    except CompileError:
        return 0
    todo = {path: sf for path, sf in todo.items() if not _complete_elf(path)}

    def one(item) -> bool:
        path, (src, flags) = item
        try:
            _build(src, path, flags)
        except CompileError:
            return False
        return True
    if not todo:
        return 0
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    jobs = min(len(todo), cpus, MAX_BUILDS)
    with progress.stage(f"building {len(todo)} C kernel librar{'y' if len(todo) == 1 else 'ies'} ({jobs} at a time)",
                        long=True), ThreadPoolExecutor(jobs) as pool:
        return sum(pool.map(one, todo.items()))
