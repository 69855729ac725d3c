"""Shared by the fusion tests: compile, check the numbers against eager, return the report."""
import torch

import kfuse


class Fn(torch.nn.Module):
    """A module around a function, holding its constant tensors as buffers (so they become weights)."""

    def __init__(self, fn, **consts):
        super().__init__()
        self.fn = fn
        for k, v in consts.items():
            self.register_buffer(k, v)

    def forward(self, *xs):
        return self.fn(self, *xs)


def compiled(model, *inputs, rtol=1e-4, **options):
    cm = kfuse.compile(model, inputs, **options)
    v = cm.verify(*inputs)
    assert v.ok and v.max_rel <= rtol, v
    return cm, cm.report()


def kernels_named(report, name):
    return [k for k in report.kernels if k.name == name]
