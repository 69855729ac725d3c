"""Capture from PyTorch: torch.export (core ATen after decompositions) -> kfuse IR, converted node
by node through the ATen table (aten.py, aten_nn.py; the upsamplings, which fall back on this
converter, are registered here). Parameters and buffers become constants, so everything computed
from them alone folds at capture time.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import logging
import operator
import warnings

import sympy
import torch
import torch.fx
from torch.fx.experimental.symbolic_shapes import free_unbacked_symbols

from ..errors import GraphError, KfuseError, UnsupportedOpError
from ..ir import Graph, Node
from . import aten_nn  # noqa: F401  (registers its builders into ATEN)
from . import complex as complex_
from .aten import ATEN, Unsupported, aten

# -- upsampling: builders that fall back on the converter -----------------------------------------

UPSAMPLE = {aten.upsample_nearest1d.vec: "nearest", aten.upsample_nearest2d.vec: "nearest",
            aten.upsample_nearest3d.vec: "nearest", aten._upsample_nearest_exact1d.vec: "nearest-exact",
            aten._upsample_nearest_exact2d.vec: "nearest-exact", aten._upsample_nearest_exact3d.vec: "nearest-exact",
            aten.upsample_linear1d.vec: "linear", aten.upsample_bilinear2d.vec: "bilinear",
            aten.upsample_trilinear3d.vec: "trilinear", aten.upsample_bicubic2d.vec: "bicubic"}


def _upsample(op, mode):
    def handler(g, x, size, *rest):
        """F.interpolate -> resize with the output size. A scale factor is used by torch as the
        coordinate scale in place of in/out; when the two differ (x1.5 of 5 is 7, and 1/1.5 != 5/7)
        the op is written out by torch's own decomposition instead (gathers and lerps)."""
        align, scales = (None, rest[0]) if mode.startswith("nearest") else rest
        # the output size does not depend on N or C; torch's meta kernel rejects an empty tensor
        out = op(torch.empty((1, 1, *x.shape[2:]), dtype=x.dtype, device="meta"), size, *rest).shape[2:]
        if scales is not None and not align and not all(map(_same_scale, scales, x.shape[2:], out)):
            return _decomposed(g, op, (x, size, *rest))
        return g.add("resize", x, size=tuple(out), mode=mode, align_corners=align)
    return handler


def _same_scale(scale, n_in, n_out):
    """Whether torch's coordinate scale 1/scale equals n_in/n_out, in double and in float."""
    f32 = lambda v: torch.tensor(v, dtype=torch.float32)
    return 1.0 / scale == n_in / n_out and bool(f32(1.0 / scale) == f32(float(n_in)) / f32(float(n_out)))


for _op, _mode in UPSAMPLE.items():
    ATEN[_op] = _upsample(_op, _mode)


def _overloads(*names):
    """The overloads named "op.overload" that this torch version has."""
    found = set()
    for name in names:
        packet, overload = name.split(".")
        if hasattr(aten, packet) and overload in getattr(aten, packet).overloads():
            found.add(getattr(getattr(aten, packet), overload))
    return found


SKIP = _overloads("_assert_tensor_metadata.default", "_assert_scalar.default", "_assert_async.default",
                  "_assert_async.msg", "_functional_assert_async.msg", "_functional_assert_scalar.default",
                  "sym_constrain_range.default", "sym_constrain_range_for_size.default",
                  "_functional_sym_constrain_range.default", "_functional_sym_constrain_range_for_size.default",
                  "_make_dep_token.default", "_linalg_check_errors.default")
"""Runtime checks (one_hot's range asserts, export's shape asserts): they produce no value an output
uses, and inputs of another shape recompile anyway. A check of sizes only, in a graph exported with
symbolic sizes, is evaluated instead (see `SizeMismatch`). The linear algebra's check of its `_ex`
op's info (a singular matrix) is made by that op, run by torch with check_errors=True (`_torch_run`)."""
ASSERT_SCALAR = _overloads("_assert_scalar.default")
READS_STORAGE = _overloads("as_strided.default", "as_strided_copy.default")


