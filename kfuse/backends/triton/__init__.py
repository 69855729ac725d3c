"""The Triton backend: the kernel IR rendered as Triton kernels (GPU, or the CPU interpreter).

    kern = build(fused_kernel)         # render, write into the cache, import; raises TritonUnavailable
    kern(inputs, outputs)              # torch tensors on one device: outputs preallocated, contiguous

Builders for `kfuse.backends.make_kernel` (each returns (fn, backend string)):
  - `fused_kernel(group)`: elementwise chains and row reductions, fp32/fp16/bf16 ("triton");
  - `linear_kernel(nodes, spec)`: act(x @ W + b) as torch.addmm/matmul (cuBLAS on a GPU) with the
    activation applied in place on the GEMM's output ("library:torch+epilogue");
  - `attention_kernel(node)`: the FlashAttention-style kernel of attention.py ("triton:attention");
  - `rope_kernel(node)`: rotary embeddings (rope.py, "triton:rope").
A kernel allocates its outputs on its inputs' device; a planned buffer is used when it is on that
device (the runtime's arena lives on the CPU).

Autotuning: where there is a GPU and KFUSE_TRITON_AUTOTUNE is not "0", a kernel with several
candidate renderings (row tile, flat block sizes, warps) times each once on its first call and keeps
the fastest (one FusedKernel is one shape, so the choice is per shape), remembered in the kfuse cache
for later processes (kernel.fastest). In the interpreter the default rendering runs alone.
"""
from __future__ import annotations

import torch

from ...kernels import FusedKernel, NotFusable, lower
from ..launch import group_runner
from ..library import INPLACE_ACTS
from . import kernel as tk
from .kernel import TritonUnavailable, available, interpreting
from .render import render

__all__ = ["build", "TritonKernel", "TritonUnavailable", "available", "interpreting", "fused_kernel",
           "linear_kernel", "attention_kernel", "rope_kernel", "render"]

# (max_block, tile, flat_block, num_warps or None: by block size) candidates timed by the autotuner;
# the first is the default
CANDIDATES = [(4096, 4096, 1024, None), (8192, 8192, 4096, None), (2048, 2048, 512, None),
              (4096, 16384, 2048, None), (4096, 4096, 4096, 16)]


class TritonKernel:
    """A loaded kernel: call with (inputs, outputs), lists of torch tensors on one device."""

    def __init__(self, k: FusedKernel, variants: list):
        self.kernel = k
        self.variants = variants          # [(candidate, rendered, jit function)], the default first
        self._use(0)
        self._tuned = len(variants) == 1 or not tk.autotune_enabled()

    def _use(self, i: int):
        _, self.rendered, fn = self.variants[i]
        self.source = self.rendered.source
        self._launch = tk.Launch(fn, self.rendered.grid, self.rendered.num_warps)

    def __call__(self, inputs, outputs):
        args = [tk.as_arg(t) for t in inputs] + [tk.as_arg(t) for t in outputs]
        if not self._tuned:
            self._tune(args)
        self._launch(args)

    def _tune(self, args):
        """Keep the fastest candidate rendering (timed on these arguments, or cached)."""
        launches = {c: tk.Launch(fn, r.grid, r.num_warps) for c, r, fn in self.variants}
        best = tk.fastest(list(launches), lambda c: launches[c](args), problem=self.variants[0][1].source)
        self._use([c for c, _, _ in self.variants].index(best))
        self._tuned = True


def build(k: FusedKernel) -> TritonKernel:
    """Render `k` (with its autotuning candidates where they can be timed), load the kernel files."""
    tk.require()
    cands = CANDIDATES if tk.autotune_enabled() else CANDIDATES[:1]
    variants, seen = [], set()
    for cand in cands:
        max_block, tile, flat_block, warps = cand
        r = render(k, max_block=max_block, tile=tile, flat_block=flat_block, warps=warps)
        if (r.source, r.num_warps) in seen:
            continue
        seen.add((r.source, r.num_warps))
        variants.append((cand, r, tk.load(r.source).kf_kernel))
    return TritonKernel(k, variants)


