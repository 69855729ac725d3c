"""The call of a fused elementwise / row-reduction kernel on a group's tensors, for every renderer of
the kernel IR (C, Triton): the kernel's own argument order, its outputs mapped to the group's
buffers, and strided inputs read in place by a kernel specialised to their strides."""
from __future__ import annotations

from ..kernels import FusedKernel
from .c import record


def group_runner(group, fk: FusedKernel, build, alloc):
    """fn(bufs, *inputs) -> the group's outputs, running the kernel `build({})` built for `fk`.

    build(layout): the kernel for inputs in the given element strides ({input node: strides} for the
      inputs that are not contiguous; {} for all contiguous), or None where it cannot read them (then
      such inputs are copied). A strided kernel is built on first sight of its strides: an input
      that arrives as a view (a slice of a merged GEMM's output, say) is read in place.
    alloc(k, buf, args): the tensor for kernel output k, given its planned buffer (or None) and the
      kernel's arguments.
    The returned fn has .kernel (the contiguous one) and .strided (strides -> kernel or None)."""
    kernel = build({})
    # the kernel orders (and may drop, by inlining small constants) its arguments its own way
    pick = [group.inputs.index(i) for i in fk.inputs]
    back = [fk.outputs.index(o) for o in group.outputs]
    where = [group.outputs.index(o) for o in fk.outputs]      # kernel output k -> its buffer
    strided: dict = {}

    def specialised(args):
        key = tuple(a.stride() for a in args)
        if key not in strided:
            strided[key] = build({n: a.stride() for n, a in zip(fk.inputs, args) if not a.is_contiguous()})
        return strided[key]

    def run(bufs, *inputs):
        args = [inputs[p] for p in pick]
        outs = [alloc(k, bufs[w], args) for k, w in enumerate(where)]
        kk = kernel if all(a.is_contiguous() for a in args) else specialised(args)
        if kk is not None:
            kk(args, outs)
        else:
            with record.paused():         # on copies: a replay of the call alone would read the old ones
                kernel([a.contiguous() for a in args], outs)
        return tuple(outs[b] for b in back)
    run.kernel, run.strided = kernel, strided
    return run
