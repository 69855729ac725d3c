"""The random graph generator of the differential fuzzer (kfuse.testing.fuzz).

    case = random_graph(seed)        # a Case: graph, fuzzed options, whether inputs carry NaN/Inf
    inputs = case.inputs(seed)       # random inputs for it (make_inputs)

It builds random DAGs of 3-25 ops over the whole IR vocabulary that makes sense on float32
(elementwise, broadcast, reductions, norms, injective views, contractions), with odd and size-1
dims, lower-rank broadcast operands, 0-d constants and several outputs. It keeps values in sane
ranges by guarding domains (log of |x| + eps, pow of a positive base, ...) and by rescaling a value
whose magnitude bound grows large, and it only applies discontinuous ops (floor, sign, comparisons,
casts to integers) to values that every backend computes bit for bit the same ("exact" values:
inputs, constants, and what exact ops make of them), so a rounding difference of one ulp can never
flip a comparison and look like a bug.
"""
from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch

from ..ir import Graph, Node

F32, I64, BOOL = torch.float32, torch.int64, torch.bool
MAX_NUMEL = 4096

DIMS = (1, 1, 2, 3, 4, 5, 7, 8, 13, 16, 33)
# a bounded family of base shapes, so that repeated shapes reuse compiled kernels from the cache
BASE_SHAPES = ((7,), (33,), (3, 7), (4, 13), (1, 16), (13, 1), (2, 3, 8), (5, 1, 7), (3, 4, 33),
               (2, 3, 4, 5), (1, 2, 1, 13), (16, 33), (), (2, 7, 16))

OPTIONS = ({}, {}, {}, {"patterns": False}, {"max_group": 2}, {"disable": ["add"]}, {"horizontal": False},
           {"disable": ["mul", "exp"]}, {"max_group": 3, "horizontal": False})

# ops that every backend computes bit for bit (no rounding, or one correctly rounded step that a
# compiler cannot contract with a neighbour): their results may feed discontinuous ops
EXACT_UNARY = ("neg", "abs", "relu", "floor", "ceil", "sign")


@dataclass
class Value:
    node: Node
    bound: float        # an estimate of max |value| (for float), used to keep values finite
    exact: bool         # computed bit for bit the same by every backend


@dataclass
class Case:
    seed: int
    graph: Graph
    options: dict
    nonfinite: bool = False            # inputs carry NaN and Inf

    def inputs(self, seed: int | None = None) -> list[torch.Tensor]:
        return make_inputs(self.graph, self.seed if seed is None else seed, self.nonfinite)


def make_inputs(graph: Graph, seed: int, nonfinite: bool = False) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for n in graph.inputs:
        if n.dtype == F32:
            t = torch.randn(n.shape, generator=gen)
            if nonfinite and t.numel():
                mask = torch.rand(n.shape, generator=gen)
                t = torch.where(mask < 0.05, torch.tensor(float("nan")), t)
                t = torch.where((mask >= 0.05) & (mask < 0.08), torch.tensor(float("inf")), t)
                t = torch.where((mask >= 0.08) & (mask < 0.11), torch.tensor(float("-inf")), t)
        elif n.dtype == BOOL:
            t = torch.rand(n.shape, generator=gen) < 0.5
        else:
            t = torch.randint(-5, 6, n.shape, generator=gen, dtype=n.dtype)
        out.append(t)
    return out


# -- the generator ------------------------------------------------------------------------------------