# -- the converter --------------------------------------------------------------------------------------------

class SizeMismatch(KfuseError):
    """Sizes a graph exported with symbolic sizes was not exported for (outside a symbol's range, a
    failed size check, two dims that must be equal and are not): it must be exported for them anew."""


# Arithmetic on sizes in a graph exported with symbolic sizes (a view's target computed from a
# sym_size): evaluated on the call's ints at conversion, so the IR stays static.
SIZE_OPS = {getattr(operator, n) for n in ("add", "sub", "mul", "floordiv", "truediv", "mod", "pow", "neg", "eq",
                                           "ne", "lt", "le", "gt", "ge", "and_", "or_", "not_")} | {
    getattr(torch, n) for n in ("sym_max", "sym_min", "sym_float", "sym_int", "sym_not", "sym_ite", "sym_sum")
    if hasattr(torch, n)}     # (sym_sum of a list: Dynamo's form of a size after strided convolutions)
SIZE_OF = {aten.sym_size.int: lambda x, d: x.shape[d], aten.sym_numel.default: lambda x: x.numel}


def from_fx(graph: torch.fx.Graph, values: dict[str, torch.Tensor], input_names: list[str],
            shapes: list[tuple[int, ...]] | None = None) -> Graph:
    """Convert an ATen-level FX graph. Placeholders named in `values` become constants; the others,
    in `input_names` order, become graph inputs, of `shapes` where given (a graph exported with
    symbolic sizes, converted for one size set), else of their traced node.meta['val'] shapes."""
    g = Graph()
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    inputs = {}
    for i, name in enumerate(input_names):
        val = placeholders[name].meta["val"]
        shape = tuple(val.shape) if shapes is None else tuple(shapes[i])
        if val.dtype.is_complex:        # fed as torch.view_as_real(x) (CompiledModel): its pairs
            inputs[name] = complex_.Complex(g.input(shape + (2,), complex_.REAL_OF[val.dtype], name))
        else:
            inputs[name] = g.input(shape, val.dtype, name)
    outs = _convert(g, graph, values, inputs)
    for k, (env, name) in enumerate(outs):
        if env is None or isinstance(env, (bool, int, float, str)):     # returned as the model returns it
            g.literals[k] = env
        elif isinstance(env, complex_.Complex):
            raise UnsupportedOpError("output", name, "PyTorch", "a complex output: kfuse's inputs and outputs are real "
                                     "(return torch.view_as_real(y))")
        else:
            g.outputs.append(env if isinstance(env, Node) else g.const(env))
            g.output_names.append(name)
    g.prune()
    return g


def _convert(g: Graph, graph: torch.fx.Graph, values: dict, inputs: dict) -> list[tuple[object, str]]:
    """Add the nodes of an FX graph to g; `inputs` maps placeholder names to nodes of g, `values`
    maps the other placeholders and attributes to tensors. Returns (value, name) per graph output."""
    env: dict[torch.fx.Node, object] = {}
    outs = []
    for n in graph.nodes:
        if n.op == "placeholder":
            if n.name in inputs:
                env[n] = inputs[n.name]
            elif n.name in values:
                env[n] = _const(g, values[n.name], n.name)
            elif n.users:
                raise GraphError(f"placeholder {n.name!r} has no value")
            else:                  # a non-tensor input compiled in: the graph holds its value where it is used
                env[n] = None
        elif n.op == "get_attr":
            if not isinstance(values.get(n.target), torch.Tensor):   # a subgraph of torch.cond, while_loop, ...
                user = next(iter(n.users), None)
                raise UnsupportedOpError(str(user.target) if user is not None else n.target, n.name, "PyTorch",
                                         "control flow with subgraphs (torch.cond, while_loop, map, scan)")
            env[n] = _const(g, values[n.target], n.name)
        elif n.op == "call_function":
            env[n] = _call(g, n, env)
        elif n.op == "output":
            outs = [(env[o], o.name) if isinstance(o, torch.fx.Node) else (o, "const")
                    for o in torch.utils._pytree.tree_leaves(n.args[0])]
    return outs


