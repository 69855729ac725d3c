"""Argument checks shared by the hand-written NHWC kernels that write an output of their input's shape
(squeeze_excite, group_norm)."""
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
