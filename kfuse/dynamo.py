"""`torch.compile(model, backend="kfuse")`: Dynamo hands us an FX module per graph break; we compile
it with kfuse.compile (torch.export of that module), so both entry points share one path."""
from __future__ import annotations

import torch

from .api import compile


def kfuse_backend(gm: torch.fx.GraphModule, example_inputs, **options):
    if not all(isinstance(t, torch.Tensor) for t in example_inputs):
        raise TypeError("kfuse backend needs static shapes: use torch.compile(..., dynamic=False)")
    cm = compile(gm, tuple(example_inputs), **options)
    return lambda *args: cm(*args)


def register():
    from torch._dynamo import list_backends, register_backend
    if "kfuse" not in list_backends(exclude_tags=()):
        register_backend(name="kfuse")(kfuse_backend)
