"""The reference kernel: a group run op by op with the reference functions (kfuse.ops.reference).

The fallback that is always right: used for ops no fused kernel covers, for a kernel that failed to
build, for `backend="reference"`, and as the unfused side when a program is profiled.
"""
from __future__ import annotations

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
