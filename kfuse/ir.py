"""The graph IR: a closed vocabulary of ops with kinds, nodes with static shapes and dtypes.

Every op's meaning is its reference function in `kfuse.ops.reference`; shapes and dtypes are
inferred by running that same function on meta tensors, so inference and semantics cannot
disagree. Fusion legality looks at `KIND[op]`, never at op names.
"""
from __future__ import annotations

import contextlib
import contextvars
import enum
import itertools
from dataclasses import dataclass, field

import torch

from .errors import GraphError
from .ops.reference import REFERENCE


class Kind(enum.IntEnum):
    """Op kinds, ordered like TVM's OpPatternKind: lower kinds fuse more freely."""
    ELEMENTWISE = 0   # out[i] = f(in[i])
    BROADCAST = 1     # elementwise over inputs broadcast to one shape
    INJECTIVE = 2     # each output element reads one input element (reshape, transpose, slice, ...)
    REDUCTION = 3     # reduces along axes (sum, max, softmax and norms along a row)
    CONTRACTION = 4   # matmul, conv, attention: library or tiled kernels
    OPAQUE = 5        # anything else; never fused
    SOURCE = 6        # graph inputs and constants


_E, _B, _I, _R, _C, _O = Kind.ELEMENTWISE, Kind.BROADCAST, Kind.INJECTIVE, Kind.REDUCTION, Kind.CONTRACTION, Kind.OPAQUE
# the convolutions (by their spatial dims; transposed: weight [Cin, Cout / groups, ...], attr output_padding)
CONVS = ("conv2d", "conv3d", "conv_transpose2d", "conv_transpose3d")

# op -> kind. The vocabulary is closed: a frontend maps every source op onto these.
KIND: dict[str, Kind] = {
    "input": Kind.SOURCE, "const": Kind.SOURCE,
    **{op: _E for op in (
        "neg", "abs", "exp", "log", "sqrt", "rsqrt", "reciprocal", "sin", "cos", "tanh", "sigmoid",
        "erf", "relu", "gelu", "silu", "floor", "ceil", "logical_not", "cast", "clamp", "leaky_relu",
        "isnan", "softplus", "sign", "log1p", "expm1", "elu", "round", "trunc", "erfc", "atan", "tan",
        "asin", "acos", "sinh", "cosh", "asinh", "acosh", "atanh", "log2", "log10", "hardswish", "hardsigmoid",
        "copy")},
    **{op: _B for op in (
        "add", "sub", "mul", "div", "pow", "maximum", "minimum", "eq", "ne", "lt", "le", "gt", "ge",
        "logical_and", "logical_or", "where", "fmod", "remainder", "atan2", "floor_div", "trunc_div")},
    **{op: _I for op in ("reshape", "transpose", "expand", "slice", "concat", "gather", "gather_elements", "index", "pad",
                         "triu", "tril", "flip", "repeat")},
    **{op: _R for op in (
        "reduce_sum", "reduce_mean", "reduce_max", "reduce_min", "reduce_var", "argmax", "softmax",
        "log_softmax", "layer_norm", "rms_norm", "argmin", "reduce_prod")},
    **{op: _C for op in ("matmul", "linear", "gated_linear", *CONVS, "attention")},
    **{op: _O for op in ("max_pool2d", "avg_pool2d", "cumsum", "rope", "recurrent", "cumprod", "topk", "sort", "resize",
                         "max_pool3d", "avg_pool3d",
                         "adaptive_avg_pool2d", "adaptive_max_pool2d", "adaptive_avg_pool3d",
                         "adaptive_max_pool3d", "embedding_bag", "scatter", "index_put", "bitcast", "grid_sample",
                         "affine_grid", "col2im", "det", "fft", "roi_align", "histc", "grouped_mm", "torch_op",
                         "max_pool_indices",
                         "squeeze_excite", "group_norm")},
}

# Injective ops that need no kernel: a torch view reads the input in place (backends run them as
# views; the scheduler never gives them a kernel of their own).
VIEW_OPS = ("reshape", "transpose", "slice", "expand")

INT_OF_SIZE = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def has_bits(t: torch.Tensor) -> bool:
    """Whether `bits` can view t: a strided tensor of 1, 2, 4 or 8-byte real elements."""
    return t.layout == torch.strided and not t.is_complex() and t.element_size() in INT_OF_SIZE


def bits(t: torch.Tensor) -> torch.Tensor:
    """t's elements as integers of the same width (floats; other dtypes as they are): equal bits, not
    equal values (0.0 is not -0.0, a NaN equals the same NaN). Constants compare this way."""
    return t.view(INT_OF_SIZE[t.element_size()]) if t.is_floating_point() else t


