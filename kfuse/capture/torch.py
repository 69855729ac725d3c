"""Capture from PyTorch: torch.export (core ATen after decompositions) -> kfuse IR.

One table maps each ATen overload onto IR ops. An overload missing from the table is an
UnsupportedOpError naming it and its node; nothing is guessed. Parameters and buffers become
constants, so everything computed from them alone folds at capture time.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.fx

from ..errors import KfuseError, UnsupportedOpError
from ..ir import Graph, Node

aten = torch.ops.aten
ATEN: dict = {}


def handles(*overloads):
    def register(fn):
        for o in overloads:
            ATEN[o] = fn
        return fn
    return register


# -- scalars and broadcasting helpers -----------------------------------------------------------------

def scalar(g: Graph, value, like: Node | None = None) -> Node:
    """A python number as a 0-d constant that promotes like torch's python scalars do."""
    if isinstance(value, Node):
        return value
    if isinstance(value, bool):
        return g.const(value, torch.bool)
    if isinstance(value, int):
        return g.const(value, torch.int64)
    floating = like is not None and like.dtype.is_floating_point
    return g.const(value, like.dtype if floating else torch.float32)


def binary(op):
    def handler(g, a, b, alpha=1, **_):
        a_node = scalar(g, a, b if isinstance(b, Node) else None)
        b_node = scalar(g, b, a_node)
        if alpha != 1:
            b_node = g.add("mul", b_node, scalar(g, alpha, b_node))
        return g.add(op, a_node, b_node)
    return handler


def unary(op, **attrs):
    return lambda g, x, *_, **__: g.add(op, x, **attrs)


def _axes(dims, ndim):
    if dims is None or dims == []:
        return tuple(range(ndim))
    dims = [dims] if isinstance(dims, int) else dims
    return tuple(sorted(d % ndim for d in dims))


for name, op in [("add", "add"), ("sub", "sub"), ("mul", "mul"), ("div", "div"), ("pow", "pow"),
                 ("maximum", "maximum"), ("minimum", "minimum"), ("eq", "eq"), ("ne", "ne"),
                 ("lt", "lt"), ("le", "le"), ("gt", "gt"), ("ge", "ge"),
                 ("logical_and", "logical_and"), ("logical_or", "logical_or"),
                 ("bitwise_and", "logical_and"), ("bitwise_or", "logical_or")]:
    packet = getattr(aten, name)
    handles(*[getattr(packet, o) for o in packet.overloads()
              if o in ("Tensor", "Scalar", "default", "Tensor_Scalar", "Tensor_Tensor")])(binary(op))

for name, op in [("neg", "neg"), ("abs", "abs"), ("exp", "exp"), ("log", "log"), ("sqrt", "sqrt"),
                 ("rsqrt", "rsqrt"), ("reciprocal", "reciprocal"), ("sin", "sin"), ("cos", "cos"),
                 ("tanh", "tanh"), ("sigmoid", "sigmoid"), ("erf", "erf"), ("relu", "relu"),
                 ("silu", "silu"), ("floor", "floor"), ("ceil", "ceil"), ("logical_not", "logical_not"),
                 ("isnan", "isnan"), ("sign", "sign"), ("log1p", "log1p"), ("expm1", "expm1")]:
    handles(getattr(aten, name).default)(unary(op))


@handles(aten.bitwise_not.default)
def _bitwise_not(g, x):
    if x.dtype != torch.bool:
        raise KfuseError("bitwise_not on integers is not supported (only on bool masks)")
    return g.add("logical_not", x)


@handles(aten.rsub.Scalar, aten.rsub.Tensor)
def _rsub(g, a, b, alpha=1):
    return binary("sub")(g, b, a if alpha == 1 else binary("mul")(g, a, alpha))


@handles(aten.pow.Scalar)
def _pow_scalar(g, base, exp):
    return g.add("pow", scalar(g, base, exp), exp)


@handles(aten.div.Tensor_mode)
def _div_mode(g, a, b, rounding_mode=None):
    q = binary("div")(g, a, b)
    if rounding_mode == "floor":
        return g.add("floor", q)
    if rounding_mode == "trunc":
        return g.add("mul", g.add("floor", g.add("abs", q)), g.add("sign", q))
    return q


@handles(aten.gelu.default)
def _gelu(g, x, approximate="none"):
    return g.add("gelu", x, approximate=approximate)


@handles(aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default, aten.hardtanh.default)
def _clamp(g, x, lo=None, hi=None):
    return g.add("clamp", x, min=lo, max=hi)


@handles(aten.leaky_relu.default)
def _leaky_relu(g, x, alpha=0.01):
    return g.add("leaky_relu", x, alpha=alpha)


