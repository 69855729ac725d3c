"""What the ONNX handler modules and the loader share: the HANDLERS table and its `handler`
decorator, the node a handler sees (`_Node`), the conversion of one ONNX node (`_convert`, with
load-time evaluation of constant nodes) and helpers more than one handler module uses.

A handler is called as `handler(node, *inputs)`: `node` is a `_Node` (attributes, opset, and
`add`/`const` that build IR nodes named after the ONNX node), `inputs` the IR nodes of the ONNX
inputs (None where an optional input is omitted). It returns one IR node, or a list with one entry
per ONNX output. Names and attribute strings from the model are only displayed and compared, never
executed.
"""
from __future__ import annotations

import math

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

from ...errors import GraphError, KfuseError, ModelFileError, UnsupportedOpError
from ...ir import Graph, Node, postorder
from ...ops.reference import REFERENCE

DTYPES = {
    TensorProto.FLOAT: torch.float32, TensorProto.DOUBLE: torch.float64, TensorProto.FLOAT16: torch.float16,
    TensorProto.BFLOAT16: torch.bfloat16, TensorProto.INT64: torch.int64, TensorProto.INT32: torch.int32,
    TensorProto.INT16: torch.int16, TensorProto.INT8: torch.int8, TensorProto.UINT8: torch.uint8,
    TensorProto.BOOL: torch.bool,
}


HANDLERS: dict = {}
# (applies(graph, onnx node, inputs), convert(node, inputs)) pairs _convert asks before HANDLERS: the
# first that applies converts the node (unsigned.py: nodes that read or make uint16/32/64 values)
INTERCEPT: list = []


def handler(*op_types):
    """Register the decorated function as the handler of these ONNX op types: a name is an op of the
    default ONNX domain, a (domain, name) pair an op of another one (("com.microsoft", "Attention"))."""
    def register(fn):
        for op_type in op_types:
            HANDLERS[op_type] = fn
        return fn
    return register


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


def _unsupported(onnx_node: onnx.NodeProto, detail: str = "") -> UnsupportedOpError:
    full = onnx_node.op_type if onnx_node.domain in ("", "ai.onnx") else f"{onnx_node.domain}.{onnx_node.op_type}"
    return UnsupportedOpError(full, onnx_node.name or (onnx_node.output[0] if onnx_node.output else ""), "ONNX",
                              detail)


def handler_key(onnx_node: onnx.NodeProto):
    """The HANDLERS key of a node: its op type in the default domain, else (domain, op type)."""
    if onnx_node.domain in ("", "ai.onnx"):
        return onnx_node.op_type
    return (onnx_node.domain, onnx_node.op_type)


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
    key = handler_key(onnx_node)
    foldable = constant and key == op_type   # only default-domain ops fold (ONNX's reference evaluator)
    try:
        hook = next((convert for applies, convert in INTERCEPT if applies(g, onnx_node, ins)), None)
        if hook is not None:
            out = hook(node, ins)
        elif key not in HANDLERS:
            if foldable:
                out = _evaluate(node, ins)
            else:   # an op ONNX defines by a function of other ops: that function, inlined
                out = _expand_function(node, ins)
        else:
            try:
                out = HANDLERS[key](node, *ins)
            except UnsupportedOpError as e:  # a variant the handler does not map, on constants: fold it
                if not foldable:
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
        """The value of a shape-like input (a shape, axes, starts, k, scales, an If's condition, ...):
        a constant, or else computed from the example inputs, which specialises the graph on the
        value of every input it reads (see `specialise`)."""
        if x.op == "const":
            return x.value
        return specialise(self, x, what)

    def ints(self, x: Node | None, what: str, attr: str | None = None) -> list[int] | None:
        """A list of ints given as an attribute (older opsets) or as a constant input (newer ones)."""
        if attr and attr in self.attrs:
            return list(self.attr(attr))
        return None if x is None else [int(v) for v in self.value(x, what).reshape(-1).tolist()]


# -- specialisation by value ------------------------------------------------------------------------

# A shape-like operand computed at run time from graph inputs (a Reshape's shape or a ReduceSum's
# axes given as an input) is computed at load time from the example inputs, like a static shape: each
# input it reads is recorded in `graph.specialised` (input index -> the example's value), and the
# compiled program is right only for inputs of those values. Inputs over this many elements are data,
# not shape tensors: a shape-like operand computed from one stays an error.
SPECIALISE_LIMIT = 1 << 12



def inline_graph(n, graph, values=()) -> list:
    """The outputs of subgraph `graph` (an If's branch, a Loop's or Scan's body) with its inputs bound
    to `values` (IR nodes), converted into the enclosing graph: its nodes see the enclosing scope,
    and their names do not leak out of it."""
    scope = dict(n.env)
    for t in graph.initializer:
        scope[t.name] = n.g.const(_tensor(t), name=t.name)
    for vi, v in zip(graph.input, values):
        scope[vi.name] = v
    for node in graph.node:
        _convert(n.g, scope, node, n.opset)
    missing = [o.name for o in graph.output if o.name not in scope]
    if missing:
        raise ModelFileError(f"ONNX node {n.name!r} ({n.proto.op_type}): subgraph outputs {missing} are produced by no node")
    return [scope[o.name] for o in graph.output]

