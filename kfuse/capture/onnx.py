"""ONNX frontend: an ONNX model becomes a kfuse Graph, one handler per ONNX op type.

`load_onnx(path_or_proto, example_inputs)` binds the graph inputs to the example inputs' static
shapes and dtypes, so every dim is known at load time: Shape yields a constant, and the shape
arithmetic exporters emit (Shape -> Gather -> Concat -> Reshape, Range, ConstantOfShape, ...)
folds away because `Graph.add` folds any node whose inputs are all constants. Handlers that
need a shape-like input (Reshape's shape, Slice's starts, ...) therefore read it as a constant
and raise a KfuseError naming the node when it is not one.

An op with no handler (or a variant its handler does not map) whose inputs are all constants is
computed at load time by ONNX's reference evaluator (`_evaluate`, size-capped); an If whose
condition folds to a constant is replaced by the branch it takes.

Each entry of HANDLERS maps one ONNX op type onto IR ops. A handler is called as
`handler(node, *inputs)`: `node` is a `_Node` (attributes, opset, and `add`/`const` that build
IR nodes named after the ONNX node), `inputs` the IR nodes of the ONNX inputs (None where an
optional input is omitted). It returns one IR node, or a list with one entry per ONNX output.
Names and attribute strings from the model are only displayed and compared, never executed.
"""
from __future__ import annotations

import math
import os

import numpy as np
import onnx
import torch
from google.protobuf.message import DecodeError
from onnx import TensorProto, helper, numpy_helper

from ..errors import GraphError, InputError, KfuseError, ModelFileError, UnsupportedOpError
from ..ir import Graph, Node
from .common import reshape
from .einsum import EinsumError, einsum

DTYPES = {
    TensorProto.FLOAT: torch.float32, TensorProto.DOUBLE: torch.float64, TensorProto.FLOAT16: torch.float16,
    TensorProto.BFLOAT16: torch.bfloat16, TensorProto.INT64: torch.int64, TensorProto.INT32: torch.int32,
    TensorProto.INT16: torch.int16, TensorProto.INT8: torch.int8, TensorProto.UINT8: torch.uint8,
    TensorProto.BOOL: torch.bool,
}


# -- loading ----------------------------------------------------------------------------------------

def load_onnx(model, example_inputs) -> Graph:
    """The kfuse Graph of an ONNX model (a path or a ModelProto), with its inputs bound to the
    static shapes and dtypes of `example_inputs` (symbolic ONNX dims take the given sizes)."""
    proto = read_model(model)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)
    g = Graph()
    env: dict[str, Node] = {}
    for t in proto.graph.initializer:
        env[t.name] = g.const(_tensor(t), name=t.name)
    _bind_inputs(g, env, [i for i in proto.graph.input if i.name not in env], example_inputs)
    for onnx_node in proto.graph.node:
        _convert(g, env, onnx_node, opset)
    for o in proto.graph.output:
        if o.name not in env:
            raise ModelFileError(f"graph output {o.name!r} is produced by no node")
        g.outputs.append(env[o.name])
        g.output_names.append(o.name)
    g.prune()  # drop initializers used only by folded shape arithmetic
    return g


def read_model(model) -> onnx.ModelProto:
    """The checked ModelProto of a path (external data loaded from beside it) or of a ModelProto.
    Every way a file can be bad (missing, not protobuf, truncated, failing the checker) and every
    op with no handler is an error naming the file or the node, before any conversion."""
    if isinstance(model, onnx.ModelProto):
        proto, what = model, "the given ModelProto"
    else:
        path = os.fspath(model)
        what = repr(path)
        if not os.path.isfile(path):
            raise ModelFileError(f"ONNX model file {what} does not exist")
        try:
            proto = onnx.load(path)
        except (DecodeError, OSError, ValueError, RuntimeError, onnx.checker.ValidationError) as e:
            # not protobuf, truncated, or external data missing beside it
            raise ModelFileError(f"ONNX model file {what} cannot be read: {e}") from None
    # Unsupported ops first: the checker would only say "no schema" for a non-standard one. An op
    # with a schema but no handler may still fold (all its inputs constant): _convert decides.
    for node in proto.graph.node:
        if node.domain not in ("", "ai.onnx") or (node.op_type not in HANDLERS and not onnx.defs.has(node.op_type)):
            raise _unsupported(node)
    try:
        # The checker wants a path for models over 2 GB; either way it is cheap next to loading.
        big = not isinstance(model, onnx.ModelProto) and proto.ByteSize() >= 2**31
        onnx.checker.check_model(os.fspath(model) if big else proto)
    except (onnx.checker.ValidationError, ValueError) as e:
        raise ModelFileError(f"ONNX model {what} fails the ONNX checker: {e}") from None
    if not proto.graph.output:
        raise ModelFileError(f"ONNX model {what} has no graph outputs (truncated?)")
    return proto


def _tensor(t: onnx.TensorProto) -> torch.Tensor:
    if t.data_type not in DTYPES:
        raise KfuseError(f"ONNX tensor {t.name!r}: element type {TensorProto.DataType.Name(t.data_type)} "
                         "is not supported")
    try:
        a = numpy_helper.to_array(t)
    except (OSError, ValueError) as e:
        raise ModelFileError(f"ONNX tensor {t.name!r}: its data cannot be read: {e}") from None
    if t.data_type == TensorProto.BFLOAT16:  # numpy has no bfloat16: go through the bits
        return torch.from_numpy(np.ascontiguousarray(a).view(np.int16)).view(torch.bfloat16)
    return torch.from_numpy(np.array(a))  # np.array copies: the tensor owns writable memory


def _bind_inputs(g: Graph, env: dict, inputs, examples):
    if len(examples) != len(inputs):
        raise InputError(f"the ONNX model takes {len(inputs)} inputs "
                         f"({', '.join(repr(i.name) for i in inputs)}), got {len(examples)} example inputs")
    sizes: dict[str, int] = {}  # symbolic dim name -> the size it took, so shared dims agree
    for vi, ex in zip(inputs, examples):
        tt = vi.type.tensor_type
        dtype = DTYPES.get(tt.elem_type)
        if dtype != ex.dtype:
            raise InputError(f"ONNX input {vi.name!r} is {TensorProto.DataType.Name(tt.elem_type)}, "
                             f"the example input is {ex.dtype}")
        if tt.HasField("shape"):
            dims = tt.shape.dim
            if len(dims) != ex.dim():
                raise InputError(f"ONNX input {vi.name!r} has rank {len(dims)}, the example input "
                                 f"has shape {list(ex.shape)}")
            for axis, (d, size) in enumerate(zip(dims, ex.shape)):
                if d.HasField("dim_value") and d.dim_value != size:
                    raise InputError(f"ONNX input {vi.name!r} has size {d.dim_value} in dim {axis}, "
                                     f"the example input has {size}")
                if d.HasField("dim_param") and sizes.setdefault(d.dim_param, size) != size:
                    raise InputError(f"ONNX input {vi.name!r}: dim {d.dim_param!r} is {size} here "
                                     f"but {sizes[d.dim_param]} in an earlier input")
        env[vi.name] = g.input(tuple(ex.shape), ex.dtype, name=vi.name)


def _unsupported(onnx_node: onnx.NodeProto, detail: str = "") -> UnsupportedOpError:
    full = onnx_node.op_type if onnx_node.domain in ("", "ai.onnx") else f"{onnx_node.domain}.{onnx_node.op_type}"
    return UnsupportedOpError(full, onnx_node.name or (onnx_node.output[0] if onnx_node.output else ""), "ONNX",
                              detail)


