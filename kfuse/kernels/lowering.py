"""Lowering a fused group of graph nodes into one `FusedKernel` (`lower`).

Composite graph ops (softmax, layer_norm, gelu, ...) are expanded here into primitives, so a
backend renders only the small primitive set in `PRIMS`.
"""
from __future__ import annotations

import math

import torch

from ..ir import Kind, Node
from .ir import _WIDE, DTYPES, LIBM_BINARY, LIBM_UNARY, REDUCTIONS, FusedKernel, NotFusable, Value, _f32
from .schedule import _schedule


def lower(nodes: list[Node], outputs: list[Node], layout: dict | None = None, *, half: bool = False,
          round_each: bool = False) -> FusedKernel:
    """The kernel computing `outputs` from the group `nodes` (topological order).
    `layout` maps an input node to the element strides it will be called with (a slice or a view
    read in place); inputs not in it are contiguous. Each input must step by 1 (or 0) along the
    loop's last dim. Raises NotFusable with the reason when the group is not one kernel of this IR.
    `half`: float16/bfloat16 tensors are f32 values of the IR (a backend that says so loads them
    converted to f32 and rounds at the store: the Triton backend; the C backend does not).
    `round_each` (with half): every float16/bfloat16 node's value is rounded to its dtype where it is
    computed (a "round_f16"/"round_bf16" primitive), as eager rounds each op's result."""
    return _Lowering(list(nodes), list(outputs), dict(layout or {}), HALF_DTYPES if half else DTYPES,
                     half and round_each).run()


ROUND = {torch.float16: "round_f16", torch.bfloat16: "round_bf16"}    # f32 -> nearest half value, as f32


# the IR dtypes with float16 and bfloat16 computed as f32 (lower(half=True))
HALF_DTYPES = {**DTYPES, torch.float16: "f32", torch.bfloat16: "f32"}


def _contiguous_strides(shape):
    strides, s = [], 1
    for d in reversed(shape):
        strides.append(s)
        s *= d
    return tuple(reversed(strides))


def _bcast_strides(shape, domain, strides=None):
    """Strides of a tensor of `shape` (contiguous unless `strides` are given) read at the points of
    `domain` (0 = broadcast)."""
    strides = (0,) * (len(domain) - len(shape)) + tuple(strides or _contiguous_strides(shape))
    shape = (1,) * (len(domain) - len(shape)) + tuple(shape)
    return tuple(0 if n == 1 else s for n, s in zip(shape, strides))


def _collapse(shape, strides, keep_last):
    """Drop size-1 dims and merge neighbours that every argument walks contiguously, so that
    e.g. [8,12,128,128] with a [8,1,1,128] mask becomes [8,1536,128], and x + y is one dim."""
    dims = [(n, [s[d] for s in strides]) for d, n in enumerate(shape)]
    last = dims.pop() if keep_last else None
    dims = [d for d in dims if d[0] != 1]
    out = []
    for n, st in dims:
        if out and all(a == b * n for a, b in zip(out[-1][1], st)):
            out[-1] = (out[-1][0] * n, st)
        else:
            out.append((n, st))
    if last is not None:
        out = (out or [(1, [0] * len(strides))]) + [last]   # a row kernel keeps a row dim
    if not out:
        out = [(1, [0] * len(strides))]
    return tuple(n for n, _ in out), [tuple(st[a] for _, st in out) for a in range(len(strides))]