def fingerprint(t: torch.Tensor) -> tuple:
    """Cheap, for finding candidates equal in bits: dtype, shape, strides and the bits of 61 elements
    spread over the tensor (all of them when it has no more)."""
    flat = bits(t).reshape(-1)
    step = max(1, flat.numel() // 61)
    return (t.dtype, tuple(t.shape), tuple(t.stride()), tuple(flat[::step].tolist()))


DTYPE_SHORT = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64",
               torch.int64: "i64", torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8", torch.bool: "bool"}

_ids = itertools.count()


@dataclass(eq=False)
class Node:
    """One op application. `name` comes from the source model and is only ever shown, never executed."""
    op: str
    inputs: list["Node"]
    attrs: dict
    shape: tuple[int, ...]
    dtype: torch.dtype
    name: str = ""
    id: int = field(default_factory=lambda: next(_ids))

    @property
    def kind(self) -> Kind:
        return KIND[self.op]

    @property
    def label(self) -> str:
        """How reports name the node: the model's name for it, else its IR id and op."""
        return self.name or f"%{self.id}:{self.op}"

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def nbytes(self) -> int:
        return self.numel * (torch.finfo(self.dtype).bits // 8 if self.dtype.is_floating_point
                             else 1 if self.dtype == torch.bool else torch.iinfo(self.dtype).bits // 8)

    @property
    def value(self) -> torch.Tensor:
        assert self.op == "const"
        return self.attrs["value"]

    def __repr__(self):
        return f"%{self.id}:{self.op}"


@dataclass
class Group:
    """Nodes (topologically ordered) that become one kernel; `outputs` are needed outside it."""
    nodes: list[Node]
    outputs: list[Node]
    inputs: list[Node] = field(init=False, default_factory=list)   # derived: read from outside

    def __post_init__(self):
        inside = set(self.nodes)
        seen = set()
        for n in self.nodes:
            for i in n.inputs:
                if i not in inside and i not in seen:
                    seen.add(i)
                    self.inputs.append(i)


def infer(op: str, inputs: list[Node], attrs: dict) -> tuple[tuple[int, ...], torch.dtype]:
    """Shape and dtype of `op` applied to `inputs`, by running its reference on meta tensors."""
    if op not in KIND:
        raise GraphError(f"op {op!r} is not in the IR vocabulary")
    metas = [torch.empty(i.shape, dtype=i.dtype, device="meta") for i in inputs]
    try:
        out = REFERENCE[op](*metas, **attrs)
    except Exception as e:  # a frontend built an ill-formed node: say which
        shapes = ", ".join(f"{DTYPE_SHORT.get(i.dtype, i.dtype)}{list(i.shape)}" for i in inputs)
        raise GraphError(f"{op}({shapes}) with {_fmt_attrs(attrs)}: {e}") from None
    return tuple(out.shape), out.dtype


# Folding a node whose inputs are all constants is done at build time, so shape arithmetic from
# ONNX files and masks built from constants never reach a kernel; outputs above this size stay ops
# unless they are no bigger than an input (a weight transpose folds, a big broadcast does not).
FOLD_LIMIT = 1 << 16


# The device constants live on: None (where made, the CPU) unless a compilation for GPU inputs sets
# it (`on_device`), so capture's factory results (arange, zeros) and the passes' new constants fold
# and run beside the model's weights on the GPU
_DEVICE: contextvars.ContextVar = contextvars.ContextVar("kfuse_graph_device", default=None)


@contextlib.contextmanager
def on_device(device):
    """Graphs made inside keep their constants on `device` (None: as made)."""
    token = _DEVICE.set(device)
    try:
        yield
    finally:
        _DEVICE.reset(token)


class Graph:
    """Nodes in topological order, graph inputs and outputs."""

    def __init__(self):
        self.device = _DEVICE.get()
        self.nodes: list[Node] = []
        self.inputs: list[Node] = []
        self.outputs: list[Node] = []
        self.input_names: list[str] = []
        self.output_names: list[str] = []
        # In-place writes into graph inputs (a KV cache's index_copy_): the last len(mutated) outputs
        # are the new values of inputs mutated[k]; a call writes them back and returns the others.
        self.mutated: list[int] = []
        # Outputs that are Python values, not tensors (None, a size as an int): flat output position
        # -> the value, returned as is among the tensors of `outputs`
        self.literals: dict[int, object] = {}

    # -- building ---------------------------------------------------------------------------------
    def input(self, shape, dtype, name="") -> Node:
        n = Node("input", [], {"index": len(self.inputs)}, tuple(shape), dtype, name)
        self.nodes.append(n)
        self.inputs.append(n)
        self.input_names.append(name)
        return n

    def const(self, value, dtype=None, name="") -> Node:
        t = torch.as_tensor(value, dtype=dtype).detach().contiguous()
        if self.device is not None and t.device != self.device:
            t = t.to(self.device)
        n = Node("const", [], {"value": t}, tuple(t.shape), t.dtype, name)
        self.nodes.append(n)
        return n

    def add(self, op: str, *inputs: Node, name: str = "", **attrs) -> Node:
        shape, dtype = infer(op, list(inputs), attrs)
        if inputs and all(i.op == "const" for i in inputs):
            size = 1
            for d in shape:
                size *= d
            if size <= FOLD_LIMIT or size <= max(i.numel for i in inputs):
                return self.const(REFERENCE[op](*[i.value for i in inputs], **attrs), name=name)
        n = Node(op, list(inputs), attrs, shape, dtype, name)
        self.nodes.append(n)
        return n

    def insert_before(self, anchor: Node, op: str, *inputs: Node, name: str = "", **attrs) -> Node:
        """A new node placed just before `anchor` (passes use this to keep topological order)."""
        n = self.add(op, *inputs, name=name, **attrs)
        self.nodes.remove(n)
        self.nodes.insert(self.nodes.index(anchor), n)
        return n

    # -- editing ----------------------------------------------------------------------------------
    def users(self) -> dict[Node, list[Node]]:
        out: dict[Node, list[Node]] = {n: [] for n in self.nodes}
        for n in self.nodes:
            for i in n.inputs:
                out[i].append(n)
        return out

    def replace_uses(self, old: Node, new: Node):
        for n in self.nodes:
            n.inputs = [new if i is old else i for i in n.inputs]
        self.outputs = [new if o is old else o for o in self.outputs]

    def prune(self):
        """Drop nodes no output depends on (graph inputs always stay)."""
        live = set(self.outputs) | set(self.inputs)
        for n in reversed(self.nodes):
            if n in live:
                live.update(n.inputs)
        self.nodes = [n for n in self.nodes if n in live]

    def toposort(self):
        self.nodes = postorder(self.nodes)

    # -- checking and printing ----------------------------------------------------------------------
    def check(self):
        """Raise GraphError unless the graph is well formed: topological order, known ops, and each
        node's recorded shape and dtype equal to what its inputs infer."""
        seen = set()
        for n in self.nodes:
            if n.op not in KIND:
                raise GraphError(f"{n}: op not in the vocabulary")
            for i in n.inputs:
                if i not in seen:
                    raise GraphError(f"{n} uses {i}, which is not defined before it")
            if n.op not in ("input", "const"):
                shape, dtype = infer(n.op, n.inputs, n.attrs)
                if (shape, dtype) != (n.shape, n.dtype):
                    raise GraphError(f"{n}: recorded {n.dtype}{list(n.shape)}, inferred {dtype}{list(shape)}")
            seen.add(n)
        for o in self.outputs:
            if o not in seen:
                raise GraphError(f"output {o} is not a node of the graph")
        if [n.attrs["index"] for n in self.inputs] != list(range(len(self.inputs))):
            raise GraphError("graph inputs are out of order")

    def op_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for n in self.nodes:
            counts[n.op] = counts.get(n.op, 0) + 1
        return counts

    def summary(self) -> str:
        counts = {k: v for k, v in sorted(self.op_counts().items()) if k not in ("input", "const")}
        params = sum(n.numel for n in self.nodes if n.op == "const")
        return (f"{len(self.inputs)} inputs, {len(self.outputs)} outputs, "
                f"{sum(counts.values())} ops, {params:,} constant elements\n  ops: "
                + ", ".join(f"{k} {v}" for k, v in counts.items()))

    def __str__(self):
        lines = []
        for n in self.nodes:
            ty = f"{DTYPE_SHORT.get(n.dtype, str(n.dtype))}{list(n.shape)}"
            if n.op == "input":
                lines.append(f"%{n.id} = input {n.name!r} : {ty}")
            elif n.op == "const":
                lines.append(f"%{n.id} = const : {ty}")
            else:
                args = ", ".join(f"%{i.id}" for i in n.inputs)
                attrs = f" {_fmt_attrs(n.attrs)}" if n.attrs else ""
                lines.append(f"%{n.id} = {n.op}({args}){attrs} : {ty}")
        lines.append("return " + ", ".join(f"%{o.id}" for o in self.outputs))
        return "\n".join(lines)


def postorder(roots) -> list[Node]:
    """`roots` and every node they depend on, each after its inputs (roots taken in their order)."""
    order, seen = [], set()
    for root in roots:
        stack = [(root, False)]
        while stack:
            n, done = stack.pop()
            if done:
                order.append(n)
            elif n not in seen:
                seen.add(n)
                stack.append((n, True))
                stack.extend((i, False) for i in reversed(n.inputs) if i not in seen)
    return order


def _fmt_attrs(attrs: dict) -> str:
    return "{" + ", ".join(f"{k}={v}" for k, v in attrs.items()) + "}"
