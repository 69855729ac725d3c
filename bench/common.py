"""The shared benchmark harness: every provider on the same inputs, side by side, in one run.

Traps it avoids (measured on the project machine, see /work/shared/design.md):
- glibc malloc handing temporaries back to the OS after a torch.compile, so eager ops page-fault on
  every call: MALLOC_TRIM_THRESHOLD_/MALLOC_MMAP_THRESHOLD_ are set before the process starts (the
  script re-executes itself once with them), and page faults per call are printed next to each time.
- thread pools fighting: each provider is timed in blocks of calls, never interleaved call by call,
  and the order of providers rotates between rounds; KFUSE_NUM_THREADS and torch both use 2 threads.

Use, in one process (providers rotated block by block):
    from common import Bench, compiled, copy_bound
    b = Bench("bench_x", "case", bytes_moved=...)
    b.run({"eager": f, "torch.compile": compiled(f, args), "kfuse": k, "copy": copy_bound(nbytes)})
or each provider in its own process (the kernel benches: bench_norm/softmax/swiglu/gelu.py):
    CASES = {"rmsnorm [1024,4096]": lambda: Case(module, inputs, ir_graph, weights=True)}
    main("bench_norm", CASES)      # eager, torch.compile, kfuse (cm(*inputs)), kfuse (no tune), kfuse kernel, copy
"""
from __future__ import annotations

import os
import sys

THREADS = os.environ.get("KFUSE_BENCH_THREADS", "2")   # 1 gives numbers robust to a busy machine
_ENV = {"MALLOC_TRIM_THRESHOLD_": str(1 << 30), "MALLOC_MMAP_THRESHOLD_": str(32 << 20),
        "KFUSE_NUM_THREADS": THREADS, "OMP_NUM_THREADS": THREADS}
if any(os.environ.get(k) != v for k, v in _ENV.items()) and not os.environ.get("KFUSE_BENCH_REEXEC"):
    os.environ.update(_ENV, KFUSE_BENCH_REEXEC="1")      # malloc reads these only at process start
    os.execv(sys.executable, [sys.executable, *sys.argv])

import contextlib  # noqa: E402
import platform  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import torch  # noqa: E402

torch.set_num_threads(int(THREADS))
ROUNDS = int(os.environ.get("KFUSE_BENCH_ROUNDS", "11"))
BLOCK_S = 0.02          # each timed block runs at least this long


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return f"{platform.node()} {cpu} x{os.cpu_count()}"


def commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        c = subprocess.run(["git", "-C", here, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", here, "status", "--porcelain"], capture_output=True, text=True).stdout.strip()
        return c + ("+dirty" if dirty else "")
    except OSError:
        return "?"


def copy_bound(nbytes: int):
    """The physical bound: `out.copy_(inp)` moving the same total bytes (nbytes/2 read, nbytes/2 written)."""
    n = max(1, nbytes // 8)
    inp, out = torch.randn(n), torch.empty(n)
    return lambda: out.copy_(inp)


_PEAK_C = r"""
#include <immintrin.h>
#include <omp.h>
#ifdef __AVX512F__
#define VN 16
typedef __m512 vt;
#define SET1 _mm512_set1_ps
#define FMA _mm512_fmadd_ps
#define ADD _mm512_add_ps
#else      /* AVX2 + FMA */
#define VN 8
typedef __m256 vt;
#define SET1 _mm256_set1_ps
#define FMA _mm256_fmadd_ps
#define ADD _mm256_add_ps
#endif
/* fp32 FMAs a second on nthreads threads: 12 independent accumulators a thread (enough to cover the FMA
   latency on two pipes; with AVX2's 16 registers, 12 + 2 constants fit), `iters` rounds of 12 FMAs of VN
   lanes; returns GFLOP/s */
double kf_fma_peak(long iters, int nthreads) {
    float sink = 0;
    double t = omp_get_wtime();
    #pragma omp parallel num_threads(nthreads) reduction(+:sink)
    {
        vt a[12], b = SET1(0.9999f), c = SET1(1e-4f);
        for (int i = 0; i < 12; i++) a[i] = SET1((float)i);
        for (long it = 0; it < iters; it++)
            for (int i = 0; i < 12; i++) a[i] = FMA(a[i], b, c);
        for (int i = 1; i < 12; i++) a[0] = ADD(a[0], a[i]);
        float lanes[VN];
        __builtin_memcpy(lanes, &a[0], sizeof lanes);
        for (int l = 0; l < VN; l++) sink += lanes[l];
    }
    t = omp_get_wtime() - t;
    return sink == 12345.0f ? 0 : 2.0 * VN * 12 * iters * nthreads / t / 1e9;
}
"""


def fma_peak_gflops() -> float:
    """This machine's fp32 FMA throughput on THREADS threads (the best of 5 runs of a register-only AVX-512
    or AVX2 loop): the compute bound beside copy_bound's memory bound. 0 where there is neither."""
    import ctypes

    from kfuse.backends.c.compiler import load
    try:
        fn = load(_PEAK_C).kf_fma_peak
    except Exception:  # noqa: BLE001 - no AVX-512/AVX2 or no compiler: no compute bound to show
        return 0.0
    fn.argtypes, fn.restype = [ctypes.c_long, ctypes.c_int], ctypes.c_double
    return max(fn(5_000_000, int(THREADS)) for _ in range(5))


def compiled(fn, args, module_with_weights: bool = False):
    """torch.compile(fullgraph=True) of fn(*args), mode default; for a module with weights also with
    torch._inductor.config.freezing=True, keeping whichever is faster here. Returns a no-arg callable."""
    import torch._inductor.config as cfg
    variants = [False, True] if module_with_weights else [False]
    best = None
    for freezing in variants:
        cfg.freezing = freezing
        torch._dynamo.reset()
        c = torch.compile(fn, fullgraph=True)
        with torch.no_grad():
            for _ in range(3):
                c(*args)
            f = (lambda c=c: c(*args))
            ms = _time_block(f, 50)[0]
        if best is None or ms < best[0]:
            best = (ms, f, freezing)
    cfg.freezing = False
    best[1].label = "freezing" if best[2] else "default"
    return best[1]


# CPU time of the calling thread: with one thread every provider (torch intra-op, Inductor's and
# kfuse's OpenMP) computes in the calling thread, so this excludes the time the machine's other
# processes hold the core, the robust number on a busy machine. With 2 threads it is not collected.
_cpu_clock = time.thread_time if THREADS == "1" else None


def _time_block(f, n, cpu: list | None = None):
    f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    c0 = _cpu_clock() if _cpu_clock else 0.0
    t0 = time.perf_counter()
    for _ in range(n):
        f()
    t = time.perf_counter() - t0
    if cpu is not None and _cpu_clock:
        cpu.append((_cpu_clock() - c0) / n * 1e3)
    return t / n * 1e3, (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0) / n


def pct(s: list, q: float):
    return s[min(len(s) - 1, max(0, round(q * (len(s) - 1))))]


def measure(providers: dict, rounds: int = ROUNDS, block_s: float = BLOCK_S) -> dict:
    """Time no-arg callables side by side: each in blocks of calls lasting about `block_s` (never
    interleaved call by call), the order of providers rotating between rounds, one untimed call
    before each block to bring its thread pool back. Per provider: median ms per call over rounds,
    quartiles (lo, hi), p10, p90, and minor page faults per call (median over rounds)."""
    names = list(providers)
    calls = {}
    with torch.no_grad():
        for name, f in providers.items():                # warm up, then size a block to ~block_s
            f()
            ms, _ = _time_block(f, 3)
            calls[name] = max(3, int(block_s * 1e3 / max(ms, 1e-4)))
        samples = {n: [] for n in names}
        faults = {n: [] for n in names}
        cpus = {n: [] for n in names}
        for r in range(rounds):
            order = names[r % len(names):] + names[:r % len(names)]
            for name in order:
                providers[name]()                         # one call to bring this pool back
                ms, pf = _time_block(providers[name], calls[name], cpus[name])
                samples[name].append(ms)
                faults[name].append(pf)
    return {n: _summary(samples[n], faults[n], cpus[n], calls[n]) for n in names}


def _summary(samples: list, faults: list, cpus: list, calls: int) -> dict:
    """One provider's timed blocks (ms per call each) as measure reports them."""
    s = sorted(samples)
    return dict(ms=statistics.median(s), lo=s[len(s) // 4], hi=s[(3 * len(s)) // 4], p10=pct(s, 0.1),
                p90=pct(s, 0.9), faults=statistics.median(faults), calls=calls,
                cpu=statistics.median(cpus) if cpus else None)


class Bench:
    def __init__(self, family: str, case: str, bytes_moved: int):
        self.family, self.case, self.bytes = family, case, bytes_moved

    def run(self, providers: dict, rounds: int = ROUNDS) -> dict:
        """Median ms per call of each provider (no-arg callables), over `rounds` rotated rounds."""
        res = measure(providers, rounds)
        for r in res.values():
            r["gbs"] = self.bytes / r["ms"] / 1e6
        self.report(res, providers)
        return res

    def report(self, res, providers):
        torch_names = [n for n in res if n.startswith(("eager", "torch.compile"))]
        # ratios against the faster torch provider; against the first provider when none ran (--providers)
        base = min(res[n]["ms"] for n in torch_names or list(res)[:1])
        cpu = all(r.get("cpu") for r in res.values())
        cbase = min(res[n]["cpu"] for n in torch_names or list(res)[:1]) if cpu else 0
        print(f"\n{self.family}: {self.case}   ({self.bytes / 1e6:.2f} MB moved per call, "
              f"{torch.get_num_threads()} threads)")
        print(f"{'provider':<22}{'median ms':>11}{'IQR ms':>17}{'GB/s':>8}{'faults/call':>13}{'vs best torch':>15}"
              + (f"{'cpu ms':>10}{'cpu vs best':>13}" if cpu else ""))
        for n, r in res.items():
            label = n + (f" ({providers[n].label})" if hasattr(providers[n], "label") else "")
            print(f"{label:<22}{r['ms']:>11.4f}{r['lo']:>8.4f}-{r['hi']:<8.4f}{r['gbs']:>8.1f}"
                  f"{r['faults']:>13.1f}{base / r['ms']:>14.2f}x"
                  + (f"{r['cpu']:>10.4f}{cbase / r['cpu']:>12.2f}x" if cpu else ""))
        if "kfuse" in res and "copy" in res:
            print(f"kfuse reaches {res['copy']['ms'] / res['kfuse']['ms'] * 100:.0f}% of the copy bandwidth"
                  + (f" ({res['copy']['cpu'] / res['kfuse']['cpu'] * 100:.0f}% in cpu time)" if cpu else ""))
        m, c = machine(), commit()
        for n, r in res.items():
            print(f"CSV,{self.family},{self.case},{n},{r['ms']:.5f},{r['lo']:.5f},{r['hi']:.5f},"
                  f"{r['gbs']:.2f},{r['faults']:.1f},{base / r['ms']:.3f},{m},{c}")


def kfuse_provider(graph, inputs):
    """Lower all op nodes of `graph` into one kernel, build it, and return a no-arg callable that runs
    it on `inputs` (graph input tensors) into preallocated outputs, as the kfuse runtime does."""
    from kfuse.backends.c import build
    from kfuse.kernels import lower
    nodes = [n for n in graph.nodes if n.op not in ("input", "const")]
    k = lower(nodes, graph.outputs)
    fn = build(k)
    args = [inputs[n.attrs["index"]] if n.op == "input" else n.value for n in k.inputs]
    outs = [torch.empty(n.shape, dtype=n.dtype) for n in k.outputs]
    fn.check(args, outs)
    call = lambda: fn(args, outs)
    call.kernel, call.outputs = k, outs
    return call


# -- each provider in its own worker process --------------------------------------------------------------
# A provider timed beside others in one process shares its allocator, its OpenMP pool and the caches
# they warm; Inductor's compiled code and kfuse's kernels both load libgomp. So `main` times each
# provider in a fresh `python <script> --worker <case> <provider>` and prints the usual table.
# A case is a function returning Case: the module (called as a user calls it), its inputs, and the
# kfuse IR graph of the fused kernel (for the raw-kernel provider and the bytes moved).

PROVIDERS = ("eager", "torch.compile", "kfuse", "kfuse (no tune)", "kfuse kernel", "copy")


class Case:
    def __init__(self, module, inputs, graph, *, weights: bool = False, atol: float = 1e-5):
        self.module, self.inputs, self.graph, self.weights, self.atol = module, inputs, graph, weights, atol

    def bytes(self) -> int:
        from kfuse.kernels import lower
        return lower([n for n in self.graph.nodes if n.op not in ("input", "const")], self.graph.outputs).bytes


def _provider(case: Case, name: str):
    mod, inputs = case.module, case.inputs
    if name == "eager":
        return lambda: mod(*inputs)
    if name == "torch.compile":
        return compiled(mod, tuple(inputs), module_with_weights=case.weights)
    if name.startswith("kfuse kernel"):
        return kfuse_provider(case.graph, inputs)
    if name.startswith("kfuse"):
        import kfuse
        cm = kfuse.compile(mod, tuple(inputs))
        with torch.no_grad():
            torch.testing.assert_close(cm(*inputs), mod(*inputs), rtol=1e-5, atol=case.atol)
        f = lambda: cm(*inputs)   # noqa: E731
        notes = [k.note for k in cm.report().kernels if k.note]
        if notes:
            f.label = "; ".join(notes)
        return f
    if name == "copy":
        return copy_bound(case.bytes())
    raise SystemExit(f"unknown provider {name!r}")


def _worker(cases: dict, case: str, provider: str, serve: bool = False):
    import json
    torch.manual_seed(0)
    c = cases[case]()
    with torch.no_grad():
        f = _provider(c, provider)
        if serve:                   # the parent times it block by block (interleaved)
            serve_blocks(f)
            res = {}
        else:
            res = measure({provider: f})[provider]
    res["label"] = getattr(f, "label", None)
    res["bytes"] = c.bytes()
    print("RESULT " + json.dumps(res))


class _Label:
    def __init__(self, label):
        if label:
            self.label = label


def main(family: str, cases: dict, providers=PROVIDERS):
    """`python bench_x.py [case ...] [--providers a,b] [--repeat K | --interleave]`: each (case, provider)
    timed in its own process; `--worker case provider [--serve]` is the child's entry."""
    import argparse
    import json
    if len(sys.argv) in (4, 5) and sys.argv[1] == "--worker":
        return _worker(cases, sys.argv[2], sys.argv[3], sys.argv[4:] == ["--serve"])
    ap = argparse.ArgumentParser()
    ap.add_argument("cases", nargs="*", default=list(cases))
    ap.add_argument("--providers", default=",".join(providers))
    ap.add_argument("--repeat", type=int, default=1, help="processes per provider, in turns; the median one is shown")
    ap.add_argument("--interleave", action="store_true", help="build every provider's process first, then time "
                    "them block by block in rotated rounds (a busy spell of the machine falls on all alike)")
    a = ap.parse_args()
    if a.interleave and a.repeat > 1:
        ap.error("--interleave times every provider in the same rounds: --repeat does not apply")
    unknown = [c for c in a.cases if c not in cases]
    if unknown:
        ap.error(f"unknown case {unknown[0]!r}; the cases: " + ", ".join(repr(c) for c in cases))
    print(f"{machine()}, commit {commit()}, torch {torch.__version__}, {THREADS} threads, each provider in its own process"
          + (", all built first, then timed in rotated rounds" if a.interleave else f" (x{a.repeat})"))
    env_of = lambda p: dict(os.environ, **({"KFUSE_AUTOTUNE": "0"} if "no tune" in p else {}),
                            **({"KFUSE_HUGEPAGES": "0"} if "4 KB pages" in p else {}))
    for case in a.cases:
        runs: dict = {p: [] for p in a.providers.split(",")}
        if a.interleave:
            for p, r in _interleaved_case(case, list(runs), env_of).items():
                runs[p].append(r)
        for _ in range(0 if a.interleave else a.repeat):  # in turns: a busy spell hits one turn, not one provider
            for p in runs:
                out = subprocess.run([sys.executable, sys.argv[0], "--worker", case, p], capture_output=True, text=True,
                                     env=env_of(p), timeout=1800)
                line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
                if out.returncode or line is None:
                    raise SystemExit(f"{case} / {p} failed:\n{out.stderr[-3000:]}")
                runs[p].append(json.loads(line[7:]))
        res = {p: sorted(r, key=lambda x: x["ms"])[len(r) // 2] for p, r in runs.items()}
        labels = {p: _Label(r.pop("label")) for p, r in res.items()}
        nbytes = next(iter(res.values()))["bytes"]
        for r in res.values():
            r["gbs"] = nbytes / r["ms"] / 1e6
        Bench(family, case, nbytes).report(res, labels)


def _interleaved_case(case: str, providers: list, env_of) -> dict:
    """main --interleave: each provider's worker built in turn, then all timed in the same rounds"""
    workers = {}
    try:
        for p in providers:
            w = Served([sys.argv[0], "--worker", case, p, "--serve"], env=env_of(p), echo=None)
            why = w.ready()
            if why:
                raise SystemExit(f"{case} / {p} failed: {why}")
            workers[p] = w
        timed = interleaved(workers)
        out = {}
        for p, w in workers.items():
            if "error" in timed[p]:
                raise SystemExit(f"{case} / {p} failed: {timed[p]['error']}")
            out[p] = dict(timed[p], **w.finish())
        return out
    finally:
        for w in workers.values():
            w.close()


# -- helpers for scripts that run their own workers (bench_models.py) ------------------------------------------

def run_worker(argv: list, env: dict | None = None, timeout: float = 1800, echo: str | None = "    ") -> dict:
    """Run `python <argv...>` as a child (it inherits this process's malloc/thread env) and return the
    JSON after its `RESULT ` line. The child's other stdout lines are printed as they come, prefixed
    with `echo` (None: not printed). A child that dies or prints no result gives {"error": reason}."""
    return Served(argv, env, timeout, echo).finish()


# -- interleaved workers: each provider in its own process, all built first, then timed block by block in
# rotated rounds. Processes timed one after another meet different spells of a busy machine (on the project
# machine the same program's time moved 1.6x between spells minutes apart, its kernels' times alike); here
# every round times each provider within a second or so of the others.

def serve_blocks(f, block_s: float = BLOCK_S) -> None:
    """A worker's side of `interleaved`: size a block of calls of `f` to about block_s, print `READY`, then
    for each `block` line read from stdin make one untimed call (its thread pool back) and time a block,
    printed as `BLOCK ms faults cpu`; returns at any other line or at the end of stdin."""
    with torch.no_grad():
        f()
        ms, _ = _time_block(f, 3)
        calls = max(3, int(block_s * 1e3 / max(ms, 1e-4)))
        print(f"READY {calls}", flush=True)
        for line in sys.stdin:
            if line.strip() != "block":
                return
            f()
            cpu: list = []
            ms, pf = _time_block(f, calls, cpu)
            print(f"BLOCK {ms} {pf} {cpu[0] if cpu else -1}", flush=True)


class Served:
    """A worker `python argv...` (inheriting this process's env, or `env`) that builds its provider and
    serves timed blocks (serve_blocks), then prints its `RESULT` JSON. Its other stdout lines are echoed
    with the prefix `echo` (None: not shown)."""

    def __init__(self, argv: list, env: dict | None = None, timeout: float = 1800, echo: str | None = "    "):
        import threading
        self.echo, self.err = echo, tempfile.TemporaryFile("w+")
        env = dict(os.environ if env is None else env, PYTHONUNBUFFERED="1")
        self.p = subprocess.Popen([sys.executable, *argv], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                  stderr=self.err, text=True, env=env)
        self.timer = threading.Timer(timeout, self.p.kill)
        self.timer.start()
        self.timeout, self.calls, self.result = timeout, 0, None

    def _line(self, *want: str) -> tuple[str, str]:
        """(tag, rest) of the next line tagged with one of `want` (or RESULT); other lines echoed;
        ("EOF", why) where the worker ended without one."""
        import json
        for line in self.p.stdout:
            tag, _, rest = line.rstrip("\n").partition(" ")
            if tag == "RESULT":
                self.result = json.loads(rest)
                return tag, rest
            if tag in want:
                return tag, rest
            if self.echo is not None and line.strip():
                print(self.echo + line.rstrip(), flush=True)
        rc = self.p.wait()
        self.err.seek(0)
        tail = [x for x in self.err.read().strip().splitlines() if x.strip()]
        why = f"killed after {self.timeout:.0f} s" if rc == -9 else f"exit {rc}"
        return "EOF", f"{why}: {tail[-1][:200] if tail else '(no message)'}"

    def ready(self) -> str | None:
        """Wait for the build: None when it serves blocks, else why not."""
        tag, rest = self._line("READY")
        if tag == "READY":
            self.calls = int(rest)
            return None
        self.close()
        return (self.result or {}).get("error") or rest

    def block(self) -> tuple[float, float, float]:
        """ms per call, page faults per call and cpu ms per call (-1: not collected) of one timed block;
        RuntimeError where the worker has stopped"""
        try:
            self.p.stdin.write("block\n")
            self.p.stdin.flush()
        except OSError:             # it ended since its last block: _line says how
            pass
        tag, rest = self._line("BLOCK")
        if tag != "BLOCK":
            raise RuntimeError(f"worker stopped: {rest}")
        ms, pf, cpu = map(float, rest.split())
        return ms, pf, cpu

    def cpu_ns(self) -> int | None:
        """CPU time the worker's threads have run, ns (Linux /proc; None elsewhere)"""
        import glob
        total = 0
        for f in glob.glob(f"/proc/{self.p.pid}/task/*/schedstat"):
            try:
                with open(f) as fh:
                    total += int(fh.read().split()[0])
            except (OSError, ValueError, IndexError):
                pass
        return total or None

    def settle(self, limit_s: float = 0.5) -> None:
        """Wait (at most limit_s) until the worker's threads stop running: after its block ONNX Runtime's
        pool spins on for ~55 ms at 1-1.75 CPUs of this machine's 2, which the next provider's block would
        otherwise pay. Idle: under 10% of a CPU over two 5 ms samples in a row."""
        prev, quiet, t0 = self.cpu_ns(), 0, time.perf_counter()
        if prev is None:
            time.sleep(0.1)
            return
        while quiet < 2 and time.perf_counter() - t0 < limit_s:
            time.sleep(0.005)
            now = self.cpu_ns() or prev
            quiet = quiet + 1 if now - prev < 0.1 * 5e6 else 0
            prev = now

    def finish(self) -> dict:
        """Stop serving (a worker that does not serve ignores it); its RESULT (or {"error": why})."""
        try:
            self.p.stdin.write("done\n")
            self.p.stdin.flush()
        except OSError:
            pass
        tag, rest = ("RESULT", "") if self.result is not None else self._line()
        self.close()
        return self.result if self.result is not None else {"error": rest}

    def close(self, grace_s: float = 30):
        """End the worker: its stdin closed (a serving one then returns from serve_blocks and exits), killed
        if it has not exited within grace_s."""
        self.timer.cancel()
        try:
            self.p.stdin.close()
        except OSError:
            pass
        try:
            self.p.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
        self.err.close()


def interleaved(workers: dict, rounds: int = ROUNDS) -> dict:
    """Time ready Served workers block by block, the order rotating between rounds: per name, the summary
    measure gives plus "samples" (ms per call of each round, in round order). A worker that stops is
    dropped with {"error": why}."""
    names = list(workers)
    samples, faults, cpus = ({n: [] for n in names} for _ in range(3))
    failed = {}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            if n in failed:
                continue
            try:
                ms, pf, cpu = workers[n].block()
            except RuntimeError as e:
                failed[n] = {"error": str(e)}
                continue
            workers[n].settle()
            samples[n].append(ms)
            faults[n].append(pf)
            if cpu >= 0:
                cpus[n].append(cpu)
    return {n: failed.get(n) or dict(_summary(samples[n], faults[n], cpus[n], workers[n].calls),
                                     samples=samples[n]) for n in names}


def median_run(runs: list) -> dict:
    """Of several processes' results for one provider, the one with the median `ms` (the upper one of
    an even count), as `main` reports with --repeat."""
    return sorted(runs, key=lambda r: r["ms"])[len(runs) // 2]


def print_side_by_side(key: str, title: str, res: dict, base: str, rows: list) -> None:
    """One model's table of common.measure results (median ms, p10-p90, faults/call) and the ratios of
    "kfuse" to `base` and to "eager"; appends (key, res) to rows for print_csv (key: "model,bB")."""
    print(f"\n{title}; median ms (p10-p90), faults/call")
    for n, r in res.items():
        print(f"  {n:<16}{r['ms']:>9.3f} ({r['p10']:.3f}-{r['p90']:.3f}) {r['faults']:>8.1f}")
    k = res["kfuse"]["ms"]
    print(f"  kfuse / {base} {k / res[base]['ms']:.3f}x, kfuse / eager {k / res['eager']['ms']:.3f}x")
    rows.append((key, res))


def print_csv(rows: list) -> None:
    for name, res in rows:
        for n, r in res.items():
            print(f"CSV,{machine()},{commit()},{name},{n},{r['ms']:.4f},{r['p10']:.4f},{r['p90']:.4f}")


@contextlib.contextmanager
def baseline_worktree(rev: str | None):
    """(rev, path) of a temporary git worktree of revision `rev` of this repository, removed after; None
    without a revision."""
    if not rev:
        yield None
        return
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = tempfile.mkdtemp(prefix="kfuse-baseline-")
    subprocess.run(["git", "-C", root, "worktree", "add", "--detach", "--force", path, rev], check=True,
                   capture_output=True)
    try:
        yield rev, path
    finally:
        subprocess.run(["git", "-C", root, "worktree", "remove", "--force", path], capture_output=True)
