"""Channels-last (NHWC) for the convolutional part of a graph.

oneDNN convolutions compute in NHWC, and a depthwise or squeeze-excitation kernel wants the channel
innermost too. Captured graphs are NCHW, so without this pass every elementwise kernel between two
convolutions read a channels-last tensor through strides and wrote NCHW, which the next convolution
converted back. Here each 4-D tensor of the region gets a physical node holding it as
[N, H, W, C] (`p = x.permute(0, 2, 3, 1)`), and the region's ops are rewritten to work on those:

  conv2d, conv_transpose2d, the same op with attr layout="nhwc" (x and the output are NHWC)
  max/avg pooling
  elementwise / broadcast   the same op on NHWC operands; constants permuted once, other operands viewed
  reduce_* over axes        the axes renumbered (a global average pool is a mean over axes 1, 2)
  concat                    the axis renumbered
  transpose                 x.permute(0, 2, 3, 1) of a region tensor is its physical node (ConvNeXt's
                            permute before a LayerNorm over channels disappears), and a permute(0, 3, 1, 2)
                            of a plain 4-D tensor joins the region as it is
  channel shuffle           (reshape to [N, G, C/G, H, W], swap G and C/G, reshape back: ShuffleNet) the same
                            permutation of the NHWC channels

Squeeze-excitation blocks are then matched on the NHWC tensors (patterns/squeeze_excite.py).

Every other consumer reads the logical tensor as a transpose of the physical one: a view, no copy
(kernels read it through its strides). Those views at the region's edges, and the views into it for
4-D inputs that come from outside, are the layout conversions the report counts.
"""
from __future__ import annotations

import torch

from ..ir import Graph, Kind, Node
from ..rewrite import apply, uses
from . import fold
from .patterns import squeeze_excite

CL = (0, 2, 3, 1)        # physical = logical.permute(CL)
BACK = (0, 3, 1, 2)      # logical = physical.permute(BACK)
POOLS = ("max_pool2d", "avg_pool2d", "adaptive_avg_pool2d", "adaptive_max_pool2d")
REDUCE = ("reduce_sum", "reduce_mean", "reduce_max", "reduce_min")


def _conv_ok(n: Node) -> bool:
    return n.op in ("conv2d", "conv_transpose2d") and len(n.shape) == 4 and n.dtype == torch.float32 and n.inputs[1].op == "const"


