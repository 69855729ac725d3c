"""The C backend: render a kernel-IR FusedKernel to C, compile it (cached on disk), call it.

    fn = build(kernel)          # raises compiler.CompileError if the C compiler is missing or fails
    fn(inputs, outputs)         # torch tensors: outputs contiguous, preallocated, written in place;
                                # inputs contiguous, or strided as given to lower(layout=...)

Outputs must not alias inputs (a row kernel may write an output before its last read of an input).
Threads: the calling thread's OpenMP count (torch.get_num_threads(); kfuse.backends.openmp.using(n)).
Schedule: the larger kernels are built with a few schedule variants in one library and the fastest,
timed on this machine, is called (autotune.py; KFUSE_AUTOTUNE=0 builds the default alone);
`fn.choice` says which (None when there was nothing to choose).
"""
from __future__ import annotations

import ctypes

from ... import config
from ...kernels import FusedKernel
from . import autotune, compiler
from .compiler import CompileError
from .record import c_call
from .render import loop_count, render, render_variants

__all__ = ["build", "CompileError", "CKernel", "render", "variant"]


class CKernel:
    """A compiled kernel: call with (inputs, outputs), lists of torch tensors laid out as `check` says."""

    def __init__(self, k: FusedKernel, lib: ctypes.CDLL, source: str, entry: str = "kf_run"):
        self.kernel, self.lib, self.source = k, lib, source
        self.choice: autotune.Choice | None = None
        self.n_args = len(k.inputs) + len(k.outputs)
        self._run = getattr(lib, entry)
        self._run.argtypes = [ctypes.c_void_p]
        self._run.restype = None
        self._argv = ctypes.c_void_p * (self.n_args + 1)
        self._count = ctypes.c_int64(loop_count(k))       # the loop count, the last argument
        self._count_ptr = ctypes.addressof(self._count)

    def argv(self, inputs, outputs):
        """The argument array render.py's kernels take: the tensors' data pointers, then the loop count's."""
        return self._argv(*[t.data_ptr() for t in inputs], *[t.data_ptr() for t in outputs], self._count_ptr)

    def __call__(self, inputs, outputs):
        c_call(self._run, self.argv(inputs, outputs), keep=(*inputs, *outputs))

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


def build(k: FusedKernel, tune: bool = True) -> CKernel:
    """Compile (or load from the disk cache) the C kernel for `k`; with `tune` (and KFUSE_AUTOTUNE
    not off, and more than one thread), with the schedule autotune.choose picks among
    autotune.variants(k). A library an artifact provides is used whichever of the two forms it is."""
    scheds = autotune.variants(k) if tune else []
    if len(scheds) < 2:
        source = render(k)
        return CKernel(k, compiler.load(source), source)
    multi, single = render_variants(k, scheds), render(k)
    want = multi if config.get().autotune and config.threads() > 1 else single
    other = single if want is multi else multi
    source = other if compiler.is_provided(other) and not compiler.is_provided(want) else want
    lib = compiler.load(source)
    if source is single or compiler.is_collecting():     # collecting: sources only, nothing timed
        return CKernel(k, lib, source)
    choice = autotune.choose(k, lib, source, scheds)
    fn = CKernel(k, lib, source, f"kf_v{choice.index}")
    fn.choice = choice
    return fn


def variant(fn: CKernel, index: int) -> CKernel:
    """The same kernel calling entry kf_v<index> of its library (tests: every variant computes the same)."""
    return CKernel(fn.kernel, fn.lib, fn.source, f"kf_v{index}")
