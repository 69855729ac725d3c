"""Render a kernel-IR `FusedKernel` as C99 + OpenMP source.

Every kernel library exports one function:
    void kf_run(void **args);        args: the inputs' then the outputs' data pointers, then a
                                     pointer to the loop count (int64: elements, or rows)
The loop count is read at the call, not written into the source: a kernel over [rows, N] renders to
the same text for every row count of its size class (whether it runs on a team), so a prefill at a
new prompt length finds its libraries in the disk cache instead of compiling them.
Its parallel regions use the calling thread's OpenMP thread count (kfuse/backends/openmp.py).
Identifiers are made here (a<k> arguments, v<k> values, s<k> stashes); no graph name reaches C.

Flat kernel:   #pragma omp parallel for simd over every element; loop-invariant values hoisted;
               an output of stride 0 (one invariant value) written once, after the loop.
Row kernel:    #pragma omp parallel { stash buffers; #pragma omp for over rows {
                   row pointers; per pass: row scalars, then an `omp simd` loop over the row with
                   its reductions held in registers (reduction clauses) } }
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ...kernels import DTYPES, REDUCTIONS, FusedKernel
from .literals import CTYPE, literal
from .vecmath import FLOAT_FN, VECMATH_C, VECMATH_H

# Loops are split statically: each thread streams one contiguous range of the elements or rows.
# Interleaved chunks cost the memory system dearly (scratch harness, 2 threads, block means, torch
# tensors): RMSNorm [1024,4096] 0.400 ms with dynamic 64K-element chunks, 0.306 guided, 0.223 static
# (a row-by-row memcpy likewise 0.216 -> 0.148, torch's copy_ 0.155); SwiGLU 0.121 -> 0.113, bias+GELU
# 0.197 -> 0.190. With a busy process on one of the two cores static was no worse than dynamic
# (RMSNorm 0.96 vs 1.86 ms), so load balancing by chunks bought nothing here.
SCHEDULE = "static"
# Below this many elements a kernel runs on the calling thread alone (torch's GRAIN_SIZE): a team
# costs more to start than it saves, and under load a descheduled team member stalls the call for a
# scheduler time slice (a [1, 8] ReLU: p99 8 ms at load 5 with 2 threads, 0.2 ms with one).
PARALLEL_MIN = 32768


@dataclass(frozen=True)
class Schedule:
    """How a kernel's outer loop is spread over threads: the knobs the autotuner (autotune.py) tries.
    The default renders the same text as before there was a choice (the same libraries in the cache)."""
    threads: str = "all"        # "all": an OpenMP team (for kernels of PARALLEL_MIN elements or more);
                                # "one": the calling thread alone
    omp: str = SCHEDULE         # the OpenMP schedule clause: "static", "dynamic, 8", "guided"; CHUNK
                                # stands for 1/16 of the loop count (at least 4096 elements, 1 row)
    stream: bool = False        # a row kernel's float outputs written by streaming (non-temporal) stores,
                                # past the caches: for outputs larger than the last-level cache can hold
    prefetch: bool = False      # a row kernel of several passes fetches the next row's inputs while it
                                # writes this row (its last pass), so the memory is busy in every pass
    wide: bool = False          # loops vectorised 512 bits wide: gcc's -march=native tuning for Intel's
                                # AVX-512 CPUs prefers 256-bit vectors (for their clocks), which halved the
                                # exp-bound loops' speed on an Ice Lake-class VM (WIDE)

    def __str__(self):
        text = "1 thread" if self.threads == "one" else self.omp.replace(" ", "").replace(CHUNK, "n/16")
        return (text + (", next row prefetched" if self.prefetch else "") + (", streaming stores" if self.stream else "")
                + (", 512-bit vectors" if self.wide else ""))


CHUNK = "{chunk}"
# A function's loops vectorised 512 bits wide whatever -march=native's tuning prefers (Schedule.wide)
WIDE = ('#pragma GCC push_options\n#pragma GCC target("prefer-vector-width=512")\n', "#pragma GCC pop_options\n")


def loop_count(k: FusedKernel) -> int:
    """The count a kernel's loop runs over, passed at the call: its elements (flat) or rows."""
    return k.shape[0] if k.flat else math.prod(k.shape[:-1])


DEFAULT = Schedule()

PRELUDE = """#define _ISOC11_SOURCE   /* aligned_alloc, which -std=gnu99 does not declare */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
""" + VECMATH_H + VECMATH_C

