"""Render a kernel-IR `FusedKernel` as C99 + OpenMP source.

Every kernel library exports two functions:
    void kf_run(void **args);        args: the inputs' then the outputs' data pointers
    void kf_set_threads(int n);      omp_set_num_threads for the OpenMP runtime the kernel uses
Identifiers are made here (a<k> arguments, v<k> values, s<k> stashes); no graph name reaches C.

Flat kernel:   #pragma omp parallel for simd over every element; loop-invariant values hoisted;
               an output of stride 0 (one invariant value) written once, after the loop.
Row kernel:    #pragma omp parallel { stash buffers; #pragma omp for over rows {
                   row pointers; per pass: row scalars, then an `omp simd` loop over the row with
                   its reductions held in registers (reduction clauses) } }
"""
from __future__ import annotations

import math

from ...kernels import DTYPES, LIBM_BINARY, LIBM_UNARY, REDUCTIONS, FusedKernel

# Elements per scheduling chunk (256 KB of f32). Smaller chunks interleave the threads' rows, and
# each thread's hardware prefetcher restarts at every jump: with 16K, RMSNorm [1024,4096] ran 0.469
# ms, with 64K 0.439 (add+LayerNorm [1024,384] 0.042 -> 0.038); 256K starves small kernels of chunks.
CHUNK = 65536
CTYPE = {"f32": "float", "i64": "int64_t", "bool": "unsigned char"}

# exp, erf and tanh are our own branch-free inline functions (VECMATH_C below, docs/vecmath.md):
# gcc inlines them into the `omp simd` loops and vectorises them (16 lanes, zmm), special values
# handled by clamps and selects, so no input takes a slow path. Earlier kernels called libmvec's
# expf, which redoes in scalar code every vector holding a lane outside |x| <= 87.3: a softmax with
# -inf mask entries ran ~4x slower than unmasked.
#
# The rest (log, log1p, sin, cos, pow) still come from glibc's libmvec: the declaration tells gcc
# it may call _ZGVeN16v_<name> from vectorised loops (-fno-math-errno in FLAGS makes that legal).
VECMATH_H = "".join(f"#pragma omp declare simd notinbranch\nfloat {f}({', '.join(['float'] * n)});\n"
                    for f, n in (("logf", 1), ("log1pf", 1), ("sinf", 1), ("cosf", 1), ("powf", 2)))

