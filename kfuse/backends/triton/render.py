"""Render a kernel-IR `FusedKernel` as a Triton kernel (Python source of one `@triton.jit` function).

The generated module defines `kf_kernel(a0, a1, ..., ak)`: the inputs' then the outputs' pointers.
Shapes and strides are numbers in the source (a kernel is specialised to its shapes, as the C
backend's are), so the launcher passes pointers only. Identifiers are made here (a<k> arguments,
v<k> values, o<k> row offsets, c<k> literals); no graph name reaches the source.

Flat kernel (no reductions, any rank): a 1-D grid of programs of BLOCK elements each,
    offs = pid * BLOCK + arange(BLOCK), masked at the end; an argument's offset is worked out from
    offs and its strides ((offs // inner) % size per dim, dims merged where they nest: offs itself
    for a contiguous one, offs % N for a row-broadcast bias); loop-invariant values are 0-d
    tensors; an output of stride 0 (one invariant value) is written by program 0.
Row kernel (loop shape [*rows, N]): a 1-D grid over tiles of RB rows x BN columns.
    Whole row in registers (N <= MAX_BLOCK): BN = next_power_of_2(N), every value computed once in
      registers ([RB, BN] tiles, row scalars as [RB, 1]); a reduction is tl.sum/tl.max over axis 1
      of the value with masked lanes replaced by the reduction's identity.
    Looped (N > MAX_BLOCK): one loop over the row in blocks of LOOP_BLOCK per pass of the kernel IR;
      a pass accumulates its reductions lane-wise in [RB, BN] accumulators, folded after the loop,
      and recomputes the varying values it needs from the loads (no stash: the row is re-read,
      from L2 for rows of a few thousand elements).
Bytes moved: each input read once per pass that needs it (once when the row fits in registers),
each output written once. fp16/bf16 arguments are loaded then converted to fp32 (the IR's "f32")
and rounded to their dtype at the store; bool arguments travel as uint8.
Offsets are int32 unless an argument spans 2^31 elements or more, then int64.
"""
from __future__ import annotations

import math

import torch

from ...kernels import REDUCTIONS, FusedKernel, NotFusable

MAX_BLOCK = 4096       # longest row held in registers (fp32: 16 KiB per row, 64 registers a thread at 8 warps)
LOOP_BLOCK = 2048      # block of a looped row
TILE = 4096            # elements per program of a row kernel: short rows are batched RB to a program
FLAT_BLOCK = 1024      # elements per program of a flat kernel

_TL = {"f32": "tl.float32", "i64": "tl.int64", "bool": "tl.int1"}
_INFIX = {"add": "+", "sub": "-", "mul": "*", "eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">",
          "ge": ">=", "and": "&", "or": "|"}
_HALF = (torch.float16, torch.bfloat16)


