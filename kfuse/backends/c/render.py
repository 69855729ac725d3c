"""Render a kernel-IR `FusedKernel` as C99 + OpenMP source.

Every kernel library exports two functions:
    void kf_run(void **args);        args: the inputs' then the outputs' data pointers
    void kf_set_threads(int n);      omp_set_num_threads for the OpenMP runtime the kernel uses
Identifiers are made here (a<k> arguments, v<k> values, s<k> stashes); no graph name reaches C.

Flat kernel:   #pragma omp parallel for simd over every element; loop-invariant values hoisted.
Row kernel:    #pragma omp parallel { stash buffers; #pragma omp for over rows {
                   row pointers; per pass: row scalars, then an `omp simd` loop over the row with
                   its reductions held in registers (reduction clauses) } }
"""
from __future__ import annotations

import math

from ...kernels import DTYPES, REDUCTIONS, FusedKernel

CHUNK = 16384   # elements per scheduling chunk
CTYPE = {"f32": "float", "i64": "int64_t", "bool": "unsigned char"}

# libmvec (glibc >= 2.35) has AVX-512 variants of these; the declaration tells gcc it may call
# _ZGVeN16v_<name> from vectorised loops (-fno-math-errno in FLAGS makes that legal).
# Known cost: libmvec redoes in scalar code every lane outside its fast domain (expf: |x| > 87.34),
# so softmax rows with -inf masks run ~4x slower than unmasked ones. A clamp before the call does
# not help: gcc rewrites expf(x < lo ? lo : x) as x < lo ? expf(lo) : expf(x). The fix is an
# inline polynomial exp (see docs/vecmath.md, "next").
VECMATH_H = "".join(f"#pragma omp declare simd notinbranch\nfloat {f}({', '.join(['float'] * n)});\n"
                    for f, n in (("expf", 1), ("logf", 1), ("log1pf", 1), ("sinf", 1), ("cosf", 1),
                                 ("tanhf", 1), ("erff", 1), ("powf", 2)))

PRELUDE = """#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <omp.h>
""" + VECMATH_H + """
void kf_set_threads(int n) { omp_set_num_threads(n); }
"""

_FLOAT_FN = {"abs": "fabsf", "exp": "expf", "log": "logf", "log1p": "log1pf", "sqrt": "sqrtf",
             "sin": "sinf", "cos": "cosf", "tanh": "tanhf", "erf": "erff", "floor": "floorf",
             "ceil": "ceilf", "pow": "powf"}
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
        # dynamic chunks of 16K elements (64 KB of f32): on a shared machine a preempted thread's
        # work is taken over instead of stalling the whole loop at its end; the atomic per chunk
        # is noise next to moving 64 KB
        self.out(f"#pragma omp parallel for simd schedule(simd: dynamic, {CHUNK})", 1)
        self.out(f"for (int64_t i = 0; i < {k.shape[0]}LL; i++) {{", 1)
        local = dict(row)
        for o, v in enumerate(k.out_values):
            self.out(f"a{self.n_in + o}[i] = {self.ref(v, local, 2, 'i', 0)};", 2)
        self.out("}", 1)

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
        clauses = []
        for i in reds:
            v = k.values[i]
            t = CTYPE[v.dtype]
            init = {"rsum": "0", "rmax": "-INFINITY" if v.dtype == "f32" else "INT64_MIN",
                    "rmin": "INFINITY" if v.dtype == "f32" else "INT64_MAX"}[v.op]
            self.out(f"{t} v{i} = {init};", d)
            clauses.append(f"reduction({ {'rsum': '+', 'rmax': 'max', 'rmin': 'min'}[v.op] }:v{i})")
            if v.op != "rsum" and v.dtype == "f32":   # amax/amin propagate NaN: flag it aside
                self.out(f"int nan{i} = 0;", d)
                clauses.append(f"reduction(|:nan{i})")
        self.out(f"#pragma omp simd {' '.join(clauses)}".rstrip(), d)
        self.out(f"for (int64_t j = 0; j < {N}LL; j++) {{", d)
        local = dict(row)
        for i in stores:
            self.out(f"s{i}[j] = {self.ref(i, local, d + 1, 'j', p)};", d + 1)
        for o, v in outs:
            self.out(f"p{self.n_in + o}[j] = {self.ref(v, local, d + 1, 'j', p)};", d + 1)
        for i in reds:
            v = k.values[i]
            x = self.ref(v.args[0], local, d + 1, "j", p)
            if v.op == "rsum":
                self.out(f"v{i} += {x};", d + 1)
            else:
                c = ">" if v.op == "rmax" else "<"
                self.out(f"v{i} = {x} {c} v{i} ? {x} : v{i};", d + 1)
                if v.dtype == "f32":
                    self.out(f"nan{i} |= {x} != {x};", d + 1)
        self.out("}", d)
        for i in reds:
            if k.values[i].op != "rsum" and k.values[i].dtype == "f32":
                self.out(f"if (nan{i}) v{i} = NAN;", d)
            row[i] = f"v{i}"


def CTYPE_OF(k: FusedKernel, a: int) -> str:
    return CTYPE[DTYPES[(k.inputs + k.outputs)[a].dtype]]


def render(k: FusedKernel) -> str:
    """C source of `k`: the same kernel IR always renders to the same text (the cache key)."""
    return _Render(k).render()
