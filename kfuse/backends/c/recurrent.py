"""ONNX LSTM, GRU and RNN in one C kernel (recurrent.c): the `recurrent` IR op, whose meaning is
`kfuse.ops.reference._recurrent`, runs its whole time loop in C, both directions, per-entry
sequence lengths, clip, peepholes, input_forget, GRU's linear_before_reset (0 or 1) and the
activations sigmoid, tanh and relu.

The input projection x W^T + b of every step is a GEMM before it (oneDNN). Here each step does
h_{t-1} R^T with R packed once, at build time, by `pack`: per block of 16 hidden units, the weights
of all its gates side by side ([dirs, blocks, H, G, 16]), so a register tile of 4 batch rows x G
vectors of one block ends holding every gate of those units and the gate math follows in place.
Bytes per step and direction: R once (G H^2 floats, 256 KiB for an LSTM with H = 128, from L2), h
and the step's xw rows. FLOPs per step and direction: 2 batch G H^2.

Threads: with dirs >= threads each thread runs whole directions and never waits; with more threads
than directions (one direction, 2 threads) they split the hidden blocks and meet at a barrier every
step, which pays off only when a step has enough work (SPLIT_MIN_MACS).
"""
from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from .. import openmp
from .compiler import keeps_built, load
from .vecmath import VECMATH_C

VL = 16                   # hidden units per block: one 512-bit vector
CELLS = {"lstm": 0, "gru": 1, "rnn": 2}
GATES = {"lstm": 4, "gru": 3, "rnn": 1}
ACTS = {"sigmoid": 0, "tanh": 1, "relu": 2}
# Split one direction's steps across threads only from this many multiply-adds per step (batch G H^2) on:
# one forward LSTM, batch 4, 32 steps, 1 vs 2 threads: H 128 (262k) 89 vs 84 us, H 256 (1M) 339 vs 209,
# H 512 (4M) 1453 vs 764 (a barrier per step; a thread descheduled by another process stalls them all).
SPLIT_MIN_MACS = 1 << 19

SOURCE = (Path(__file__).with_name("recurrent.c")).read_text().replace("/*VECMATH*/", VECMATH_C)


@keeps_built
def _lib():
    lib = load(SOURCE)
    lib.rec_forward.argtypes = [ctypes.c_void_p]
    lib.rec_forward.restype = None
    return lib


class _Args(ctypes.Structure):
    _fields_ = ([(n, ctypes.c_void_p) for n in ("xw", "pk", "pk2", "rb", "h0", "c0", "p", "lens", "out", "work")]
                + [(n, ctypes.c_int64) for n in ("seq", "batch", "hid", "dirs", "cell", "lbr", "input_forget",
                                                  "reverse", "nthreads", "has_clip")]
                + [("act", (ctypes.c_int64 * 3) * 2), ("clip", ctypes.c_float)])


def pack(r: torch.Tensor, cell: str, lbr: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """R [dirs, G*H, H] -> pk [dirs, blocks, H, Gp, 16] (pk[d, j, k, g, l] = R[d, g*H + 16j + l, k],
    zero past H), and for GRU with linear_before_reset = 0 the z, r gates in pk and the h gate in pk2."""
    dirs, gh, hid = r.shape
    g = GATES[cell]
    nblk = -(-hid // VL)
    w = torch.nn.functional.pad(r.float().reshape(dirs, g, hid, hid), (0, 0, 0, nblk * VL - hid))
    w = w.reshape(dirs, g, nblk, VL, hid).permute(0, 2, 4, 1, 3)    # [dirs, blocks, k, g, 16]
    if cell == "gru" and not lbr:
        return w[:, :, :, :2].contiguous(), w[:, :, :, 2:].contiguous()
    return w.contiguous(), None


def threads_for(dirs: int, step_macs: int) -> int:
    """Threads for one call: the calling thread's OpenMP count (the runtime sets it for the call), but no
    more than the directions when a step (step_macs = batch G H^2 multiply-adds) is small."""
    t = openmp.threads()
    return min(t, dirs) if step_macs < SPLIT_MIN_MACS else t


def kernel(node):
    """fn(bufs, xw, r, *optional) -> (out,) for one `recurrent` node (float32); R is packed now when
    it is a constant, else on every call."""
    a = node.attrs
    cell, optional = a["cell"], tuple(a["optional"])
    xw_n, r_n = node.inputs[0], node.inputs[1]
    seq, batch, _ = xw_n.shape
    dirs, gh, hid = r_n.shape
    _lib()                                       # compile now, so a missing compiler falls back at build time
    lbr = bool(a.get("lbr", False))
    packed = pack(r_n.value, cell, lbr) if r_n.op == "const" else None
    lens = None if a.get("lens") is None else torch.tensor(a["lens"], dtype=torch.int64)
    nblk = -(-hid // VL)
    work_floats = 5 * dirs * batch * nblk * VL
    template = _Args(seq=seq, batch=batch, hid=hid, dirs=dirs, cell=CELLS[cell], lbr=int(lbr),
                     input_forget=int(bool(a.get("input_forget", False))), reverse=int(a["direction"] == "reverse"),
                     has_clip=int(a.get("clip") is not None),
                     clip=float(a["clip"]) if a.get("clip") is not None else 0.0)
    for d in range(dirs):
        for i, name in enumerate(a["acts"][d]):
            template.act[d][i] = ACTS[name]
    template.lens = None if lens is None else lens.data_ptr()
    fn, shape = _lib().rec_forward, node.shape

    def run(bufs, xw, r, *extra):
        pk, pk2 = packed if packed is not None else pack(r, cell, lbr)
        keep = [t if t.is_contiguous() else t.contiguous() for t in (xw, *extra)]
        xw, extra = keep[0], keep[1:]
        opt = dict(zip(optional, extra))
        out = bufs[0] if bufs[0] is not None else torch.empty(shape, dtype=torch.float32)
        work = torch.empty(work_floats, dtype=torch.float32)
        args = _Args.from_buffer_copy(template)
        args.xw, args.pk, args.out, args.work = xw.data_ptr(), pk.data_ptr(), out.data_ptr(), work.data_ptr()
        args.nthreads = threads_for(dirs, batch * gh * hid)
        if pk2 is not None:
            args.pk2 = pk2.data_ptr()
        for name in ("rb", "h0", "c0", "p"):
            if name in opt:
                setattr(args, name, opt[name].data_ptr())
        fn(ctypes.byref(args))
        return (out,)
    run.sources = lambda: [SOURCE]
    run.keep = (lens, packed)
    return run, "c:recurrent"