@handles(aten.softplus.default)
def _softplus(g, x, beta=1, threshold=20):
    return g.add("softplus", x, beta=beta, threshold=threshold)


@handles(aten.where.self, aten.where.ScalarSelf, aten.where.ScalarOther, aten.where.Scalar)
def _where(g, c, a, b):
    like = a if isinstance(a, Node) else b if isinstance(b, Node) else None
    return g.add("where", c, scalar(g, a, like), scalar(g, b, like))


@handles(aten.masked_fill.Scalar, aten.masked_fill.Tensor)
def _masked_fill(g, x, mask, value):
    return g.add("where", mask, scalar(g, value, x) if not isinstance(value, Node) else g.add("cast", value, dtype=x.dtype), x)


@handles(aten._to_copy.default, aten.to.dtype)
def _to_copy(g, x, *args, dtype=None, **_):
    if args and isinstance(args[0], torch.dtype):
        dtype = args[0]
    return x if dtype is None or dtype == x.dtype else g.add("cast", x, dtype=dtype)


@handles(aten.clone.default, aten.alias.default, aten.lift_fresh_copy.default, aten.detach.default,
         aten.contiguous.default, aten.dropout.default)
def _identity(g, x, *_, **__):
    return x


# -- shapes ----------------------------------------------------------------------------------------------

def reshape(g, x, shape):
    shape = list(shape)
    if -1 in shape:
        known = math.prod(d for d in shape if d != -1)
        shape[shape.index(-1)] = x.numel // known if known else 0
    return x if tuple(shape) == x.shape else g.add("reshape", x, shape=tuple(shape))


@handles(aten.view.default, aten._unsafe_view.default, aten.reshape.default)
def _view(g, x, shape):
    return reshape(g, x, shape)


@handles(aten.permute.default)
def _permute(g, x, dims):
    perm = tuple(d % len(x.shape) for d in dims)
    return x if perm == tuple(range(len(perm))) else g.add("transpose", x, perm=perm)


@handles(aten.transpose.int)
def _transpose(g, x, a, b):
    perm = list(range(len(x.shape)))
    perm[a], perm[b] = perm[b], perm[a]
    return _permute(g, x, perm)


@handles(aten.t.default)
def _t(g, x):
    return _transpose(g, x, 0, 1) if len(x.shape) == 2 else x


@handles(aten.unsqueeze.default)
def _unsqueeze(g, x, dim):
    dim = dim % (len(x.shape) + 1)
    return reshape(g, x, x.shape[:dim] + (1,) + x.shape[dim:])


@handles(aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)
def _squeeze(g, x, dims=None):
    axes = _axes(dims, len(x.shape)) if x.shape else ()
    return reshape(g, x, tuple(d for i, d in enumerate(x.shape) if not (i in axes and d == 1)))


@handles(aten.expand.default)
def _expand(g, x, shape, implicit=False):
    shape = tuple(x.shape[i - (len(shape) - len(x.shape))] if d == -1 else d for i, d in enumerate(shape))
    return x if shape == x.shape else g.add("expand", x, shape=shape)


@handles(aten.slice.Tensor)
def _slice(g, x, dim=0, start=None, end=None, step=1):
    n = x.shape[dim % len(x.shape)]
    start, end, _ = slice(start, end, step).indices(n)
    end = max(end, start)
    if (start, end, step) == (0, n, 1):
        return x
    return g.add("slice", x, axis=dim % len(x.shape), start=start, end=end, step=step)


@handles(aten.select.int)
def _select(g, x, dim, index):
    dim = dim % len(x.shape)
    index = index % x.shape[dim]
    s = g.add("slice", x, axis=dim, start=index, end=index + 1, step=1)
    return reshape(g, s, x.shape[:dim] + x.shape[dim + 1:])


@handles(aten.split_with_sizes.default, aten.split.Tensor)
def _split(g, x, sizes, dim=0):
    dim = dim % len(x.shape)
    n = x.shape[dim]
    if isinstance(sizes, int):
        sizes = [min(sizes, n - s) for s in range(0, n, sizes)]
    outs, start = [], 0
    for s in sizes:
        outs.append(_slice(g, x, dim, start, start + s))
        start += s
    return tuple(outs)


@handles(aten.cat.default)
def _cat(g, xs, dim=0):
    xs = [x for x in xs if x.numel > 0 or len(x.shape) > 1]
    return xs[0] if len(xs) == 1 else g.add("concat", *xs, axis=dim % len(xs[0].shape))


@handles(aten.embedding.default)
def _embedding(g, w, idx, *_):
    return g.add("gather", w, idx, axis=0)


