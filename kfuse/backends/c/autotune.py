"""Choose each C kernel's schedule by timing it on this machine, once, and remember the winner.

A schedule (render.Schedule) is how a kernel's outer loop is spread over the threads: all threads
with a static split (the default), the calling thread alone, dynamic chunks, guided; for row kernels
of several passes, whether the last pass prefetches the next row's inputs; for row kernels writing
STREAM_MIN_BYTES or more, whether they write by streaming stores (with and without the prefetch); and, on
an AVX-512 CPU, each static split with its loops vectorised 512 bits wide. Which is fastest
depends on the machine (a Zen 5 and a Zen 4 disagreed about static vs dynamic splits and about
small kernels), so instead of constants measured on one of them:

    scheds = variants(k)            # [DEFAULT] for a kernel with nothing to choose (small, one thread)
    lib = compiler.load(render_variants(k, scheds))     # one library, an entry kf_v<i> per schedule
    choice = choose(k, lib, source, scheds)             # timed now, or read from the cache

`choose` calls each entry on fresh inputs in turn (a warm-up call, then rounds until about BUDGET_S),
takes the median per variant, and keeps the default unless another is faster by more than MARGIN
(two cores shared with other processes give 5% of noise easily). A timing during which this process's
threads waited for a CPU (another process's load, a hypervisor's steal) is taken again (ATTEMPTS), and
a choice made on disturbed times holds for this process only. The choice is stored in
`<cache_dir>/autotune.json` under a key of the CPU (model name, family/model, ISA flags), the C
compiler and flags, the thread count and the kernel's source, so the next compile of the same
kernel on this machine reads it and times nothing. KFUSE_AUTOTUNE=0 (kfuse.config) turns it off:
every kernel renders its default schedule alone.
"""
from __future__ import annotations

import atexit
import contextlib
import contextvars
import dataclasses
import ctypes
import functools
import hashlib
import json
import math
import os
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ... import config
from .. import openmp
from . import compiler
from .render import BLOCK, CHUNK, DEFAULT, PARALLEL_MIN, SCHEDULE, Schedule, loop_count

BUDGET_S = 0.05        # timing per kernel, at most (plus one warm-up call per variant)
MARGIN = 0.05          # a variant replaces the default only when its median is this much lower
# a kernel (pick) replaces the first candidate only when its fastest call is this much faster: ties
# timed either way kept flipping a choice between compiles (the ResNet stem's two kernels within 1-4%)
KERNEL_MARGIN = 0.03
MIN_REPS, MAX_REPS = 3, 15
# A timing is disturbed when this process's threads spent more than LOAD_MAX of its thread-time waiting,
# runnable, for a CPU (or the hypervisor stole it); it is taken again, up to ATTEMPTS in all.
LOAD_MAX = 0.10
ATTEMPTS = 3
# A row kernel writing this many bytes or more also times its streaming-store form (render.Schedule.stream):
# outputs that, with their inputs, crowd a last-level cache of tens of MB. A size of the kernel's, not of
# the machine's caches, so the variants (and an artifact's library) do not depend on the machine.
STREAM_MIN_BYTES = 8 << 20
_ISA = ("avx", "avx2", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16", "avx512_fp16", "fma", "f16c",
        "amx_tile", "sse4_2")


@dataclass
class Choice:
    index: int                      # the chosen entry kf_v<index>
    sched: Schedule
    how: str                        # "timed", "cached", or "default" (one thread, or tuning off)
    ms: dict = field(default_factory=dict)     # variant name -> median ms (when timed now)
    load: float = 0.0               # the timing's disturbance (waited()); above LOAD_MAX: not cached

    def __str__(self):
        if self.how == "default":
            return f"{self.sched} (not tuned: one thread or KFUSE_AUTOTUNE=0)"
        if not self.ms:
            return f"{self.sched} (autotuned, cached)"
        times = ", ".join(f"{n} {t:.3f}" for n, t in self.ms.items())
        return f"{self.sched} (autotuned: {times} ms{under_load(self.load)})"


