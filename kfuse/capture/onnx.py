"""ONNX frontend: an ONNX model becomes a kfuse Graph, one handler per ONNX op type.

`load_onnx(path_or_proto, example_inputs)` binds the graph inputs to the example inputs' static
shapes and dtypes, so every dim is known at load time: Shape yields a constant, and the shape
arithmetic exporters emit (Shape -> Gather -> Concat -> Reshape, Range, ConstantOfShape, ...)
folds away because `Graph.add` folds any node whose inputs are all constants. Handlers that
need a shape-like input (Reshape's shape, Slice's starts, ...) therefore read it as a constant
and raise a KfuseError naming the node when it is not one.

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
    # Unsupported ops first: the checker would only say "no schema" for a non-standard one.
    for node in proto.graph.node:
        if node.domain not in ("", "ai.onnx") or node.op_type not in HANDLERS:
            full = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            raise UnsupportedOpError(full, node.name or (node.output[0] if node.output else ""), "ONNX")
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


def _convert(g: Graph, env: dict, onnx_node: onnx.NodeProto, opset: int):
    name = onnx_node.name or (onnx_node.output[0] if onnx_node.output else "")
    op_type = onnx_node.op_type
    ins = []
    for i in onnx_node.input:
        if i and i not in env:
            raise ModelFileError(f"ONNX node {name!r} ({op_type}) reads {i!r}, which nothing defines before it")
        ins.append(env[i] if i else None)
    node = _Node(g, onnx_node, name, opset)
    try:
        out = HANDLERS[op_type](node, *ins)
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

    def __init__(self, g: Graph, proto: onnx.NodeProto, name: str, opset: int):
        self.g, self.proto, self.name, self.opset = g, proto, name, opset
        self.attrs = {a.name: a for a in proto.attribute}

    def attr(self, key, default=None):
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


def _axis(axis: int, rank: int) -> int:
    return axis + rank if axis < 0 else axis


# -- shared helpers -------------------------------------------------------------------------------

def _reshape(n: _Node, x: Node, shape) -> Node:
    shape = tuple(int(d) for d in shape)
    return x if shape == x.shape else n.add("reshape", x, shape=shape)


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
    return n.add("gather", _reshape(n, x, (x.numel,)), n.const(flat_index), axis=0)


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
    if len(x.shape) != 4:
        n.fail(f"only 2-d spatial inputs (rank 4) are supported, got shape {list(x.shape)}")
    strides = list(n.attr("strides", [1, 1]))
    dilations = list(n.attr("dilations", [1, 1]))
    begins, ends = _spatial_pads(n, x, kernel, strides, dilations)
    symmetric = begins == ends and (max_pad is None or all(b <= m for b, m in zip(begins, max_pad)))
    if symmetric:
        return x, strides, dilations, tuple(begins)
    if pad_value is None:
        n.fail(f"asymmetric pads {begins + ends} are not supported here")
    return _pad(n, x, [0, 0] + begins, [0, 0] + ends, pad_value), strides, dilations, (0, 0)


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
    # Integer Div truncates in ONNX; torch's div is true division.
    if a.op == "const" and b.op == "const":
        return n.const(torch.div(a.value, b.value, rounding_mode="trunc"))
    q = n.add("div", n.add("cast", a, dtype=torch.float64), n.add("cast", b, dtype=torch.float64))
    return n.add("cast", q, dtype=a.dtype)  # the cast truncates toward zero


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
    if -1 in target:
        known = math.prod(d for d in target if d != -1)
        target[target.index(-1)] = x.numel // known if known else 0
    return _reshape(n, x, target)


def _flatten(n, x):
    axis = _axis(n.attr("axis", 1), len(x.shape))
    return _reshape(n, x, (math.prod(x.shape[:axis]), math.prod(x.shape[axis:])))


def _squeeze(n, x, axes=None):
    axes = n.ints(axes, "axes", "axes")
    rank = len(x.shape)
    axes = [i for i, d in enumerate(x.shape) if d == 1] if axes is None else [_axis(a, rank) for a in axes]
    if any(x.shape[a] != 1 for a in axes):
        n.fail(f"squeezes axes {axes} of shape {list(x.shape)}, which are not all of size 1")
    return _reshape(n, x, [d for i, d in enumerate(x.shape) if i not in axes])


def _unsqueeze(n, x, axes=None):
    axes = n.ints(axes, "axes", "axes")
    rank = len(x.shape) + len(axes)
    shape = list(x.shape)
    for a in sorted(_axis(a, rank) for a in axes):
        shape.insert(a, 1)
    return _reshape(n, x, shape)


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
    if step == 1:
        return x if (start, end) == (0, dim) else n.add("slice", x, axis=axis, start=start, end=max(end, start))
    if step > 1:
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
    rows = _reshape(n, x, (math.prod(x.shape[:k]),) + x.shape[k:])  # the first k dims as one
    return n.add("gather", rows, n.const(_positions(x.shape[:k])[index.unbind(-1)]), axis=0)


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
    y = n.add("expand", _reshape(n, x, inter), shape=tuple(wide))
    return _reshape(n, y, [r * d for r, d in zip(reps, x.shape)])


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


def _reduce(op):
    def handler(n, x, axes=None):
        axes = n.ints(axes, "axes", "axes")
        if not axes:  # empty or absent: all axes, unless the node asks for a no-op
            if n.attr("noop_with_empty_axes", 0):
                return x
            axes = range(len(x.shape))
        axes = sorted(_axis(a, len(x.shape)) for a in axes)
        return n.add(op, x, axes=axes, keepdim=bool(n.attr("keepdims", 1)))
    return handler


def _argmax(n, x):
    if n.attr("select_last_index", 0):
        n.fail("select_last_index=1 is not supported")
    return n.add("argmax", x, axis=_axis(n.attr("axis", 0), len(x.shape)), keepdim=bool(n.attr("keepdims", 1)))


def _softmax(op):
    def handler(n, x):
        rank = len(x.shape)
        if n.opset >= 13:
            return n.add(op, x, axis=_axis(n.attr("axis", -1), rank))
        # Before opset 13 the input is flattened to 2-d at `axis` and normalised over the second part.
        axis = _axis(n.attr("axis", 1), rank)
        flat = _reshape(n, x, (math.prod(x.shape[:axis]), math.prod(x.shape[axis:])))
        return _reshape(n, n.add(op, flat, axis=1), x.shape)
    return handler


def _norm_weight(n, w, shape):
    """A norm's scale or bias as the normalised shape (ONNX allows any broadcastable one)."""
    if w.shape == shape:
        return w
    return _reshape(n, w, shape) if w.numel == math.prod(shape) else n.add("expand", w, shape=shape)


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
    return n.add("add", n.add("mul", x, _reshape(n, s, per_channel)), _reshape(n, t, per_channel))


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
    return n.add("conv2d", x, w, *extra, stride=tuple(strides), padding=padding,
                 dilation=tuple(dilations), groups=n.attr("group", 1))