def _const(g: Graph, value, name: str):
    if isinstance(value, torch.Tensor) and value.dtype.is_complex:
        return complex_.constant(g, value, name)
    return g.const(value, name=name)


def _call(g, n: torch.fx.Node, env):
    if n.target is operator.getitem:
        out = env[n.args[0]][n.args[1]]
        if out is None and n.users:     # an output its handler does not map (adaptive max-pool indices)
            src = n.args[0]
            raise UnsupportedOpError(str(src.target), src.name, "PyTorch", f"its output {n.args[1]} is not supported")
        return out
    conv = lambda a: env[a] if isinstance(a, torch.fx.Node) else a
    if n.target in SIZE_OF or n.target in SIZE_OPS or n.target in ASSERT_SCALAR:
        return _size_arithmetic(n, torch.fx.node.map_aggregate(n.args, conv))
    if n.target in SKIP:
        return None
    val = n.meta.get("val")
    if isinstance(val, torch.Tensor) and free_unbacked_symbols(val.shape):
        raise UnsupportedOpError(str(n.target), n.name, "PyTorch",
                                 f"its output size {list(val.shape)} depends on the values of its inputs (as with "
                                 f"boolean-mask indexing x[mask], nonzero or masked_select); kfuse compiles fixed sizes only")
    args = torch.fx.node.map_aggregate(n.args, conv)
    kwargs = dict(torch.fx.node.map_aggregate(n.kwargs, conv))
    if complex_.involved(n.target, args, kwargs, val):
        handler = functools.partial(complex_.call, g, n.target)
        return _run(handler, n, args, kwargs)
    handler = ATEN.get(n.target)
    if handler is None:
        target = _copying(n.target)
        handler = _torch_run(target) if _by_torch(target) else None
    if handler is None:
        random = isinstance(n.target, torch._ops.OpOverload) and torch.Tag.nondeterministic_seeded in n.target.tags
        raise UnsupportedOpError(str(n.target), n.name, "PyTorch", "it draws random numbers" if random else "")
    if n.target in READS_STORAGE:       # as_strided's meaning depends on its input's traced memory layout
        val = n.args[0].meta.get("val")
        if val is not None and any(isinstance(d, torch.SymInt) for d in (*val.stride(), val.storage_offset())):
            raise SizeMismatch(f"{n.target} at node {n.name!r} reads memory laid out by symbolic sizes")
        kwargs["storage"] = None if val is None else (tuple(val.stride()), val.storage_offset())
    return _run(functools.partial(handler, g), n, args, kwargs)


def _run(handler, n: torch.fx.Node, args, kwargs):
    """handler(*args, **kwargs) for node n, its errors naming the op and node"""
    kwargs = {k: v for k, v in kwargs.items() if k not in ("layout", "device", "pin_memory", "memory_format", "non_blocking")}
    try:
        out = handler(*args, **kwargs)
    except Unsupported as e:
        raise UnsupportedOpError(str(n.target), n.name, "PyTorch", str(e)) from None
    except GraphError as e:
        raise GraphError(f"{n.target} at node {n.name!r}: {e}") from e
    for node in out if isinstance(out, tuple) else (out,):
        if isinstance(node, Node) and node.op != "const" and not node.name:
            node.name = n.name
    return out


def _size_arithmetic(n: torch.fx.Node, args: tuple):
    """A size (sym_size of a node of g), arithmetic on sizes, or a check of sizes, on the call's ints.
    A size read from data (`item()`) is a node of g, not a number: its checks are skipped as SKIP's are."""
    if n.target in SIZE_OF:
        return SIZE_OF[n.target](*args)
    from_data = any(isinstance(a, Node) for a in torch.utils._pytree.tree_leaves(args))
    if n.target in ASSERT_SCALAR:
        if not from_data and not args[0]:
            raise SizeMismatch(f"the sizes of this call fail the exported graph's check "
                               f"{args[1] if len(args) > 1 else n.name!r}")
        return None
    if from_data:
        raise UnsupportedOpError(str(n.target), n.name, "PyTorch", "arithmetic on a value read from a tensor")
    return n.target(*args)