def _convert(g: Graph, env: dict, onnx_node: onnx.NodeProto, opset: int):
    name = onnx_node.name or (onnx_node.output[0] if onnx_node.output else "")
    op_type = onnx_node.op_type
    ins = []
    for i in onnx_node.input:
        if i and i not in env:
            raise ModelFileError(f"ONNX node {name!r} ({op_type}) reads {i!r}, which nothing defines before it")
        ins.append(env[i] if i else None)
    node = _Node(g, onnx_node, name, opset, env)
    constant = all(x is None or x.op == "const" for x in ins)
    try:
        if onnx_node.domain not in ("", "ai.onnx"):
            raise _unsupported(onnx_node)
        if op_type not in HANDLERS:
            if not constant:
                raise _unsupported(onnx_node)
            out = _evaluate(node, ins)
        else:
            try:
                out = HANDLERS[op_type](node, *ins)
            except UnsupportedOpError as e:  # a variant the handler does not map, on constants: fold it
                if not constant:
                    raise
                try:
                    out = _evaluate(node, ins)
                except UnsupportedOpError:
                    raise e from None
    except GraphError as e:  # an IR node the handler built did not type-check: say which ONNX node
        raise GraphError(f"ONNX node {name!r} ({op_type}): {e}") from None
    outs = out if isinstance(out, (list, tuple)) else [out]
    for oname, value in zip(onnx_node.output, outs):
        if oname:
            env[oname] = value
    if any(o for o in onnx_node.output[len(outs):]):
        node.fail(f"output {len(outs)} and later are not supported")


class _Node:
    """What a handler sees of its ONNX node: attributes, the opset, and IR builders."""

    def __init__(self, g: Graph, proto: onnx.NodeProto, name: str, opset: int, env: dict):
        self.g, self.proto, self.name, self.opset, self.env = g, proto, name, opset, env
        self.attrs = {a.name: a for a in proto.attribute}
        self.overrides = {}  # attribute values a handler wrapper rewrote (1-d windows lifted to 2-d)

    def attr(self, key, default=None):
        if key in self.overrides:
            return self.overrides[key]
        if key not in self.attrs:
            return default
        v = helper.get_attribute_value(self.attrs[key])
        if isinstance(v, bytes):
            return v.decode()
        if isinstance(v, TensorProto):
            return _tensor(v)
        return v

    def n_outputs(self) -> int:
        return len(self.proto.output)

    def fail(self, why):
        raise KfuseError(f"ONNX node {self.name!r} ({self.proto.op_type}): {why}")

    def unsupported(self, why):
        """An UnsupportedOpError naming the op and node, saying which variant of the op is not mapped."""
        raise _unsupported(self.proto, why)

    def add(self, op, *inputs, **attrs) -> Node:
        return self.g.add(op, *inputs, name=self.name, **attrs)

    def const(self, value, dtype=None) -> Node:
        return self.g.const(value, dtype=dtype, name=self.name)

    def value(self, x: Node, what: str) -> torch.Tensor:
        """The value of a shape-like input, which must have folded to a constant."""
        if x.op != "const":
            self.fail(f"{what} must be a constant (all shapes are static), but it is computed at run time")
        return x.value

    def ints(self, x: Node | None, what: str, attr: str | None = None) -> list[int] | None:
        """A list of ints given as an attribute (older opsets) or as a constant input (newer ones)."""
        if attr and attr in self.attrs:
            return list(self.attr(attr))
        return None if x is None else [int(v) for v in self.value(x, what).reshape(-1).tolist()]


# -- constant evaluation ------------------------------------------------------------------------------

# A node with no handler (or a variant its handler does not map) whose inputs are all constants is
# computed at load time by ONNX's reference evaluator, so shape arithmetic such as Mod or ReduceProd
# over Shape in legacy exports never needs a kernel. Nodes with more elements in or out than this
# stay unsupported, and so do random ops (their value is not fixed) and ops with subgraphs.
EVAL_LIMIT = 1 << 20
_RANDOM = ("Bernoulli", "Multinomial", "RandomNormal", "RandomNormalLike", "RandomUniform", "RandomUniformLike")


def _evaluate(n: _Node, ins) -> list:
    from onnx.reference import ReferenceEvaluator
    p = n.proto
    if p.op_type in _RANDOM or any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS)
                                   for a in p.attribute):
        n.unsupported("it is random or has subgraphs, so it is not evaluated even on constant inputs")
    if any(x is not None and x.dtype == torch.bfloat16 for x in ins):
        n.unsupported("its constant inputs are bfloat16, which the load-time evaluator cannot read")
    if sum(x.numel for x in ins if x is not None) > EVAL_LIMIT:
        n.unsupported(f"its constant inputs are over {EVAL_LIMIT} elements, too many to evaluate at load time")
    inits = [numpy_helper.from_array(x.value.numpy(), name) for name, x in zip(p.input, ins) if name]
    outputs = [o for o in p.output if o]
    graph = helper.make_graph([p], "fold", [], [onnx.ValueInfoProto(name=o) for o in outputs], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", n.opset)])
    try:  # output sizes first where inference knows them: nothing huge is computed
        inferred = onnx.shape_inference.infer_shapes(model, data_prop=True).graph.output
    except Exception:  # inference is only a guard; the evaluator reports real errors below
        inferred = []
    for vi in inferred:
        dims = vi.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims) and math.prod(d.dim_value for d in dims) > EVAL_LIMIT:
            n.unsupported(f"its output {vi.name!r} would be over {EVAL_LIMIT} elements, too many to evaluate")
    try:
        results = ReferenceEvaluator(model).run(None, {})
    except Exception as e:  # the reference implementation's own error, whatever its type
        n.unsupported(f"its inputs are constants but ONNX's reference evaluator fails on it: {type(e).__name__}: {e}")
    values = {}
    for o, r in zip(outputs, results):
        a = np.asarray(r)
        if a.dtype.kind not in "biuf" or helper.np_dtype_to_tensor_dtype(a.dtype) not in DTYPES:
            n.unsupported(f"its output {o!r} is of type {a.dtype}, which kfuse does not support")
        if a.size > EVAL_LIMIT:
            n.unsupported(f"its output {o!r} is over {EVAL_LIMIT} elements, too many to keep as a constant")
        values[o] = n.const(torch.from_numpy(np.array(a)))
    return [values.get(o) for o in p.output]


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# -- shared helpers -------------------------------------------------------------------------------

def _pad(n: _Node, x: Node, begins, ends, value=0.0) -> Node:
    """Constant padding; begins/ends are per dim, in ONNX order (first dim first)."""
    if not any(begins) and not any(ends):
        return x
    pads = []
    for b, e in reversed(list(zip(begins, ends))):  # F.pad wants the last dim first
        pads += [int(b), int(e)]
    return n.add("pad", x, pads=pads, value=float(value))


def _normalize_index(n: _Node, idx: Node, dim: int) -> Node:
    """ONNX allows negative indices (counted from the end); the IR's gather does not."""
    if idx.op == "const":
        v = idx.value
        return n.const(torch.where(v < 0, v + dim, v))
    neg = n.add("lt", idx, n.const(0, dtype=idx.dtype))
    return n.add("where", neg, n.add("add", idx, n.const(dim, dtype=idx.dtype)), idx)


def _positions(shape) -> torch.Tensor:
    """Each element's position in the row-major flattening of `shape` (torch indexing on this
    tensor turns constant ONNX indices into flat positions, negative ones included)."""
    return torch.arange(math.prod(shape)).reshape(shape)