# Streaming stores (Schedule.stream): a block of BLOCK floats, computed into an aligned local array,
# leaves by non-temporal stores where its destination is 64-byte aligned (else plain stores). They skip
# the read of each destination line a store first makes and leave the caches to the inputs. gcc
# ignores `omp simd nontemporal`, hence the intrinsics.
STREAM_C = """#if defined(__AVX512F__) || defined(__AVX2__)
#include <immintrin.h>
#endif
KF_INLINE void kf_stream_block(float *restrict p, const float *restrict v) {
    if (((uintptr_t)p & 63) == 0) {
#if defined(__AVX512F__)
        for (int i = 0; i < %(block)d; i += 16)
            _mm512_stream_ps(p + i, _mm512_load_ps(v + i));
        return;
#elif defined(__AVX2__)
        for (int i = 0; i < %(block)d; i += 8)
            _mm256_stream_ps(p + i, _mm256_load_ps(v + i));
        return;
#endif
    }
    memcpy(p, v, %(block)d * sizeof(float));
}
KF_INLINE void kf_stream_fence(void) {
#if defined(__AVX512F__) || defined(__AVX2__)
    _mm_sfence();      /* the streamed lines reach memory before the team's closing barrier */
#endif
}
"""

_INFIX = {"add": "+", "sub": "-", "mul": "*", "div": "/", "eq": "==", "ne": "!=", "lt": "<",
          "le": "<=", "gt": ">", "ge": ">=", "and": "&&", "or": "||"}


def expr(op: str, a: list[str], dtype: str, arg_dtype: str) -> str:
    """C expression of primitive `op` on argument expressions `a` (all of `arg_dtype`)."""
    if op == "cast":
        return f"({a[0]} != 0)" if dtype == "bool" else f"({CTYPE[dtype]})({a[0]})"
    if op == "neg":
        return f"(-{a[0]})"
    if op == "not":
        return f"(!{a[0]})"
    if op == "where":
        return f"({a[0]} ? {a[1]} : {a[2]})"
    if op in ("max", "min"):          # NaN-propagating, as torch.maximum/minimum
        c = ">" if op == "max" else "<"
        nan = f" || {a[0]} != {a[0]}" if arg_dtype == "f32" else ""
        return f"(({a[0]} {c} {a[1]}{nan}) ? {a[0]} : {a[1]})"
    if op in _INFIX:
        return f"({a[0]} {_INFIX[op]} {a[1]})"
    if op == "abs" and arg_dtype != "f32":
        return f"({a[0]} < 0 ? -{a[0]} : {a[0]})"
    return f"{FLOAT_FN[op]}({', '.join(a)})"