def specialise(n: _Node, x: Node, what: str) -> torch.Tensor:
    """x's value on the example inputs (load_onnx's `graph._examples`), computed by the reference
    functions of x and the nodes it depends on; records the inputs it read in `graph.specialised`."""
    examples = getattr(n.g, "_examples", None)
    order = postorder([x])   # x's ancestors, inputs before their users
    inputs = [i for i in order if i.op == "input"]
    if examples is None or any(i not in examples for i in inputs):
        n.fail(f"{what} is computed at run time, and there is no example input to specialise it on")
    big = [i for i in inputs if examples[i].numel() > SPECIALISE_LIMIT]
    if big:
        n.fail(f"{what} is computed at run time from input {big[0].name!r} ({examples[big[0]].numel()} elements): "
               f"only inputs of at most {SPECIALISE_LIMIT} elements are specialised by value")
    values = n.g._example_values   # memo across handlers: node -> its value on the examples
    for node in order:
        if node in values:
            continue
        if node.op == "input":
            values[node] = examples[node]
        elif node.op == "const":
            values[node] = node.value
        else:
            try:
                values[node] = REFERENCE[node.op](*[values[i] for i in node.inputs], **node.attrs)
            except Exception as e:  # noqa: BLE001 - e.g. an index out of range in the example's values
                n.fail(f"{what} is computed at run time, and computing it from the example inputs fails "
                       f"at {node.label}: {type(e).__name__}: {e}")
    for i in inputs:   # a copy: the caller may reuse the example tensor for other values
        if i.attrs["index"] not in n.g.specialised:
            n.g.specialised[i.attrs["index"]] = examples[i].detach().clone()
    return values[x]


# -- constant evaluation --------------------------------------------------------------------------

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
    except Exception:  # inference is only a guard; the evaluator reports real errors below  # noqa: BLE001
        inferred = []
    for vi in inferred:
        dims = vi.type.tensor_type.shape.dim
        if all(d.HasField("dim_value") for d in dims) and math.prod(d.dim_value for d in dims) > EVAL_LIMIT:
            n.unsupported(f"its output {vi.name!r} would be over {EVAL_LIMIT} elements, too many to evaluate")
    try:
        results = ReferenceEvaluator(model).run(None, {})
    except Exception as e:  # the reference implementation's own error, whatever its type  # noqa: BLE001
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


def _function_of(n: _Node, ins) -> onnx.FunctionProto | None:
    """The FunctionProto ONNX's schema defines `n`'s op by at the model's opset (a context-dependent
    one built for the node's attributes and input types), or None."""
    p = n.proto
    if p.domain not in ("", "ai.onnx"):
        return None
    try:
        schema = onnx.defs.get_schema(p.op_type, n.opset, "")
    except onnx.defs.SchemaError:
        return None
    fixed = [v for v in schema.function_opset_versions if v <= n.opset]
    if fixed:
        return onnx.FunctionProto.FromString(schema.get_function_with_opset_version(max(fixed)))
    dependent = [v for v in schema.context_dependent_function_opset_versions if v <= n.opset]
    if not dependent:
        return None
    types = {v: k for k, v in DTYPES.items()}
    if any(x is not None and x.dtype not in types for x in ins):
        return None
    protos = [(helper.make_tensor_type_proto(types[x.dtype], x.shape) if x is not None else onnx.TypeProto())
              for x in ins]
    try:
        body = schema.get_context_dependent_function_with_opset_version(
            max(dependent), p.SerializeToString(), [t.SerializeToString() for t in protos])
        return onnx.FunctionProto.FromString(body) if body else None
    except Exception:  # onnx cannot build the function for these attributes or types  # noqa: BLE001
        return None


def _expand_function(n: _Node, ins) -> list:
    """An op with no handler that ONNX defines as a function of other ops (LinearAttention,
    CausalConvWithState, ...): the function's nodes converted in a scope of their own, attributes
    referenced by name taken from the node (or the schema's defaults)."""
    fn = None if n.proto.op_type in _RANDOM else _function_of(n, ins)
    if fn is None:
        raise _unsupported(n.proto)
    schema = onnx.defs.get_schema(n.proto.op_type, n.opset, "")
    given = {}
    for name, a in schema.attributes.items():
        if a.default_value.type:
            given[name] = a.default_value
    given.update({a.name: a for a in n.proto.attribute})
    opset = next((o.version for o in fn.opset_import if o.domain in ("", "ai.onnx")), n.opset)
    scope = {name: x for name, x in zip(fn.input, ins)}
    try:
        for node in fn.node:
            _convert(n.g, scope, _bind_attributes(node, given), opset)
    except UnsupportedOpError as e:   # name the op of the model, and what in its function failed
        raise _unsupported(n.proto, f"its ONNX function needs {e}") from None
    missing = [o for o in fn.output if o not in scope]
    if missing:
        raise ModelFileError(f"ONNX node {n.name!r}: the function of {n.proto.op_type} does not produce {missing}")
    return [scope[o] for o in fn.output]


def _bind_attributes(node: onnx.NodeProto, given: dict) -> onnx.NodeProto:
    """A function body's node with its attributes that refer to the caller's (ref_attr_name) replaced
    by the caller's values (dropped where the caller has none)."""
    if not any(a.ref_attr_name for a in node.attribute):
        return node
    out = onnx.NodeProto()
    out.CopyFrom(node)
    del out.attribute[:]
    for a in node.attribute:
        if a.ref_attr_name:
            if a.ref_attr_name in given:
                b = onnx.AttributeProto()
                b.CopyFrom(given[a.ref_attr_name])
                b.name = a.name
                out.attribute.append(b)
        else:
            out.attribute.append(a)
    return out


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