def _by_torch(target) -> bool:
    """Whether an op without a handler of ours runs as torch runs it, one opaque node: an op another
    library registered (torch.library: transformers' mixture-of-experts fallback, a user's op), or an
    ATen op no kernel of ours covers (torch.cdist, the linear algebra) that is functional, draws no
    random numbers and returns new tensors (a view could outlive the buffer it reads)."""
    if not isinstance(target, torch._ops.OpOverload):
        return False
    if target.namespace not in ("aten", "prims", "prim"):
        return True
    schema = target._schema
    return (target.namespace == "aten" and not schema.is_mutable and torch.Tag.nondeterministic_seeded not in target.tags
            and all(r.alias_info is None for r in schema.returns))


def _copying(target):
    """A view op's functional `_copy` twin (aten.diagonal -> aten.diagonal_copy, the same arguments)
    where torch has one, else `target`: a view run by torch could outlive the buffer it reads."""
    if isinstance(target, torch._ops.OpOverload) and target.namespace == "aten" \
            and any(r.alias_info is not None for r in target._schema.returns):
        copy_op = getattr(getattr(torch.ops.aten, target._opname + "_copy", None), target._overloadname, None)
        return copy_op or target
    return target


def _torch_run(target):
    """The handler of an op `_by_torch` admits: a `torch_op` node per tensor it returns, whose attributes
    hold the op's name, its non-tensor arguments and which output it is (the op's fake/meta
    implementation, which export needed too, infers the shape)."""
    def handler(g, *args, **kwargs):
        returns = [str(r.type) for r in target._schema.returns]
        if not returns or any(r != "Tensor" for r in returns):
            raise Unsupported(f"an op returning {', '.join(returns) or 'nothing'}: only ops returning tensors "
                              "run as opaque nodes")
        def value(a):
            if isinstance(a, (list, tuple)) and any(isinstance(x, Node) for x in a):
                raise Unsupported("an op taking a list of tensors")
            return None if isinstance(a, Node) else tuple(a) if isinstance(a, list) else a
        # the tensor arguments become the node's inputs, positional ones first; `tensors` names their slots
        slots = tuple(i for i, a in enumerate(args) if isinstance(a, Node))
        names = tuple(k for k, v in kwargs.items() if isinstance(v, Node))
        inputs = [args[i] for i in slots] + [kwargs[k] for k in names]
        if any(a.name == "check_errors" for a in target._schema.arguments):
            kwargs["check_errors"] = True   # linalg's _ex ops: raise as torch.linalg.inv does (export checks apart)
        attrs = dict(target=target.name(), args=tuple(value(a) for a in args),
                     kwargs=tuple((k, value(v)) for k, v in kwargs.items()), tensors=(slots, names))
        if len(returns) == 1:
            return g.add("torch_op", *inputs, **attrs)
        return tuple(g.add("torch_op", *inputs, **attrs, output=i) for i in range(len(returns)))
    return handler


def _decomposed(g: Graph, op, args: tuple) -> Node:
    """op(*args) written out in ops this table maps, by exporting torch's own decomposition of it
    (a zero tensor stands for each Node argument: the decompositions used here depend on shapes only)."""
    from torch._decomp import decomposition_table
    nodes = [a for a in args if isinstance(a, Node)]

    class Apply(torch.nn.Module):
        def forward(self, *ts):
            it = iter(ts)
            return op(*[next(it) if isinstance(a, Node) else a for a in args])

    examples = tuple(torch.zeros(n.shape, dtype=n.dtype) for n in nodes)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ep = torch.export.export(Apply(), examples, strict=False)
        table = torch.export.default_decompositions()
        if op not in table:
            table[op] = decomposition_table[op]
        ep = ep.run_decompositions(table)
    from torch.export.graph_signature import InputKind
    specs = ep.graph_signature.input_specs
    user = [s.arg.name for s in specs if s.kind == InputKind.USER_INPUT]
    consts = {s.arg.name: ep.constants[s.target] for s in specs if s.kind != InputKind.USER_INPUT}
    (out, _), = _convert(g, ep.graph, consts, dict(zip(user, nodes)))
    return out


