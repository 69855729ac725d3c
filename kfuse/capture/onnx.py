"""ONNX frontend, the loader: an ONNX model becomes a kfuse Graph, one handler per ONNX op type
(the handlers and the HANDLERS table are in the onnx_ops package).

`load_onnx(path_or_proto, example_inputs)` binds the graph inputs to the example inputs' static
shapes and dtypes, so every dim is known at load time: Shape yields a constant, and the shape
arithmetic exporters emit (Shape -> Gather -> Concat -> Reshape, Range, ConstantOfShape, ...)
folds away because `Graph.add` folds any node whose inputs are all constants. A declared dim that
is a name, -1, 0 or absent is dynamic: it takes the example's size (one name, one size).

Handlers that need a shape-like input (Reshape's shape, Slice's starts, ReduceSum's axes, TopK's k,
Resize's scales, an If's condition, ...) read it as a constant. When it is computed at run time
from graph inputs instead (a shape tensor fed as an input), it is specialised: computed from the
example inputs at load time, like a static shape, and every input it reads is recorded in the
returned graph's `specialised` ({input index: the example's value}; see onnx_ops/common.py
`specialise`). The graph is right only for inputs of those values: whoever caches compiled graphs
keys them by those values too.

An op with no handler (or a variant its handler does not map) whose inputs are all constants is
computed at load time by ONNX's reference evaluator (`_evaluate`, size-capped); an If whose
condition folds to a constant (or is specialised) is replaced by the branch it takes.

Graph inputs and outputs that are not tensors (sequences, optionals, maps) or whose element type
kfuse has no dtype for are a clear KfuseError naming them, checked before the examples. uint16/32/64
values are carried as int64 while loading (onnx_ops/unsigned.py) and cast back at the outputs.
"""
from __future__ import annotations

import os

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import TensorProto

from ..errors import InputError, KfuseError, ModelFileError
from ..ir import Graph, Node
from .onnx_ops import HANDLERS
from .onnx_ops import unsigned
from .onnx_ops.common import DTYPES, _convert, _tensor, _unsupported, handler_key

__all__ = ["HANDLERS", "load_onnx", "output_steps", "read_model"]


# -- loading ----------------------------------------------------------------------------------------

def load_onnx(model, example_inputs) -> Graph:
    """The kfuse Graph of an ONNX model (a path or a ModelProto), with its inputs bound to the
    static shapes and dtypes of `example_inputs` (symbolic ONNX dims take the given sizes)."""
    proto = read_model(model)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 1)
    g = Graph()
    g.specialised = {}   # input index -> the example value the graph was specialised on
    g._unsigned = {}     # int64 node -> the unsigned width it carries (onnx_ops/unsigned.py), while loading
    env: dict[str, Node] = {}
    for t in proto.graph.initializer:
        env[t.name] = unsigned.const(g, t, t.name) if t.data_type in unsigned.UNSIGNED else g.const(_tensor(t), name=t.name)
    inputs = [i for i in proto.graph.input if i.name not in env]
    for vi, where in [(i, "input") for i in inputs] + [(o, "output") for o in proto.graph.output]:
        _check_type(vi, where)
    # while loading, handlers reach the examples (and the values computed from them) through the graph
    g._examples, g._example_values = _bind_inputs(g, env, inputs, example_inputs), {}
    try:
        for onnx_node in proto.graph.node:
            _convert(g, env, onnx_node, opset)
        for o in proto.graph.output:
            if o.name not in env:
                raise ModelFileError(f"graph output {o.name!r} is produced by no node")
            elem = o.type.tensor_type.elem_type
            out = env[o.name]
            if elem in unsigned.UNSIGNED or unsigned.bits_of(g, out):
                out = unsigned.to_output(g, out, elem, o.name)
            g.outputs.append(out)
            g.output_names.append(o.name)
    finally:
        del g._examples, g._example_values, g._unsigned
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
        key = handler_key(node)
        if key not in HANDLERS and (key != node.op_type or not onnx.defs.has(node.op_type)):
            raise _unsupported(node)
    try:
        # The checker wants a path for models over 2 GB; either way it is cheap next to loading.
        big = not isinstance(model, onnx.ModelProto) and proto.ByteSize() >= 2**31
        onnx.checker.check_model(os.fspath(model) if big else _for_checker(proto))
    except (onnx.checker.ValidationError, ValueError) as e:
        raise ModelFileError(f"ONNX model {what} fails the ONNX checker: {e}") from None
    if not proto.graph.output:
        raise ModelFileError(f"ONNX model {what} has no graph outputs (truncated?)")
    return proto