def _max_pool(n, x):
    if n.n_outputs() > 1 and n.proto.output[1]:
        n.fail("the Indices output is not supported")
    kernel = n.attr("kernel_shape")
    x, strides, dilations, padding = _window_args(n, x, kernel, pad_value=-math.inf,
                                                  max_pad=[k // 2 for k in kernel])
    return n.add("max_pool2d", x, kernel=tuple(kernel), stride=tuple(strides), padding=padding,
                 dilation=tuple(dilations), ceil_mode=bool(n.attr("ceil_mode", 0)))


def _avg_pool(n, x):
    kernel = n.attr("kernel_shape")
    include = bool(n.attr("count_include_pad", 0))
    # Explicit zero padding is only right when the padded zeros count in the average.
    x, strides, dilations, padding = _window_args(n, x, kernel, pad_value=0.0 if include else None,
                                                  max_pad=[k // 2 for k in kernel])
    if dilations != [1, 1]:
        n.fail("dilated average pooling is not supported")
    return n.add("avg_pool2d", x, kernel=tuple(kernel), stride=tuple(strides), padding=padding,
                 ceil_mode=bool(n.attr("ceil_mode", 0)), count_include_pad=include)


def _global_pool(op):
    return lambda n, x: n.add(op, x, axes=list(range(2, len(x.shape))), keepdim=True)


def _pad_h(n, x, pads=None, value=None, axes=None):
    if n.attr("mode", "constant") != "constant":
        n.fail(f"pad mode {n.attr('mode')!r} is not supported")
    pads = n.ints(pads, "pads", "pads")
    fill = n.attr("value", 0.0) if value is None else n.value(value, "constant_value").item()
    rank = len(x.shape)
    axes = [_axis(a, rank) for a in (n.ints(axes, "axes") or range(rank))]
    begins, ends = [0] * rank, [0] * rank
    for i, a in enumerate(axes):
        begins[a], ends[a] = pads[i], pads[i + len(axes)]
    return _pad(n, x, begins, ends, fill)


def _gelu(n, x):
    return n.add("gelu", x, approximate=n.attr("approximate", "none"))


HANDLERS = {
    # elementwise
    **{k: _unary(v) for k, v in {
        "Neg": "neg", "Abs": "abs", "Exp": "exp", "Log": "log", "Sqrt": "sqrt", "Reciprocal": "reciprocal",
        "Sin": "sin", "Cos": "cos", "Tanh": "tanh", "Sigmoid": "sigmoid", "Erf": "erf", "Relu": "relu",
        "Floor": "floor", "Ceil": "ceil", "Not": "logical_not", "IsNaN": "isnan", "Sign": "sign",
        "Softplus": "softplus"}.items()},
    "LeakyRelu": lambda n, x: n.add("leaky_relu", x, alpha=float(n.attr("alpha", 0.01))),
    "Gelu": _gelu,
    "Clip": _clip,
    "Cast": _cast, "CastLike": _cast_like,
    "Identity": _identity, "Dropout": _dropout,
    # broadcasting binary
    **{k: _binary(v) for k, v in {
        "Add": "add", "Sub": "sub", "Mul": "mul", "Equal": "eq", "Less": "lt", "LessOrEqual": "le",
        "Greater": "gt", "GreaterOrEqual": "ge", "And": "logical_and", "Or": "logical_or",
        "Xor": "ne"}.items()},
    "Div": _div, "Pow": _pow, "Where": _where,
    "Max": _variadic("maximum"), "Min": _variadic("minimum"), "Sum": _variadic("add"), "Mean": _mean,
    # constants and shapes (fold at load time)
    "Constant": _constant, "ConstantOfShape": _constant_of_shape, "Shape": _shape, "Size": _size,
    "Range": _range,
    # data movement
    "Reshape": _reshape_h, "Flatten": _flatten, "Squeeze": _squeeze, "Unsqueeze": _unsqueeze,
    "Transpose": _transpose, "Concat": _concat, "Slice": _slice, "Split": _split, "Gather": _gather,
    "GatherElements": _gather_elements, "GatherND": _gather_nd, "Expand": _expand, "Tile": _tile,
    "Trilu": _trilu, "Pad": _pad_h,
    # reductions and normalisations
    "ReduceSum": _reduce("reduce_sum"), "ReduceMean": _reduce("reduce_mean"),
    "ReduceMax": _reduce("reduce_max"), "ReduceMin": _reduce("reduce_min"), "ArgMax": _argmax,
    "CumSum": _cumsum, "Softmax": _softmax("softmax"), "LogSoftmax": _softmax("log_softmax"),
    "LayerNormalization": _layer_norm,
    "BatchNormalization": _batch_norm,
    # contractions and windows
    "MatMul": _binary("matmul"), "Gemm": _gemm, "Conv": _conv,
    "MaxPool": _max_pool, "AveragePool": _avg_pool,
    "GlobalAveragePool": _global_pool("reduce_mean"), "GlobalMaxPool": _global_pool("reduce_max"),
}