class _Render:
    def __init__(self, k: FusedKernel, sched: Schedule = DEFAULT):
        self.k, self.sched = k, sched
        self.lines: list[str] = []
        self.n_in = len(k.inputs)

    def out(self, line: str, depth: int):
        self.lines.append("    " * depth + line)

    def ptr(self, a: int) -> str:
        return f"p{a}" if not self.k.flat else f"a{a}"

    # one value, emitted on demand; `local` holds what this loop body has computed already
    def ref(self, i: int, local: dict, depth: int, idx: str, pas: int | None) -> str:
        k = self.k
        if i in local:
            return local[i]
        v = k.values[i]
        if v.op == "lit":
            return literal(v.attr, v.dtype)
        name = f"v{i}"
        if v.op == "load":
            rhs = f"{self.ptr(v.attr)}[{idx if k.varies[i] else '0'}]"
        elif pas is not None and i in k.stash and k.phase[i] < pas:
            rhs = f"s{i}[{idx}]"
        else:
            args = [self.ref(a, local, depth, idx, pas) for a in v.args]
            rhs = expr(v.op, args, v.dtype, k.values[v.args[0]].dtype)
        self.out(f"{CTYPE[v.dtype]} {name} = {rhs};", depth)
        local[i] = name
        return name

    def render(self, name: str = "void kf_run") -> str:
        """The kernel as one C function `name` (its declaration up to the argument list)."""
        k = self.k
        args = k.inputs + k.outputs
        body = [f"{name}(void **args) {{"]
        for a, n in enumerate(args):
            const = "const " if a < self.n_in else ""
            t = CTYPE[DTYPES[n.dtype]]
            body.append(f"    {const}{t} *restrict a{a} = ({const}{t} *)args[{a}];")
        body.append(f"    const int64_t n = *(const int64_t *)args[{len(args)}];")
        self.lines = []
        if k.flat:
            self.flat()
        else:
            self.rows()
        text = "\n".join(body + self.lines + ["}", ""])
        return WIDE[0] + text + WIDE[1] if self.sched.wide else text

    def flat(self):
        """All elements in one parallel SIMD loop; invariant values computed once, before it."""
        k = self.k
        row: dict = {}
        for i in k.live:
            if not k.varies[i]:
                self.ref(i, row, 1, "0", None)
        if k.shape[0] >= PARALLEL_MIN and self.sched.threads == "all":
            chunk = "(n / 256 + 1) * 16 > 4096 ? (n / 256 + 1) * 16 : 4096"
            self.out(f"#pragma omp parallel for simd schedule(simd: {self.sched.omp.replace(CHUNK, chunk)})", 1)
        else:
            self.out("#pragma omp simd", 1)
        self.out("for (int64_t i = 0; i < n; i++) {", 1)
        local = dict(row)
        once = [(o, v) for o, v in enumerate(k.out_values) if k.strides[self.n_in + o][0] == 0]
        for o, v in enumerate(k.out_values):
            if (o, v) not in once:
                self.out(f"a{self.n_in + o}[i] = {self.ref(v, local, 2, 'i', 0)};", 2)
        self.out("}", 1)
        # an output of stride 0 (a [1] value in a [7] loop) holds one loop-invariant value (lower()
        # refuses any other): written once, after the loop has read every input
        for o, v in once:
            self.out(f"a{self.n_in + o}[0] = {self.ref(v, row, 1, '0', None)};", 1)

    def rows(self):
        k = self.k
        N = k.shape[-1]
        lead = k.shape[:-1]
        R = math.prod(lead)
        parallel = R > 1 and R * N >= PARALLEL_MIN and self.sched.threads == "all"
        if parallel:
            self.out("#pragma omp parallel", 1)
        self.out("{", 1)
        for i in sorted(k.stash):
            t = CTYPE[k.values[i].dtype]
            self.out(f"{t} *s{i} = ({t} *)aligned_alloc(64, ({N} * sizeof({t}) + 63) / 64 * 64);", 2)
        if parallel:
            self.out(f"#pragma omp for schedule({self.sched.omp.replace(CHUNK, 'n / 16 > 1 ? n / 16 : 1')})", 2)
        self.out("for (int64_t r = 0; r < n; r++) {", 2)
        d = 3
        # row pointers: decompose r into the leading indices (one dim after collapsing, usually)
        if len(lead) > 1:
            self.out("int64_t q = r;", d)
            for j in reversed(range(1, len(lead))):
                self.out(f"int64_t i{j} = q % {lead[j]}LL; q /= {lead[j]}LL;", d)
            self.out("int64_t i0 = q;", d)
        idx = ["r"] if len(lead) == 1 else [f"i{j}" for j in range(len(lead))]
        self.next_row = {}      # input -> its elements from one row to the next, where the rows follow evenly
        for a, st in enumerate(k.strides):
            if all(st[j] == st[j + 1] * lead[j + 1] for j in range(len(lead) - 1)):
                off = f"{st[-2]}LL * r" if st[-2] else "0"   # walks the rows contiguously
                if a < self.n_in and st[-2] and st[-1] == 1:
                    self.next_row[a] = st[-2]
            else:
                off = " + ".join(f"{s}LL * {x}" for s, x in zip(st[:-1], idx) if s) or "0"
            self.out(f"{'const ' if a < self.n_in else ''}{CTYPE_OF(k, a)} *restrict p{a} = a{a} + {off};", d)
        row: dict = {}
        row_out = [(o, v) for o, v in enumerate(k.out_values) if k.strides[self.n_in + o][-1] == 0]
        for p in range(k.passes):
            # row scalars of this phase (finished reductions and what depends on them)
            for i in k.live:
                if not k.varies[i] and k.phase[i] == p and k.values[i].op not in REDUCTIONS:
                    self.ref(i, row, d, "0", None)
            for o, v in row_out:
                if k.phase[v] == p:
                    self.out(f"p{self.n_in + o}[0] = {self.ref(v, row, d, '0', None)};", d)
            self.one_pass(p, row, d, N, row_out)
        self.out("}", 2)
        if self.sched.stream:
            self.out("kf_stream_fence();", 2)
        for i in sorted(k.stash):
            self.out(f"free(s{i});", 2)
        self.out("}", 1)

    def one_pass(self, p, row, d, N, row_out):
        k = self.k
        reds = [i for i in k.live if k.values[i].op in REDUCTIONS and k.phase[i] == p + 1]
        outs = [(o, v) for o, v in enumerate(k.out_values)
                if k.varies[v] and k.phase[v] == p] + \
               [(o, v) for o, v in enumerate(k.out_values)
                if not k.varies[v] and k.phase[v] == p and (o, v) not in row_out]
        stores = [i for i in sorted(k.stash) if k.phase[i] == p]
        if not (reds or outs or stores):
            return
        streamed = [(o, v) for o, v in outs if self.streams(o, v)] if not reds and N >= BLOCK else []
        fetch = self.sched.prefetch and p == k.passes - 1 and p > 0 and N >= BLOCK
        if streamed or fetch:
            self.blocked_pass(p, row, d, N, stores, outs, streamed, fetch)
            return
        nan = [i for i in reds if k.values[i].op != "rsum" and k.values[i].dtype == "f32"]
        for i in reds:
            v = k.values[i]
            self.out(f"{CTYPE[v.dtype]} v{i} = {_INIT[v.op, v.dtype]};", d)
        for i in nan:   # amax/amin propagate NaN: flagged aside
            self.out(f"int nan{i} = 0;", d)
        # A reduction in one accumulator is a chain of dependent vector adds, one per vector of the
        # row; long rows run in blocks of BLOCK lanes into arrays (BLOCK/16 independent vector
        # accumulators, kept in registers), folded into the scalar after the row.
        split = (N // BLOCK) * BLOCK if reds and N >= 4 * BLOCK else 0
        if split:
            for i in reds:
                self.out(f"{CTYPE[k.values[i].dtype]} b{i}[{BLOCK}];", d)
            for i in nan:
                self.out(f"int bnan{i}[{BLOCK}];", d)
            self.out("#pragma omp simd", d)
            self.out(f"for (int jj = 0; jj < {BLOCK}; jj++) {{", d)
            for i in reds:
                self.out(f"b{i}[jj] = v{i};", d + 1)
            for i in nan:
                self.out(f"bnan{i}[jj] = 0;", d + 1)
            self.out("}", d)
            self.out(f"for (int64_t j0 = 0; j0 < {split}LL; j0 += {BLOCK}) {{", d)
            self.out("#pragma omp simd", d + 1)
            self.out(f"for (int jj = 0; jj < {BLOCK}; jj++) {{", d + 1)
            self.out("int64_t j = j0 + jj;", d + 2)
            self.body(p, row, d + 2, stores, outs, reds, "b{}[jj]", "bnan{}[jj]")
            self.out("}", d + 1)
            self.out("}", d)
        if split < N:
            self.loop(d, f"{split}LL", f"{N}LL", reds, nan, "j",
                      lambda: self.body(p, row, d + 1, stores, outs, reds, "v{}", "nan{}"))
        if split:
            def fold_blocks():
                for i in reds:
                    self.fold(i, f"b{i}[jj]", "v{}", "nan{}", d + 1)
                for i in nan:
                    self.out(f"nan{i} |= bnan{i}[jj];", d + 1)
            self.loop(d, "0", f"{BLOCK}", reds, nan, "jj", fold_blocks)
        for i in nan:
            self.out(f"if (nan{i}) v{i} = NAN;", d)
        for i in reds:
            row[i] = f"v{i}"

    def streams(self, o, v) -> bool:
        """Whether output o (value v) of this row kernel leaves by streaming stores: under Schedule.stream,
        a float output that varies along the row, its elements contiguous."""
        k = self.k
        return self.sched.stream and k.varies[v] and k.strides[self.n_in + o][-1] == 1 and \
            DTYPES[k.outputs[o].dtype] == "f32"

    def blocked_pass(self, p, row, d, N, stores, outs, streamed, fetch):
        """A pass without reductions run BLOCK elements at a time: its `streamed` outputs computed into
        aligned local arrays t<o>, each block then streamed out (kf_stream_block); with `fetch`, each block
        first prefetches the same block of the next row's inputs (into L1: the row's first pass reads them
        next). The rest of the row, past the last whole block, by plain stores."""
        split = N // BLOCK * BLOCK
        dest = {o: f"t{o}[jj]" for o, _ in streamed}
        self.out(f"for (int64_t j0 = 0; j0 < {split}LL; j0 += {BLOCK}) {{", d)
        for a, step in self.next_row.items() if fetch else ():
            self.out(f"const char *f{a} = (const char *)(p{a} + {step}LL + j0);", d + 1)
            for line in range(0, BLOCK * self.k.inputs[a].dtype.itemsize, 64):
                self.out(f"__builtin_prefetch(f{a} + {line}, 0, 3);", d + 1)   # never faults, past the end too
        for o, _ in streamed:
            self.out(f"float t{o}[{BLOCK}] __attribute__((aligned(64)));", d + 1)
        self.out("#pragma omp simd", d + 1)
        self.out(f"for (int jj = 0; jj < {BLOCK}; jj++) {{", d + 1)
        self.out("int64_t j = j0 + jj;", d + 2)
        self.body(p, row, d + 2, stores, outs, [], "", "", dest)
        self.out("}", d + 1)
        for o, _ in streamed:
            self.out(f"kf_stream_block(p{self.n_in + o} + j0, t{o});", d + 1)
        self.out("}", d)
        if split < N:
            self.loop(d, f"{split}LL", f"{N}LL", [], [], "j", lambda: self.body(p, row, d + 1, stores, outs, [], "", ""))

    def loop(self, d, start, stop, reds, nan, var, emit_body):
        """A `omp simd` loop from start to stop reducing into the scalars v<i> (and nan<i> for the
        reductions in `nan`); emit_body writes its body."""
        clauses = [f"reduction({_CLAUSE[self.k.values[i].op]}:v{i})" for i in reds]
        clauses += [f"reduction(|:nan{i})" for i in nan]
        self.out(f"#pragma omp simd {' '.join(clauses)}".rstrip(), d)
        self.out(f"for (int64_t {var} = {start}; {var} < {stop}; {var}++) {{", d)
        emit_body()
        self.out("}", d)

    def body(self, p, row, d, stores, outs, reds, acc, nanacc, dest=None):
        """One element j of pass p: its stash stores, outputs (into dest[o] where given, else the output
        row) and reduction updates."""
        k = self.k
        local = dict(row)
        for i in stores:
            self.out(f"s{i}[j] = {self.ref(i, local, d, 'j', p)};", d)
        for o, v in outs:
            target = (dest or {}).get(o, f"p{self.n_in + o}[j]")
            self.out(f"{target} = {self.ref(v, local, d, 'j', p)};", d)
        for i in reds:
            self.fold(i, self.ref(k.values[i].args[0], local, d, "j", p), acc, nanacc, d)

    def fold(self, i, x, acc, nanacc, d):
        """Fold value x into reduction i's accumulator (acc and nanacc format the names)."""
        v = self.k.values[i]
        a = acc.format(i)
        if v.op == "rsum":
            self.out(f"{a} += {x};", d)
            return
        c = ">" if v.op == "rmax" else "<"
        self.out(f"{a} = {x} {c} {a} ? {x} : {a};", d)
        if v.dtype == "f32":
            self.out(f"{nanacc.format(i)} |= {x} != {x};", d)


BLOCK = 64      # lanes per block of a split reduction: 4 vectors of 16
_CLAUSE = {"rsum": "+", "rmax": "max", "rmin": "min"}
_INIT = {("rsum", "f32"): "0", ("rsum", "i64"): "0", ("rsum", "bool"): "0",
         ("rmax", "f32"): "-INFINITY", ("rmax", "i64"): "INT64_MIN",
         ("rmin", "f32"): "INFINITY", ("rmin", "i64"): "INT64_MAX"}


def CTYPE_OF(k: FusedKernel, a: int) -> str:
    return CTYPE[DTYPES[(k.inputs + k.outputs)[a].dtype]]


def _prelude(scheds) -> str:
    return PRELUDE + (STREAM_C % {"block": BLOCK} if any(s.stream for s in scheds) else "")


def render(k: FusedKernel, sched: Schedule = DEFAULT) -> str:
    """C source of `k`: the same kernel IR always renders to the same text (the cache key)."""
    return _prelude([sched]) + "\n" + _Render(k, sched).render()


def render_variants(k: FusedKernel, scheds: list[Schedule]) -> str:
    """C source of `k` under each schedule: one exported function kf_v<i> per schedule, and kf_run,
    which runs the first. One library serves the autotuner's timing and whichever variant wins
    (autotune.py), so the choice never needs another compile and the source never depends on it."""
    names = "".join(f"/* kf_v{i}: {s} */\n" for i, s in enumerate(scheds))
    funcs = [_Render(k, s).render(f"void kf_v{i}") for i, s in enumerate(scheds)]
    return _prelude(scheds) + "\n" + names + "\n".join(funcs) + "void kf_run(void **args) { kf_v0(args); }\n"