@handles(aten.index_select.default)
def _index_select(g, x, dim, idx):
    return g.add("gather", x, idx, axis=dim % len(x.shape))


@handles(aten.gather.default)
def _gather_elements(g, x, dim, idx, sparse_grad=False):
    return g.add("gather_elements", x, idx, axis=dim % len(x.shape))


@handles(aten.index.Tensor)
def _index(g, x, indices):
    used = [(d, i) for d, i in enumerate(indices) if i is not None]
    if len(used) == 1 and used[0][1].dtype != torch.bool:
        return g.add("gather", x, used[0][1], axis=used[0][0])
    return g.add("index", x, *(i for _, i in used), dims=tuple(d for d, _ in used))


@handles(aten.constant_pad_nd.default)
def _pad(g, x, pads, value=0.0):
    return g.add("pad", x, pads=tuple(pads), value=float(value))


@handles(aten.triu.default)
def _triu(g, x, diagonal=0):
    return g.add("triu", x, diagonal=diagonal)


@handles(aten.tril.default)
def _tril(g, x, diagonal=0):
    return g.add("tril", x, diagonal=diagonal)


# -- creation (folds to constants) -------------------------------------------------------------------------

@handles(aten.arange.start_step, aten.arange.default, aten.arange.start)
def _arange(g, *args, dtype=None, **_):
    return g.const(torch.arange(*args, dtype=dtype))


@handles(aten.full.default)
def _full(g, size, value, dtype=None, **_):
    return g.const(torch.full(tuple(size), value, dtype=dtype))


@handles(aten.scalar_tensor.default)
def _scalar_tensor(g, value, dtype=None, **_):
    return g.const(torch.scalar_tensor(value, dtype=dtype))


def _filled(fill):
    def handler(g, size, dtype=None, **_):
        return g.const(torch.full(tuple(size), fill, dtype=dtype or torch.float32))
    return handler


ATEN[aten.zeros.default], ATEN[aten.ones.default] = _filled(0), _filled(1)


@handles(aten.full_like.default, aten.zeros_like.default, aten.ones_like.default, aten.empty_like.default)
def _like(g, x, value=0, dtype=None, **_):
    return g.const(torch.full(x.shape, value, dtype=dtype or x.dtype))


# -- reductions and normalisation --------------------------------------------------------------------------

def reduction(op):
    def handler(g, x, dims=None, keepdim=False, dtype=None):
        if dtype is not None and dtype != x.dtype:
            x = g.add("cast", x, dtype=dtype)
        return g.add(op, x, axes=_axes(dims, len(x.shape)), keepdim=keepdim)
    return handler


handles(aten.mean.dim)(reduction("reduce_mean"))
handles(aten.sum.dim_IntList)(reduction("reduce_sum"))
handles(aten.amax.default)(reduction("reduce_max"))
handles(aten.amin.default)(reduction("reduce_min"))


ATEN[aten.mean.default] = lambda g, x, dtype=None: reduction("reduce_mean")(g, x, None, False, dtype)
ATEN[aten.sum.default] = lambda g, x, dtype=None: reduction("reduce_sum")(g, x, None, False, dtype)


@handles(aten.any.dim, aten.any.dims, aten.any.default)
def _any(g, x, dims=None, keepdim=False):
    m = reduction("reduce_max")(g, g.add("cast", x, dtype=torch.float32), dims, keepdim)
    return g.add("ne", m, scalar(g, 0.0, m))


@handles(aten.var.correction)
def _var(g, x, dims=None, correction=None, keepdim=False):
    return g.add("reduce_var", x, axes=_axes(dims, len(x.shape)),
                 correction=1 if correction is None else correction, keepdim=keepdim)


@handles(aten.var_mean.correction)
def _var_mean(g, x, dims=None, correction=None, keepdim=False):
    return (_var(g, x, dims, correction=correction, keepdim=keepdim),
            g.add("reduce_mean", x, axes=_axes(dims, len(x.shape)), keepdim=keepdim))


@handles(aten.max.dim)
def _max_dim(g, x, dim, keepdim=False):
    axis = dim % len(x.shape)
    return (g.add("reduce_max", x, axes=(axis,), keepdim=keepdim), g.add("argmax", x, axis=axis, keepdim=keepdim))


@handles(aten.argmax.default)
def _argmax(g, x, dim=None, keepdim=False):
    if dim is None:
        return g.add("argmax", reshape(g, x, (x.numel,)), axis=0, keepdim=False)
    return g.add("argmax", x, axis=dim % len(x.shape), keepdim=keepdim)


