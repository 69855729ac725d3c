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
import struct

from ...kernels import DTYPES, LIBM_BINARY, LIBM_UNARY, REDUCTIONS, FusedKernel

# Loops are split statically: each thread streams one contiguous range of the elements or rows.
# Interleaved chunks cost the memory system dearly (scratch harness, 2 threads, block means, torch
# tensors): RMSNorm [1024,4096] 0.400 ms with dynamic 64K-element chunks, 0.306 guided, 0.223 static
# (a row-by-row memcpy likewise 0.216 -> 0.148, torch's copy_ 0.155); SwiGLU 0.121 -> 0.113, bias+GELU
# 0.197 -> 0.190. With a busy process on one of the two cores static was no worse than dynamic
# (RMSNorm 0.96 vs 1.86 ms), so load balancing by chunks bought nothing here.
SCHEDULE = "static"
CTYPE = {"f32": "float", "i64": "int64_t", "bool": "unsigned char"}


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

/* e^x = 2^(n-1) * 2e^r: n = rint(x log2 e) by the 1.5*2^23 shifter (plus 126, so the low bits of t
   are n + 126, the exponent field of 2^(n-1)), r = x - n ln2 in two Cody-Waite steps (n*C1 is exact),
   2e^r by a degree-5 polynomial on |r| <= ln2/2, and one multiply by 2^(n-1) = t << 23. Only two
   guards: x is clamped below at -87.5 (NaN passes: its comparison is false), where n = -126 gives
   2^(n-1) = +0, so results under 2^-125.5 (1.7e-38) flush to 0 and no denormal is ever made (a
   denormal multiply costs a microcode assist: a -inf-masked softmax ran 2.3x slower); and n is
   capped at 128 by an unsigned min on t's bits (huge x, +inf and NaN bits included). Above the cap r
   grows, the polynomial (all coefficients positive) exceeds 2 and the product overflows to inf, as
   it should; a NaN x makes r NaN. exp(0) = 1 exactly (the polynomial's constant is 2).
   Against the clamp-and-select form with the exponent-field add (22 vector ops a vector, degree 6),
   these 13 ops made SwiGLU 1.4x faster. */
KF_INLINE float kf_exp(float x) {
    float xl = x < -0x1.5ep+6f ? -0x1.5ep+6f : x;
    uint32_t t = kf_asuint(fmaf(xl, 0x1.715476p+0f, 0x1.8p+23f + 126.0f));
    t = t < 0x4b4000feu ? t : 0x4b4000feu;    /* n + 126 <= 254: n <= 128 */
    float n = kf_asfloat(t) - (0x1.8p+23f + 126.0f);
    float r = fmaf(-n, 0x1.63p-1f, xl);
    r = fmaf(-n, -0x1.bd0106p-13f, r);
    float p = 0x1.0fa7d8p-6f;
    p = fmaf(p, r, 0x1.573ad0p-4f);
    p = fmaf(p, r, 0x1.555a6ep-2f);
    p = fmaf(p, r, 0x1.fffdc4p-1f);
    p = fmaf(p, r, 0x1.fffff6p+0f);
    p = fmaf(p, r, 2.0f);
    return p * kf_asfloat(t << 23);
}

%(ERF)s
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

# erf's two polynomials, highest degree first: erf(z) = z + z Q(z^2) for |z| <= 0.921875, and B(|z| - 2.4)
# above (erf in [0.8, 1): absolute error is what counts there, so no exp is needed). B is degree 12: its
# float32 error (~1.7e-7 absolute, rounding in the evaluation) is that of the degree-13 fit it replaced,
# and one FMA fewer made bias+GELU 0.193 -> 0.185 ms.
ERF_Q = ("-0x1.3a48e2p-11", "0x1.474a0ep-8", "-0x1.b68e66p-6", "0x1.ce1ab4p-4", "-0x1.8126e8p-2",
         "0x1.06eba6p-3")
ERF_B = ("-0x1.0afdccp-17", "0x1.0605e2p-15", "0x1.af4b3ap-16", "-0x1.531a3p-12", "0x1.2ea3b8p-11",
         "0x1.dc8366p-13", "-0x1.9a1ec2p-9", "0x1.02d9fcp-7", "-0x1.8c7aep-7", "0x1.987e88p-7",
         "-0x1.17b6f2p-7", "0x1.d211acp-9", "0x1.ffa5c4p-1")


