"""ONNX handlers of the spectral ops, DFT and STFT, on the IR's "fft" op (torch's FFTs, run as torch runs
them). ONNX carries a signal with a last dimension of 1 (real) or 2 (real, imaginary): the pairs the IR
uses for complex values (capture/complex.py), so nothing is converted on the way in or out."""
from __future__ import annotations

import torch

from ..common import reshape
from .common import _pad, _slice_axis, handler

_FLOATS = (torch.float32, torch.float64)


def _length(n, x, axis: int, length: int):
    """x with `axis` cut or zero-padded to `length` elements, as numpy's fft(x, n) takes its input."""
    size = x.shape[axis]
    if length < size:
        return _slice_axis(n, x, axis, 0, length, 1)
    ends = [0] * len(x.shape)
    ends[axis] = length - size
    return _pad(n, x, [0] * len(x.shape), ends)


def _pairs(n, x):
    """x [..., 1] (real) or [..., 2] as complex pairs: a real signal's imaginary part zero-padded."""
    return _length(n, x, len(x.shape) - 1, 2)


def _dft(n, x, axis: int, length: int, inverse: bool, onesided: bool):
    """ONNX's DFT of x [..., 1 | 2] along signal axis `axis`, `length` points: [..., 2] pairs, or
    [..., 1] for the inverse of a one-sided spectrum (irfft). The inverse is scaled by 1 / length."""
    if x.dtype not in _FLOATS:
        n.unsupported(f"{x.dtype} input (torch's FFTs take float32 and float64)")
    rank = len(x.shape)
    if rank < 2 or x.shape[-1] not in (1, 2) or not 0 <= axis < rank - 1:
        n.fail(f"input {list(x.shape)} and axis {axis}: want [..., 1 or 2] and an axis before the last")
    if length < 1:
        n.fail(f"dft_length {length}: want at least 1")
    if inverse and onesided:    # one-sided spectrum -> real signal: the first length // 2 + 1 bins used
        y = n.add("fft", _length(n, _pairs(n, x), axis, length // 2 + 1), kind="c2r", dims=(axis,), norm=2,
                  length=length)
        return reshape(n, y, (*y.shape, 1))
    x = _length(n, x, axis, length)
    if x.shape[-1] == 1 and not inverse:
        return n.add("fft", reshape(n, x, x.shape[:-1]), kind="r2c", dims=(axis,), norm=0, onesided=onesided)
    y = n.add("fft", _pairs(n, x), kind="c2c", dims=(axis,), norm=2 if inverse else 0, forward=not inverse)
    return _slice_axis(n, y, axis, 0, length // 2 + 1, 1) if onesided else y


@handler("DFT")
def _dft_node(n, x, dft_length=None, axis=None):
    rank = len(x.shape)
    if n.opset >= 20:
        a = -2 if axis is None else n.ints(axis, "axis")[0]
    else:
        a = n.attr("axis", 1)
    if not -rank <= a < rank:
        n.fail(f"axis {a} of a rank-{rank} input")
    a %= rank
    inverse, onesided = bool(n.attr("inverse", 0)), bool(n.attr("onesided", 0))
    if dft_length is not None:
        length = n.ints(dft_length, "dft_length")[0]
    elif inverse and onesided:
        length = 2 * (x.shape[a] - 1)
    else:
        length = x.shape[a]
    return _dft(n, x, a, length, inverse, onesided)


@handler("STFT")
def _stft(n, signal, frame_step, window=None, frame_length=None):
    """Frames of the signal [batch, length, 1 | 2] gathered by constant indices ([batch, frames, size,
    1 | 2], a frame running past the end zero-padded), times the window, then each frame's DFT of
    frame_length points: [batch, frames, bins, 2]."""
    if len(signal.shape) != 3:
        n.fail(f"signal {list(signal.shape)}: want [batch, length, 1 or 2]")
    step = n.ints(frame_step, "frame_step")[0]
    if window is not None and len(window.shape) != 1:
        n.fail(f"window {list(window.shape)}: want one dimension")
    size = window.shape[0] if window is not None else None
    length = (n.ints(frame_length, "frame_length")[0] if frame_length is not None
              else size if size is not None else signal.shape[1])
    size = length if size is None else size
    frames = 1 + (signal.shape[1] - length) // step if step > 0 else 0
    if step < 1 or frames < 1 or size < 1:
        n.fail(f"frame_step {step}, frame_length {length}, window {size} over a signal of {signal.shape[1]}: no frame")
    x = _length(n, signal, 1, max(signal.shape[1], (frames - 1) * step + size))
    index = torch.arange(frames).unsqueeze(1) * step + torch.arange(size)
    x = n.add("gather", x, n.const(index), axis=1)
    if window is not None:
        x = n.add("mul", x, reshape(n, window, (size, 1)))
    return _dft(n, x, 2, length, False, bool(n.attr("onesided", 1)))