def pow2(n: int) -> int:
    """The least power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def literal(x, dtype: str) -> str:
    """A 0-d tensor of the IR dtype: typed, so no arithmetic is folded in Python doubles."""
    if dtype == "f32":
        x = float(x)
        text = repr(x) if math.isfinite(x) else f'float("{x}")'
    elif dtype == "i64":
        text = str(int(x))
    else:
        text = "1" if x else "0"
    return f"tl.full([], {text}, {_TL[dtype]})"


def expr(op: str, a: list[str], dtype: str, arg_dtype: str, attr_lit=None) -> str:
    """Triton expression of primitive `op` on argument expressions `a` (all of `arg_dtype`)."""
    f32 = arg_dtype == "f32"
    if op == "cast":
        return f"({a[0]} != 0)" if dtype == "bool" else f"{a[0]}.to({_TL[dtype]})"
    if op in ("round_f16", "round_bf16"):       # rounding="eager": the half value, computed on in fp32
        return f"{a[0]}.to({'tl.float16' if op == 'round_f16' else 'tl.bfloat16'}).to(tl.float32)"
    if op == "neg":
        return f"(-{a[0]})"
    if op == "not":
        return f"(~{a[0]})"
    if op == "where":
        return f"tl.where({a[0]}, {a[1]}, {a[2]})"
    if op in ("max", "min"):          # NaN-propagating, as torch.maximum/minimum
        c = ">" if op == "max" else "<"
        nan = f" | ({a[0]} != {a[0]})" if f32 else ""
        return f"tl.where(({a[0]} {c} {a[1]}){nan}, {a[0]}, {a[1]})"
    if op == "div":
        return f"tl.div_rn({a[0]}, {a[1]})" if f32 else f"({a[0]} // {a[1]})"
    if op in _INFIX:
        return f"({a[0]} {_INFIX[op]} {a[1]})"
    if op == "abs":
        return f"tl.abs({a[0]})"
    if op == "pow":
        return _pow(a, attr_lit)
    fn = _FLOAT_FN.get(op)
    if fn is None:
        raise NotFusable(f"primitive {op!r} has no Triton rendering (the interpreter lacks libdevice)")
    return fn.format(*a)


# Float functions from tl.math only (libdevice is not available in the interpreter); the others as
# formulas accurate to a few ulp in fp32.
_FLOAT_FN = {
    "exp": "tl.exp({0})", "log": "tl.log({0})", "sqrt": "tl.sqrt_rn({0})", "sin": "tl.sin({0})",
    "cos": "tl.cos({0})", "erf": "tl.erf({0})", "floor": "tl.floor({0})", "ceil": "tl.ceil({0})",
    "log2": "tl.log2({0})", "log10": "(tl.log({0}) * 0.4342944819032518)",
    # 0.5 + 0.5 erf rather than 0.5 (1 + erf): the same bits (0.5 e is exact), one FMA fewer (GELU on a GPU
    # is bound by its arithmetic: 1.03x faster on an H200)
    "phi": "(0.5 + 0.5 * tl.erf({0} * 0.7071067811865476))",
    "erfc": "(1.0 - tl.erf({0}))",
    "tanh": "_tanh({0})", "expm1": "_expm1({0})", "log1p": "_log1p({0})",
    "sinh": "(0.5 * (tl.exp({0}) - tl.exp(-{0})))", "cosh": "(0.5 * (tl.exp({0}) + tl.exp(-{0})))",
    "tan": "tl.div_rn(tl.sin({0}), tl.cos({0}))",
    "trunc": "tl.where({0} < 0, tl.ceil({0}), tl.floor({0}))",
    "round": "_rint({0})",
}

# Helpers the formulas call, written into every generated module.
HELPERS = '''
@triton.jit
def _tanh(x):
    # |x| < 0.3: odd Taylor series to x^11 (next term < 1e-9 relative); else 1 - 2 / (exp(2|x|) + 1)
    ax = tl.abs(x)
    x2 = x * x
    p = x * (1.0 + x2 * (-0.3333333333333333 + x2 * (0.13333333333333333 + x2 * (-0.05396825396825397
             + x2 * (0.021869488536155203 + x2 * -0.008863235529902197)))))
    t = 1.0 - tl.div_rn(2.0, tl.exp(2.0 * ax) + 1.0)
    return tl.where(ax < 0.3, p, tl.where(x < 0, -t, t))


@triton.jit
def _expm1(x):
    # |x| < 1e-2: Taylor to x^5; else exp(x) - 1
    p = x * (1.0 + x * (0.5 + x * (0.16666666666666666 + x * (0.041666666666666664 + x * 0.008333333333333333))))
    return tl.where(tl.abs(x) < 1e-2, p, tl.exp(x) - 1.0)


@triton.jit
def _log1p(x):
    # log(u) - ((u - 1) - x) / u with u = 1 + x: the rounding of u corrected (Goldberg)
    u = 1.0 + x
    d = u - 1.0
    r = tl.log(u) - tl.div_rn(d - x, u)
    return tl.where(d == 0, x, tl.where(u == float("inf"), u, r))


@triton.jit
def _rint(x):
    # round half to even; |x| >= 2^23 is an integer already
    r = tl.floor(x + 0.5)
    r = tl.where((r - x == 0.5) & (r - 2.0 * tl.floor(r * 0.5) != 0), r - 1.0, r)
    return tl.where(tl.abs(x) >= 8388608.0, x, r)
'''


def _pow(a, e):
    """x ** e for a literal exponent e (the lowering expands 1, 2, 3, 0.5, -1, -0.5 itself)."""
    if e is None:
        raise NotFusable("pow with a non-literal exponent has no Triton rendering")
    e = float(e)
    if e == 0:
        return f"tl.where({a[0]} == {a[0]}, 1.0, 1.0)"
    mag = f"tl.exp2({e!r} * tl.log2(tl.abs({a[0]})))"
    if e.is_integer():     # a negative base to an integer power: the sign by the parity
        return f"tl.where({a[0]} < 0, -{mag}, {mag})" if int(e) % 2 else mag
    return f"tl.where({a[0]} < 0, float('nan'), {mag})"


class _Render:
    def __init__(self, k: FusedKernel, max_block: int, tile: int, flat_block: int):
        self.k = k
        self.tile, self.flat_block = tile, flat_block
        self.n_in = len(k.inputs)
        self.args = k.inputs + k.outputs
        self.lines: list[str] = []
        self.max_block = max_block
        span = [sum((n - 1) * abs(s) for n, s in zip(k.shape, st)) + 1 for st in k.strides]
        self.big = max(span + [math.prod(k.shape)]) >= 2 ** 31
        for v in k.values:
            if v.op in REDUCTIONS and v.dtype == "bool":
                raise NotFusable("a reduction of bool values has no Triton rendering")

    def out(self, line: str, depth: int):
        self.lines.append("    " * depth + line)

    def load(self, a: int, offset: str, mask: str) -> str:
        dt = self.args[a].dtype
        text = f"tl.load(a{a} + {offset}, mask={mask}, other=0)" if mask else f"tl.load(a{a} + {offset})"
        if dt in _HALF:
            return f"{text}.to(tl.float32)"
        if dt == torch.bool:
            return f"({text} != 0)"
        return text

    def store(self, a: int, offset: str, value: str, mask: str | None, depth: int):
        m = f", mask={mask}" if mask else ""
        self.out(f"tl.store(a{a} + {offset}, ({value}).to(a{a}.dtype.element_ty){m})", depth)

    # one value, emitted on demand; `local` holds what this scope has computed already
    def ref(self, i: int, local: dict, depth: int, ctx) -> str:
        if i in local:
            return local[i]
        k = self.k
        v = k.values[i]
        if v.op == "lit":
            return f"c{i}"
        if v.op == "load":
            rhs = ctx.load(v.attr, k.varies[i])
        else:
            args = [self.ref(a, local, depth, ctx) for a in v.args]
            e = None
            if v.op == "pow" and k.values[v.args[1]].op == "lit":
                e = k.values[v.args[1]].attr
            rhs = expr(v.op, args, v.dtype, k.values[v.args[0]].dtype, e)
        self.out(f"v{i} = {rhs}", depth)
        local[i] = f"v{i}"
        return f"v{i}"

    def render(self, name: str = "kf_kernel") -> str:
        k = self.k
        params = ", ".join(f"a{a}" for a in range(len(self.args)))
        self.lines = [f"@triton.jit\ndef {name}({params}):"]
        for i in k.live:
            v = k.values[i]
            if v.op == "lit":
                self.out(f"c{i} = {literal(v.attr, v.dtype)}", 1)
        if k.passes == 1:
            self.flat()
        else:
            self.rows()
        return "\n".join(self.lines) + "\n"

    # -- flat ------------------------------------------------------------------------------------------
    def flat(self):
        """No reductions: one 1-D grid over every point of the loop shape (any rank); each argument's
        offset is worked out from the flat index (divisions by constants, dims merged where the
        argument's strides allow). On an H200 this ran a broadcast-bias GELU [8192, 11008] 1.14x
        faster than the row kernel's loop over column blocks."""
        k = self.k
        n = math.prod(k.shape)
        B = min(self.flat_block, pow2(n))
        self.block = B
        pid = "tl.program_id(0).to(tl.int64)" if self.big else "tl.program_id(0)"
        self.out(f"offs = {pid} * {B} + tl.arange(0, {B})", 1)
        self.out(f"m = offs < {n}", 1)
        index: dict = {}
        offsets = [self.flat_offset(a, index) for a in range(len(self.args))]
        inv: dict = {}
        render = self

        class Ctx:
            @staticmethod
            def load(a, varies):
                return render.load(a, offsets[a], "m") if offsets[a] != "0" else render.load(a, "0", None)
        row: dict = {}
        for i in k.live:
            if self.invariant(i, inv):
                self.ref(i, row, 1, Ctx)
        local = dict(row)
        once = []
        for o, v in enumerate(k.out_values):
            a = self.n_in + o
            if offsets[a] == "0":
                once.append((a, v))
                continue
            val = self.ref(v, local, 1, Ctx)
            if self.invariant(v, inv):
                val = f"tl.broadcast_to({val}, [{B}])"
            self.store(a, offsets[a], val, "m", 1)
        if once:
            self.out("if tl.program_id(0) == 0:", 1)
            for a, v in once:
                self.store(a, "0", self.ref(v, row, 1, Ctx), None, 2)

    def invariant(self, i: int, memo: dict) -> bool:
        """Whether value i is the same at every point (it reads no argument that varies)."""
        if i not in memo:
            v = self.k.values[i]
            if v.op == "load":
                memo[i] = not any(self.k.strides[v.attr])
            else:
                memo[i] = all(self.invariant(a, memo) for a in v.args)
        return memo[i]

    def flat_offset(self, a: int, index: dict) -> str:
        """Argument a's element offset at flat index `offs`: "0" where it is one value. Consecutive dims
        whose strides nest (outer stride = inner stride x inner size) are one dim; each remaining dim's
        index is (offs // inner) % size, emitted once per kernel (`index` names those already made)."""
        merged: list[list[int]] = []
        for n, s in zip(self.k.shape, self.k.strides[a]):
            if n == 1:
                continue
            if merged and merged[-1][1] == s * n:
                merged[-1] = [merged[-1][0] * n, s]
            else:
                merged.append([n, s])
        terms, inner = [], 1
        for j in reversed(range(len(merged))):
            n, s = merged[j]
            if s:
                e = "offs" if inner == 1 else f"(offs // {inner})"
                if j:
                    e = f"({e} % {n})"
                if e != "offs":
                    if e not in index:
                        index[e] = f"x{len(index)}"
                        self.out(f"{index[e]} = {e}", 1)
                    e = index[e]
                terms.append(e if s == 1 else f"{e} * {s}")
            inner *= n
        return " + ".join(reversed(terms)) or "0"

    def grid(self) -> tuple[int, ...]:
        k = self.k
        if k.passes == 1:
            return (math.ceil(math.prod(k.shape) / self.block),)
        return (math.ceil(math.prod(k.shape[:-1]) / self.rb),)

    def num_warps(self) -> int:
        n = self.block if self.k.passes == 1 else self.rb * self.bn
        return 2 if n <= 256 else 4 if n <= 2048 else 8

    # -- rows ------------------------------------------------------------------------------------------
    def rows(self):
        k = self.k
        N = k.shape[-1]
        lead = k.shape[:-1]
        R = math.prod(lead)
        single = N <= self.max_block
        BN = pow2(N) if single else min(LOOP_BLOCK, pow2(self.max_block))
        RB = max(1, min(pow2(R), self.tile // BN))
        self.bn, self.rb = BN, RB
        pid = "tl.program_id(0).to(tl.int64)" if self.big else "tl.program_id(0)"
        self.out(f"rows = {pid} * {RB} + tl.arange(0, {RB})[:, None]", 1)
        self.out(f"rm = rows < {R}", 1)
        self.out(f"cols = tl.arange(0, {BN})[None, :]", 1)
        if len(lead) > 1:
            self.out("q = rows", 1)
            for j in reversed(range(1, len(lead))):
                self.out(f"i{j} = q % {lead[j]}", 1)
                self.out(f"q = q // {lead[j]}", 1)
            self.out("i0 = q", 1)
        idx = ["rows"] if len(lead) == 1 else [f"i{j}" for j in range(len(lead))]
        for a, st in enumerate(k.strides):
            if all(st[j] == st[j + 1] * lead[j + 1] for j in range(len(lead) - 1)):
                off = f"rows * {st[-2]}" if st[-2] else "rows * 0"   # walks the rows contiguously
            else:
                off = " + ".join(f"{x} * {s}" for s, x in zip(st[:-1], idx) if s) or "rows * 0"
            self.out(f"o{a} = {off}", 1)
        render = self
        col = "cols" if single else "j"

        class Ctx:
            @staticmethod
            def load(a, varies):
                if varies:
                    return render.load(a, f"o{a} + {col}", "m")
                return render.load(a, f"o{a}", "rm")
        row: dict = {}
        if single:
            self.out(f"m = rm & (cols < {N})", 1)
        row_out = [(o, v) for o, v in enumerate(k.out_values) if k.strides[self.n_in + o][-1] == 0]
        scope = row if single else None
        for p in range(k.passes):
            for i in k.live:
                if not k.varies[i] and k.phase[i] == p and k.values[i].op not in REDUCTIONS:
                    self.ref(i, row, 1, Ctx)
            for o, v in row_out:
                if k.phase[v] == p:
                    val = f"tl.broadcast_to({self.ref(v, row, 1, Ctx)}, [{RB}, 1])"
                    self.store(self.n_in + o, f"o{self.n_in + o}", val, "rm", 1)
            self.one_pass(p, row, scope, N, row_out, Ctx, single)

    def one_pass(self, p, row, scope, N, row_out, Ctx, single):
        k = self.k
        RB, BN = self.rb, self.bn
        reds = [i for i in k.live if k.values[i].op in REDUCTIONS and k.phase[i] == p + 1]
        outs = [(o, v) for o, v in enumerate(k.out_values)
                if k.phase[v] == p and (o, v) not in row_out]
        if not (reds or outs):
            return
        if single:
            local, d = scope, 1
        else:
            for i in reds:
                v = k.values[i]
                self.out(f"acc{i} = tl.full([{RB}, {BN}], {_IDENT[v.op, v.dtype]}, {_TL[v.dtype]})", 1)
                if v.dtype == "f32" and v.op != "rsum":
                    self.out(f"nan{i} = tl.zeros([{RB}, {BN}], tl.int32)", 1)
            self.out(f"for j0 in range(0, {N}, {BN}):", 1)
            self.out("j = j0 + cols", 2)
            self.out(f"m = rm & (j < {N})", 2)
            local, d = dict(row), 2
        col = "cols" if single else "j"
        for o, v in outs:
            a = self.n_in + o
            val = self.ref(v, local, d, Ctx)
            if not k.varies[v]:
                val = f"tl.broadcast_to({val}, [{RB}, {BN}])"
            self.store(a, f"o{a} + {col}", val, "m", d)
        for i in reds:
            v = k.values[i]
            x = self.ref(v.args[0], local, d, Ctx)
            ident = _IDENT[v.op, v.dtype]
            masked = f"tl.where(m, {x}, {ident})"
            nan = v.dtype == "f32" and v.op != "rsum"
            red = {"rsum": "tl.sum", "rmax": "tl.max", "rmin": "tl.min"}[v.op]
            if single:
                self.out(f"v{i} = {red}({masked}, axis=1, keep_dims=True)", d)
                if nan:
                    self.out(f"n{i} = tl.max(tl.where(m & ({x} != {x}), 1, 0), axis=1, keep_dims=True)", d)
                    self.out(f"v{i} = tl.where(n{i} > 0, float('nan'), v{i})", d)
            else:
                if v.op == "rsum":
                    self.out(f"acc{i} = acc{i} + {masked}", d)
                else:
                    c = ">" if v.op == "rmax" else "<"
                    self.out(f"t{i} = {masked}", d)
                    self.out(f"acc{i} = tl.where(t{i} {c} acc{i}, t{i}, acc{i})", d)
                    if nan:
                        self.out(f"nan{i} = nan{i} | tl.where(m & ({x} != {x}), 1, 0)", d)
        if not single:
            for i in reds:
                v = k.values[i]
                red = {"rsum": "tl.sum", "rmax": "tl.max", "rmin": "tl.min"}[v.op]
                self.out(f"v{i} = {red}(acc{i}, axis=1, keep_dims=True)", 1)
                if v.dtype == "f32" and v.op != "rsum":
                    self.out(f"v{i} = tl.where(tl.max(nan{i}, axis=1, keep_dims=True) > 0, float('nan'), v{i})", 1)
        for i in reds:
            row[i] = f"v{i}"
            if scope is not None:
                scope[i] = f"v{i}"


_IDENT = {("rsum", "f32"): "0.0", ("rsum", "i64"): "0",
          ("rmax", "f32"): "float('-inf')", ("rmax", "i64"): "-9223372036854775807",
          ("rmin", "f32"): "float('inf')", ("rmin", "i64"): "9223372036854775807"}


class Rendered:
    """A kernel's source and how to launch it: grid and num_warps."""

    def __init__(self, source: str, grid: tuple, num_warps: int):
        self.source, self.grid, self.num_warps = source, grid, num_warps


def render(k: FusedKernel, max_block: int = MAX_BLOCK, tile: int = TILE, flat_block: int = FLAT_BLOCK,
           warps: int | None = None) -> Rendered:
    """The Triton source of `k` (the same kernel IR always renders to the same text: the cache key).
    max_block: the longest row held in registers; tile: elements per program of a row kernel;
    flat_block: elements per program of a flat kernel; warps: num_warps (None: by the block's size)."""
    r = _Render(k, max_block, tile, flat_block)
    body = r.render()
    source = "import triton\nimport triton.language as tl\n\n" + HELPERS + "\n\n" + body
    return Rendered(source, r.grid(), warps or r.num_warps())