def variants(k) -> list[Schedule]:
    """The schedules worth timing for kernel `k` ([DEFAULT] alone when it runs on one thread anyway:
    fewer than PARALLEL_MIN elements, or one row; or for strided inputs, whose kernels are built at
    call time, where nothing should be timed). The list depends on the kernel alone, not on the
    thread count, so an artifact's library serves any thread count."""
    n = math.prod(k.shape)
    rows = n // k.shape[-1] if not k.flat else n
    if n < PARALLEL_MIN or rows < 2 or k.layout:
        return [DEFAULT]
    # chunks of 1/16 of the loop (elements, in whole 64-byte lines, or rows), sized at the call
    scheds = [DEFAULT, Schedule(threads="one"), Schedule(omp=f"dynamic, {CHUNK}"), Schedule(omp="guided")]
    fetch = not k.flat and k.passes > 1 and k.shape[-1] >= BLOCK
    if fetch:
        scheds.append(Schedule(prefetch=True))
    if not k.flat and sum(math.prod(o.shape) * o.dtype.itemsize for o in k.outputs) >= STREAM_MIN_BYTES:
        scheds += [Schedule(stream=True)] + ([Schedule(stream=True, prefetch=True)] if fetch else [])
    if vector_isa() == "avx512":       # each static split also with 512-bit loops (render.Schedule.wide)
        scheds += [dataclasses.replace(s, wide=True) for s in scheds if s.omp == SCHEDULE]
    return scheds


@functools.lru_cache(maxsize=None)
def _cpuinfo() -> dict[str, str]:
    """The first processor's fields of /proc/cpuinfo (empty where it cannot be read)."""
    info: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if not line.strip():
                    break           # the first processor is enough
                name, _, value = line.partition(":")
                info[name.strip()] = value.strip()
    except OSError:
        pass
    return info


def cpu_has(flag: str) -> bool:
    """Whether this CPU has ISA extension `flag` ("avx512f"): the code -march=native builds uses it."""
    return flag in _cpuinfo().get("flags", "").split()


def vector_isa() -> str:
    """Which form of the hand-written kernels -march=native builds here, as their `#if`s choose it:
    "avx512" (__AVX512F__), "avx2" (__AVX2__ and __FMA__), else "portable"."""
    if cpu_has("avx512f"):
        return "avx512"
    return "avx2" if cpu_has("avx2") and cpu_has("fma") else "portable"


@functools.lru_cache(maxsize=None)
def machine_key() -> str:
    """The CPU (model name, family, model, the ISA flags -march=native turns into code), the compiler
    and its flags: what decides how a rendered kernel runs, apart from the thread count."""
    info = _cpuinfo()
    flags = sorted(set(info.get("flags", "").split()) & set(_ISA))
    cpu = [info.get("model name", "?"), info.get("cpu family", "?"), info.get("model", "?"), " ".join(flags)]
    try:
        cc = compiler.identity()
    except compiler.CompileError:
        cc = "no compiler"
    return "\n".join([*cpu, cc, " ".join(compiler.FLAGS), str(os.cpu_count())])


@functools.lru_cache(maxsize=None)
def kernels_fingerprint() -> str:
    """A hash of the C kernels' sources (kfuse/backends/c/*.c): `pick` keys its choices by it, so a choice
    between kernels made before one of them changed is timed again, not kept."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.glob("*.c")):
        h.update(path.name.encode() + b"\0" + path.read_bytes())
    return h.hexdigest()[:16]


_loading = threading.local()      # .key, .threads: the machine key and thread count of an artifact being loaded


def _key(source: str, threads: int) -> str:
    machine = getattr(_loading, "key", None) or machine_key()
    return hashlib.sha256("\0".join([machine, str(threads), source]).encode()).hexdigest()[:32]


@contextlib.contextmanager
def compiled_on(key: str | None, threads: int | None = None):
    """Within it, choices are looked up under `key`, the machine key an artifact was compiled under, where
    it names this machine but for the compiler (a process without one, or with another): the artifact's
    kernels are that compiler's libraries, so the choices it carries (adopt) are the ones that hold, and
    are hit instead of timed again (which under load could pick another kernel and other bits). `threads`:
    the thread count they were made at; a process running on another count (a one-CPU serving replica)
    still takes the carried choice between kernels (pick), so it computes the compiled program's bits. On
    another CPU neither is used: that machine times its own choices."""
    mine = machine_key().split("\n")
    theirs = key.split("\n") if isinstance(key, str) else []
    # the CPU's four lines first, the flags and CPU count last; the compiler's identity (lines) between
    same_cpu = len(theirs) >= 6 and theirs[:4] == mine[:4] and theirs[-2:] == mine[-2:]
    _loading.key = key if same_cpu else None
    _loading.threads = threads if same_cpu else None
    try:
        yield
    finally:
        _loading.key = _loading.threads = None


_memo: dict[str, tuple[int, str]] = {}       # key -> (index, variant name), this process's choices


def choices() -> dict:
    """This process's choices ({key: [index, name]}), for an artifact to carry: loaded elsewhere on this
    machine, its kernels are the ones chosen when it was compiled, whatever that machine's cache holds."""
    return {k: list(v) for k, v in _memo.items()}