# Coefficients: float32 weighted-minimax fits (Lawson iterations in float64, each coefficient rounded
# to float32 in turn and the rest refitted), errors measured by the sweep in tests/ops/test_c_kernels.py.
VECMATH_C = """
#define KF_INLINE static inline __attribute__((always_inline))
typedef union { float f; uint32_t u; } kf_bits;
KF_INLINE float kf_asfloat(uint32_t u) { kf_bits b; b.u = u; return b.f; }
KF_INLINE uint32_t kf_asuint(float f) { kf_bits b; b.f = f; return b.u; }

/* e^x. n = rint(x log2 e) (the 1.5*2^23 shifter: its low bits are n), r = x - n ln2 in two steps
   (Cody-Waite: n*C1 is exact), e^r = 1 + r + r^2 P(r) on |r| <= ln2/2, then 2^n added to the
   exponent field of that result (t << 23 is n << 23: one shift and one integer add, exact).
   That is only right for normal results, so x is clamped to [ln FLT_MIN, ln FLT_MAX] (as floats
   inside the range) and the lanes outside are selected at the end: above, inf; below, 0 (results
   under 2^-126 flush to zero, as with FTZ: an absolute error below 1.2e-38); NaN is put back there
   too. Flushed lanes compute exp(0): a multiply that underflows to a denormal costs a microcode
   assist (a -inf-masked softmax ran 2.3x slower).
   Against the exact two-multiply scaling that produced denormals, SwiGLU ran 1.19x faster. */
KF_INLINE float kf_exp(float x) {
    float xc = x < -0x1.5d589ep+6f ? 0.0f : x;
    xc = 0x1.62e42ep+6f < xc ? 0x1.62e42ep+6f : xc;
    float t = fmaf(xc, 0x1.715476p+0f, 0x1.8p+23f);
    float n = t - 0x1.8p+23f;
    float r = fmaf(-n, 0x1.63p-1f, xc);
    r = fmaf(-n, -0x1.bd0106p-13f, r);
    float p = 0x1.6a5196p-10f;
    p = fmaf(p, r, 0x1.12397cp-7f);
    p = fmaf(p, r, 0x1.5558acp-5f);
    p = fmaf(p, r, 0x1.555492p-3f);
    p = fmaf(p, r, 0x1.fffffcp-2f);
    float y = 1.0f + fmaf(r * r, p, r);
    float e = kf_asfloat(kf_asuint(y) + (kf_asuint(t) << 23));
    e = x <= 0x1.62e42ep+6f ? e : x + INFINITY;   /* inf above; NaN (whose bits the add garbled) */
    return x < -0x1.5d589ep+6f ? 0.0f : e;
}

/* erf(x), computed on a = |x| with the sign of x put back last (so erf(-0) = -0).
   a <= 0.921875: a + a Q(a^2), Q of degree 5. Above (erf in [0.8, 1): absolute error is
   what counts): a degree-13 polynomial in |x| - 2.4, |x| clamped to 3.925, sign copied from x;
   from |x| >= 3.92 (erfc < 2^-25, inf included) the result is exactly +-1. No exp: both branches
   are plain FMAs, computed side by side and one selected. */
KF_INLINE float kf_erf(float x) {
    float a = fabsf(x), s = x * x;
    float q = -0x1.3a48e2p-11f;
    q = fmaf(q, s, 0x1.474a0ep-8f);
    q = fmaf(q, s, -0x1.b68e66p-6f);
    q = fmaf(q, s, 0x1.ce1ab4p-4f);
    q = fmaf(q, s, -0x1.8126e8p-2f);
    q = fmaf(q, s, 0x1.06eba6p-3f);
    float small = fmaf(a, q, a);
    float u = (a < 3.925f ? a : 3.925f) - 2.4f;
    float b = -0x1.b0a22ap-21f;
    b = fmaf(b, u, -0x1.168deap-17f);
    b = fmaf(b, u, 0x1.36404ap-15f);
    b = fmaf(b, u, 0x1.d7ed9ep-16f);
    b = fmaf(b, u, -0x1.638962p-12f);
    b = fmaf(b, u, 0x1.2b4b7ep-11f);
    b = fmaf(b, u, 0x1.03919ep-12f);
    b = fmaf(b, u, -0x1.991a1cp-9f);
    b = fmaf(b, u, 0x1.026fe0p-7f);
    b = fmaf(b, u, -0x1.8c9f38p-7f);
    b = fmaf(b, u, 0x1.989a4ap-7f);
    b = fmaf(b, u, -0x1.17af26p-7f);
    b = fmaf(b, u, 0x1.d209a2p-9f);
    b = fmaf(b, u, 0x1.ffa5c2p-1f);
    b = a >= 3.92f ? 1.0f : b;
    float y = a > 0.921875f ? b : small;
    return kf_asfloat(kf_asuint(y) | (kf_asuint(x) & 0x80000000u));   /* sign of x, -0 included */
}

/* tanh(x), on a = |x| with the sign of x put back last (tanh(-0) = -0). a <= 0.625: a + a s P(s),
   s = a^2. Above: 1 - 2 / (e^(2a) + 1); e^(2a) overflows to inf from a ~ 44.4 on, giving exactly 1. */
KF_INLINE float kf_tanh(float x) {
    float a = fabsf(x), s = x * x;
    float p = 0x1.1a2e3ep-9f;
    p = fmaf(p, s, -0x1.0c6020p-7f);
    p = fmaf(p, s, 0x1.63a57ep-6f);
    p = fmaf(p, s, -0x1.b9f18ap-5f);
    p = fmaf(p, s, 0x1.11107ap-3f);
    p = fmaf(p, s, -0x1.555554p-2f);
    float small = fmaf(a * s, p, a);
    float big = 1.0f - 2.0f / (kf_exp(a + a) + 1.0f);
    float y = a > 0.625f ? big : small;
    return kf_asfloat(kf_asuint(y) | (kf_asuint(x) & 0x80000000u));
}
"""

PRELUDE = """#define _ISOC11_SOURCE   /* aligned_alloc, which -std=gnu99 does not declare */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>
""" + VECMATH_H + VECMATH_C + """
void kf_set_threads(int n) { omp_set_num_threads(n); }
"""

_FLOAT_FN = {"abs": "fabsf", "exp": "kf_exp", "log": "logf", "log1p": "log1pf", "sqrt": "sqrtf",
             "sin": "sinf", "cos": "cosf", "tanh": "kf_tanh", "erf": "kf_erf", "floor": "floorf",
             "ceil": "ceilf", "pow": "powf", "round": "nearbyintf", "trunc": "truncf",
             **{f: f + "f" for f in LIBM_UNARY + LIBM_BINARY}}