def output_steps(model) -> dict[str, float]:
    """Graph output name -> its quantization step, for the outputs a DequantizeLinear with a constant scale
    produces (the largest of a per-channel scale): where a fused computation's float value lands
    within rounding of a QuantizeLinear's half-way point, it may round to the neighbouring step."""
    proto = read_model(model)
    consts = {t.name: t for t in proto.graph.initializer}
    consts.update({n.output[0]: a.t for n in proto.graph.node if n.op_type == "Constant" for a in n.attribute
                   if a.name == "value"})
    producer = {o: n for n in proto.graph.node for o in n.output}
    steps = {}
    for out in proto.graph.output:
        n = producer.get(out.name)
        if n is not None and n.op_type == "DequantizeLinear" and n.domain in ("", "ai.onnx", "com.microsoft") \
                and len(n.input) > 1 and n.input[1] in consts:
            scale = onnx.numpy_helper.to_array(consts[n.input[1]])
            if scale.size and np.issubdtype(scale.dtype, np.floating):
                steps[out.name] = float(np.abs(scale.astype(np.float64)).max())
    return steps


WIDENED = (TensorProto.FLOAT16, TensorProto.FLOAT)     # the element types `widened` makes double


def widened(model: onnx.ModelProto, to: int = TensorProto.DOUBLE) -> onnx.ModelProto:
    """A copy of `model` computing in float64: every float16 and float32 type (inputs, outputs, value
    infos, initializers, Cast targets, constants, subgraphs, functions' casts) made double; with `to`
    FLOAT, float16 alone made float32. verify's float64 evaluation of an ONNX file
    (api.CompiledModel._reference64) runs it, as the node suite's does."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    types = [t for t in WIDENED if t != to]
    wide = onnx.helper.tensor_dtype_to_np_dtype(to)

    def widen_type(t):
        if t.HasField("tensor_type") and t.tensor_type.elem_type in types:
            t.tensor_type.elem_type = to

    def widen_tensor(t):
        if t.data_type in types:
            t.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(t).astype(wide), t.name))

    def widen_attrs(node):
        for a in node.attribute:
            if a.name in ("to", "saturate_to") and a.type == onnx.AttributeProto.INT and a.i in types:
                a.i = to
            elif a.type == onnx.AttributeProto.TENSOR:
                widen_tensor(a.t)
            elif a.type == onnx.AttributeProto.GRAPH:
                widen_graph(a.g)
            elif a.type == onnx.AttributeProto.GRAPHS:
                for sub in a.graphs:
                    widen_graph(sub)

    def widen_graph(g):
        for vi in list(g.input) + list(g.output) + list(g.value_info):
            widen_type(vi.type)
        for t in g.initializer:
            widen_tensor(t)
        for node in g.node:
            widen_attrs(node)

    widen_graph(out.graph)
    for f in out.functions:
        for node in f.node:
            widen_attrs(node)
    return out


UNCHECKED = "kfuse.unchecked"   # the checker's copy puts default-domain ops with no ONNX schema here


def _for_checker(proto: onnx.ModelProto) -> onnx.ModelProto:
    """proto, or for the checker a copy with what ONNX Runtime accepts and the checker does not made
    acceptable: graph outputs that declare no tensor type or no shape (kfuse's conversion finds both) get
    placeholders; default-domain ops with no ONNX schema that kfuse handles (ONNX Runtime's optimizer
    writes SimplifiedLayerNormalization there) move to a domain the checker does not check."""
    def untyped(o):
        kind = o.type.WhichOneof("value")
        return kind is None or kind == "tensor_type" and not o.type.tensor_type.HasField("shape")

    def schemaless(n):
        return n.domain in ("", "ai.onnx") and not onnx.defs.has(n.op_type)
    if not any(untyped(o) for o in proto.graph.output) and not any(schemaless(n) for n in proto.graph.node):
        return proto
    fixed = onnx.ModelProto()
    fixed.CopyFrom(proto)
    for o in fixed.graph.output:
        if untyped(o):
            if o.type.WhichOneof("value") is None:
                o.type.tensor_type.elem_type = TensorProto.FLOAT    # a placeholder, for the checker alone
            o.type.tensor_type.shape.SetInParent()
    moved = [n for n in fixed.graph.node if schemaless(n)]
    for n in moved:
        n.domain = UNCHECKED
    if moved:
        fixed.opset_import.append(onnx.helper.make_opsetid(UNCHECKED, 1))
    return fixed


def _check_type(vi: onnx.ValueInfoProto, where: str):
    """A clear error for a graph input or output kfuse cannot hold: not a tensor (a sequence, an
    optional, a map), or a tensor of an element type with no kfuse dtype (strings, 2-, 4- and 8-bit
    types; uint16/32/64 are carried as int64, onnx_ops/unsigned.py). An output with no declared type passes."""
    kind = vi.type.WhichOneof("value")
    if kind is None:
        return
    if kind != "tensor_type":
        what = {"sequence_type": "a sequence", "optional_type": "an optional", "map_type": "a map",
                "sparse_tensor_type": "a sparse tensor"}.get(kind, kind)
        raise KfuseError(f"ONNX graph {where} {vi.name!r} is {what}: kfuse takes and returns tensors only")
    elem = vi.type.tensor_type.elem_type
    if elem not in DTYPES and elem not in unsigned.UNSIGNED and (where == "input" or elem != TensorProto.UNDEFINED):
        raise KfuseError(f"ONNX graph {where} {vi.name!r} has element type {TensorProto.DataType.Name(elem)}, "
                         "which kfuse does not support")


def _bind_inputs(g: Graph, env: dict, inputs, examples) -> dict:
    """Graph inputs for the ONNX inputs, with the examples' shapes; returns {input node: example}."""
    if len(examples) != len(inputs):
        raise InputError(f"the ONNX model takes {len(inputs)} inputs "
                         f"({', '.join(repr(i.name) for i in inputs)}), got {len(examples)} example inputs")
    sizes: dict[str, int] = {}  # symbolic dim name -> the size it took, so shared dims agree
    bound = {}
    for vi, ex in zip(inputs, examples):
        tt = vi.type.tensor_type
        dtype = unsigned.UNSIGNED[tt.elem_type][0] if tt.elem_type in unsigned.UNSIGNED else DTYPES.get(tt.elem_type)
        if dtype != ex.dtype:
            raise InputError(f"ONNX input {vi.name!r} is {TensorProto.DataType.Name(tt.elem_type)}, "
                             f"the example input is {ex.dtype}")
        if tt.HasField("shape"):
            dims = tt.shape.dim
            if len(dims) != ex.dim():
                raise InputError(f"ONNX input {vi.name!r} has rank {len(dims)}, the example input "
                                 f"has shape {list(ex.shape)}")
            for axis, (d, size) in enumerate(zip(dims, ex.shape)):
                # a positive size is fixed; a name, -1, 0 or nothing is dynamic (the example's size)
                if d.HasField("dim_value") and d.dim_value > 0 and d.dim_value != size:
                    raise InputError(f"ONNX input {vi.name!r} has size {d.dim_value} in dim {axis}, "
                                     f"the example input has {size}")
                if d.HasField("dim_param") and d.dim_param and sizes.setdefault(d.dim_param, size) != size:
                    raise InputError(f"ONNX input {vi.name!r}: dim {d.dim_param!r} is {size} here "
                                     f"but {sizes[d.dim_param]} in an earlier input")
        node = g.input(tuple(ex.shape), ex.dtype, name=vi.name)
        env[vi.name] = unsigned.bind_input(g, node, tt.elem_type) if tt.elem_type in unsigned.UNSIGNED else node
        bound[node] = ex
    return bound