def adopt(saved: dict):
    """Take the choices an artifact carries (choices()); a key names its machine and thread count, so
    another machine's entries are never hit."""
    for key, (index, name) in saved.items():
        _memo[str(key)] = (int(index), str(name))


def _path():
    return config.get().cache_dir / "autotune.json"


_file: tuple = (None, {})      # (stamp, entries) of the cache file as this process last read or wrote it
_pending: dict = {}             # cache file path -> choices made since the last flush
_flush_lock = threading.Lock()


def _stamp(path: Path) -> tuple:
    st = path.stat()
    return str(path), st.st_mtime_ns, st.st_size


def _read(path: Path | None = None) -> dict:
    """The cache file's entries (default: this configuration's file), parsed again only when the file
    changed (it holds every kernel ever tuned on this machine: parsing it per lookup cost more than the
    lookups saved)."""
    global _file
    path = path or _path()
    try:
        stamp = _stamp(path)
    except OSError:
        return {}
    if _file[0] != stamp:
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            data = {}
        _file = (stamp, data if isinstance(data, dict) else {})
    return _file[1]


def _write(key: str, index: int, name: str, ms: dict, load: float):
    """Queue one choice for the cache file (`flush` writes it: after a program's kernels are built, and
    at exit; a rewrite of the whole file per choice took 0.1 s each once it had grown)."""
    _pending.setdefault(str(_path()), {})[key] = {"index": index, "variant": name, "ms": ms, "load": round(load, 4)}


def flush():
    """Write the queued choices into the cache file, merged with what is there (atomic replace; a lost
    race with another process loses entries, which are timed again later)."""
    global _file
    with _flush_lock:
        queued = dict(_pending)
        _pending.clear()
        for where, entries in queued.items():
            path = Path(where)
            try:
                data = {**_read(path), **entries}
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".{os.getpid()}.tmp")
                tmp.write_text(json.dumps(data))
                os.replace(tmp, path)
                _file = (_stamp(path), data)
            except OSError:
                pass            # a read-only cache: the choices hold for this process only


atexit.register(flush)


def own_rng():
    """Random inputs for timing drawn without moving torch's global generator: a kernel first timed
    inside the user's seeded run (a compile on the first call of generate(do_sample=True), a new thread
    count) must not change the numbers the run draws next."""
    return torch.random.fork_rng(devices=[])


def fresh_inputs(k) -> list[torch.Tensor]:
    """Inputs for timing `k` (random_values of its inputs)."""
    return random_values(k.inputs)


def random_values(nodes) -> list[torch.Tensor]:
    """Values of `nodes` to time on: constants as they are, floats uniform in [-2, 2], integers 1 (a safe
    divisor, a valid index), booleans random."""
    out = []
    for n in nodes:
        if n.op == "const":
            out.append(n.value.contiguous())
        elif n.dtype.is_floating_point:
            out.append(torch.empty(n.shape, dtype=n.dtype).uniform_(-2, 2))
        elif n.dtype == torch.bool:
            out.append(torch.rand(n.shape) < 0.5)
        else:
            out.append(torch.ones(n.shape, dtype=n.dtype))
    return out


