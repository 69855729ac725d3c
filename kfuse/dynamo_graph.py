"""The graph-reading helpers of kfuse/dynamo.py: traced values, the KV-cache outputs of a decode graph
(concatenations and sliding windows, made views of growable buffers: runtime/kvcache.py), and which
nodes are cheap or size arithmetic (what a partition moves or runs by torch)."""
from __future__ import annotations

import operator
from typing import NamedTuple

import torch
import torch.fx

from .runtime import kvcache


def _symbols(value) -> bool:
    """Whether a traced value (tensor, SymInt, or a tuple of them) has a symbolic size or is one."""
    from torch.fx.experimental.symbolic_shapes import free_symbols
    try:
        return bool(free_symbols(value))
    except Exception:    # noqa: BLE001 - a value free_symbols cannot walk (None, a dtype): static
        return False


def _val(n: torch.fx.Node):
    return n.meta.get("example_value", n.meta.get("val"))


class _CacheOut(NamedTuple):
    """A graph output that is a KV cache: `cat` (torch.cat([past, new], dim=axis)) or, where `rows` is
    set, the window `cat[..., -rows:, :]` of it that a sliding-window cache keeps."""
    cat: torch.fx.Node
    axis: int
    past: int | None       # past's position among the graph's inputs; None: the empty tensor of a new cache
    rows: int | None = None


def _cache_appends(gm: torch.fx.GraphModule) -> dict[int, _CacheOut]:
    """Output position -> _CacheOut for each output that is a KV-cache concatenation as Hugging Face's
    DynamicCache writes it (torch.cat([past, new], dim=-2) of a rank >= 3 floating tensor, past a graph
    input or the empty tensor of a lazily initialised cache), or the last rows of one along that axis
    (DynamicSlidingWindowLayer's `full[:, :, -w:, :]`)."""
    out = next(n for n in gm.graph.nodes if n.op == "output").args[0]
    inputs = [n for n in gm.graph.nodes if n.op == "placeholder"]
    found = {}
    for i, n in enumerate(out if isinstance(out, (tuple, list)) else ()):
        rows = None
        if isinstance(n, torch.fx.Node) and n.target is operator.getitem and isinstance(n.args[0], torch.fx.Node):
            rows, n = _window_rows(n), n.args[0]
            if rows is None:
                continue
        if not (isinstance(n, torch.fx.Node) and n.op == "call_function" and n.target in (torch.cat, torch.concat)):
            continue
        parts, dim = n.args[0], n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
        val = _val(n)
        if (len(n.args) > 2 or set(n.kwargs) - {"dim"} or not isinstance(parts, (list, tuple)) or len(parts) != 2
                or not isinstance(dim, int) or not isinstance(val, torch.Tensor) or val.dim() < 3
                or not val.is_floating_point() or dim % val.dim() != val.dim() - 2):
            continue
        past = _val(parts[0]) if isinstance(parts[0], torch.fx.Node) else None
        if isinstance(past, torch.Tensor) and parts[0].op == "placeholder":
            found[i] = _CacheOut(n, val.dim() - 2, inputs.index(parts[0]), rows)
        elif isinstance(past, torch.Tensor) and past.dim() == 1 and not _symbols(past) and past.numel() == 0:
            found[i] = _CacheOut(n, val.dim() - 2, None, rows)
    return found


def _window_rows(n: torch.fx.Node) -> int | None:
    """w where n is `x[:, ..., -w:, :]` (the last w rows along the second-last axis, all of the others)."""
    x, index = _val(n.args[0]), n.args[1]
    if not isinstance(x, torch.Tensor) or not isinstance(index, tuple) or len(index) != x.dim() or x.dim() < 3:
        return None
    whole = slice(None, None, None)
    last = index[-2]
    if (not all(isinstance(a, slice) and a == whole for j, a in enumerate(index) if j != x.dim() - 2)
            or not isinstance(last, slice) or last.stop is not None or last.step is not None
            or not isinstance(last.start, int) or last.start >= 0):
        return None
    return -last.start


def _adopt(outs, appends: dict, args) -> tuple[object, set]:
    """(outs with each cache concatenation that continues a growable cache (its past one of ours, or the
    empty tensor a cache starts from) made the latest view of a growable buffer, their positions);
    other concatenations of an input are left as computed (spare rows only where a cache grows)."""
    fixed, adopted = list(outs), set()
    for i, c in appends.items():
        if c.past is None or kvcache.growable(args[c.past]):
            fixed[i] = kvcache.adopt(fixed[i], c.axis)
            adopted.add(i)
    return (tuple(fixed) if isinstance(outs, tuple) else fixed), adopted


_CHEAP = {"view", "reshape", "transpose", "permute", "unsqueeze", "squeeze", "contiguous", "size", "to", "expand",
          "split", "chunk", "flatten", "__getitem__", "getitem", "dim", "numel", "sym_sum", "window"}


def _cheap(n: torch.fx.Node) -> bool:
    """Whether a node is a view, a getitem or size arithmetic (no work worth a kfuse call)."""
    if n.op not in ("call_function", "call_method", "call_module"):
        return True
    return (n.target if isinstance(n.target, str) else getattr(n.target, "__name__", "")) in _CHEAP


def _size_arithmetic(n: torch.fx.Node) -> bool:
    """Whether n computes a Python int from others (a cache length plus one, a sym_max): pure, cheap."""
    if n.op != "call_function" or isinstance(_val(n), bool) or not isinstance(_val(n), (int, torch.SymInt)):
        return False
    return getattr(n.target, "__module__", None) in ("_operator", "operator") or \
        getattr(n.target, "__name__", "").startswith("sym_")
