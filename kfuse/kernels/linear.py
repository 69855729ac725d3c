"""The GEMM-with-epilogue kernel: act(x @ W + bias) with a constant weight, as the library runs it.

One table says which activations an epilogue carries: the names of `kfuse.ops.reference.ACTIVATIONS`
(the meaning of `linear(..., act=)`), reached from IR ops by `activation_of`. The pattern rules, the
automatic scheduler and the library backend all read it from here.
"""
from __future__ import annotations

import torch

from ..ir import Node
from ..ops.reference import ACTIVATIONS

# IR op -> the epilogue activation it is (gelu depends on its `approximate` attribute)
_ACT_OF_OP = {"relu": "relu", "silu": "silu", "sigmoid": "sigmoid", "tanh": "tanh"}
_GELU = {"none": "gelu", "tanh": "gelu_tanh"}


def activation_of(n: Node) -> str | None:
    """The name (a key of ACTIVATIONS) of the activation node n computes, or None."""
    act = _GELU.get(n.attrs.get("approximate", "none")) if n.op == "gelu" else _ACT_OF_OP.get(n.op)
    assert act is None or act in ACTIVATIONS
    return act


def as_linear(nodes, dtypes=(torch.float32,)):
    """(x, w [K, N], bias or None, act) when `nodes` compute act(x @ w + bias) with constant w and
    bias: a `linear` op from the pattern rules, or a matmul by a constant weight followed by the
    epilogue the automatic fuser attached (a bias add, then an activation). Else None. `dtypes`: the
    dtypes the caller's GEMM takes (the CPU library: float32 only)."""
    head = nodes[0]
    if head.dtype not in dtypes:
        return None
    if head.op == "linear" and len(nodes) == 1:
        return head.inputs[0], head.inputs[1].value, head.inputs[2].value if len(head.inputs) == 3 else None, head.attrs["act"]
    if head.op != "matmul" or head.inputs[1].op != "const" or len(head.inputs[1].shape) != 2 or len(head.inputs[0].shape) < 2:
        return None
    n_out, bias, act, last = head.shape[-1], None, "none", head
    for n in nodes[1:]:
        if last not in n.inputs or n.shape != last.shape:
            return None
        other = [i for i in n.inputs if i is not last]
        if n.op == "add" and bias is None and act == "none" and len(other) == 1 and other[0].op == "const" \
                and other[0].numel == n_out and other[0].shape[-1:] == (n_out,) and other[0].dtype == n.dtype:
            bias = other[0].value.reshape(n_out)
        elif act == "none" and not other and activation_of(n) is not None:
            act = activation_of(n)
        else:
            return None
        last = n
    return head.inputs[0], head.inputs[1].value, bias, act