# Composite ops kept out of the decompositions because one IR op says them whole: SDPA (its
# decomposition also breaks on some strided inputs, e.g. transformers' GPT-2 with
# attn_implementation="sdpa"), F.pad in every mode (reflect/replicate would become index gathers,
# circular a scatter into aten.empty) and the upsamplings the default table would write out.
KEEP_WHOLE = (aten.scaled_dot_product_attention.default, aten.pad.default, *UPSAMPLE)


def register_cache_types(model):
    """Hugging Face models return (and take) their KV cache as a Cache object, which torch.export
    can flatten only once transformers has registered it as a pytree node; transformers does so for
    its own exporters, so kfuse asks it to, with whichever of its helpers this version has."""
    if not type(model).__module__.startswith("transformers."):
        return
    try:
        from transformers.exporters.exporter_dynamo import register_cache_pytrees_for_model
        register_cache_pytrees_for_model(model)
    except ImportError:
        try:
            from transformers.integrations.executorch import register_dynamic_cache_export_support
            register_dynamic_cache_export_support()
        except ImportError:
            pass        # an older transformers: export names the type it cannot flatten


def export(model: torch.nn.Module, example_inputs: tuple, example_kwargs: dict | None = None) -> tuple[Graph, object]:
    """torch.export + core ATen decompositions -> (Graph, output pytree spec). A model carrying
    `kfuse_export` = (cache, key) shares one export with the models of equal key in `cache` (a dict):
    models computing the same graph over other weights (a decode graph's layers, as Dynamo segments),
    each converted with its own parameters and buffers."""
    shared = getattr(model, "kfuse_export", None)
    if shared is None:
        return to_graph(exported(model, example_inputs, example_kwargs))
    cache, key = shared
    ep = cache.get(key)
    if ep is None:
        ep = cache[key] = exported(model, example_inputs, example_kwargs)
    return to_graph(ep, state={**dict(model.named_parameters()), **dict(model.named_buffers())})


@contextlib.contextmanager
def _quiet_fake_tensors():
    """torch's fake tensors log an op that fails on the traced shapes (a call of a new shape the model
    cannot take) with a full traceback before raising; the KfuseError raised here names it."""
    logger = logging.getLogger("torch._subclasses.fake_tensor")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def twin(model: torch.nn.Module) -> torch.nn.Module:
    """A copy of the module tree sharing every parameter, buffer and other value with `model`.
    torch.export (non-strict) swaps fake tensors into the module it traces and lets forward set
    attributes on it, so a call of the user's own module in another thread while kfuse compiles
    returned fake tensors or broke the trace; the twin takes all of that, and the traced program's
    weights are still the user's tensors (same objects: later changes to them are seen)."""
    twins = {}

    def twin_of(m):
        if isinstance(m, torch.jit.ScriptModule):      # its state lives in C++: shared as it is
            return m
        if id(m) not in twins:
            new = twins[id(m)] = object.__new__(type(m))
            # containers copied too: hook dicts, RNN's _flat_weights list (set through its __setattr__)
            state = {k: copy.copy(v) if isinstance(v, (list, dict, set)) else v for k, v in m.__dict__.items()}
            state.update(_parameters=dict(m._parameters), _buffers=dict(m._buffers),
                         _modules={k: None if c is None else twin_of(c) for k, c in m._modules.items()})
            new.__dict__.update(state)
        return twins[id(m)]
    return twin_of(model)