def _flat_gather(n: _Node, x: Node, flat_index: torch.Tensor) -> Node:
    """Elements of x at constant positions of its flattened form; the result has flat_index's shape."""
    return n.add("gather", reshape(n, x, (x.numel,)), n.const(flat_index), axis=0)


def _spatial_pads(n: _Node, x: Node, kernel, strides, dilations):
    """(begins, ends) of the spatial dims, from `pads` or `auto_pad`."""
    k = len(kernel)
    auto = n.attr("auto_pad", "NOTSET")
    if auto in ("NOTSET", "VALID"):
        pads = n.attr("pads", [0] * 2 * k) if auto == "NOTSET" else [0] * 2 * k
        return list(pads[:k]), list(pads[k:])
    begins, ends = [], []
    for size, kk, s, d in zip(x.shape[2:], kernel, strides, dilations):  # SAME_UPPER / SAME_LOWER
        total = max((math.ceil(size / s) - 1) * s + (kk - 1) * d + 1 - size, 0)
        small, big = total // 2, total - total // 2
        begins.append(small if auto == "SAME_UPPER" else big)
        ends.append(big if auto == "SAME_UPPER" else small)
    return begins, ends


def _window_args(n: _Node, x: Node, kernel, pad_value, max_pad=None):
    """Shared by Conv and the pools: strides, dilations and padding. Asymmetric padding (or more
    than torch's pools accept) becomes an explicit pad op before the window op."""
    nd = len(x.shape) - 2
    if nd not in (2, 3):
        n.fail(f"only 1-d, 2-d and 3-d spatial inputs (rank 3 to 5) are supported, got shape {list(x.shape)}")
    strides = list(n.attr("strides", [1] * nd))
    dilations = list(n.attr("dilations", [1] * nd))
    begins, ends = _spatial_pads(n, x, kernel, strides, dilations)
    symmetric = begins == ends and (max_pad is None or all(b <= m for b, m in zip(begins, max_pad)))
    if symmetric:
        return x, strides, dilations, tuple(begins)
    if pad_value is None:
        n.fail(f"asymmetric pads {begins + ends} are not supported here")
    return _pad(n, x, [0, 0] + begins, [0, 0] + ends, pad_value), strides, dilations, (0,) * nd


# -- handlers ---------------------------------------------------------------------------------------

def _unary(op):
    return lambda n, x: n.add(op, x)


def _binary(op):
    return lambda n, a, b: n.add(op, a, b)


def _variadic(op):
    def handler(n, *xs):
        out = xs[0]
        for x in xs[1:]:
            out = n.add(op, out, x)
        return out
    return handler


def _div(n, a, b):
    if a.dtype.is_floating_point:
        return n.add("div", a, b)
    return n.add("trunc_div", a, b)  # integer Div truncates in ONNX; torch's div is true division


def _pow(n, x, y):
    if y.dtype != x.dtype:  # ONNX Pow's result has x's type whatever the exponent's type
        y = n.add("cast", y, dtype=x.dtype)
    return n.add("pow", x, y)


def _mean(n, *xs):
    return n.add("div", _variadic("add")(n, *xs), n.const(float(len(xs)), dtype=xs[0].dtype))


def _identity(n, x):
    return x


def _dropout(n, x, ratio=None, training_mode=None):
    if training_mode is not None and bool(n.value(training_mode, "training_mode").item()):
        n.fail("training-mode dropout is not supported (inference only)")
    if n.n_outputs() > 1 and n.proto.output[1]:  # the mask: nothing is dropped in inference
        return [x, n.const(torch.ones(x.shape, dtype=torch.bool))]
    return x


def _cast(n, x):
    to = n.attr("to")
    if to not in DTYPES:
        n.fail(f"cast to {TensorProto.DataType.Name(to)} is not supported")
    return x if DTYPES[to] == x.dtype else n.add("cast", x, dtype=DTYPES[to])


def _cast_like(n, x, like):
    return x if like.dtype == x.dtype else n.add("cast", x, dtype=like.dtype)


def _constant(n):
    for key in ("value", "value_float", "value_floats", "value_int", "value_ints"):
        if key in n.attrs:
            v = n.attr(key)
            return n.const(v if isinstance(v, torch.Tensor) else torch.tensor(v))
    n.fail(f"constant of kind {sorted(n.attrs)} is not supported")


def _constant_of_shape(n, shape):
    fill = n.attr("value")
    fill = torch.zeros(1) if fill is None else fill
    return n.const(torch.full(n.ints(shape, "shape"), fill.reshape(-1)[0].item(), dtype=fill.dtype))


def _shape(n, x):
    rank = len(x.shape)
    start = min(max(_axis(n.attr("start", 0), rank), 0), rank)
    end = min(max(_axis(n.attr("end", rank), rank), 0), rank)
    return n.const(torch.tensor(x.shape[start:end], dtype=torch.int64))


def _size(n, x):
    return n.const(torch.tensor(x.numel, dtype=torch.int64))


def _range(n, start, limit, delta):
    s, l, d = (n.value(v, what) for v, what in ((start, "start"), (limit, "limit"), (delta, "delta")))
    count = max(math.ceil((l.item() - s.item()) / d.item()), 0)  # ONNX's definition of the length
    return n.const((torch.arange(count) * d + s).to(s.dtype))


def _reshape_h(n, x, shape):
    target = n.ints(shape, "shape")
    allowzero = n.attr("allowzero", 0)
    target = [x.shape[i] if d == 0 and not allowzero else d for i, d in enumerate(target)]
    return reshape(n, x, target)   # which infers a -1


def _flatten(n, x):
    axis = _axis(n.attr("axis", 1), len(x.shape))
    return reshape(n, x, (math.prod(x.shape[:axis]), math.prod(x.shape[axis:])))


def _squeeze(n, x, axes=None):
    axes = n.ints(axes, "axes", "axes")
    rank = len(x.shape)
    axes = [i for i, d in enumerate(x.shape) if d == 1] if axes is None else [_axis(a, rank) for a in axes]
    if any(x.shape[a] != 1 for a in axes):
        n.fail(f"squeezes axes {axes} of shape {list(x.shape)}, which are not all of size 1")
    return reshape(n, x, [d for i, d in enumerate(x.shape) if i not in axes])


def _unsqueeze(n, x, axes=None):
    axes = n.ints(axes, "axes", "axes")
    rank = len(x.shape) + len(axes)
    shape = list(x.shape)
    for a in sorted(_axis(a, rank) for a in axes):
        shape.insert(a, 1)
    return reshape(n, x, shape)


def _transpose(n, x):
    perm = list(n.attr("perm", reversed(range(len(x.shape)))))
    return x if perm == sorted(perm) else n.add("transpose", x, perm=perm)


def _concat(n, *xs):
    xs = [x for x in xs if x is not None]
    return xs[0] if len(xs) == 1 else n.add("concat", *xs, axis=_axis(n.attr("axis"), len(xs[0].shape)))


def _slice_axis(n, x, axis, start, end, step):
    """x[start:end:step] along one axis with ONNX's clamping (ends may be INT64_MAX or negative)."""
    dim = x.shape[axis]
    if step == 0:
        n.fail("slice step 0")
    start = start + dim if start < 0 else start
    end = end + dim if end < 0 else end
    if step > 0:
        start, end = min(max(start, 0), dim), min(max(end, 0), dim)
    else:
        start, end = min(max(start, 0), dim - 1), min(max(end, -1), dim - 1)
    if step > 0:  # step always given: a slice that becomes a view kernel calls VIEW["slice"] with it
        if (start, end, step) == (0, dim, 1):
            return x
        return n.add("slice", x, axis=axis, start=start, end=max(end, start), step=step)
    # torch slices cannot step backwards: a reversed slice is a gather of constant indices
    return n.add("gather", x, n.const(torch.arange(start, end, step, dtype=torch.int64)), axis=axis)


