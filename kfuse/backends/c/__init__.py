"""The C backend: render a kernel-IR FusedKernel to C, compile it (cached on disk), call it.

    fn = build(kernel)          # raises compiler.CompileError if the C compiler is missing or fails
    fn(inputs, outputs)         # torch tensors: outputs contiguous, preallocated, written in place;
                                # inputs contiguous, or strided as given to lower(layout=...)

Outputs must not alias inputs (a row kernel may write an output before its last read of an input).
Threads: the calling thread's OpenMP count (torch.get_num_threads(); kfuse.backends.openmp.using(n)).
"""
from __future__ import annotations

import ctypes

from ...kernels import FusedKernel
from . import compiler
from .compiler import CompileError
from .render import render

__all__ = ["build", "CompileError", "CKernel", "render"]


class CKernel:
    """A compiled kernel: call with (inputs, outputs), lists of torch tensors laid out as `check` says."""

    def __init__(self, k: FusedKernel, lib: ctypes.CDLL, source: str):
        self.kernel, self.lib, self.source = k, lib, source
        self.n_args = len(k.inputs) + len(k.outputs)
        self._run = lib.kf_run
        self._run.argtypes = [ctypes.c_void_p]
        self._run.restype = None
        self._argv = ctypes.c_void_p * self.n_args

    def __call__(self, inputs, outputs):
        argv = self._argv(*[t.data_ptr() for t in inputs], *[t.data_ptr() for t in outputs])
        self._run(argv)

    def check(self, inputs, outputs):
        """Raise ValueError unless the tensors match the kernel's arguments (tests, debugging):
        shapes, dtypes, and strides (contiguous, or those the kernel was lowered for)."""
        k = self.kernel
        for t, n in zip(list(inputs) + list(outputs), k.inputs + k.outputs, strict=True):
            want = k.layout.get(n)
            ok = t.stride() == want if want is not None else t.is_contiguous()
            if tuple(t.shape) != n.shape or t.dtype != n.dtype or not ok:
                raise ValueError(f"argument for {n}: got {t.dtype}{list(t.shape)} strides {list(t.stride())}, "
                                 f"want {n.dtype}{list(n.shape)} strides {list(want) if want else 'contiguous'}")


def build(k: FusedKernel) -> CKernel:
    """Compile (or load from the disk cache) the C kernel for `k`."""
    source = render(k)
    return CKernel(k, compiler.load(source), source)