class _Region:
    def __init__(self, g: Graph):
        self.g = g
        self.phys: dict[Node, Node] = {}       # logical node -> its NHWC node
        self.views: dict[Node, Node] = {}      # plain 4-D node -> its NHWC view
        self.plain: dict[Node, Node] = {}      # logical node -> the plain node now computing it
        self.into = 0                          # views into the region made for plain 4-D inputs
        self.users = g.users()                 # of the captured nodes (new ones never read them)

    def physical(self, x: Node) -> Node:
        """x as NHWC: its physical node, a permuted constant, or a view of a plain tensor."""
        if x in self.phys:
            return self.phys[x]
        x = self.plain.get(x, x)
        if x.op == "const":
            v = x.value.reshape((1,) * (4 - x.value.dim()) + tuple(x.value.shape))
            return self.g.const(v.permute(CL).contiguous())
        if x not in self.views:
            y = x if len(x.shape) == 4 else self.g.add("reshape", x, shape=(1,) * (4 - len(x.shape)) + x.shape)
            self.views[x] = self.g.add("transpose", y, perm=CL)
            self.into += 1
        return self.views[x]

    def rewrite(self, n: Node):
        """Put n in the region (self.phys) or give its plain replacement (self.plain), or leave it."""
        g, ins = self.g, n.inputs
        inside = [i in self.phys for i in ins]
        if _conv_ok(n):
            self.phys[n] = g.add(n.op, self.physical(ins[0]), *ins[1:], **n.attrs, layout="nhwc")
        elif n.op == "reshape" and len(n.shape) == 4 and (gn := self.group_norm(n)) is not None:
            self.phys[n] = gn
        elif n.op == "reshape" and len(n.shape) == 4 and (cs := self.channel_shuffle(n)) is not None:
            self.phys[n] = cs
        elif not any(inside):
            if n.op == "transpose" and n.attrs["perm"] == BACK and len(n.shape) == 4:
                self.phys[n] = self.plain.get(ins[0], ins[0])     # a plain NHWC tensor seen as NCHW
        elif n.op in POOLS and inside[0]:
            self.phys[n] = g.add(n.op, self.phys[ins[0]], **n.attrs, layout="nhwc")
        elif n.kind in (Kind.ELEMENTWISE, Kind.BROADCAST) and len(n.shape) == 4 and all(len(i.shape) <= 4 for i in ins):
            self.phys[n] = g.add(n.op, *[self.physical(i) for i in ins], **n.attrs)
        elif n.op == "concat" and len(n.shape) == 4:
            axis = BACK[n.attrs["axis"] % 4]
            self.phys[n] = g.add("concat", *[self.physical(i) for i in ins], axis=axis)
        elif n.op in REDUCE and len(ins) == 1:
            axes = sorted(BACK[a % 4] for a in n.attrs["axes"])
            keep = n.attrs.get("keepdim", False)
            rest = [CL[d] for d in range(4) if d not in axes]       # logical dims in physical order
            if keep or rest == sorted(rest):
                new = g.add(n.op, self.phys[ins[0]], **{**n.attrs, "axes": tuple(axes)})
                (self.phys if keep else self.plain)[n] = new
        elif n.op == "transpose" and n.attrs["perm"] == CL:
            self.plain[n] = self.phys[ins[0]]

    def channel_shuffle(self, n: Node) -> Node | None:
        """reshape(transpose(reshape(x, [N, G, C/G, H, W]), (0, 2, 1, 3, 4)), [N, C, H, W]) of a region tensor
        x (ShuffleNet's channel shuffle) as the same permutation of x's NHWC channels: [N, H, W, G, C/G],
        its last two dims swapped, [N, H, W, C]. As captured the shuffle left the region: a copy in NCHW
        order that every consumer then read through a transpose with a channel stride of H*W."""
        t = n.inputs[0]
        if t.op != "transpose" or tuple(t.attrs["perm"]) != (0, 2, 1, 3, 4):
            return None
        r = t.inputs[0]
        if r.op != "reshape" or r.inputs[0] not in self.phys:
            return None
        x = r.inputs[0]
        nb, c, h, w = x.shape
        if n.shape != x.shape or len(r.shape) != 5 or r.shape[0] != nb or r.shape[3:] != (h, w):
            return None
        y = self.g.add("reshape", self.phys[x], shape=(nb, h, w, *r.shape[1:3]))
        y = self.g.add("transpose", y, perm=(0, 1, 2, 4, 3))
        return self.g.add("reshape", y, shape=(nb, h, w, c))

    def group_norm(self, n: Node) -> Node | None:
        """GroupNorm of a region tensor x as captured (kfuse/capture/aten_nn.py): reshape(x, [N, G, K]),
        a row layer_norm, a scale and shift of the row shape, SiLU, reshape back to x's shape (n),
        as one NHWC group_norm op: the rows of a group are not contiguous in NHWC, so as captured
        the norm read the region through a copy back to NCHW and the next convolution copied again."""
        def single(m):
            return len(self.users[m]) == 1 and m not in self.g.outputs

        silu, affine = False, {}
        m = n.inputs[0]
        if m.op == "silu" and single(m):
            silu, m = True, m.inputs[0]
        for op in ("add", "mul"):
            consts = [i for i in m.inputs if i.op == "const"] if m.op == op and single(m) else []
            if len(consts) == 1 and len(m.inputs) == 2:
                affine[op] = consts[0]
                m = next(i for i in m.inputs if i is not consts[0])
        if m.op != "layer_norm" or m.attrs.get("ndim", 1) != 1 or not single(m) or len(m.inputs) != 3:
            return None
        rows = m.inputs[0]
        if rows.op != "reshape" or not single(rows) or rows.inputs[0] not in self.phys:
            return None
        x, (ln_w, ln_b) = rows.inputs[0], m.inputs[1:]
        nb, c, h, w = x.shape
        if x.shape != n.shape or len(rows.shape) != 3 or rows.shape[0] != nb or c % rows.shape[1] \
                or 0 in rows.shape or ln_w.op != "const" or ln_b.op != "const":
            return None
        groups = rows.shape[1]

        def per_channel(p, shape, neutral):   # a constant broadcast to `shape` -> [C], if constant over H*W
            if p is None:
                return torch.full((c,), float(neutral))
            v = p.value.float().expand(shape).reshape(-1, h * w)
            v = v[:, 0].contiguous() if bool((v == v[:, :1]).all()) else None
            return v if v is None or v.numel() == c else v.repeat(c // v.numel())
        # the row norm's own scale and shift (per position in a group's row: the same for every group),
        # then the scale and shift of the row shape; folding may have merged them either way
        lw, lb = per_channel(ln_w, (rows.shape[2],), 1), per_channel(ln_b, (rows.shape[2],), 0)
        mw, ab = per_channel(affine.get("mul"), rows.shape[1:], 1), per_channel(affine.get("add"), rows.shape[1:], 0)
        if any(v is None for v in (lw, lb, mw, ab)):
            return None
        wc, bc = lw * mw, lb * mw + ab
        return self.g.add("group_norm", self.phys[x], self.g.const(wc), self.g.const(bc), groups=groups,
                          eps=float(m.attrs["eps"]), silu=silu, layout="nhwc")


def group_norm_epilogue(g: Graph, n: Node, report=None):
    """A per-channel scale or shift, or a SiLU, after an NHWC group_norm op, taken into it (the capture
    applies GroupNorm's affine after the reshape back when it is too big to fold into the row form)."""
    gn = next((i for i in n.inputs if i.op == "group_norm"), None)
    if gn is None or gn.attrs.get("silu") or uses(g, gn) != 1:
        return None
    x, w, b = gn.inputs
    c = gn.shape[3]
    if n.op == "silu":
        return g.add("group_norm", x, w, b, **{**gn.attrs, "silu": True})
    other = next((i for i in n.inputs if i is not gn), None)
    if n.op not in ("mul", "add") or other is None or other.op != "const" or other.numel != c \
            or other.shape[-1:] != (c,) or n.shape != gn.shape:
        return None
    v = other.value.float().reshape(c)
    w, b = (w.value * v, b.value * v) if n.op == "mul" else (w.value, b.value + v)
    return g.add("group_norm", x, g.const(w), g.const(b), **gn.attrs)


def run(graph: Graph, options: dict, report) -> Graph:
    if options.get("layout", "auto") != "auto" or options.get("backend", "cpu") != "cpu" \
            or not any(_conv_ok(n) for n in graph.nodes):
        return graph
    r = _Region(graph)
    for n in list(graph.nodes):
        if n.op not in ("input", "const"):
            r.rewrite(n)
    if not r.phys:
        return graph
    for n, p in r.plain.items():
        graph.replace_uses(n, p)
    for n, p in r.phys.items():
        graph.replace_uses(n, graph.add("transpose", p, perm=BACK))
    graph.toposort()
    graph.prune()
    # the edge views meet the model's own transposes (ConvNeXt's permutes cancel out)
    apply(graph, [("transpose_chain", fold.transpose_chain), ("reshape_chain", fold.reshape_chain)])
    if "squeeze_excite" not in options.get("disable", ()):
        apply(graph, squeeze_excite.RULES, report)
    apply(graph, [("group_norm_epilogue", group_norm_epilogue)], report)
    live = set(graph.nodes)
    region = {p for p in r.phys.values() if p in live and p.op not in ("input", "const")}
    edges = [m for m in graph.nodes if m.op == "transpose" and len(m.shape) == 4 and m.attrs["perm"] in (CL, BACK)]
    report.fired("nhwc_layout", len(region))
    if edges:
        report.fired("layout_conversion", len(edges))
    return graph