class Generator:
    def __init__(self, seed: int, *, nonfinite: bool = False):
        self.rng = random.Random(seed)
        self.g = Graph()
        self.vals: list[Value] = []
        self.nonfinite = nonfinite
        self.base = self.rng.choice(BASE_SHAPES)

    # -- helpers -----------------------------------------------------------------------------------
    def r(self):
        return self.rng.random()

    def add(self, op, *args, bound=1.0, exact=False, **attrs) -> Value:
        n = self.g.add(op, *[a.node for a in args], **attrs)
        v = Value(n, bound, exact)
        self.vals.append(v)
        return v

    def gelu(self, x: Value, bound: float, approximate: str = "none") -> Value:
        """gelu of x; with non-finite inputs x is clamped first, as torch's own gelu(inf) is NaN on its
        vector path and inf on its scalar one (seed 901960: a GEMM epilogue's gelu met an inf)."""
        if self.nonfinite and approximate == "none":
            x = self.add("clamp", x, bound=bound, min=-1e4, max=1e4)
        return self.add("gelu", x, bound=bound, approximate=approximate)

    def const(self, value, dtype=None, bound=None) -> Value:
        t = torch.as_tensor(value, dtype=dtype)
        n = self.g.const(t)
        b = float(t.abs().max()) if t.numel() and t.dtype.is_floating_point else 1.0
        return Value(n, b if bound is None else bound, True)

    def rand_const(self, shape, lo=-1.0, hi=1.0) -> Value:
        t = torch.empty(shape).uniform_(lo, hi, generator=torch.Generator().manual_seed(self.rng.getrandbits(31)))
        return self.const(t)

    def new_input(self, shape, dtype=F32) -> Value:
        n = self.g.input(shape, dtype)
        v = Value(n, 5.0, True)
        self.vals.append(v)
        return v

    def pick(self, dtype=F32, exact=None, pred=None) -> Value | None:
        cands = [v for v in self.vals if v.node.dtype == dtype and (exact is None or v.exact == exact)
                 and (pred is None or pred(v))]
        if not cands:
            return None
        if self.r() < 0.6:        # favour recent values: deep chains fuse more
            cands = cands[-3:]
        return self.rng.choice(cands)

    def tame(self, v: Value, limit=50.0) -> Value:
        """v rescaled by a constant when its magnitude bound is above `limit`."""
        if v.bound <= limit or v.node.dtype != F32:
            return v
        s = 2.0 ** -math.ceil(math.log2(v.bound / limit))   # a power of two: exact
        return self.add("mul", v, self.const(s), bound=v.bound * s, exact=v.exact)

    def bcast_shape(self, shape) -> tuple:
        """A shape that broadcasts against `shape` (lower rank, size-1 dims), or the shape itself."""
        shape = tuple(shape)
        c = self.r()
        if c < 0.35 or not shape:
            return shape if self.r() < 0.8 or not shape else ()
        if c < 0.6:
            return shape[self.rng.randrange(len(shape) + 1):]
        return tuple(1 if self.r() < 0.5 else d for d in shape)

    def operand_like(self, a: Value, dtype=F32) -> Value:
        """A second operand for a binary op with a: another value, a constant or a new input."""
        shape = a.node.shape
        c = self.r()
        if c < 0.45:
            other = self.pick(dtype, pred=lambda v: v is not a and _broadcasts(v.node.shape, shape))
            if other is not None:
                return other
        s = self.bcast_shape(shape)
        if c < 0.75 or dtype != F32:
            if dtype == F32:
                if not s or self.r() < 0.3:
                    return self.const(round(self.rng.uniform(-2, 2), 3))     # a 0-d / scalar constant
                return self.rand_const(s)
            if dtype == BOOL:
                return self.const(torch.rand(s, generator=torch.Generator().manual_seed(self.rng.getrandbits(31))) < 0.5)
            return self.const(torch.randint(-3, 4, s, generator=torch.Generator().manual_seed(self.rng.getrandbits(31))))
        return self.new_input(s)

    # -- op families ---------------------------------------------------------------------------------
    def unary(self):
        x = self.pick()
        if x is None:
            return
        b = x.bound
        op = self.rng.choice(["neg", "abs", "exp", "log", "sqrt", "rsqrt", "reciprocal", "sin", "cos", "tanh",
                              "sigmoid", "erf", "relu", "gelu", "gelu_tanh", "silu", "floor", "ceil", "clamp",
                              "leaky_relu", "softplus", "log1p", "expm1", "sign", "cast", "isnan"])
        if op in ("neg", "abs", "relu"):
            self.add(op, x, bound=b, exact=x.exact)
        elif op in ("floor", "ceil", "sign"):
            if not x.exact and not self.nonfinite:
                return self.unary()
            if not x.exact:
                return
            self.add(op, x, bound=b + 1, exact=True)
        elif op in ("exp", "expm1"):
            x = self.tame(x, 8.0)
            self.add(op, x, bound=math.exp(min(x.bound, 80)) + 1)
        elif op in ("log", "rsqrt"):
            eps = self.rng.choice([0.1, 0.5, 1.0])
            a = self.add("add", self.add("abs", x, bound=b, exact=x.exact), self.const(eps), bound=b + eps)
            self.add(op, a, bound=max(abs(math.log(eps)), math.log(b + eps) + 1) if op == "log" else eps ** -0.5)
        elif op == "sqrt":
            self.add("sqrt", self.add("abs", x, bound=b, exact=x.exact), bound=math.sqrt(b) + 1)
        elif op == "log1p":
            self.add("log1p", self.add("abs", x, bound=b, exact=x.exact), bound=math.log1p(b) + 1)
        elif op == "reciprocal":
            d = self.add("add", self.add("abs", x, bound=b, exact=x.exact), self.const(0.5), bound=b + 0.5)
            if self.r() < 0.5:
                d = self.add("neg", d, bound=d.bound)
            self.add("reciprocal", d, bound=2.0)
        elif op in ("sin", "cos"):
            self.add(op, self.tame(x, 20.0), bound=1.0)
        elif op in ("tanh", "sigmoid", "erf"):
            self.add(op, x, bound=1.0)
        elif op == "gelu":
            self.gelu(x, b)
        elif op == "gelu_tanh":
            self.gelu(x, b, "tanh")
        elif op == "silu":
            self.add("silu", x, bound=b)
        elif op == "clamp":
            lo = round(self.rng.uniform(-2, 0), 2)
            hi = round(self.rng.uniform(0, 2), 2)
            which = self.rng.randrange(3)
            kw = {"min": lo, "max": hi} if which == 0 else {"min": lo} if which == 1 else {"max": hi}
            self.add("clamp", x, bound=max(b, 2.0), exact=x.exact, **kw)
        elif op == "leaky_relu":
            self.add("leaky_relu", x, bound=b, alpha=self.rng.choice([0.01, 0.2, 1.5]))
        elif op == "softplus":
            kw = {} if self.r() < 0.5 else {"beta": self.rng.choice([0.5, 2.0]), "threshold": self.rng.choice([5.0, 20.0])}
            x = self.tame(x, 40.0)
            self.add("softplus", x, bound=x.bound * 2 + 1, **kw)
        elif op == "cast":
            if self.nonfinite or not x.exact:
                return
            if self.r() < 0.5:
                i = self.add("cast", x, bound=b, exact=True, dtype=I64)
                if self.r() < 0.4:        # integer arithmetic on the way
                    i = self.add(self.rng.choice(["add", "mul", "maximum", "sub"]), i, self.operand_like(i, I64),
                                 bound=b * 4 + 4, exact=True)
                if self.r() < 0.8:
                    self.add("cast", i, bound=b * 4 + 4, exact=True, dtype=F32)
            else:
                t = self.add("cast", x, bound=1, exact=True, dtype=BOOL)
                if self.r() < 0.8:
                    self.add("cast", t, bound=1, exact=True, dtype=F32)
        elif op == "isnan":
            t = self.add("isnan", x, exact=True)
            if self.r() < 0.7:
                self.add("cast", t, bound=1, exact=True, dtype=F32)

    def binary(self):
        a = self.pick()
        if a is None:
            return
        op = self.rng.choice(["add", "sub", "mul", "div", "pow", "maximum", "minimum", "compare", "compare",
                              "logical"])
        if op in ("add", "sub", "maximum", "minimum"):
            b = self.operand_like(a)
            args = (a, b) if self.r() < 0.5 else (b, a)
            exact = op in ("maximum", "minimum") and a.exact and b.exact
            self.add(op, *args, bound=a.bound + b.bound if op in ("add", "sub") else max(a.bound, b.bound), exact=exact)
        elif op == "mul":
            a, b = self.tame(a), self.tame(self.operand_like(a))
            self.add("mul", *((a, b) if self.r() < 0.5 else (b, a)), bound=a.bound * b.bound)
        elif op == "div":
            b = self.operand_like(a)
            d = self.add("add", self.add("abs", b, bound=b.bound, exact=b.exact), self.const(0.5), bound=b.bound + 0.5)
            if self.r() < 0.3:
                d = self.add("neg", d, bound=d.bound)
            self.add("div", a, d, bound=a.bound * 2)
        elif op == "pow":
            base = self.add("add", self.add("abs", self.tame(a, 10.0), bound=min(a.bound, 10.0)),
                            self.const(self.rng.choice([0.1, 0.5, 1.0])), bound=11.0)
            if self.r() < 0.5:
                e = self.const(self.rng.choice([2.0, 3.0, 0.5, -1.0, -0.5, 1.0, 1.5, -2.0, 0.0]))
            else:
                e = self.add("tanh", self.operand_like(a), bound=1.0)
                e = self.add("mul", e, self.const(2.0), bound=2.0)
            self.add("pow", base, e, bound=max(11.0 ** 3, 10.0 ** 2))
        elif op == "compare":
            x = self.pick(exact=True)
            if x is None:
                return
            y = self.operand_like(x)
            if not y.exact:
                y = self.const(round(self.rng.uniform(-1, 1), 2))
            c = self.add(self.rng.choice(["eq", "ne", "lt", "le", "gt", "ge"]), x, y, exact=True)
            self.use_bool(c)
        else:
            c = self.pick(BOOL)
            if c is None:
                x = self.pick(exact=True)
                if x is None:
                    return
                c = self.add("gt", x, self.const(0.0), exact=True)
            d = self.operand_like(c, BOOL)
            e = self.add(self.rng.choice(["logical_and", "logical_or"]), c, d, exact=True)
            if self.r() < 0.3:
                e = self.add("logical_not", e, exact=True)
            self.use_bool(e)

    def use_bool(self, c: Value):
        """A bool value goes on as a where condition, a cast, or stays a (bool) output."""
        u = self.r()
        if u < 0.6:
            a = self.pick(pred=lambda v: _broadcasts(v.node.shape, c.node.shape)) or self.operand_like(c)
            b = self.operand_like(a)
            args = (a, b) if self.r() < 0.5 else (b, a)
            self.add("where", c, *args, bound=max(a.bound, b.bound), exact=a.exact and b.exact)
        elif u < 0.85:
            self.add("cast", c, bound=1.0, exact=True, dtype=F32)

    def reduction(self):
        x = self.pick(pred=lambda v: len(v.node.shape) >= 1)
        if x is None:
            return
        nd = len(x.node.shape)
        op = self.rng.choice(["reduce_sum", "reduce_mean", "reduce_max", "reduce_min", "softmax", "log_softmax",
                              "layer_norm", "rms_norm"])
        last = self.r() < 0.6
        if op.startswith("reduce_"):
            if last:
                axes = (nd - 1,)
            else:
                k = self.rng.randint(1, nd)
                axes = tuple(sorted(self.rng.sample(range(nd), k)))
                if self.r() < 0.3:
                    axes = tuple(a - nd for a in axes)     # negative axes
            n = math.prod(x.node.shape[a] for a in axes)
            bound = x.bound * n if op == "reduce_sum" else x.bound
            self.add(op, x, bound=bound, exact=x.exact and op in ("reduce_max", "reduce_min"),
                     axes=axes, keepdim=self.r() < 0.5)
        elif op in ("softmax", "log_softmax"):
            axis = nd - 1 if last else self.rng.randrange(-nd, nd)
            x = self.tame(x, 30.0)
            self.add(op, x, bound=1.0 if op == "softmax" else 2 * x.bound + math.log(x.node.shape[axis]) + 1, axis=axis)
        elif op == "layer_norm":
            ndim = 1 if nd < 2 or self.r() < 0.7 else 2
            ws = x.node.shape[-ndim:]
            w, b = self.rand_const(ws, 0.5, 1.5), self.rand_const(ws)
            self.add("layer_norm", x, w, b, bound=1.5 * math.sqrt(math.prod(ws)) + 1, eps=self.rng.choice([1e-5, 1e-6]),
                     ndim=ndim)
        else:
            w = self.rand_const(x.node.shape[-1:], 0.5, 1.5)
            self.add("rms_norm", x, w, bound=1.5 * math.sqrt(x.node.shape[-1]) + 1, eps=self.rng.choice([1e-5, 1e-6]))

    def injective(self):
        x = self.pick(dtype=self.rng.choice([F32] * 6 + [BOOL, I64]), pred=lambda v: len(v.node.shape) >= 1)
        if x is None:
            x = self.pick(pred=lambda v: len(v.node.shape) >= 1)
            if x is None:
                return
        shape, nd = x.node.shape, len(x.node.shape)
        op = self.rng.choice(["reshape", "transpose", "slice", "concat", "expand", "gather", "pad"])
        keep = {"bound": x.bound, "exact": x.exact}
        if op == "reshape":
            self.add("reshape", x, shape=_refactor(self.rng, shape), **keep)
        elif op == "transpose":
            perm = list(range(nd))
            self.rng.shuffle(perm)
            self.add("transpose", x, perm=tuple(perm), **keep)
        elif op == "slice":
            ax = self.rng.randrange(nd)
            d = shape[ax]
            start = self.rng.randrange(d)
            end = self.rng.randint(start + 1, d)
            step = self.rng.choice([1, 1, 2, 3])
            self.add("slice", x, axis=ax, start=start, end=end, step=step, **keep)
        elif op == "concat":
            ax = self.rng.randrange(nd)
            parts = [x]
            for _ in range(self.rng.randint(1, 2)):
                other = self.pick(x.node.dtype, pred=lambda v: v.node.shape[:ax] + v.node.shape[ax + 1:] ==
                                  shape[:ax] + shape[ax + 1:] and len(v.node.shape) == nd and v.node.shape[ax] <= 16)
                if other is None or self.r() < 0.3:
                    s = list(shape)
                    s[ax] = self.rng.choice([1, 2, 3])
                    other = self.rand_const(s) if x.node.dtype == F32 else self.const(torch.zeros(s, dtype=x.node.dtype))
                parts.append(other)
            self.rng.shuffle(parts)
            self.add("concat", *parts, axis=ax, bound=max(p.bound for p in parts), exact=all(p.exact for p in parts))
        elif op == "expand":
            target = tuple(self.rng.choice([2, 3, 5]) if d == 1 and self.r() < 0.7 else d for d in shape)
            if self.r() < 0.3:
                target = (self.rng.choice([2, 3]),) + target
            if math.prod(target) <= MAX_NUMEL:
                self.add("expand", x, shape=target, **keep)
        elif op == "gather":
            ax = self.rng.randrange(nd)
            ishape = self.rng.choice([(), (3,), (2, 2), (5,)])
            idx = torch.randint(0, shape[ax], ishape, generator=torch.Generator().manual_seed(self.rng.getrandbits(31)))
            out = shape[:ax] + tuple(ishape) + shape[ax + 1:]
            if math.prod(out) <= MAX_NUMEL:
                self.add("gather", x, self.const(idx), axis=ax, **keep)
        else:
            k = self.rng.randint(1, min(nd, 2))
            pads = tuple(self.rng.choice([0, 1, 2]) for _ in range(2 * k))
            val = 0.0 if self.r() < 0.7 or x.node.dtype != F32 else 1.5
            out = math.prod(d + (pads[2 * (nd - 1 - i)] + pads[2 * (nd - 1 - i) + 1] if nd - 1 - i < k else 0)
                            for i, d in enumerate(shape))
            if out <= MAX_NUMEL:
                self.add("pad", x, pads=pads, value=val, bound=max(x.bound, abs(val)), exact=x.exact)

    def contraction(self):
        x = self.pick(pred=lambda v: len(v.node.shape) >= 1)
        if x is None:
            return
        x = self.tame(x, 10.0)
        shape = x.node.shape
        K = shape[-1]
        kind = self.r()
        if kind < 0.55 or len(shape) < 2:      # by a constant weight: a library linear after patterns
            N = self.rng.choice([1, 3, 8, 13, 16])
            w = self.rand_const((K, N))
            y = self.add("matmul", x, w, bound=x.bound * K + 1)
            if self.r() < 0.4:            # bias, activation: the linear epilogue patterns
                y = self.add("add", y, self.rand_const((N,)), bound=y.bound + 1)
            if self.r() < 0.3:
                act = self.rng.choice(["relu", "silu", "sigmoid", "tanh", "gelu"])
                y = self.add(act, y, bound=y.bound) if act != "gelu" else self.gelu(
                    y, y.bound, self.rng.choice(["none", "tanh"]))
        else:                                  # between two activations, batched over leading dims
            N = self.rng.choice([1, 2, 5, 7])
            lead = shape[:-2]
            if self.r() < 0.5:
                other = self.new_input(tuple(self.bcast_shape(lead)) + (K, N))
            else:                              # x against a transposed view of itself (q kᵀ)
                perm = tuple(range(len(shape) - 2)) + (len(shape) - 1, len(shape) - 2)
                other = self.add("transpose", x, perm=perm, bound=x.bound, exact=x.exact)
            self.add("matmul", x, other, bound=x.bound * other.bound * K + 1)

    # -- a whole graph -------------------------------------------------------------------------------
    def build(self) -> Graph:
        n_in = self.rng.randint(1, 3)
        for i in range(n_in):
            self.new_input(self.base if i == 0 else self.bcast_shape(self.base))
        target = self.rng.randint(3, 25)
        families = [(self.unary, 4), (self.binary, 4), (self.reduction, 2), (self.injective, 2), (self.contraction, 1)]
        fns = [f for f, w in families for _ in range(w)]
        attempts = 0
        while _n_ops(self.g) < target and attempts < 200:
            attempts += 1
            self.rng.choice(fns)()
            self.vals = [v for v in self.vals if v.node.numel <= MAX_NUMEL]
        self.g.outputs = self.pick_outputs()
        self.g.prune()
        return self.g

    def pick_outputs(self) -> list[Node]:
        computed = [v.node for v in self.vals if v.node.op not in ("input", "const")]
        if not computed:
            computed = [self.g.add("neg", self.vals[0].node)]
        users = self.g.users()
        leaves = [n for n in computed if not users.get(n)]
        outs = [computed[-1]]
        if self.r() < 0.5:                 # every dangling value is an output
            outs += leaves
        if self.r() < 0.3:                 # and an interior one (needed outside its group)
            outs.append(self.rng.choice(computed))
        return list(dict.fromkeys(outs))