def _slice(n, x, starts=None, ends=None, axes=None, steps=None):
    starts, ends = n.ints(starts, "starts", "starts"), n.ints(ends, "ends", "ends")
    axes = n.ints(axes, "axes", "axes") or list(range(len(starts)))
    steps = n.ints(steps, "steps") or [1] * len(starts)
    for a, s, e, st in zip(axes, starts, ends, steps):
        x = _slice_axis(n, x, _axis(a, len(x.shape)), s, e, st)
    return x


def _split(n, x, split=None):
    axis = _axis(n.attr("axis", 0), len(x.shape))
    dim, count = x.shape[axis], n.n_outputs()
    sizes = n.ints(split, "split", "split")
    if sizes is None:  # equal parts; with num_outputs (opset 18) the last part may be smaller
        part = math.ceil(dim / n.attr("num_outputs", count))
        sizes = [min(part, dim - i * part) for i in range(count)]
    if sum(sizes) != dim:
        n.fail(f"split sizes {sizes} do not add up to dim {dim}")
    starts = np.cumsum([0] + sizes[:-1]).tolist()
    return [_slice_axis(n, x, axis, s, s + size, 1) for s, size in zip(starts, sizes)]


def _gather(n, x, idx):
    axis = _axis(n.attr("axis", 0), len(x.shape))
    return n.add("gather", x, _normalize_index(n, idx, x.shape[axis]), axis=axis)


def _gather_elements(n, x, idx):
    """out[i][j][k] = x[i][idx[i][j][k]][k] (axis 1): a gather of x's elements at constant positions."""
    axis = _axis(n.attr("axis", 0), len(x.shape))
    index = n.value(idx, "indices").long()
    index = torch.where(index < 0, index + x.shape[axis], index)
    return _flat_gather(n, x, _positions(x.shape).gather(axis, index))


def _gather_nd(n, x, idx):
    """x indexed by the last dim of constant `indices` (batch_dims 0): a gather at constant positions."""
    if n.attr("batch_dims", 0):
        n.fail("batch_dims other than 0 are not supported")
    index = n.value(idx, "indices").long()
    k = index.shape[-1]
    rows = reshape(n, x, (math.prod(x.shape[:k]),) + x.shape[k:])  # the first k dims as one
    return n.add("gather", rows, n.const(_positions(x.shape[:k])[index.unbind(-1)]), axis=0)


_SCATTER_REDUCE = {"none": "none", "add": "sum", "mul": "prod", "max": "amax", "min": "amin"}


def _scatter_reduction(n):
    red = n.attr("reduction", "none")
    if red not in _SCATTER_REDUCE:
        n.unsupported(f"reduction {red!r}")
    return red


def _scatter_elements(n, x, idx, updates):
    """ScatterElements (and the old Scatter): one scatter op along `axis`, run by torch; negative
    indices count from the end, as ONNX allows."""
    axis = _axis(n.attr("axis", 0), len(x.shape))
    red = _SCATTER_REDUCE[_scatter_reduction(n)]
    return n.add("scatter", x, _normalize_index(n, idx, x.shape[axis]), updates, axis=axis, reduce=red)


def _scatter_nd(n, x, idx, updates):
    """ScatterND: x[idx[..., 0], ..., idx[..., k-1]] = updates (or += / *= ... by `reduction`): an
    index_put with one index tensor per leading dim of x; add is its accumulate, the others are not
    mapped."""
    red = _scatter_reduction(n)
    if red not in ("none", "add"):
        n.unsupported(f"reduction {red!r}: only none and add are mapped")
    k = idx.shape[-1]
    parts = [_normalize_index(n, reshape(n, _slice_axis(n, idx, len(idx.shape) - 1, j, j + 1, 1), idx.shape[:-1]),
                              x.shape[j]) for j in range(k)]
    return n.add("index_put", x, updates, *parts, dims=tuple(range(k)), accumulate=red == "add")


def _expand(n, x, shape):
    out = tuple(torch.broadcast_shapes(x.shape, tuple(n.ints(shape, "shape"))))
    return x if out == x.shape else n.add("expand", x, shape=out)


def _tile(n, x, repeats):
    reps = n.ints(repeats, "repeats")
    if all(r == 1 for r in reps):
        return x
    # Tile repeats the whole tensor along each dim: [r0, d0, r1, d1, ...] flattened pairwise.
    inter = [v for d in x.shape for v in (1, d)]
    wide = [v for r, d in zip(reps, x.shape) for v in (r, d)]
    y = n.add("expand", reshape(n, x, inter), shape=tuple(wide))
    return reshape(n, y, [r * d for r, d in zip(reps, x.shape)])


