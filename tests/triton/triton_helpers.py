"""Running a program compiled with backend="triton" kernel by kernel, every output buffer a kernel
writes into filled with NaN first (a kernel that skips elements leaves NaN behind and fails)."""
from __future__ import annotations

import warnings

import numpy as np
import torch

import kfuse
from helpers import assert_close


def run_poisoned(cm, inputs):
    """The outputs of cm's last program on `inputs`, each writing kernel given NaN-filled buffers."""
    prog = cm._last
    flat = list(inputs)
    env = dict(zip(prog.graph.inputs, flat))
    env.update({n: n.value for n in prog.graph.nodes if n.op == "const"})
    with warnings.catch_warnings(), np.errstate(all="ignore"):
        warnings.simplefilter("ignore")
        for group, kernel in zip(prog.groups, prog.kernels):
            args = [env[i] for i in group.inputs]
            if kernel.writes_into:
                bufs = tuple(torch.full(o.shape, float("nan"), dtype=o.dtype) if o.dtype.is_floating_point
                             else torch.full(o.shape, -7, dtype=o.dtype) for o in group.outputs)
                outs = kernel.fn(bufs, *args)
            else:
                outs = kernel.fn(*args)
            env.update(zip(group.outputs, outs))
    return [env[o] for o in prog.graph.outputs]


def check(model, inputs, *, tol=None, backends=None, n_kernels=None):
    """Compile `model` with backend="triton"; the poisoned run and the normal call both match eager.
    `backends`: the set of backend names the report must show for the fused kernels (e.g. {"triton"})."""
    model = model.eval()
    cm = kfuse.compile(model, tuple(inputs), backend="triton")
    with torch.no_grad():
        want = model(*inputs)
    want = list(want) if isinstance(want, (tuple, list)) else [want]
    tol = tol or {}
    assert_close(run_poisoned(cm, inputs), want, **tol, msg="poisoned run")
    got = cm(*inputs)
    assert_close(list(got) if isinstance(got, (tuple, list)) else [got], want, **tol, msg="call")
    kernels = cm.report().kernels
    if backends is not None:
        fused = {k.backend for k in kernels if k.backend not in ("view",)}
        assert fused <= set(backends) | {"torch"} and fused & set(backends), [(k.name, k.backend, k.note) for k in kernels]
    if n_kernels is not None:
        assert len([k for k in kernels if k.backend == "triton"]) == n_kernels, [(k.name, k.backend) for k in kernels]
    return cm
