"""Argument checks shared by the hand-written NHWC kernels that write an output of their input's shape
(squeeze_excite, group_norm), and the row geometry of an input read in place (concat, the 1x1 ->
depthwise pair)."""
from __future__ import annotations

import torch


def nhwc_input(x: torch.Tensor, c: int, what: str) -> torch.Tensor:
    """x as a contiguous float32 [N, H, W, c]; a clear ValueError for anything else."""
    if x.dim() != 4 or x.shape[3] != c or x.dtype != torch.float32:
        raise ValueError(f"{what}: x must be float32 [N, H, W, {c}], got {x.dtype} {tuple(x.shape)}")
    return x if x.is_contiguous() else x.contiguous()


def same_shape_io(x: torch.Tensor, out: torch.Tensor | None, c: int, what: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(x contiguous, the output buffer) for a kernel taking float32 x [N, H, W, c] and writing out of
    x's shape; a clear ValueError for anything else."""
    x = nhwc_input(x, c, what)
    if out is None:
        out = torch.empty(x.shape, dtype=torch.float32)
    elif tuple(out.shape) != tuple(x.shape) or out.dtype != torch.float32 or not out.is_contiguous():
        raise ValueError(f"{what}: out must be contiguous float32 {tuple(x.shape)}")
    return x, out


def row_stride(x: torch.Tensor, axis: int) -> int | None:
    """The stride in elements between x's rows, viewed as [prod(shape[:axis]), the rest] with the rest
    contiguous, or None where x is not such rows (its rows are then copied first)."""
    inner = 1
    for d in range(x.dim() - 1, axis - 1, -1):      # the axis and the dims after it: contiguous
        if x.shape[d] != 1 and x.stride(d) != inner:
            return None
        inner *= x.shape[d]
    step = None
    for d in range(axis - 1, -1, -1):               # the dims before it: one stride, row after row
        if x.shape[d] == 1:
            continue
        if step is None:
            step, span = x.stride(d), x.stride(d) * x.shape[d]
        elif x.stride(d) != span:
            return None
        else:
            span *= x.shape[d]
    return inner if step is None else step