def exported(model: torch.nn.Module, example_inputs: tuple, example_kwargs: dict | None = None,
             dynamic_shapes=None):
    """The model as torch.export traces it, after the core ATen decompositions. `dynamic_shapes`
    (torch.export's argument) marks sizes to keep symbolic: one export then serves every size set
    it admits (`to_graph(ep, shapes)`), where a re-export costs about a second per size set."""
    # inference: traced in eval mode (BatchNorm's running statistics, no dropout), on a twin of the
    # caller's module, which stays as it was (in its mode; it had been switched to eval for good)
    from torch.export._remove_effect_tokens_pass import _remove_effect_tokens
    from torch.export.graph_signature import InputKind
    modal = (torch.nn.modules.batchnorm._NormBase, torch.nn.modules.dropout._DropoutNd)   # differ in eval mode
    if any(m.training and isinstance(m, modal) for m in model.modules()):
        warnings.warn(f"kfuse: {type(model).__name__} is in training mode; kfuse compiles it as in eval mode "
                      f"(inference: BatchNorm's running statistics, no dropout)", stacklevel=3)
    register_cache_types(model)
    model = twin(model).eval()
    try:
        with torch.no_grad(), warnings.catch_warnings(), _quiet_fake_tensors():
            warnings.simplefilter("ignore")
            ep = torch.export.export(model, tuple(example_inputs), dict(example_kwargs or {}), strict=False,
                                     dynamic_shapes=dynamic_shapes)
            table = torch.export.default_decompositions()
            for op in KEEP_WHOLE:
                table.pop(op, None)
            ep = ep.run_decompositions(table)
            if any(spec.kind == InputKind.TOKEN for spec in ep.graph_signature.input_specs):
                ep = _remove_effect_tokens(ep)   # ordering tokens of effectful ops (linalg's checks): plain calls
    except Exception as e:
        hint = ""
        if "DataDependent" in type(e).__name__ or "data-dependent" in str(e):
            hint = (" (a branch or a size there depends on the values of tensors, as a mixture-of-experts' routing "
                    "by nonzero does: kfuse.compile takes one graph of fixed sizes; torch.compile(model, "
                    "backend=\"kfuse\") splits the model at such points and fuses the graphs between them)")
        elif "torch.classes.quantized" in str(e):
            hint = (" (a module quantized by torch.ao.quantization: its packed weights are objects torch.export cannot "
                    "trace; compile the float model)")
        raise KfuseError(f"torch.export failed on {type(model).__name__}{hint}: {type(e).__name__}: {e}") from e
    sig = ep.graph_signature
    if sig.buffers_to_mutate:
        written = ", ".join(sorted(set(sig.buffers_to_mutate.values())))
        raise KfuseError(f"{type(model).__name__} writes into its buffer(s) {written}: kfuse compiles buffers in "
                         f"as constants; pass such a tensor as an input instead")
    if sig.parameters_to_mutate:
        written = ", ".join(sorted(set(sig.parameters_to_mutate.values())))
        raise KfuseError(f"{type(model).__name__} writes into its parameter(s) {written} in forward: kfuse compiles "
                         f"parameters in as constants. If it does so once (rescaling its weights on the first call, "
                         f"as Hugging Face's RWKV does), call the model once in eager before compiling it")
    return ep


def to_graph(ep, shapes: list[tuple[int, ...]] | None = None, state: dict | None = None) -> tuple[Graph, object]:
    """An exported program as a kfuse Graph and its output pytree spec; with `shapes` (one per user
    input), a program exported with symbolic sizes converted for those sizes (SizeMismatch if it
    was not exported for them); with `state` (name -> tensor), those parameters and buffers in place
    of the exported ones (another model of the same graph)."""
    from torch.export.graph_signature import InputKind
    values = {}
    state = {**ep.state_dict, **ep.constants, **(state or {})}
    for spec in ep.graph_signature.input_specs:
        if spec.kind != InputKind.USER_INPUT and hasattr(spec.arg, "name"):
            values[spec.arg.name] = state[spec.target].detach()
    user = [n.name for n in _user_inputs(ep)]
    for name, attr in ep.graph_module.named_buffers():
        values.setdefault(name, attr)
    sig = ep.graph_signature
    if shapes is not None:
        _check_sizes(ep, shapes)
    graph = from_fx(ep.graph, values, user, shapes)
    _mutations(graph, sig, user)
    return graph, ep.call_spec.out_spec