def f32(x: float) -> float:
    """x rounded to float32."""
    return struct.unpack("f", struct.pack("f", x))[0]


def _erf_of_scaled(c: float, h: float = 1.0) -> str:
    """C statements leaving y = h erf(c x) (sign included) for the float x, with c and h (a power of 2,
    so exactly) folded into the coefficients: the scalings cost no multiply. On a = |x|, s = a^2,
    small: erf(c a) = a (c (1 + Q_0) + sum_k c^(2k+1) Q_k s^k), a degree-5 polynomial in s and one multiply;
    big:   B(c a - 2.4) = B'(min(a, 3.91/c) - 2.4/c), B'_k = c^k B_k. B' is exactly 1.0f at the clamp
           (for c = 1 and sqrt(1/2): tests/ops/test_c_kernels.py), so larger |x|, inf included, give
           exactly +-1 with no select; erf(3.91) is 1 - 1 ULP/2, and rounds to 1 from 3.9192.
    Both are computed side by side and one selected by a > 0.921875/c; the sign of x is put back last
    (erf(-0) = -0), which also keeps NaN (a NaN a fails the comparisons and takes the small branch)."""
    top = literal(f32(3.91 / c), "f32")

    def horner(coefs, var, name):
        lines = [f"    float {name} = {literal(coefs[0], 'f32')};"]
        lines += [f"    {name} = fmaf({name}, {var}, {literal(k, 'f32')});" for k in coefs[1:]]
        return lines
    q = [float.fromhex(k) for k in ERF_Q]
    n = len(q) - 1
    small = [h * f32(c ** (2 * (n - i) + 1) * k) for i, k in enumerate(q[:-1])] + [h * f32(c * (1 + q[-1]))]
    b = [float.fromhex(k) for k in ERF_B]
    big = [h * f32(c ** (len(b) - 1 - i) * k) for i, k in enumerate(b)]
    return "\n".join(
        ["    float a = fabsf(x), s = x * x;"] + horner(small, "s", "q")
        + [f"    float u = (a > {top} ? {top} : a) - {literal(f32(2.4 / c), 'f32')};"] + horner(big, "u", "b")
        + [f"    float y = a > {literal(f32(0.921875 / c), 'f32')} ? b : a * q;",
           "    y = kf_asfloat(kf_asuint(y) | (kf_asuint(x) & 0x80000000u));"])


ERF_C = f"""
/* erf(x): _erf_of_scaled with c = 1 (docs/vecmath.md). */
KF_INLINE float kf_erf(float x) {{
{_erf_of_scaled(1.0)}
    return y;
}}

/* Phi(x) = 0.5 + 0.5 erf(x / sqrt 2), the normal CDF of gelu(x) = x Phi(x): the 1/sqrt(2) and the 0.5
   folded into erf's coefficients save gelu two multiplies (bias+GELU [1024,1536] 0.230 -> 0.193 ms with
   the clamp that needs no select; docs/vecmath.md); Phi is exactly 1 from x ~ 5.53 on and exactly 0
   below -5.53. */
KF_INLINE float kf_phi(float x) {{
{_erf_of_scaled(math.sqrt(0.5), 0.5)}
    return 0.5f + y;
}}
"""
VECMATH_C = VECMATH_C % {"ERF": ERF_C}

PRELUDE = """#define _ISOC11_SOURCE   /* aligned_alloc, which -std=gnu99 does not declare */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>
""" + VECMATH_H + VECMATH_C + """
void kf_set_threads(int n) { omp_set_num_threads(n); }
"""

_FLOAT_FN = {"abs": "fabsf", "exp": "kf_exp", "log": "logf", "log1p": "log1pf", "sqrt": "sqrtf",
             "sin": "sinf", "cos": "cosf", "tanh": "kf_tanh", "erf": "kf_erf", "phi": "kf_phi", "floor": "floorf",
             "ceil": "ceilf", "pow": "powf", "round": "nearbyintf", "trunc": "truncf",
             **{f: f + "f" for f in LIBM_UNARY + LIBM_BINARY}}
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
        self.out(f"#pragma omp parallel for simd schedule(simd: {SCHEDULE})", 1)
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
        self.out(f"#pragma omp for schedule({SCHEDULE})", 2)
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
