"""The reference kernel: a group run op by op with the reference functions (kfuse.ops.reference).

The fallback that is always right: used for ops no fused kernel covers, for a kernel that failed to
build, for `backend="reference"`, and as the unfused side when a program is profiled.
"""
from __future__ import annotations

import torch

from ..ir import Group
from ..ops.reference import REFERENCE


def reference_kernel(group: Group):
    nodes, ins, outs = group.nodes, group.inputs, group.outputs

    def fn(*args):
        env = dict(zip(ins, args))
        for n in nodes:
            env[n] = REFERENCE[n.op](*[env[i] for i in n.inputs], **n.attrs)
        return tuple(env[o] for o in outs)
    return fn


# Torch ops whose out= form computes into the tensor it is given (not a copy of a new result). Run for a
# group of one such op, torch writes into the group's planned buffer: a new output of tens of MB is
# mmapped by malloc and page-faulted in on every call (torch.cat into mvit_v2_s's 78 MB attention block:
# 36 ms, into a buffer written before 5.6 ms).
OUT_FORMS = {
    "concat": lambda out, *xs, axis: torch.cat(xs, axis, out=out),
    "matmul": lambda out, a, b: torch.matmul(a, b, out=out),
}


def out_kernel(node):
    """For an OUT_FORMS op whose inputs have its dtype, the kernel fn(bufs, *node.inputs) writing into
    bufs[0] (a new tensor where it is None: an output the caller keeps); else None. Not for a matmul of a
    vector: torch.matmul(vector, matrix, out=) resizes its [N] out to [1, N] (a deprecated resize, with a
    warning), which would change the planned buffer's shape under the ops reading it."""
    if node.op not in OUT_FORMS or any(i.dtype != node.dtype for i in node.inputs):
        return None
    if node.op == "matmul" and any(len(i.shape) == 1 for i in node.inputs):
        return None
    into, new = OUT_FORMS[node.op], REFERENCE[node.op]

    def fn(bufs, *args):
        if bufs[0] is None:
            return (new(*args, **node.attrs),)
        with torch.no_grad():       # out= takes no input that requires grad; kfuse computes inference
            into(bufs[0], *args, **node.attrs)
        return bufs
    return fn