class _Lowering:
    def __init__(self, nodes, outputs, layout, dtypes=DTYPES, round_each=False):
        self.nodes, self.outputs, self.layout = nodes, outputs, layout
        self.dtypes, self.round_each = dtypes, round_each
        self.values: list[Value] = []
        self.memo: dict = {}
        self.env: dict[Node, int] = {}
        self.inputs: list[Node] = []

    # -- building values ------------------------------------------------------------------------
    def emit(self, op, args, dtype, attr=None) -> int:
        key = (op, tuple(args), dtype, repr(attr))
        if key not in self.memo:
            self.values.append(Value(op, tuple(args), dtype, attr))
            self.memo[key] = len(self.values) - 1
        return self.memo[key]

    def lit(self, x, dtype="f32") -> int:
        x = bool(x) if dtype == "bool" else int(x) if dtype == "i64" else _f32(float(x))
        return self.emit("lit", (), dtype, x)

    def cvt(self, v, dtype) -> int:
        val = self.values[v]
        if val.dtype == dtype:
            return v
        if val.op == "lit":
            return self.lit(val.attr, dtype)
        return self.emit("cast", (v,), dtype)

    def f(self, op, *args, dtype=None) -> int:
        """A primitive on values, computing in the first argument's dtype unless told."""
        dt = dtype or self.values[args[0]].dtype
        return self.emit(op, [self.cvt(a, dt) for a in args], dt)

    def cmp(self, op, a, b) -> int:
        dt = self._promote(a, b)
        return self.emit(op, (self.cvt(a, dt), self.cvt(b, dt)), "bool")

    def _promote(self, *vs) -> str:
        dts = {self.values[v].dtype for v in vs}
        return "f32" if "f32" in dts else "i64" if "i64" in dts else "bool"

    # -- reading graph nodes ----------------------------------------------------------------------
    def value_of(self, n: Node) -> int:
        if n in self.env:
            return self.env[n]
        if n.op == "const" and n.numel == 1:          # small constants become literals
            dt = DTYPES.get(n.dtype) or _WIDE.get(n.dtype)
            if dt is None:
                raise NotFusable(f"constant of dtype {n.dtype} is not supported")
            return self.lit(n.value.reshape(()).item(), dt)
        if n.dtype not in self.dtypes:
            raise NotFusable(f"input {n} of dtype {n.dtype} is not supported (f32, i64, bool only)")
        self.inputs.append(n)
        self.env[n] = self.emit("load", (), self.dtypes[n.dtype], len(self.inputs) - 1)
        return self.env[n]

    # -- the group --------------------------------------------------------------------------------
    def run(self) -> FusedKernel:
        group = set(self.nodes)
        if not self.nodes:
            raise NotFusable("empty group")
        for o in self.outputs:
            if o not in group:
                raise NotFusable(f"output {o} is not in the group")
        domain_shapes = []
        for n in self.nodes:
            if n.kind not in (Kind.ELEMENTWISE, Kind.BROADCAST, Kind.REDUCTION):
                raise NotFusable(f"{n}: op {n.op!r} of kind {n.kind.name} is not a row kernel op")
            if n.dtype not in self.dtypes:
                raise NotFusable(f"{n}: dtype {n.dtype} is not supported (f32, i64, bool only)")
            for i in n.inputs:
                if i in group and _drops_last_axis(i):
                    raise NotFusable(f"{i}: a reduction without keepdim feeds {n} in the group "
                                     f"(its shape no longer lines up with the row)")
            if not _drops_last_axis(n):
                domain_shapes.append(n.shape)
            if n.kind == Kind.REDUCTION:
                domain_shapes.append(n.inputs[0].shape)
        try:
            self.domain = tuple(torch.broadcast_shapes(*domain_shapes))
        except RuntimeError as e:
            raise NotFusable(f"group shapes do not broadcast together: {e}") from None
        if len(self.domain) == 0:
            self.domain = (1,)
        self.N = self.domain[-1]

        for n in self.nodes:
            for i in n.inputs:
                if i in group and i not in self.env:
                    raise NotFusable(f"group is not in topological order: {n} uses {i} before it")
            v = self.lower_node(n)
            if self.round_each and n.dtype in ROUND:
                v = self.emit(ROUND[n.dtype], (v,), "f32")
            self.env[n] = v

        out_strides = [self._out_strides(o) for o in self.outputs]
        in_strides = [_bcast_strides(n.shape, self.domain, self.layout.get(n)) for n in self.inputs]
        has_red = any(v.op in REDUCTIONS for v in self.values)
        shape, strides = _collapse(self.domain, in_strides + out_strides, keep_last=has_red)
        for n, st in zip(self.inputs, strides):
            if st[-1] not in (0, 1):
                raise NotFusable(f"input {n} steps by {st[-1]} along the loop's last dim (strides "
                                 f"{list(self.layout.get(n, ()))}): the kernel reads rows contiguously")
        k = FusedKernel(self.nodes, self.inputs, list(self.outputs), shape, strides, self.values,
                        [self.env[o] for o in self.outputs],
                        layout={n: tuple(self.layout[n]) for n in self.inputs if n in self.layout})
        _schedule(k)
        _check_outputs(k)
        return k

    def _out_strides(self, o: Node) -> tuple[int, ...]:
        """Strides of output o over the loop domain, placed by broadcasting as its consumers read it:
        a reduction without keepdim is one value per row (its shape plus a trailing 1), anything
        else aligns with the domain from the right. _check_outputs then refuses the placements a
        kernel cannot write (a value broadcast over rows, or varying along a row it is constant on)."""
        shape = tuple(o.shape) + ((1,) if _drops_last_axis(o) else ())
        if len(shape) > len(self.domain) or any(n not in (1, d) for n, d in zip(reversed(shape), reversed(self.domain))):
            raise NotFusable(f"output {o} of shape {list(o.shape)} does not lie in the loop shape {list(self.domain)}")
        return _bcast_strides(shape, self.domain)

    def lower_node(self, n: Node) -> int:
        a = n.attrs
        xs = [self.value_of(i) for i in n.inputs]
        dt = self.dtypes[n.dtype]
        if n.kind == Kind.REDUCTION:
            self._check_row_axis(n)
        fn = getattr(self, "op_" + n.op, None)
        if fn is not None:
            return fn(n, xs, dt, **a)
        if n.op in ("neg", "abs", "floor", "ceil", "round", "trunc"):
            if dt != "f32" and n.op in ("floor", "ceil", "round", "trunc"):
                return self.cvt(xs[0], dt)
            return self.f(n.op, xs[0], dtype=self._arith(n, dt))
        if n.op in ("exp", "log", "sqrt", "sin", "cos", "tanh", "erf") + LIBM_UNARY:
            return self.f(n.op, xs[0], dtype="f32")
        if n.op in LIBM_BINARY and dt == "f32":     # integer fmod by 0 raises in torch: left to it
            return self.f(n.op, *xs, dtype="f32")
        if n.op in ("add", "sub", "mul", "div", "maximum", "minimum"):
            return self.f({"maximum": "max", "minimum": "min"}.get(n.op, n.op), *xs, dtype=self._arith(n, dt))
        if n.op in ("eq", "ne", "lt", "le", "gt", "ge"):
            return self.cmp(n.op, *xs)
        if n.op in ("logical_and", "logical_or"):
            return self.f(n.op[8:], *xs, dtype="bool")
        raise NotFusable(f"{n}: op {n.op!r} has no kernel lowering")

    def _arith(self, n, dt):
        if dt == "bool":
            raise NotFusable(f"{n}: arithmetic on bool is not supported")
        return dt

    def _check_row_axis(self, n):
        nd = len(n.inputs[0].shape)
        ax = n.attrs.get("axes", n.attrs.get("axis", -1))
        if n.op in ("layer_norm",):
            ax = -1 if n.attrs.get("ndim", 1) == 1 else None
        if n.op == "rms_norm":
            ax = -1
        if isinstance(ax, (list, tuple)):
            ax = ax[0] if len(ax) == 1 else None
        if ax is None or nd == 0 or ax not in (-1, nd - 1):
            raise NotFusable(f"{n}: reduces over {n.attrs}, not over the last axis alone")
        if n.inputs[0].shape[-1] != self.N:
            raise NotFusable(f"{n}: reduces a row of {n.inputs[0].shape[-1]}, the loop row is {self.N}")

    # -- composite ops, expanded into primitives --------------------------------------------------
    def op_rsqrt(self, n, xs, dt):
        return self.f("div", self.lit(1.0), self.f("sqrt", xs[0], dtype="f32"))

    def op_reciprocal(self, n, xs, dt):
        return self.f("div", self.lit(1.0), xs[0], dtype="f32")

    def op_sigmoid(self, n, xs, dt):
        x = self.cvt(xs[0], "f32")
        return self.f("div", self.lit(1.0), self.f("add", self.lit(1.0), self.f("exp", self.f("neg", x))))

    def op_silu(self, n, xs, dt):
        x = self.cvt(xs[0], "f32")   # torch: x / (1 + exp(-x))
        return self.f("div", x, self.f("add", self.lit(1.0), self.f("exp", self.f("neg", x))))

    def op_elu(self, n, xs, dt, alpha=1.0, scale=1.0, input_scale=1.0):
        x = self.cvt(xs[0], "f32")   # torch: x <= 0 ? expm1(x * input_scale) * (alpha * scale) : x * scale
        neg = self.f("mul", self.f("expm1", self.f("mul", x, self.lit(input_scale))), self.lit(alpha * scale))
        return self.emit("where", (self.cmp("le", x, self.lit(0.0)), neg, self.f("mul", x, self.lit(scale))), "f32")

    def op_relu(self, n, xs, dt):
        x = xs[0]                     # NaN < 0 is false: NaN passes through, as in torch
        return self.emit("where", (self.cmp("lt", x, self.lit(0, dt)), self.lit(0, dt), x), dt)

    def op_gelu(self, n, xs, dt, approximate="none"):
        x = self.cvt(xs[0], "f32")
        if approximate == "tanh":     # 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))
            inner = self.f("mul", self.lit(math.sqrt(2 / math.pi)),
                           self.f("add", x, self.f("mul", self.lit(0.044715), self.f("mul", self.f("mul", x, x), x))))
            t = self.f("tanh", inner)
            return self.f("mul", self.f("mul", x, self.lit(0.5)), self.f("add", self.lit(1.0), t))
        # x Phi(x), Phi(x) = 0.5 (1 + erf(x / sqrt 2)) the normal CDF: a primitive of its own, so a
        # backend can fold the 1/sqrt(2) into its erf (torch's order, x * 0.5 * (1 + erf(..)), differs
        # by a rounding)
        return self.f("mul", x, self.f("phi", x, dtype="f32"))

    def op_logical_not(self, n, xs, dt):
        return self.f("not", self.cvt(xs[0], "bool"))

    def op_cast(self, n, xs, dt, dtype):
        return self.cvt(xs[0], dt)

    def op_copy(self, n, xs, dt):
        return xs[0]

    def op_isnan(self, n, xs, dt):
        x = xs[0]
        return self.cmp("ne", x, x) if self.values[x].dtype == "f32" else self.lit(False, "bool")

    def op_sign(self, n, xs, dt):
        x = xs[0]                     # (x > 0) - (x < 0): 0 for NaN, as torch.sign
        return self.f("sub", self.cvt(self.cmp("gt", x, self.lit(0, dt)), dt), self.cvt(self.cmp("lt", x, self.lit(0, dt)), dt))

    def op_clamp(self, n, xs, dt, min=None, max=None):
        x = self.cvt(xs[0], dt)
        if min is not None:
            x = self.emit("where", (self.cmp("lt", x, self.lit(min, dt)), self.lit(min, dt), x), dt)
        if max is not None:
            x = self.emit("where", (self.cmp("gt", x, self.lit(max, dt)), self.lit(max, dt), x), dt)
        return x

    def op_leaky_relu(self, n, xs, dt, alpha):
        x = self.cvt(xs[0], "f32")
        return self.emit("where", (self.cmp("gt", x, self.lit(0.0)), x, self.f("mul", x, self.lit(alpha))), "f32")

    def op_hardsigmoid(self, n, xs, dt):
        x = self.cvt(xs[0], "f32")    # torch: min(max(x + 3, 0), 6) / 6; NaN passes through both compares
        return self.f("div", self.op_clamp(n, [self.f("add", x, self.lit(3.0))], "f32", 0.0, 6.0), self.lit(6.0))

    def op_hardswish(self, n, xs, dt):
        x = self.cvt(xs[0], "f32")    # torch: x * min(max(x + 3, 0), 6) / 6, in that order
        gate = self.op_clamp(n, [self.f("add", x, self.lit(3.0))], "f32", 0.0, 6.0)
        return self.f("div", self.f("mul", x, gate), self.lit(6.0))

    def op_softplus(self, n, xs, dt, beta=1.0, threshold=20.0):
        x = self.cvt(xs[0], "f32")    # torch: x*beta > threshold ? x : log1p(exp(x*beta)) / beta
        xb = self.f("mul", x, self.lit(beta))
        soft = self.f("div", self.f("log1p", self.f("exp", xb)), self.lit(beta))
        return self.emit("where", (self.cmp("gt", xb, self.lit(threshold)), x, soft), "f32")

    def op_pow(self, n, xs, dt):
        if dt != "f32":
            raise NotFusable(f"{n}: integer pow is not supported")
        x, e = self.cvt(xs[0], "f32"), self.values[xs[1]]
        if e.op == "lit":             # the exponents torch itself special-cases, computed as it does
            special = {1.0: lambda: x, 2.0: lambda: self.f("mul", x, x),
                       3.0: lambda: self.f("mul", self.f("mul", x, x), x),
                       0.5: lambda: self.f("sqrt", x), -1.0: lambda: self.f("div", self.lit(1.0), x),
                       -0.5: lambda: self.f("div", self.lit(1.0), self.f("sqrt", x))}
            if float(e.attr) in special:
                return special[float(e.attr)]()
        return self.f("pow", x, xs[1], dtype="f32")

    def op_where(self, n, xs, dt):
        return self.emit("where", (self.cvt(xs[0], "bool"), self.cvt(xs[1], dt), self.cvt(xs[2], dt)), dt)

    # reductions along the row; the result is one value per row (keepdim or not)
    def op_reduce_sum(self, n, xs, dt, axes, keepdim=False):
        return self.emit("rsum", (self.cvt(xs[0], dt),), dt)

    def op_reduce_mean(self, n, xs, dt, axes, keepdim=False):
        return self.f("div", self.emit("rsum", (self.cvt(xs[0], dt),), dt), self.lit(self.N))

    def op_reduce_max(self, n, xs, dt, axes, keepdim=False):
        return self.emit("rmax", (xs[0],), dt)

    def op_reduce_min(self, n, xs, dt, axes, keepdim=False):
        return self.emit("rmin", (xs[0],), dt)

    def op_reduce_var(self, n, xs, dt, axes, correction=1, keepdim=False):
        _, ss = self._moments(self.cvt(xs[0], "f32"))
        return self.f("div", ss, self.lit(self.N - correction))

    def _moments(self, x):
        """The row's mean and centred sum of squares, by the corrected two-pass algorithm (Chan,
        Golub & LeVeque): m = sum(x) / N, d = x - m, c = sum(d) / N (the error of m), then
        mean = m + c and sum((x - mean)^2) = sum(d^2) - c sum(d), clamped at 0. Two passes over
        the row, the second from L1. A row of N equal values gets its mean exactly (d = x - m and
        sum(d) = N d are exact, so m + c = x) and x - mean = 0, so layer_norm returns its bias
        exactly, as torch's Welford moments do; plain sum / N is off by an ulp that rstd, up to
        1/sqrt(eps), amplifies (tests/unit/test_fuzz.py::test_layer_norm_of_a_constant_row)."""
        N = self.lit(self.N)
        m = self.f("div", self.emit("rsum", (x,), "f32"), N)
        d = self.f("sub", x, m)
        s = self.emit("rsum", (d,), "f32")
        c = self.f("div", s, N)
        ss = self.f("sub", self.emit("rsum", (self.f("mul", d, d),), "f32"), self.f("mul", c, s))
        return self.f("sub", d, c), self.f("max", ss, self.lit(0.0))

    def op_softmax(self, n, xs, dt, axis):
        x = self.cvt(xs[0], "f32")    # exp(x - max) * (1 / sum), as ATen's vectorised softmax: one
        e = self.f("exp", self.f("sub", x, self.emit("rmax", (x,), "f32")))   # division per row, not
        return self.f("mul", e, self.f("div", self.lit(1.0), self.emit("rsum", (e,), "f32")))  # per element;
        # a fully -inf row gives NaN (max -inf, -inf - -inf), as in torch

    def op_log_softmax(self, n, xs, dt, axis):
        x = self.cvt(xs[0], "f32")
        s = self.f("sub", x, self.emit("rmax", (x,), "f32"))
        return self.f("sub", s, self.f("log", self.emit("rsum", (self.f("exp", s),), "f32")))

    def op_layer_norm(self, n, xs, dt, eps, ndim=1):
        d, ss = self._moments(self.cvt(xs[0], "f32"))
        var = self.f("div", ss, self.lit(self.N))
        rstd = self.f("div", self.lit(1.0), self.f("sqrt", self.f("add", var, self.lit(eps))))
        y = self.f("mul", d, rstd)
        if len(xs) > 1:
            y = self.f("mul", y, xs[1])
        if len(xs) > 2:
            y = self.f("add", y, xs[2])
        return y

    def op_rms_norm(self, n, xs, dt, eps):
        x = self.cvt(xs[0], "f32")    # x * rsqrt(mean(x^2) + eps) * w
        ms = self.f("div", self.emit("rsum", (self.f("mul", x, x),), "f32"), self.lit(self.N))
        r = self.f("div", self.lit(1.0), self.f("sqrt", self.f("add", ms, self.lit(eps))))
        return self.f("mul", self.f("mul", x, r), xs[1])


def _drops_last_axis(n: Node) -> bool:
    return n.op.startswith("reduce_") and not n.attrs.get("keepdim", False)


def _check_outputs(k: FusedKernel):
    """Refuse outputs smaller than the loop that the kernel cannot write once per element.

    An output with stride 0 along a loop dim holds one value for all points along it. Along the
    row (the last dim) that is a per-row output, written once per row: its value must not vary
    along the row (a softmax of shape [N] in an [R, N] loop does). In a flat kernel it is written
    once, so it must be loop-invariant. Across rows, every row would write it again: refused."""
    for o, v, st in zip(k.outputs, k.out_values, k.strides[len(k.inputs):]):
        if k.varies[v] and st[-1] == 0 and k.shape[-1] > 1:
            raise NotFusable(f"output {o} of shape {list(o.shape)} is one value per "
                             f"{'row' if not k.flat else 'kernel'} but varies along the loop's last dim")
        if not k.flat and any(s == 0 and n > 1 for s, n in zip(st[:-1], k.shape[:-1])):
            raise NotFusable(f"output {o} of shape {list(o.shape)} is broadcast across the rows of the "
                             f"loop {list(k.shape)}: each row would write it again")