def _alloc(shape, dtype, buf, device):
    if buf is not None and buf.device == device:
        return buf
    return torch.empty(shape, dtype=dtype, device=device)


def fused_kernel(group, rounding: str = "outputs"):
    """The Triton kernel of an elementwise/row-reduction group: (fn(bufs, *inputs), "triton").
    float16/bfloat16 values are computed in fp32 and rounded at the kernel's outputs, or with
    rounding="eager" after every op, as PyTorch eager rounds them."""
    eager = rounding == "eager"
    fk = lower(group.nodes, group.outputs, half=True, round_each=eager)
    shapes = [(o.shape, o.dtype) for o in fk.outputs]

    def build_for(layout):
        if not layout:
            return build(fk)
        try:                 # strided inputs read in place, or None: copied
            return build(lower(group.nodes, group.outputs, layout, half=True, round_each=eager))
        except NotFusable:
            return None

    def alloc(k, buf, args):
        return _alloc(*shapes[k], buf, tk.device_of(args))

    run = group_runner(group, fk, build_for, alloc)
    run.sources = lambda: []
    return run, "triton"


def linear_kernel(x_node, w, b, act):
    """act(x @ w + b) with constant w [K, N] through torch (cuBLAS on a GPU): addmm carries the bias
    in the GEMM's epilogue, the activation runs in place on its output (one pass, no copy)."""
    w = w.detach().contiguous()
    b = None if b is None else b.detach().contiguous()
    inplace = INPLACE_ACTS[act]
    consts: dict = {}

    def on(device):
        if device not in consts:
            consts[device] = (w.to(device), None if b is None else b.to(device))
        return consts[device]

    def run(x, *_):
        wd, bd = on(x.device)
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        y = torch.mm(x2, wd) if bd is None else torch.addmm(bd, x2, wd)
        if inplace is not None:
            inplace(y)
        return (y.view(*lead, y.shape[-1]),)
    return run, "library:torch.mm" + ("+bias" if b is not None else "") + (f"+{act}" if act != "none" else "")


def rope_kernel(node):
    """The Triton rotary-embedding kernel for one `rope` node: (fn(bufs, x, cos, sin), "triton:rope")."""
    from .rope import rope
    tk.require()
    if len(node.shape) > 4 or node.shape[-1] % 2 or node.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise NotFusable("Triton rope takes float x of rank <= 4 with an even last dim")
    run = lambda bufs, x, c, s: (rope(x, c, s, out=bufs[0]),)   # noqa: E731
    run.sources = lambda: []
    return run, "triton:rope"


def attention_kernel(node):
    """The Triton attention kernel for one `attention` node: (fn(bufs, q, k, v[, mask]), backend)."""
    from .attention import attention
    tk.require()
    q = node.inputs[0]
    if len(q.shape) != 4 or q.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise NotFusable("Triton attention takes 4-D float32/float16/bfloat16 q, k, v")
    b, h, lq, d = q.shape
    if node.inputs[2].shape[-1] != d:
        raise NotFusable(f"Triton attention needs v's head dim ({node.inputs[2].shape[-1]}) equal to q's ({d})")
    scale, causal, zero_masked = node.attrs["scale"], node.attrs["causal"], node.attrs.get("zero_masked", False)

    def run(bufs, q, k, v, mask=None):
        buf = bufs[0]
        # stored [B, Lq, H, D]: the head merge (transpose + reshape) that follows is then a view
        if buf is not None and buf.device == q.device:
            store = buf.view(b, lq, h, d)
        else:
            store = torch.empty(b, lq, h, d, dtype=q.dtype, device=q.device)
        out = store.permute(0, 2, 1, 3)
        attention(q, k, v, mask, scale=scale, causal=causal, out=out, zero_masked=zero_masked)
        return (out,)
    run.sources = lambda: []
    return run, "triton:attention"