def _depth_to_space(n, x):
    if len(x.shape) != 4:
        n.fail(f"the input must be [N, C, H, W], got shape {list(x.shape)}")
    b = n.attr("blocksize")
    batch, c, h, w = x.shape
    if n.attr("mode", "DCR") == "DCR":  # depth ordered (block row, block column, channel)
        y = n.add("transpose", reshape(n, x, (batch, b, b, c // (b * b), h, w)), perm=[0, 3, 4, 1, 5, 2])
    else:  # CRD: (channel, block row, block column)
        y = n.add("transpose", reshape(n, x, (batch, c // (b * b), b, b, h, w)), perm=[0, 1, 4, 2, 5, 3])
    return reshape(n, y, (batch, c // (b * b), h * b, w * b))


def _space_to_depth(n, x):
    if len(x.shape) != 4:
        n.fail(f"the input must be [N, C, H, W], got shape {list(x.shape)}")
    b = n.attr("blocksize")
    batch, c, h, w = x.shape
    y = n.add("transpose", reshape(n, x, (batch, c, h // b, b, w // b, b)), perm=[0, 3, 5, 1, 2, 4])
    return reshape(n, y, (batch, c * b * b, h // b, w // b))


def _one_hot(n, indices, depth, values):
    """where(indices[..., None] == arange(depth), on, off), the class axis placed at `axis`."""
    d = int(n.value(depth, "depth").reshape(-1)[0].item())
    off, on = n.value(values, "values").reshape(-1)
    if indices.dtype.is_floating_point:  # non-integer indices are cast to int64 first
        indices = n.add("cast", indices, dtype=torch.int64)
    rank = len(indices.shape) + 1
    axis = _axis(n.attr("axis", -1), rank)
    indices = _normalize_index(n, indices, d)  # -depth..-1 count from the end; others match nothing
    classes = torch.arange(d, dtype=indices.dtype).reshape([d if i == axis else 1 for i in range(rank)])
    hit = n.add("eq", reshape(n, indices, indices.shape[:axis] + (1,) + indices.shape[axis:]), n.const(classes))
    return n.add("where", hit, n.const(on), n.const(off))


def _einsum(n, *xs):
    try:
        return einsum(n, n.attr("equation"), xs)
    except EinsumError as e:
        n.unsupported(str(e)) if e.unsupported else n.fail(str(e))


def _resize_source(coord, out, size, scale):
    """Where each of `out` output positions samples the input (size `size`) along one axis, by
    ONNX's coordinate transformation, in float32 as ONNX Runtime computes it."""
    x, s, f32 = np.arange(out, dtype=np.float32), np.float32(scale), np.float32
    if coord in ("half_pixel", "pytorch_half_pixel"):
        if coord == "pytorch_half_pixel" and out == 1:
            return np.zeros(1, np.float32)
        return (x + f32(0.5)) / s - f32(0.5)
    if coord == "align_corners":
        return x * f32(size - 1) / f32(out - 1) if out > 1 else np.zeros(out, np.float32)
    if coord == "asymmetric":
        return x / s
    if coord == "half_pixel_symmetric":
        adjustment = f32(out) / (s * f32(size))
        offset = f32(size) / f32(2) * (f32(1) - adjustment)
        return offset + (x + f32(0.5)) / s - f32(0.5)
    return None


_NEAREST = {"round_prefer_floor": lambda x, s: np.ceil(x - np.float32(0.5)),
            "round_prefer_ceil": lambda x, s: np.floor(x + np.float32(0.5)),
            "floor": lambda x, s: np.floor(x), "ceil": lambda x, s: np.ceil(x),
            # opset 10: ceil when downsampling, floor otherwise (ONNX Runtime's behaviour)
            "simple": lambda x, s: np.ceil(x) if s < 1 else np.floor(x)}


def _torch_map(size, out, mode, align_corners=None):
    """Where torch's F.interpolate samples along one axis: it interpolates positions 0..size-1."""
    ramp = torch.arange(size, dtype=torch.float64).reshape(1, 1, size)
    return torch.nn.functional.interpolate(ramp, size=out, mode=mode, align_corners=align_corners).reshape(-1).numpy()


def _resize(n, x, roi=None, scales=None, sizes=None):
    """Resize as torch's F.interpolate mode where that samples exactly where ONNX does (checked per
    axis at load time), else nearest as a gather per axis and linear as two gathers and weights per
    axis (ONNX's linear is separable); cubic only where torch's bicubic matches."""
    if n.opset < 11:  # Resize-10: (X, scales), asymmetric coordinates
        roi, scales = None, roi
    rank = len(x.shape)
    mode = n.attr("mode", "nearest")
    coord = n.attr("coordinate_transformation_mode", "half_pixel") if n.opset >= 11 else "asymmetric"
    nearest = n.attr("nearest_mode", "round_prefer_floor") if n.opset >= 11 else "simple"
    described = f"mode={mode!r}, coordinate_transformation_mode={coord!r}" + (
        f", nearest_mode={nearest!r}" if mode == "nearest" else "")
    if n.attr("antialias", 0):
        n.unsupported(f"antialias=1 ({described})")
    if mode not in ("nearest", "linear", "cubic") or coord == "tf_crop_and_resize" or \
            _resize_source(coord, 1, 1, 1.0) is None or (mode == "nearest" and nearest not in _NEAREST):
        n.unsupported(described)
    axes = [_axis(a, rank) for a in n.attr("axes", range(rank))]
    out, scale = list(x.shape), [1.0] * rank
    if sizes is not None and sizes.numel:
        wanted = n.ints(sizes, "sizes")
        policy = n.attr("keep_aspect_ratio_policy", "stretch")
        if policy == "stretch":
            for a, o in zip(axes, wanted):
                out[a], scale[a] = o, float(np.float32(o) / np.float32(x.shape[a]))
        else:  # one scale for all the axes, the largest (or smallest) that fits the sizes
            r = (min if policy == "not_larger" else max)(o / x.shape[a] for a, o in zip(axes, wanted))
            for a in axes:
                out[a], scale[a] = int(math.floor(r * x.shape[a] + 0.5)), r
    elif scales is not None and scales.numel:
        for a, sc in zip(axes, n.value(scales, "scales").reshape(-1).tolist()):
            out[a], scale[a] = int(np.float32(sc) * np.float32(x.shape[a])), sc
    else:
        n.fail("neither scales nor sizes is given")
    src = {a: _resize_source(coord, out[a], x.shape[a], scale[a]) for a in range(rank)}
    if mode == "nearest":
        index = {a: np.clip(_NEAREST[nearest](src[a], scale[a]), 0, x.shape[a] - 1).astype(np.int64)
                 for a in range(rank)}
        moved = [a for a in range(rank) if out[a] != x.shape[a] or (index[a] != np.arange(out[a])).any()]
    else:  # linear samples clamped positions; cubic only goes to torch, which checks its own way
        pos = {a: np.clip(src[a], 0, x.shape[a] - 1) for a in range(rank)}
        moved = [a for a in range(rank) if out[a] != x.shape[a] or np.abs(pos[a] - np.arange(out[a])).max() > 0]
    if not moved:
        return x
    spatial = 3 <= rank <= 5 and moved[0] >= 2 and x.dtype.is_floating_point

    def torch_resize(tmode, align_corners=None):
        return n.add("resize", x, size=out[2:], mode=tmode, align_corners=align_corners)

    if mode == "nearest":
        if spatial:
            for tmode in ("nearest", "nearest-exact"):
                if all((_torch_map(x.shape[a], out[a], tmode) == index[a]).all() for a in moved):
                    return torch_resize(tmode)
        for a in moved:  # the exact positions, one gather per axis
            x = n.add("gather", x, n.const(torch.from_numpy(index[a])), axis=a)
        return x
    if not x.dtype.is_floating_point:
        n.unsupported(f"{described} on {x.dtype} input")
    if mode == "cubic":
        consistent = all(np.float32(scale[a]) == np.float32(out[a]) / np.float32(x.shape[a]) for a in moved)
        exact = n.attr("cubic_coeff_a", -0.75) == -0.75 and not n.attr("exclude_outside", 0)
        if spatial and rank == 4 and exact and (coord == "align_corners" or consistent and (
                coord == "half_pixel" or coord == "pytorch_half_pixel" and min(out[2:]) > 1)):
            return torch_resize("bicubic", coord == "align_corners")
        n.unsupported(f"{described}, cubic_coeff_a={n.attr('cubic_coeff_a', -0.75)}, "
                      f"exclude_outside={n.attr('exclude_outside', 0)} with scales {[scale[a] for a in moved]}")
    if spatial:
        tmode = {3: "linear", 4: "bilinear", 5: "trilinear"}[rank]
        for align_corners in (False, True):
            if all(np.abs(_torch_map(x.shape[a], out[a], "linear", align_corners) - pos[a]).max() < 1e-4
                   for a in moved):
                return torch_resize(tmode, align_corners)
    for a in moved:  # x[i0] (1 - w) + x[i1] w along each axis, i0 = floor(pos), i1 = i0 + 1 (clamped)
        i0 = np.minimum(np.floor(pos[a]), x.shape[a] - 1).astype(np.int64)
        i1 = np.minimum(i0 + 1, x.shape[a] - 1)
        w = torch.from_numpy(pos[a] - i0).to(x.dtype).reshape([-1] + [1] * (rank - 1 - a))
        lo, hi = (n.add("gather", x, n.const(torch.from_numpy(i)), axis=a) for i in (i0, i1))
        x = n.add("add", n.add("mul", lo, n.const(1 - w)), n.add("mul", hi, n.const(w)))
    return x


def _where(n, c, a, b):
    return n.add("where", c, a, b)


def _clip(n, x, lo=None, hi=None):
    bounds = {}
    for key, bound, op in (("min", lo, "maximum"), ("max", hi, "minimum")):
        if bound is None:
            value = n.attr(key)  # attributes before opset 11, inputs after
        elif bound.op == "const":
            value = bound.value.item()
        else:  # a bound computed at run time
            x, value = n.add(op, x, bound), None
        if value is not None:
            bounds[key] = value
    return n.add("clamp", x, **bounds) if bounds else x


def _trilu(n, x, k=None):
    diagonal = 0 if k is None else int(n.value(k, "k").item())
    return n.add("triu" if n.attr("upper", 1) else "tril", x, diagonal=diagonal)


def _cumsum(n, x, axis):
    axis = _axis(int(n.value(axis, "axis").item()), len(x.shape))
    flip = torch.arange(x.shape[axis] - 1, -1, -1)
    if n.attr("reverse", 0):
        x = n.add("gather", x, n.const(flip), axis=axis)
    y = n.add("cumsum", x, axis=axis)
    if n.attr("exclusive", 0):
        y = n.add("sub", y, x)
    return n.add("gather", y, n.const(flip), axis=axis) if n.attr("reverse", 0) else y


def _reduce_axes(n, x, axes):
    """The sorted axes a Reduce* node reduces, or None when it is a no-op (empty axes and
    noop_with_empty_axes)."""
    axes = n.ints(axes, "axes", "axes")
    if not axes:  # empty or absent: all axes, unless the node asks for a no-op
        if n.attr("noop_with_empty_axes", 0):
            return None
        axes = range(len(x.shape))
    return sorted(_axis(a, len(x.shape)) for a in axes)


def _reduce(op, pre=None, post=None):
    """A Reduce* node as `post(op(pre(x)))`; a no-op node still applies `pre` and `post`, as ONNX's
    reference does (ReduceSumSquare with noop_with_empty_axes squares)."""
    def handler(n, x, axes=None):
        y = pre(n, x) if pre else x
        axes = _reduce_axes(n, x, axes)
        if axes is not None:
            y = n.add(op, y, axes=axes, keepdim=bool(n.attr("keepdims", 1)))
        y = post(n, y) if post else y
        return _cast_like(n, y, x)  # ReduceL2 and ReduceLogSum of integers keep the integer type
    return handler


def _square(n, x):
    return n.add("mul", x, x)


def _reduce_log_sum_exp(n, x, axes=None):
    """log(sum(exp(x - m))) + m with m the max over the axes, as ONNX Runtime computes it."""
    axes = _reduce_axes(n, x, axes)
    if axes is None:
        return x
    m = n.add("reduce_max", x, axes=axes, keepdim=True)
    s = n.add("reduce_sum", n.add("exp", n.add("sub", x, m)), axes=axes, keepdim=True)
    y = n.add("add", n.add("log", s), m)
    return y if n.attr("keepdims", 1) else reshape(n, y, [d for i, d in enumerate(x.shape) if i not in axes])


def _arg(op):
    def handler(n, x):
        axis = _axis(n.attr("axis", 0), len(x.shape))
        keep = bool(n.attr("keepdims", 1))
        if not n.attr("select_last_index", 0):
            return n.add(op, x, axis=axis, keepdim=keep)
        # the last extreme is the first one of the flipped tensor, counted from the end
        i = n.add(op, n.add("flip", x, dims=[axis]), axis=axis, keepdim=keep)
        return n.add("sub", n.const(x.shape[axis] - 1, dtype=torch.int64), i)
    return handler


def _topk(n, x, k=None):
    kk = int(n.attr("k")) if k is None else int(n.value(k, "k").reshape(-1)[0])  # an attribute before opset 10
    axis = _axis(n.attr("axis", -1), len(x.shape))
    largest = bool(n.attr("largest", 1))
    # Values do not depend on the order of equal elements: torch's topk. Indices do: ONNX puts the
    # lower index first among equal values, which torch.topk does not promise and a stable sort does.
    # (sorted=0 leaves the order unspecified, so sorted order is as good as any; an output nobody
    # reads is pruned.)
    values = n.add("topk", x, k=kk, axis=axis, largest=largest, sorted=True)
    order = n.add("sort", x, axis=axis, descending=largest, output="indices")
    return [values, _slice_axis(n, order, axis, 0, kk, 1)]


def _softmax(op):
    def handler(n, x):
        rank = len(x.shape)
        if n.opset >= 13:
            return n.add(op, x, axis=_axis(n.attr("axis", -1), rank))
        # Before opset 13 the input is flattened to 2-d at `axis` and normalised over the second part.
        axis = _axis(n.attr("axis", 1), rank)
        flat = reshape(n, x, (math.prod(x.shape[:axis]), math.prod(x.shape[axis:])))
        return reshape(n, n.add(op, flat, axis=1), x.shape)
    return handler


def _norm_weight(n, w, shape):
    """A norm's scale or bias as the normalised shape (ONNX allows any broadcastable one)."""
    if w.shape == shape:
        return w
    return reshape(n, w, shape) if w.numel == math.prod(shape) else n.add("expand", w, shape=shape)


def _layer_norm(n, x, scale, bias=None):
    if n.n_outputs() > 1 and any(n.proto.output[1:]):
        n.fail("the Mean and InvStdDev outputs are not supported")
    axis = _axis(n.attr("axis", -1), len(x.shape))
    shape = x.shape[axis:]
    bias = n.const(torch.zeros(shape, dtype=x.dtype)) if bias is None else _norm_weight(n, bias, shape)
    return n.add("layer_norm", x, _norm_weight(n, scale, shape), bias,
                 eps=float(n.attr("epsilon", 1e-5)), ndim=len(shape))


def _batch_norm(n, x, scale, bias, mean, var):
    if n.n_outputs() > 1 and any(n.proto.output[1:]):
        n.fail("training-mode outputs are not supported (inference only)")
    # y = x * s + t with s = scale / sqrt(var + eps), t = bias - mean * s; with constant
    # statistics s and t fold to constants here.
    s = n.add("mul", scale, n.add("rsqrt", n.add("add", var, n.const(n.attr("epsilon", 1e-5), dtype=var.dtype))))
    t = n.add("sub", bias, n.add("mul", mean, s))
    per_channel = (x.shape[1],) + (1,) * (len(x.shape) - 2)
    return n.add("add", n.add("mul", x, reshape(n, s, per_channel)), reshape(n, t, per_channel))


def _instance_norm(n, x, scale, bias):
    """Each (sample, channel) normalised over its spatial positions: a layer_norm over the flattened
    spatial dims, then the per-channel affine."""
    rank, (batch, channels) = len(x.shape), x.shape[:2]
    size = math.prod(x.shape[2:])
    flat = reshape(n, x, (batch, channels, size))
    y = n.add("layer_norm", flat, n.const(torch.ones(size, dtype=x.dtype)), n.const(torch.zeros(size, dtype=x.dtype)),
              eps=float(n.attr("epsilon", 1e-5)), ndim=1)
    per_channel = (channels,) + (1,) * (rank - 2)
    y = n.add("mul", reshape(n, y, x.shape), reshape(n, scale, per_channel))
    return n.add("add", y, reshape(n, bias, per_channel))


def _gemm(n, a, b, c=None):
    if n.attr("transA", 0):
        a = n.add("transpose", a, perm=[1, 0])
    if n.attr("transB", 0):
        b = n.add("transpose", b, perm=[1, 0])  # folds once for a constant weight
    y = n.add("matmul", a, b)
    alpha, beta = n.attr("alpha", 1.0), n.attr("beta", 1.0)
    if alpha != 1.0:
        y = n.add("mul", y, n.const(alpha, dtype=y.dtype))
    if c is not None and beta != 0.0:
        y = n.add("add", y, c if beta == 1.0 else n.add("mul", c, n.const(beta, dtype=c.dtype)))
    return y


def _conv(n, x, w, b=None):
    x, strides, dilations, padding = _window_args(n, x, w.shape[2:], pad_value=0.0)
    extra = (b,) if b is not None else ()
    return n.add(f"conv{len(strides)}d", x, w, *extra, stride=tuple(strides), padding=padding,
                 dilation=tuple(dilations), groups=n.attr("group", 1))


def _max_pool(n, x):
    if n.n_outputs() > 1 and n.proto.output[1]:
        n.fail("the Indices output is not supported")
    kernel = n.attr("kernel_shape")
    x, strides, dilations, padding = _window_args(n, x, kernel, pad_value=-math.inf,
                                                  max_pad=[k // 2 for k in kernel])
    return n.add(f"max_pool{len(kernel)}d", x, kernel=tuple(kernel), stride=tuple(strides), padding=padding,
                 dilation=tuple(dilations), ceil_mode=bool(n.attr("ceil_mode", 0)))


def _avg_pool(n, x):
    kernel = n.attr("kernel_shape")
    include = bool(n.attr("count_include_pad", 0))
    # Explicit zero padding is only right when the padded zeros count in the average.
    x, strides, dilations, padding = _window_args(n, x, kernel, pad_value=0.0 if include else None,
                                                  max_pad=[k // 2 for k in kernel])
    if any(d != 1 for d in dilations):
        n.fail("dilated average pooling is not supported")
    return n.add(f"avg_pool{len(kernel)}d", x, kernel=tuple(kernel), stride=tuple(strides), padding=padding,
                 ceil_mode=bool(n.attr("ceil_mode", 0)), count_include_pad=include)


def _global_pool(op):
    return lambda n, x: n.add(op, x, axes=list(range(2, len(x.shape))), keepdim=True)


def _conv_transpose(n, x, w, b=None):
    if len(x.shape) != 4:
        n.unsupported(f"only 1-d and 2-d spatial inputs (rank 3 or 4) are supported, got shape {list(x.shape)}")
    spatial, kernel = x.shape[2:], w.shape[2:]
    strides, dilations = list(n.attr("strides", [1, 1])), list(n.attr("dilations", [1, 1]))
    out_pad = list(n.attr("output_padding", [0, 0]))
    # the output before any padding is removed ("full"), then the pads removed from its ends
    full = [(i - 1) * s + (k - 1) * d + 1 for i, s, k, d in zip(spatial, strides, kernel, dilations)]
    auto, target = n.attr("auto_pad", "NOTSET"), n.attr("output_shape")
    if target is not None or auto in ("SAME_UPPER", "SAME_LOWER"):
        # pads follow from the output size; SAME_UPPER puts the odd one at the end, otherwise the start
        target = list(target)[-2:] if target is not None else [i * s for i, s in zip(spatial, strides)]
        total = [f + p - t for f, p, t in zip(full, out_pad, target)]
        if any(t < 0 for t in total):
            n.unsupported(f"output_shape {target} is larger than the convolution's full output {full}")
        begins = [t // 2 if auto == "SAME_UPPER" else t - t // 2 for t in total]
        ends = [t - b for t, b in zip(total, begins)]
    elif auto == "VALID":
        begins = ends = [0, 0]
    else:
        pads = list(n.attr("pads", [0, 0, 0, 0]))
        begins, ends = pads[:2], pads[2:]
    if any(p < 0 for p in begins + ends):
        n.unsupported(f"negative pads {begins + ends}")
    if any(p >= max(s, d) for p, s, d in zip(out_pad, strides, dilations)):
        n.unsupported(f"output_padding {out_pad} not below the stride or dilation")
    # torch pads both ends alike: remove the smaller pad there and slice off the rest
    common = [min(b, e) for b, e in zip(begins, ends)]
    extra = (b,) if b is not None else ()
    y = n.add("conv_transpose2d", x, w, *extra, stride=tuple(strides), padding=tuple(common),
              output_padding=tuple(out_pad), groups=n.attr("group", 1), dilation=tuple(dilations))
    for i in range(2):
        start = begins[i] - common[i]
        y = _slice_axis(n, y, 2 + i, start, start + full[i] + out_pad[i] - begins[i] - ends[i], 1)
    return y


# 1-d window attributes as 2-d ones with a height of 1
_LIFT_1D = {"kernel_shape": lambda v: [1] + v, "strides": lambda v: [1] + v, "dilations": lambda v: [1] + v,
            "output_padding": lambda v: [0] + v, "output_shape": lambda v: [1] + v[-1:],
            "pads": lambda v: [0, v[0], 0, v[1]]}


def _windows_1d(handler):
    """Conv, ConvTranspose and the pools on rank-3 inputs [N, C, L]: run as 2-d on [N, C, 1, L]."""
    def wrapped(n, x, w=None, *rest):
        if len(x.shape) != 3:
            return handler(n, x, *([w] if w is not None or rest else []), *rest)
        for key, lift in _LIFT_1D.items():
            if key in n.attrs:
                n.overrides[key] = lift(list(n.attr(key)))
        x = reshape(n, x, x.shape[:2] + (1,) + x.shape[2:])
        if w is not None:  # the weight of a convolution: [O, I, k] -> [O, I, 1, k]
            w = reshape(n, w, w.shape[:2] + (1,) + w.shape[2:])
        y = handler(n, x, *([w] if w is not None or rest else []), *rest)
        return reshape(n, y, y.shape[:2] + y.shape[3:])
    return wrapped


def _pad_h(n, x, pads=None, value=None, axes=None):
    mode = n.attr("mode", "constant")
    if mode not in ("constant", "reflect", "edge", "wrap"):
        n.unsupported(f"pad mode {mode!r}")
    pads = n.ints(pads, "pads", "pads")
    fill = n.attr("value", 0.0) if value is None else n.value(value, "constant_value").item()
    rank = len(x.shape)
    axes = [_axis(a, rank) for a in (n.ints(axes, "axes") or range(rank))]
    begins, ends = [0] * rank, [0] * rank
    for i, a in enumerate(axes):
        begins[a], ends[a] = pads[i], pads[i + len(axes)]
    return _pad(n, x, begins, ends, fill) if mode == "constant" else _pad_mode(n, x, begins, ends, mode)


_TORCH_PAD = {"reflect": "reflect", "edge": "replicate", "wrap": "circular"}


def _pad_mode(n, x, begins, ends, mode):
    """reflect / edge / wrap padding. torch pads the last 1 to 3 dims of a tensor with one or two
    more in these modes: more dims before the first padded one are flattened into one. Pads that do
    not fit (padding a dim further than torch wraps or reflects, more dims, negative pads) become one
    gather per dim of the positions numpy's pad reads, which is how ONNX defines the modes."""
    rank = len(x.shape)
    padded = [a for a in range(rank) if begins[a] or ends[a]]
    if not padded:
        return x
    first = padded[0]
    limit = {"reflect": lambda d: d - 1, "edge": lambda d: math.inf, "wrap": lambda d: d}[mode]
    if rank - first <= 3 and all(0 <= p <= limit(x.shape[a]) for a in padded for p in (begins[a], ends[a])):
        y = x if first in (1, 2) else reshape(n, x, (math.prod(x.shape[:first]),) + x.shape[first:])
        pads = [int(p) for a in reversed(range(first, rank)) for p in (begins[a], ends[a])]
        y = n.add("pad", y, pads=pads, mode=_TORCH_PAD[mode])
        return reshape(n, y, [d + b + e for d, b, e in zip(x.shape, begins, ends)])
    for a in padded:
        dim, b, e = x.shape[a], begins[a], ends[a]
        keep = np.arange(max(-b, 0), dim - max(-e, 0))  # negative pads remove elements
        index = np.pad(keep, (max(b, 0), max(e, 0)), mode={"edge": "edge"}.get(mode, mode))
        x = n.add("gather", x, n.const(torch.from_numpy(index).long()), axis=a)
    return x


def _gelu(n, x):
    return n.add("gelu", x, approximate=n.attr("approximate", "none"))


def _hard_sigmoid(n, x, alpha=0.2, beta=0.5):
    alpha, beta = n.attr("alpha", alpha), n.attr("beta", beta)
    y = n.add("add", n.add("mul", x, n.const(alpha, dtype=x.dtype)), n.const(beta, dtype=x.dtype))
    return n.add("clamp", y, min=0.0, max=1.0)


def _hard_swish(n, x):  # ONNX's function body: x * HardSigmoid(x, alpha=1/6, beta=0.5)
    return n.add("mul", x, _hard_sigmoid(n, x, alpha=float(np.float32(1 / 6))))


def _mish(n, x):
    return n.add("mul", x, n.add("tanh", n.add("softplus", x)))


def _elu(n, x):
    return n.add("elu", x, alpha=float(n.attr("alpha", 1.0)))


def _selu(n, x):
    return n.add("elu", x, alpha=float(n.attr("alpha", 1.67326319217681884765625)),
                 scale=float(n.attr("gamma", 1.05070102214813232421875)))


def _celu(n, x):  # max(0, x) + min(0, alpha (exp(x / alpha) - 1)): torch's celu, an elu
    alpha = float(n.attr("alpha", 1.0))
    return n.add("elu", x, alpha=alpha, input_scale=1.0 / alpha)


def _prelu(n, x, slope):
    if slope.op == "const" and slope.numel == 1 and x.dtype.is_floating_point:
        return n.add("leaky_relu", x, alpha=float(slope.value.reshape(-1)[0]))
    # ONNX Runtime's x > 0 ? x : x * slope, with slope broadcast to x (unidirectionally)
    return n.add("where", n.add("gt", x, n.const(0, dtype=x.dtype)), x, n.add("mul", x, slope))


def _mod(n, a, b):
    # fmod=0 (integers only) takes the divisor's sign like Python's %; fmod=1 the dividend's, like C
    return n.add("fmod" if n.attr("fmod", 0) else "remainder", a, b)


def _is_inf(n, x):
    pos, neg = n.attr("detect_positive", 1), n.attr("detect_negative", 1)
    if pos and neg:
        return n.add("eq", n.add("abs", x), n.const(math.inf, dtype=x.dtype))
    if pos or neg:
        return n.add("eq", x, n.const(math.inf if pos else -math.inf, dtype=x.dtype))
    return n.const(torch.zeros(x.shape, dtype=torch.bool))


def _if(n, cond):
    """An If whose condition folded to a constant: the branch taken, inlined. Its nodes see the
    enclosing scope, and their names do not leak out of it."""
    if cond.op != "const":
        n.unsupported("its condition is computed at run time (only a constant condition is inlined)")
    if cond.numel != 1:
        n.fail(f"the condition has {cond.numel} elements, not one")
    branch = n.attr("then_branch" if bool(cond.value.reshape(-1)[0]) else "else_branch")
    scope = dict(n.env)
    for t in branch.initializer:
        scope[t.name] = n.g.const(_tensor(t), name=t.name)
    for node in branch.node:
        _convert(n.g, scope, node, n.opset)
    missing = [o.name for o in branch.output if o.name not in scope]
    if missing:
        raise ModelFileError(f"ONNX node {n.name!r} (If): branch outputs {missing} are produced by no node")
    return [scope[o.name] for o in branch.output]


HANDLERS = {
    # elementwise
    **{k: _unary(v) for k, v in {
        "Neg": "neg", "Abs": "abs", "Exp": "exp", "Log": "log", "Sqrt": "sqrt", "Reciprocal": "reciprocal",
        "Sin": "sin", "Cos": "cos", "Tanh": "tanh", "Sigmoid": "sigmoid", "Erf": "erf", "Relu": "relu",
        "Floor": "floor", "Ceil": "ceil", "Not": "logical_not", "IsNaN": "isnan", "Sign": "sign",
        "Softplus": "softplus", "Round": "round", "Atan": "atan", "Tan": "tan", "Asin": "asin", "Acos": "acos",
        "Sinh": "sinh", "Cosh": "cosh", "Asinh": "asinh", "Acosh": "acosh", "Atanh": "atanh"}.items()},
    "LeakyRelu": lambda n, x: n.add("leaky_relu", x, alpha=float(n.attr("alpha", 0.01))),
    "Gelu": _gelu, "Elu": _elu, "Selu": _selu, "Celu": _celu, "HardSigmoid": _hard_sigmoid,
    "HardSwish": _hard_swish, "Mish": _mish, "PRelu": _prelu, "IsInf": _is_inf,
    "Clip": _clip,
    "Cast": _cast, "CastLike": _cast_like,
    "Identity": _identity, "Dropout": _dropout,
    # broadcasting binary
    **{k: _binary(v) for k, v in {
        "Add": "add", "Sub": "sub", "Mul": "mul", "Equal": "eq", "Less": "lt", "LessOrEqual": "le",
        "Greater": "gt", "GreaterOrEqual": "ge", "And": "logical_and", "Or": "logical_or",
        "Xor": "ne"}.items()},
    "Div": _div, "Pow": _pow, "Where": _where, "Mod": _mod,
    "Max": _variadic("maximum"), "Min": _variadic("minimum"), "Sum": _variadic("add"), "Mean": _mean,
    # constants and shapes (fold at load time)
    "Constant": _constant, "ConstantOfShape": _constant_of_shape, "Shape": _shape, "Size": _size,
    "Range": _range, "If": _if,
    # data movement
    "Reshape": _reshape_h, "Flatten": _flatten, "Squeeze": _squeeze, "Unsqueeze": _unsqueeze,
    "Transpose": _transpose, "Concat": _concat, "Slice": _slice, "Split": _split, "Gather": _gather,
    "GatherElements": _gather_elements, "GatherND": _gather_nd, "ScatterElements": _scatter_elements,
    "Scatter": _scatter_elements, "ScatterND": _scatter_nd, "Expand": _expand, "Tile": _tile,
    "Trilu": _trilu, "Pad": _pad_h, "DepthToSpace": _depth_to_space, "SpaceToDepth": _space_to_depth,
    "OneHot": _one_hot, "Resize": _resize,
    # reductions and normalisations
    "ReduceSum": _reduce("reduce_sum"), "ReduceMean": _reduce("reduce_mean"),
    "ReduceMax": _reduce("reduce_max"), "ReduceMin": _reduce("reduce_min"), "ReduceProd": _reduce("reduce_prod"),
    "ReduceL1": _reduce("reduce_sum", pre=lambda n, x: n.add("abs", x)),
    "ReduceL2": _reduce("reduce_sum", pre=_square, post=lambda n, y: n.add("sqrt", y)),
    "ReduceSumSquare": _reduce("reduce_sum", pre=_square),
    "ReduceLogSum": _reduce("reduce_sum", post=lambda n, y: n.add("log", y)),
    "ReduceLogSumExp": _reduce_log_sum_exp,
    "ArgMax": _arg("argmax"), "ArgMin": _arg("argmin"), "TopK": _topk,
    "CumSum": _cumsum, "Softmax": _softmax("softmax"), "LogSoftmax": _softmax("log_softmax"),
    "LayerNormalization": _layer_norm,
    "BatchNormalization": _batch_norm, "InstanceNormalization": _instance_norm,
    # contractions and windows
    "MatMul": _binary("matmul"), "Gemm": _gemm, "Einsum": _einsum, "Conv": _windows_1d(_conv),
    "ConvTranspose": _windows_1d(_conv_transpose),
    "MaxPool": _windows_1d(_max_pool), "AveragePool": _windows_1d(_avg_pool),
    "GlobalAveragePool": _global_pool("reduce_mean"), "GlobalMaxPool": _global_pool("reduce_max"),
}