@handles(aten._softmax.default, aten.softmax.int)
def _softmax(g, x, dim, *_):
    return g.add("softmax", x, axis=dim % len(x.shape))


@handles(aten._log_softmax.default, aten.log_softmax.int)
def _log_softmax(g, x, dim, *_):
    return g.add("log_softmax", x, axis=dim % len(x.shape))


@handles(aten.native_layer_norm.default)
def _native_layer_norm(g, x, shape, w, b, eps):
    ndim = len(shape)
    norm = tuple(shape)
    w = w if w is not None else g.const(torch.ones(norm, dtype=x.dtype))
    b = b if b is not None else g.const(torch.zeros(norm, dtype=x.dtype))
    out = g.add("layer_norm", x, w, b, eps=eps, ndim=ndim)
    axes = tuple(range(len(x.shape) - ndim, len(x.shape)))
    mean = g.add("reduce_mean", x, axes=axes, keepdim=True)
    var = g.add("reduce_var", x, axes=axes, correction=0, keepdim=True)
    rstd = g.add("rsqrt", g.add("add", var, scalar(g, eps, var)))
    return out, mean, rstd   # mean and rstd are pruned unless used


@handles(aten._native_batch_norm_legit_no_training.default)
def _batch_norm(g, x, w, b, mean, var, momentum, eps):
    """Inference BatchNorm as x * scale + shift; scale and shift fold to constants at capture."""
    c = x.shape[1]
    bshape = (c,) + (1,) * (len(x.shape) - 2)
    scale = g.add("rsqrt", g.add("add", var, scalar(g, eps, var)))
    if w is not None:
        scale = g.add("mul", scale, w)
    shift = g.add("neg", g.add("mul", mean, scale))
    if b is not None:
        shift = g.add("add", shift, b)
    y = g.add("add", g.add("mul", x, reshape(g, scale, bshape)), reshape(g, shift, bshape))
    return y, mean, var


@handles(aten.cumsum.default)
def _cumsum(g, x, dim, dtype=None):
    if dtype is not None and dtype != x.dtype:
        x = g.add("cast", x, dtype=dtype)
    return g.add("cumsum", x, axis=dim % len(x.shape))


# -- contractions ---------------------------------------------------------------------------------------------

@handles(aten.mm.default, aten.bmm.default, aten.matmul.default)
def _mm(g, a, b):
    return g.add("matmul", a, b)


@handles(aten.addmm.default)
def _addmm(g, bias, a, b, beta=1, alpha=1):
    y = g.add("matmul", a, b)
    if alpha != 1:
        y = g.add("mul", y, scalar(g, alpha, y))
    if beta != 1:
        bias = g.add("mul", bias, scalar(g, beta, bias))
    return g.add("add", y, bias)


@handles(aten.linear.default)
def _linear(g, x, w, b=None):
    y = g.add("matmul", x, _t(g, w))
    return y if b is None else g.add("add", y, b)


@handles(aten.convolution.default)
def _convolution(g, x, w, b, stride, padding, dilation, transposed, output_padding, groups):
    if transposed or len(x.shape) != 4:
        raise KfuseError("only 2-D, non-transposed convolutions are supported")
    args = (x, w) if b is None else (x, w, b)
    return g.add("conv2d", *args, stride=tuple(stride), padding=tuple(padding), dilation=tuple(dilation), groups=groups)


@handles(aten.max_pool2d_with_indices.default, aten.max_pool2d.default)
def _max_pool(g, x, kernel, stride=(), padding=(0, 0), dilation=(1, 1), ceil_mode=False):
    kernel = tuple(kernel)
    y = g.add("max_pool2d", x, kernel=kernel, stride=tuple(stride) or kernel, padding=tuple(padding),
              dilation=tuple(dilation), ceil_mode=ceil_mode)
    return y, None


@handles(aten.avg_pool2d.default)
def _avg_pool(g, x, kernel, stride=(), padding=(0, 0), ceil_mode=False, count_include_pad=True, divisor=None):
    if divisor is not None:
        raise KfuseError("avg_pool2d with divisor_override is not supported")
    kernel = tuple(kernel)
    return g.add("avg_pool2d", x, kernel=kernel, stride=tuple(stride) or kernel, padding=tuple(padding),
                 ceil_mode=ceil_mode, count_include_pad=count_include_pad)