_INFIX = {"add": "+", "sub": "-", "mul": "*", "div": "/", "eq": "==", "ne": "!=", "lt": "<",
          "le": "<=", "gt": ">", "ge": ">=", "and": "&&", "or": "||"}


def literal(x, dtype: str) -> str:
    """An exact C literal: hex floats for f32 (round-trip exact), INFINITY/NAN for the specials."""
    if dtype == "bool":
        return "1" if x else "0"
    if dtype == "i64":
        return "(-9223372036854775807LL - 1)" if x == -2**63 else f"{int(x)}LL"
    if math.isnan(x):
        return "NAN"
    if math.isinf(x):
        return "INFINITY" if x > 0 else "(-INFINITY)"
    return f"{float(x).hex()}f" if x >= 0 else f"(-{float(-x).hex()}f)"


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
    return f"{_FLOAT_FN[op]}({', '.join(a)})"


class _Render:
    def __init__(self, k: FusedKernel):
        self.k = k
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

    def render(self) -> str:
        k = self.k
        args = k.inputs + k.outputs
        body = [PRELUDE, "void kf_run(void **args) {"]
        for a, n in enumerate(args):
            const = "const " if a < self.n_in else ""
            t = CTYPE[DTYPES[n.dtype]]
            body.append(f"    {const}{t} *restrict a{a} = ({const}{t} *)args[{a}];")
        self.lines = []
        if k.flat:
            self.flat()
        else:
            self.rows()
        return "\n".join(body + self.lines + ["}", ""])

    def flat(self):
        """All elements in one parallel SIMD loop; invariant values computed once, before it."""
        k = self.k
        row: dict = {}
        for i in k.live:
            if not k.varies[i]:
                self.ref(i, row, 1, "0", None)
        # dynamic chunks of CHUNK elements: on a shared machine a preempted thread's work is taken
        # over instead of stalling the whole loop at its end; the atomic per chunk is noise next
        # to moving 256 KB
        self.out(f"#pragma omp parallel for simd schedule(simd: dynamic, {CHUNK})", 1)
        self.out(f"for (int64_t i = 0; i < {k.shape[0]}LL; i++) {{", 1)
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
        self.out("#pragma omp parallel", 1)
        self.out("{", 1)
        for i in sorted(k.stash):
            t = CTYPE[k.values[i].dtype]
            self.out(f"{t} *s{i} = ({t} *)aligned_alloc(64, ({N} * sizeof({t}) + 63) / 64 * 64);", 2)
        self.out(f"#pragma omp for schedule(dynamic, {max(1, CHUNK // N)})", 2)   # as in flat()
        self.out(f"for (int64_t r = 0; r < {R}LL; r++) {{", 2)
        d = 3
        # row pointers: decompose r into the leading indices (one dim after collapsing, usually)
        if len(lead) > 1:
            self.out("int64_t q = r;", d)
            for j in reversed(range(1, len(lead))):
                self.out(f"int64_t i{j} = q % {lead[j]}LL; q /= {lead[j]}LL;", d)
            self.out("int64_t i0 = q;", d)
        idx = ["r"] if len(lead) == 1 else [f"i{j}" for j in range(len(lead))]
        for a, st in enumerate(k.strides):
            if all(st[j] == st[j + 1] * lead[j + 1] for j in range(len(lead) - 1)):
                off = f"{st[-2]}LL * r" if st[-2] else "0"   # walks the rows contiguously
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

    def loop(self, d, start, stop, reds, nan, var, emit_body):
        """A `omp simd` loop from start to stop reducing into the scalars v<i> (and nan<i> for the
        reductions in `nan`); emit_body writes its body."""
        clauses = [f"reduction({_CLAUSE[self.k.values[i].op]}:v{i})" for i in reds]
        clauses += [f"reduction(|:nan{i})" for i in nan]
        self.out(f"#pragma omp simd {' '.join(clauses)}".rstrip(), d)
        self.out(f"for (int64_t {var} = {start}; {var} < {stop}; {var}++) {{", d)
        emit_body()
        self.out("}", d)

    def body(self, p, row, d, stores, outs, reds, acc, nanacc):
        """One element j of pass p: its stash stores, outputs and reduction updates."""
        k = self.k
        local = dict(row)
        for i in stores:
            self.out(f"s{i}[j] = {self.ref(i, local, d, 'j', p)};", d)
        for o, v in outs:
            self.out(f"p{self.n_in + o}[j] = {self.ref(v, local, d, 'j', p)};", d)
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


def render(k: FusedKernel) -> str:
    """C source of `k`: the same kernel IR always renders to the same text (the cache key)."""
    return _Render(k).render()