def _n_ops(g: Graph) -> int:
    return sum(n.op not in ("input", "const") for n in g.nodes)


def _broadcasts(a, b) -> bool:
    """Whether shape a broadcasts onto shape b without changing b."""
    if len(a) > len(b):
        return False
    return all(x == y or x == 1 for x, y in zip(reversed(a), reversed(b)))


def _refactor(rng, shape) -> tuple:
    """A random shape with the same number of elements."""
    n = math.prod(shape)
    factors = []
    m = n
    p = 2
    while m > 1 and p * p <= m:
        while m % p == 0:
            factors.append(p)
            m //= p
        p += 1
    if m > 1:
        factors.append(m)
    rng.shuffle(factors)
    k = rng.randint(1, 4)
    dims = [1] * k
    for f in factors:
        dims[rng.randrange(k)] *= f
    if rng.random() < 0.2:
        dims.insert(rng.randrange(len(dims) + 1), 1)
    return tuple(dims)


def random_graph(seed: int, *, options: dict | None = None) -> Case:
    """The random Case for `seed`: a checked graph, its options, and whether inputs carry NaN/Inf."""
    rng = random.Random(seed * 7919 + 17)
    nonfinite = rng.random() < 0.08
    gen = Generator(seed, nonfinite=nonfinite)
    g = gen.build()
    g.check()
    opts = dict(rng.choice(OPTIONS)) if options is None else dict(options)
    return Case(seed, g, opts, nonfinite)