EVICT_BYTES = 64 << 20  # written before each call of a cold timing: twice the L3 of the project machine

# whether the program being built reads its weights from memory (autotune.weights_from_memory)
_weights_cold = contextvars.ContextVar("kfuse_weights_cold", default=False)


@contextlib.contextmanager
def weights_from_memory(cold: bool):
    """Within it, with `cold`, `pick` times each candidate with the caches overwritten and then its inputs
    read again: a program whose weights exceed the last-level cache reads each kernel's weight from
    memory on every call, its activations from cache (ResNet-50 at batch 1, 102 MB of weights: Winograd's
    16/9 larger weight won every warm timing and ran slower in the program)."""
    token = _weights_cold.set(bool(cold))
    try:
        yield
    finally:
        _weights_cold.reset(token)


@functools.lru_cache(maxsize=None)
def cache_bytes(level: int | None = None) -> int:
    """The size of CPU 0's cache of `level` (a data or unified one), or of its last level (Linux sysfs);
    where it cannot be read, 32 MiB for the last level, 1 MiB for level 2, 32 KiB for level 1."""
    sizes = {}
    for d in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        try:
            if (d / "type").read_text().strip() == "Instruction":
                continue
            text = (d / "size").read_text().strip().upper()
            size = int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20}[text[-1]] if text[-1] in "KM" else int(text)
            sizes[int((d / "level").read_text())] = size
        except (OSError, ValueError, KeyError):
            continue
    if level is None:
        return sizes[max(sizes)] if sizes else 32 << 20
    return sizes.get(level, {1: 32 << 10, 2: 1 << 20}.get(level, 32 << 20))