@handles(aten._adaptive_avg_pool2d.default, aten.adaptive_avg_pool2d.default)
def _adaptive_avg_pool(g, x, size):
    h, w = x.shape[-2:]
    oh, ow = size
    if (oh, ow) == (1, 1):
        return g.add("reduce_mean", x, axes=(len(x.shape) - 2, len(x.shape) - 1), keepdim=True)
    if h % oh or w % ow:
        raise KfuseError(f"adaptive_avg_pool2d from {h}x{w} to {oh}x{ow} needs uneven windows (unsupported)")
    k = (h // oh, w // ow)
    return g.add("avg_pool2d", x, kernel=k, stride=k, padding=(0, 0))


def _sdpa(g, q, k, v, mask=None, dropout=0.0, causal=False, *_, scale=None, enable_gqa=False, **__):
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    args = (q, k, v) if mask is None else (q, k, v, mask)
    return g.add("attention", *args, scale=scale, causal=bool(causal))


handles(aten.scaled_dot_product_attention.default)(_sdpa)


@handles(aten._scaled_dot_product_flash_attention_for_cpu.default)
def _sdpa_flash_cpu(g, q, k, v, dropout=0.0, causal=False, *, attn_mask=None, scale=None):
    return _sdpa(g, q, k, v, attn_mask, dropout, causal, scale=scale), None


SKIP = {aten._assert_tensor_metadata.default, aten._assert_scalar.default, aten.sym_constrain_range_for_size.default}


# -- the converter --------------------------------------------------------------------------------------------

def from_fx(graph: torch.fx.Graph, values: dict[str, torch.Tensor], input_names: list[str]) -> Graph:
    """Convert an ATen-level FX graph. Placeholders named in `values` become constants; the others,
    in `input_names` order, become graph inputs (their shapes come from node.meta['val'])."""
    g = Graph()
    env: dict[torch.fx.Node, object] = {}
    placeholders = {n.name: n for n in graph.nodes if n.op == "placeholder"}
    for name in input_names:
        val = placeholders[name].meta["val"]
        env[placeholders[name]] = g.input(tuple(val.shape), val.dtype, name)
    for n in graph.nodes:
        if n.op == "placeholder":
            if n not in env:
                env[n] = g.const(values[n.name], name=n.name)
        elif n.op == "get_attr":
            env[n] = g.const(values[n.target], name=n.name)
        elif n.op == "call_function":
            env[n] = _call(g, n, env)
        elif n.op == "output":
            outs = torch.utils._pytree.tree_leaves(n.args[0])
            g.outputs = [env[o] if isinstance(o, torch.fx.Node) else g.const(o) for o in outs]
            g.output_names = [o.name if isinstance(o, torch.fx.Node) else "const" for o in outs]
    g.prune()
    return g


def _call(g, n: torch.fx.Node, env):
    if n.target is __import__("operator").getitem:
        return env[n.args[0]][n.args[1]]
    if n.target in SKIP:
        return None
    handler = ATEN.get(n.target)
    if handler is None:
        raise UnsupportedOpError(str(n.target), n.name, "PyTorch")
    conv = lambda a: env[a] if isinstance(a, torch.fx.Node) else a  # noqa: E731
    args = torch.fx.node.map_aggregate(n.args, conv)
    kwargs = torch.fx.node.map_aggregate(n.kwargs, conv)
    kwargs = {k: v for k, v in kwargs.items() if k not in ("layout", "device", "pin_memory", "memory_format", "non_blocking")}
    out = handler(g, *args, **kwargs)
    for node in out if isinstance(out, tuple) else (out,):
        if isinstance(node, Node) and node.op != "const" and not node.name:
            node.name = n.name
    return out


def export(model: torch.nn.Module, example_inputs: tuple, example_kwargs: dict | None = None) -> tuple[Graph, object]:
    """torch.export + core ATen decompositions -> (Graph, output pytree spec)."""
    from torch.export.graph_signature import InputKind
    model = model.eval()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ep = torch.export.export(model, tuple(example_inputs), dict(example_kwargs or {}), strict=False)
        except Exception as e:
            raise KfuseError(f"torch.export failed on {type(model).__name__}: {type(e).__name__}: {e}") from e
        # SDPA stays whole: it maps onto our attention op (and its decomposition breaks on some
        # strided inputs, e.g. transformers' GPT-2 with attn_implementation="sdpa").
        table = torch.export.default_decompositions()
        table.pop(aten.scaled_dot_product_attention.default, None)
        ep = ep.run_decompositions(table)
    values, user = {}, []
    state = {**ep.state_dict, **ep.constants}
    for spec in ep.graph_signature.input_specs:
        if spec.kind == InputKind.USER_INPUT:
            user.append(spec.arg.name)
        elif hasattr(spec.arg, "name"):
            values[spec.arg.name] = state[spec.target].detach()
    for name, attr in ep.graph_module.named_buffers():
        values.setdefault(name, attr)
    return from_fx(ep.graph, values, user), ep.call_spec.out_spec