def _user_inputs(ep) -> list[torch.fx.Node]:
    """The placeholders of an exported program's user inputs, in their order."""
    from torch.export.graph_signature import ConstantArgument, InputKind
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    # (a non-tensor input, None or a number, is a ConstantArgument: compiled in, not an input)
    return [nodes[s.arg.name] for s in ep.graph_signature.input_specs
            if s.kind == InputKind.USER_INPUT and not isinstance(s.arg, ConstantArgument)]


def symbolic_inputs(ep) -> dict[int, list[int]]:
    """User input position -> its dims that the exported program keeps symbolic."""
    out = {}
    for i, node in enumerate(_user_inputs(ep)):
        dims = [d for d, n in enumerate(getattr(node.meta.get("val"), "shape", ())) if isinstance(n, torch.SymInt)]
        if dims:
            out[i] = dims
    return out


def _check_sizes(ep, shapes) -> None:
    """SizeMismatch unless `shapes` is a size set `ep` was exported for: every static dim as traced,
    each symbol one value within its range, every symbolic dim equal to its expression."""
    traced = [tuple(node.meta["val"].shape) for node in _user_inputs(ep)]
    if len(shapes) != len(traced) or any(len(s) != len(t) for s, t in zip(shapes, traced)):
        raise SizeMismatch("the call's inputs differ in number or rank from the exported graph's")
    bound = {}
    for shape, want in zip(shapes, traced):     # plain symbols first: they give the values
        for got, d in zip(shape, want):
            if isinstance(d, torch.SymInt) and isinstance(d.node.expr, sympy.Symbol):
                if bound.setdefault(d.node.expr, got) != got:
                    raise SizeMismatch(f"dims exported as one size {d.node.expr} differ: {bound[d.node.expr]} and {got}")
    for shape, want in zip(shapes, traced):
        for got, d in zip(shape, want):
            expr = d.node.expr if isinstance(d, torch.SymInt) else sympy.Integer(d)
            value = expr.xreplace({k: sympy.Integer(v) for k, v in bound.items()})
            if not value.is_number or int(value) != got:
                raise SizeMismatch(f"a dim exported as {expr} is {got} in this call")
    for sym, r in ep.range_constraints.items():
        if sym in bound and bound[sym] not in r:
            raise SizeMismatch(f"size {bound[sym]} is outside the exported range {r.lower}..{r.upper} of {sym}")


def _mutations(g: Graph, sig, user: list[str]) -> None:
    """Export lists the model's in-place writes into its inputs (a static KV cache's index_copy_)
    as extra outputs, first. Move them last and record which input each updates (graph.mutated).
    An index_put whose target input nothing else reads writes in place: only the new rows move,
    not a copy of the whole cache per call."""
    from torch.export.graph_signature import OutputKind
    kinds = [s.kind for s in sig.output_specs]
    if OutputKind.USER_INPUT_MUTATION not in kinds:
        return
    # every output of the export in its order: a tensor (node, name) or a Python value (graph.literals,
    # numbered among all of them until now: among the user's outputs after this)
    tensors = iter(zip(g.outputs, g.output_names))
    full = [(None, g.literals[k]) if k in g.literals else next(tensors) for k in range(len(kinds))]
    writes = [(full[k][0], user.index(s.target)) for k, s in enumerate(sig.output_specs)
              if s.kind == OutputKind.USER_INPUT_MUTATION]
    kept = [out for out, kind in zip(full, kinds) if kind != OutputKind.USER_INPUT_MUTATION]
    g.literals = {k: v for k, (o, v) in enumerate(kept) if o is None}
    g.outputs = [o for o, _ in kept if o is not None] + [o for o, _ in writes]
    g.output_names = [n for o, n in kept if o is not None] + [f"{user[i]} (written in place)" for _, i in writes]
    g.mutated = [i for _, i in writes]
    users = g.users()
    for new, i in writes:
        x = g.inputs[i]
        if new.op == "index_put" and new.inputs[0] is x and set(users[x]) == {new} and x not in g.outputs:
            new.attrs["inplace"] = True