@functools.lru_cache(maxsize=1)
def _evict_buffer() -> torch.Tensor:
    return torch.zeros(EVICT_BYTES // 4)


def _time(fns, argv, budget_s: float = BUDGET_S, cold: str = "", stat=None) -> list[float]:
    """Median ms per call of each entry (or `stat` of its times, sorted), called in turn each round (a busy
    spell slows all alike). cold "all": the caches are overwritten before each call (not timed), as a
    program's input arrives for its first kernel, after the previous call's work has passed through them;
    "weights": then the inputs (tensors in argv) are read again, as from the kernel before."""
    def evict(_):
        _evict_buffer().add_(1.0)
        if cold == "weights":
            for a in argv:
                if isinstance(a, torch.Tensor):
                    a.sum()
    evict = evict if cold else None
    first = []
    for f in fns:
        f(argv)                         # warm-up: pages of the outputs, the thread team
        if evict:
            evict(argv)
        t = time.perf_counter()
        f(argv)
        first.append(time.perf_counter() - t)
    reps = max(MIN_REPS, min(MAX_REPS, int(budget_s / max(sum(first), 1e-9))))
    ts = [[] for _ in fns]
    for _ in range(reps):
        for f, t_f in zip(fns, ts):
            if evict:
                evict(argv)
            t = time.perf_counter()
            f(argv)
            t_f.append(time.perf_counter() - t)
    stat = stat or (lambda t: t[len(t) // 2])
    return [stat(sorted(t_f)) * 1e3 for t_f in ts]


def waited() -> int:
    """Nanoseconds this process's threads have spent runnable but not running (Linux schedstat, summed over
    /proc/self/task), plus the time the hypervisor stole from this machine's CPUs (/proc/stat): the
    measure of another process's load that a timing suffered. 0 where neither can be read."""
    ns = 0
    try:
        tasks = os.listdir("/proc/self/task")
    except OSError:
        tasks = []
    for t in tasks:
        try:
            with open(f"/proc/self/task/{t}/schedstat") as f:
                ns += int(f.read().split()[1])
        except (OSError, ValueError, IndexError):
            pass                    # a thread that ended meanwhile
    try:
        with open("/proc/stat") as f:
            ns += int(f.readline().split()[8]) * 1_000_000_000 // os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        pass
    return ns


def _time_quietly(fns, argv, threads: int, **kw) -> tuple[list[float], float]:
    """_time's result and its disturbance (the fraction of the timing's thread-time spent waiting for a
    CPU): taken again while that is above LOAD_MAX, up to ATTEMPTS times, keeping the least disturbed
    (a choice is cached for good: beside a busy process a 0.26 ms kernel was timed at 7.98 ms)."""
    best = None
    for _ in range(ATTEMPTS):
        w, t = waited(), time.perf_counter()
        ms = _time(fns, argv, **kw)
        load = (waited() - w) / max((time.perf_counter() - t) * 1e9 * threads, 1.0)
        if best is None or load < best[1]:
            best = (ms, load)
        if load <= LOAD_MAX:
            break
    return best


def under_load(load: float) -> str:
    """The report's mark of a choice made on disturbed times (empty for a quiet timing)."""
    return f"; under load, {load:.0%} of the time waiting for a CPU: not cached" if load > LOAD_MAX else ""


def cached(key: str, names: list[str], file: bool = True) -> int | None:
    """The index of this machine's earlier choice for `key` (this process's memo, else, with `file`, the
    cache file), if it still names names[index]; else None."""
    hit = _memo.get(key)
    if hit is None and file:
        entry = _read().get(key)
        # an entry without its load was timed before timings were checked for disturbance: timed again
        if isinstance(entry, dict) and entry.get("index") in range(len(names)) and "load" in entry:
            hit = (entry["index"], entry.get("variant"))
    if hit is None or names[hit[0]] != hit[1]:
        return None
    _memo[key] = hit
    return hit[0]


def remember(key: str, best: int, names: list[str], ms: list[float], load: float = 0.0) -> dict:
    """Store choice `best` of `names` (timed at `ms`, disturbed by `load`) in the memo, and in the cache file
    when the timing was quiet (load at most LOAD_MAX: a later compile times a disturbed one again); the
    times by name."""
    times = {n: round(t, 4) for n, t in zip(names, ms)}
    _memo[key] = (best, names[best])
    if load <= LOAD_MAX:
        _write(key, best, names[best], times, load)
    return times


def winner(ms: list[float], margin: float, default: int = 0) -> int:
    """The index of the fastest of `ms`, unless it is within `margin` of ms[default]: then default."""
    best = min(range(len(ms)), key=ms.__getitem__)
    return best if ms[best] <= (1 - margin) * ms[default] else default


def choose(k, lib: ctypes.CDLL, source: str, scheds: list[Schedule], threads: int | None = None) -> Choice:
    """The fastest of `scheds` for `k` (entries kf_v<i> of `lib`, built from `source`): from this
    process's memo or the cache file when this machine has timed it, else timed now and stored."""
    threads = threads or config.threads()
    if threads < 2 or not config.get().autotune:      # an artifact's tuned library, used without tuning
        return Choice(0, scheds[0], "default")
    count = loop_count(k)     # one source serves many counts: the choice is per count
    key = _key(f"{source}\0{count}", threads)
    hit = cached(key, [str(s) for s in scheds])
    if hit is not None:
        return Choice(hit, scheds[hit], "cached")
    from . import CKernel          # (the package imports this module)
    with own_rng():
        inputs = fresh_inputs(k)
    outputs = [torch.empty(n.shape, dtype=n.dtype) for n in k.outputs]
    kernel = CKernel(k, lib, source)      # held while argv points at its loop count
    argv = kernel.argv(inputs, outputs)
    fns = [getattr(lib, f"kf_v{i}") for i in range(len(scheds))]
    for f in fns:
        f.argtypes, f.restype = [ctypes.c_void_p], None
    with openmp.using(threads):
        ms, load = _time_quietly(fns, argv, threads)
    best = winner(ms, MARGIN)
    times = remember(key, best, [str(s) for s in scheds], ms, load)
    return Choice(best, scheds[best], "timed", times, load)


def problem(*parts) -> str:
    """The text naming a timed choice (pick's cache key): JSON, so a shape or attribute read back from an
    artifact as a list names the same problem as the tuple it was compiled from. The "into" mark: choices
    timed with our kernels writing into a buffer (earlier ones allocated, page faults and all, and are not
    reused); "first-into" likewise for a pair's first kernel (split_pairs)."""
    return json.dumps(["into", *parts], sort_keys=True, default=str)


def _cold_mode(cold: bool) -> str:
    return "all" if cold else "weights" if _weights_cold.get() else ""


def _text(problem: str, names: list[str], cold: bool) -> str:
    """What names a timed choice among `names` on `problem` (with `cold`, or inside weights_from_memory,
    timed so): its cache key before the machine and thread count (_key)."""
    mode = _cold_mode(cold)
    return "\0".join([problem, *names, kernels_fingerprint(), *([f"cold {mode} {EVICT_BYTES}"] if mode else [])])


# the mark of a verdict key (verdict_key); "2": walks in orders of each group's own, timed to the next contested
# kernel (runtime/settle.py), whose verdicts replace those of the rotation
IN_PROGRAM = "\0in the program 2"


def verdict_key(problem: str, names: list[str], cold: bool = False, threads: int | None = None) -> str:
    """The cache key of the choice on `problem` as timed in a program (runtime/settle.py): `pick` takes
    it before one timed alone."""
    return _key(_text(problem, names, cold) + IN_PROGRAM, threads or config.threads())


def settled(problem: str, names: list[str], cold: bool = False) -> bool:
    """Whether the choice on `problem` has been timed in a program on this machine (verdict_key)."""
    return cached(verdict_key(problem, names, cold), names) is not None


def pick(problem: str, candidates: dict, inputs, threads: int | None = None, cold: bool = False) -> tuple[str, str]:
    """(name, what the report shows) of the fastest of `candidates` ({name: fn(arg)}, interchangeable
    kernels: our depthwise convolution or oneDNN's; the first unless another is KERNEL_MARGIN faster) on
    `problem` (a text naming the shapes and attributes), timed on the argument `inputs()` makes (only
    when there is something to time) like the schedule variants and cached per machine the same way;
    `cold`: with the caches overwritten before each call (_time), else with the weights alone from
    memory inside `weights_from_memory(True)`. A choice timed in a program (verdict_key) comes first.
    With KFUSE_AUTOTUNE=0 the first candidate, untimed, or the choice a loaded artifact carries (adopt):
    its program as it was compiled, bit for bit."""
    names = list(candidates)
    threads = threads or config.threads()
    text = _text(problem, names, cold)
    keys = [_key(text + IN_PROGRAM, threads), _key(text, threads)]
    carried_threads = getattr(_loading, "threads", None)
    if carried_threads not in (None, threads):        # an artifact made at another thread count: its choice
        for key in (_key(text + IN_PROGRAM, carried_threads), _key(text, carried_threads)):
            carried = cached(key, names, file=False)
            if carried is not None:
                return names[carried], f"{names[carried]} (the artifact's choice, made at {carried_threads} threads)"
    if not config.get().autotune:
        for key in keys:        # untimed: only what an artifact brought (adopt)
            carried = cached(key, names, file=False)
            if carried is not None:
                return names[carried], f"{names[carried]} (the artifact's choice; not timed: KFUSE_AUTOTUNE=0)"
        return names[0], f"{names[0]} (not timed: KFUSE_AUTOTUNE=0)"
    for key, how in zip(keys, ("measured in the program", "measured")):
        hit = cached(key, names)
        if hit is not None:
            return names[hit], f"{names[hit]} ({how}, cached)"
    with own_rng():
        args = inputs()
    with openmp.using(threads), torch.no_grad():
        # the fastest call of each, not the median: whole kernels are compared here, and on a loaded machine
        # most calls of a 0.1 ms kernel can take an 8 ms scheduler slice (cached choices were seen made on
        # medians of 8.0 vs 15.9 ms), which the fastest call of the rounds escapes
        ms, load = _time_quietly([candidates[n] for n in names], args, threads, cold=_cold_mode(cold), stat=lambda t: t[0])
    best = winner(ms, KERNEL_MARGIN)
    remember(keys[1], best, names, ms, load)
    times = ", ".join(f"{n} {t:.3f} ms" for n, t in zip(names, ms))
    tie = f"; the first kept, the fastest within {KERNEL_MARGIN:.0%}" if ms[best] > min(ms) else ""
    return names[best], f"{names[best]} (measured: {times}{tie}{under_load(load)})"
