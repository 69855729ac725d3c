"""The backend-neutral kernel IR: primitive and reduction ops, dtype tables, `Value` and `FusedKernel`.

One kernel shape covers every group of elementwise, broadcast and last-axis reduction ops:

    for each row r of a loop shape [*rows, N]          (rows run in parallel)
        pass 0: for j < N: evaluate what pass 0 needs; accumulate the reductions of level 1
        row scalars: finish those reductions, compute what depends on them only per row
        pass 1: for j < N: ... reductions of level 2 ...           (as many passes as levels)
        last pass: write the outputs

A value is an SSA `Value` over the loop point (r, j): a load of a kernel argument (broadcast by
strides, stride 0 on a broadcast dim), a literal, a primitive op, or a reduction along j.

A group without reductions whose loop shape collapses to one dimension is a *flat* kernel: one
parallel SIMD loop over all elements, with no per-row work.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field

import torch

from ..errors import KfuseError
from ..ir import Node

# Primitive ops of the kernel IR, by arity. max/min propagate NaN as torch.maximum does; the
# reductions rmax/rmin propagate NaN as torch.amax does.
# Float functions a backend takes from its math library as they are (C: the name plus "f").
LIBM_UNARY = ("erfc", "atan", "tan", "expm1", "asin", "acos", "sinh", "cosh", "asinh", "acosh", "atanh", "log2",
              "log10")
LIBM_BINARY = ("fmod", "atan2")
PRIMS = {
    1: ("neg", "abs", "exp", "log", "log1p", "sqrt", "sin", "cos", "tanh", "erf", "phi", "floor", "ceil",
        "round", "trunc", *LIBM_UNARY, "not", "cast"),
    2: ("add", "sub", "mul", "div", "pow", "max", "min", "eq", "ne", "lt", "le", "gt", "ge", "and", "or",
        *LIBM_BINARY),
    3: ("where",),
}
REDUCTIONS = ("rsum", "rmax", "rmin")
TRANSCENDENTAL = {"exp", "log", "log1p", "sin", "cos", "tanh", "erf", "phi", "pow", "div", "sqrt", *LIBM_UNARY, *LIBM_BINARY}

DTYPES = {torch.float32: "f32", torch.int64: "i64", torch.bool: "bool"}
_WIDE = {torch.float64: "f32", torch.float16: "f32", torch.bfloat16: "f32",
         torch.int32: "i64", torch.int16: "i64", torch.int8: "i64", torch.uint8: "i64"}  # literals only


class NotFusable(KfuseError):
    """The group cannot be one kernel of this IR; `reason` says why (it feeds the why-not report)."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


@dataclass(frozen=True)
class Value:
    op: str                 # "load", "lit", a primitive of PRIMS, or a reduction of REDUCTIONS
    args: tuple[int, ...]   # ids of argument values (indices into FusedKernel.values)
    dtype: str              # "f32" | "i64" | "bool"
    attr: object = None     # load: argument index; lit: the number


@dataclass
class FusedKernel:
    """One kernel: loop shape, arguments with their strides, and the values computed per point.

    `inputs` then `outputs` are the kernel's arguments in call order. `strides[a]` gives argument
    a's element stride for each dim of `shape` (0 where it is broadcast). `out_values[k]` is the
    value written to outputs[k]; a per-row output (a keepdim reduction) has stride 0 along N.
    """
    nodes: list[Node]
    inputs: list[Node]
    outputs: list[Node]
    shape: tuple[int, ...]
    strides: list[tuple[int, ...]]
    values: list[Value]
    out_values: list[int]
    phase: list[int] = field(default_factory=list)
    varies: list[bool] = field(default_factory=list)
    stash: set[int] = field(default_factory=set)
    layout: dict = field(default_factory=dict)   # input node -> its element strides, if not contiguous

    @property
    def flat(self) -> bool:
        """No reductions and one dim: a single parallel SIMD loop over every element."""
        return len(self.shape) == 1 and self.passes == 1

    @property
    def passes(self) -> int:
        return 1 + max((self.phase[v] for v in self.live), default=0)

    @property
    def live(self) -> list[int]:
        seen, stack = set(), list(self.out_values)
        while stack:
            v = stack.pop()
            if v not in seen:
                seen.add(v)
                stack.extend(self.values[v].args)
        return sorted(seen)

    @property
    def bytes(self) -> int:
        """Bytes the kernel must move at least: each input read once, each output written once."""
        return sum(n.nbytes for n in self.inputs) + sum(n.nbytes for n in self.outputs)

    def __str__(self):
        lines = [f"kernel shape={list(self.shape)} passes={self.passes} flat={self.flat} bytes={self.bytes}"]
        for a, (n, s) in enumerate(zip(self.inputs + self.outputs, self.strides)):
            lines.append(f"  arg{a} {'in ' if a < len(self.inputs) else 'out'} {n} strides={list(s)}")
        for i in self.live:
            v = self.values[i]
            extra = f" {v.attr!r}" if v.attr is not None else ""
            mark = ("~" if self.varies[i] else " ") + ("S" if i in self.stash else " ")
            lines.append(f"  v{i}{mark} p{self.phase[i]} = {v.op}({', '.join(f'v{a}' for a in v.args)}){extra} : {v.dtype}")
        lines.append("  out " + ", ".join(f"v{v}" for v in self.out_values))
        return "\n".join(lines)


def _f32(x: float) -> float:
    """x rounded to float32 (inf and NaN as they are): the value of an f32 literal."""
    return struct.unpack("f", struct.pack("f", x))[0] if math.isfinite(x) else x
