"""ONNX handlers of the recurrent ops LSTM, GRU and RNN.

The input projection of every step and both directions is one matmul ([seq*batch, input] x W^T,
plus the bias). The time loop is then one `recurrent` IR op (float32, the common case): its C kernel
(kfuse/backends/c/recurrent.py) runs every step of both directions in one call. Other dtypes are
unrolled over time (shapes are static, so the sequence length is known at compile time): each step
multiplies h_{t-1} by the constant R^T and does the gate math with elementwise IR ops, which the
fuser turns into one kernel per step. The formulas are those of ONNX's reference
(onnx/reference/ops/op_lstm.py, op_gru.py, op_rnn.py), with `clip` applied to the gate
pre-activations and `sequence_lens` as ONNX Runtime reads them: a batch entry past its length keeps
its state and writes zeros to Y (reverse: its steps start at its own last element).
"""
from __future__ import annotations

import torch

from ..common import reshape
from .common import _slice_axis, handler

# activations kfuse's IR has; ONNX also names Affine, LeakyRelu, ThresholdedRelu, ScaledTanh,
# HardSigmoid, Elu, Softsign and Softplus, which are a clear error here
_ACTIVATIONS = {"sigmoid": "sigmoid", "tanh": "tanh", "relu": "relu"}
_DEFAULTS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}
_GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
# the time loop as one `recurrent` op for these dtypes (its C kernel is float32); tests set it to ()
# to check the unrolled form
FUSED_DTYPES = (torch.float32,)


def _activations(n, kind, dirs):
    per = len(_DEFAULTS[kind])
    names = [v.decode() if isinstance(v, bytes) else v for v in n.attr("activations", []) or []]
    if not names:
        names = _DEFAULTS[kind] * dirs
    if len(names) != per * dirs:
        n.fail(f"activations {names} should name {per} functions per direction ({dirs} direction(s))")
    for name in names:
        if name.lower() not in _ACTIVATIONS:
            n.fail(f"activation {name!r} is not supported (only {', '.join(sorted(_ACTIVATIONS))})")
    ops = [_ACTIVATIONS[name.lower()] for name in names]
    return [ops[d * per:(d + 1) * per] for d in range(dirs)]


def _recurrent(kind, n, x, w, r, b=None, seq_lens=None, h0=None, c0=None, p=None):
    direction = n.attr("direction", "forward")
    if direction not in ("forward", "reverse", "bidirectional"):
        n.fail(f"direction {direction!r} is not forward, reverse or bidirectional")
    dirs = 2 if direction == "bidirectional" else 1
    layout = int(n.attr("layout", 0))
    if len(x.shape) != 3 or len(w.shape) != 3 or len(r.shape) != 3:
        n.fail(f"X, W and R must be 3-d, got shapes {list(x.shape)}, {list(w.shape)}, {list(r.shape)}")
    if w.shape[0] != dirs or r.shape[0] != dirs:
        n.fail(f"direction {direction!r} needs {dirs} direction(s) in W and R, got {w.shape[0]} and {r.shape[0]}")
    gates = _GATES[kind]
    hid = r.shape[-1]
    if n.attr("hidden_size") is not None and int(n.attr("hidden_size")) != hid:
        n.fail(f"hidden_size {n.attr('hidden_size')} does not match R's shape {list(r.shape)}")
    gh = gates * hid
    acts = _activations(n, kind, dirs)
    clip = n.attr("clip")
    lbr = kind == "GRU" and int(n.attr("linear_before_reset", 0))
    input_forget = kind == "LSTM" and int(n.attr("input_forget", 0))
    dtype = x.dtype

    if layout == 1:  # [batch, seq, input] -> [seq, batch, input]; states [batch, dirs, H] -> [dirs, batch, H]
        x = n.add("transpose", x, perm=[1, 0, 2])
        h0 = None if h0 is None else n.add("transpose", h0, perm=[1, 0, 2])
        c0 = None if c0 is None else n.add("transpose", c0, perm=[1, 0, 2])
    elif layout != 0:
        n.fail(f"layout {layout} is not 0 or 1")
    seq, batch, size = x.shape

    # sequence_lens: a constant, or specialised on the example's value
    masks, lens = None, None
    if seq_lens is not None:
        lens = [int(v) for v in n.value(seq_lens, "sequence_lens").reshape(-1).tolist()]
        if len(lens) != batch or any(v < 0 or v > seq for v in lens):
            n.fail(f"sequence_lens {lens} should be {batch} lengths between 0 and {seq}")
        if any(v != seq for v in lens):
            t = torch.arange(seq).reshape(seq, 1, 1)
            masks = t < torch.tensor(lens).reshape(1, batch, 1)   # [seq, batch, 1]

    # the input projection of all steps and both directions: one matmul
    wt = n.add("transpose", reshape(n, w, [dirs * gh, size]), perm=[1, 0])   # [input, dirs*G*H]
    xw = n.add("matmul", reshape(n, x, [seq * batch, size]), wt)              # [seq*batch, dirs*G*H]
    rec_bias = None
    if b is not None:
        b = reshape(n, b, [dirs, 2 * gh])
        wb, rb = _slice_axis(n, b, 1, 0, gh, 1), _slice_axis(n, b, 1, gh, 2 * gh, 1)
        if lbr:   # GRU's h gate adds Rb_h inside the reset: R's bias goes with the recurrent matmul
            bias, rec_bias = wb, rb
        else:
            bias = n.add("add", wb, rb)
        xw = n.add("add", xw, reshape(n, bias, [dirs * gh]))
    xw = reshape(n, xw, [seq, batch, dirs * gh])

    if dtype in FUSED_DTYPES:
        extra = {"rb": None if rec_bias is None else reshape(n, rec_bias, [dirs, gh]), "h0": h0, "c0": c0,
                 "p": None if p is None else reshape(n, p, [dirs, 3 * hid])}
        extra = {k: v for k, v in extra.items() if v is not None}
        out = n.add("recurrent", xw, r, *extra.values(), cell=kind.lower(), direction=direction,
                    acts=tuple(tuple(a) for a in acts), clip=None if clip is None else float(clip), lbr=bool(lbr),
                    input_forget=bool(input_forget), lens=None if masks is None else tuple(lens),
                    optional=tuple(extra))   # [seq + 1 (+1), dirs, batch, H]: Y, Y_h (, Y_c)
        y = _slice_axis(n, out, 0, 0, seq, 1)
        states = [reshape(n, _slice_axis(n, out, 0, seq + i, seq + i + 1, 1), [dirs, batch, hid])
                  for i in range(2 if kind == "LSTM" else 1)]
        return _outputs(n, kind, layout, y, *states)

    def zeros():
        return n.const(torch.zeros(1, batch, hid), dtype=dtype)

    def act(op, v):
        return n.add(op, v)

    def clipped(v):
        return v if clip is None else n.add("clamp", v, min=-float(clip), max=float(clip))

    # Every step's tensors are [1, batch, ...]: a step's input is one slice of xw and each gate one
    # more, with no reshape between (each view costs a little at run time)
    def part(v, i):   # gate i of a [1, batch, G*H] tensor, or of the [1, batch, dirs*G*H] step input
        return _slice_axis(n, v, 2, i * hid, (i + 1) * hid, 1)

    xs = [_slice_axis(n, xw, 0, t, t + 1, 1) for t in range(seq)]   # [1, batch, dirs*G*H]

    ys, hs, cs = [], [], []
    for d in range(dirs):
        f, g = acts[d][0], (acts[d][1] if len(acts[d]) > 1 else None)
        h_act = acts[d][2] if len(acts[d]) > 2 else None
        rt = n.add("transpose", reshape(n, _slice_axis(n, r, 0, d, d + 1, 1), [gh, hid]), perm=[1, 0])  # [H, G*H]
        rbd = None if rec_bias is None else reshape(n, _slice_axis(n, rec_bias, 0, d, d + 1, 1), [gh])
        h = zeros() if h0 is None else _slice_axis(n, h0, 0, d, d + 1, 1)
        c = None
        peep = None
        if kind == "LSTM":
            c = zeros() if c0 is None else _slice_axis(n, c0, 0, d, d + 1, 1)
            if p is not None:
                pd = reshape(n, _slice_axis(n, p, 0, d, d + 1, 1), [3 * hid])
                peep = [_slice_axis(n, pd, 0, i * hid, (i + 1) * hid, 1) for i in range(3)]  # p_i, p_o, p_f
        if kind == "GRU" and not lbr:
            rt_zr = _slice_axis(n, rt, 1, 0, 2 * hid, 1)
            rt_h = _slice_axis(n, rt, 1, 2 * hid, 3 * hid, 1)
        steps = range(seq - 1, -1, -1) if direction == "reverse" or d == 1 else range(seq)
        y = [None] * seq
        base = d * gates   # this direction's first gate in the step input
        for t in steps:
            xt = xs[t]
            c_new = None
            if kind == "LSTM":
                rec = n.add("matmul", h, rt)   # added per gate: the slices stay inside the gate kernel
                gi, go, gf, gc = (n.add("add", part(xt, base + i), part(rec, i)) for i in range(4))
                if peep is not None:
                    gi = n.add("add", gi, n.add("mul", peep[0], c))
                    gf = n.add("add", gf, n.add("mul", peep[2], c))
                i_ = act(f, clipped(gi))
                f_ = n.add("sub", n.const(1.0, dtype=dtype), i_) if input_forget else act(f, clipped(gf))
                c_new = n.add("add", n.add("mul", f_, c), n.add("mul", i_, act(g, clipped(gc))))
                if peep is not None:
                    go = n.add("add", go, n.add("mul", peep[1], c_new))
                h_new = n.add("mul", act(f, clipped(go)), act(h_act, c_new))
            elif kind == "GRU":
                if lbr:
                    rec = n.add("matmul", h, rt)
                    if rbd is not None:
                        rec = n.add("add", rec, rbd)
                    z = act(f, clipped(n.add("add", part(xt, base), part(rec, 0))))
                    rr = act(f, clipped(n.add("add", part(xt, base + 1), part(rec, 1))))
                    hh = act(g, clipped(n.add("add", part(xt, base + 2), n.add("mul", rr, part(rec, 2)))))
                else:
                    rec = n.add("matmul", h, rt_zr)
                    z = act(f, clipped(n.add("add", part(xt, base), part(rec, 0))))
                    rr = act(f, clipped(n.add("add", part(xt, base + 1), part(rec, 1))))
                    hh = act(g, clipped(n.add("add", part(xt, base + 2), n.add("matmul", n.add("mul", rr, h), rt_h))))
                # (1 - z) * hh + z * h
                h_new = n.add("add", n.add("mul", n.add("sub", n.const(1.0, dtype=dtype), z), hh), n.add("mul", z, h))
            else:
                h_new = act(f, clipped(n.add("add", part(xt, base), n.add("matmul", h, rt))))
            if masks is not None:
                m = n.const(masks[t])
                y[t] = n.add("where", m, h_new, n.const(0.0, dtype=dtype))
                h_new = n.add("where", m, h_new, h)
                if c_new is not None:
                    c_new = n.add("where", m, c_new, c)
            else:
                y[t] = h_new
            h, c = h_new, c_new
        ys.append(y)
        hs.append(h)
        cs.append(c)

    # Y: [seq, dirs, batch, H] from one concat in (t, d) order
    y = n.add("concat", *[ys[d][t] for t in range(seq) for d in range(dirs)], axis=0)   # [seq*dirs, batch, H]
    y = reshape(n, y, [seq, dirs, batch, hid])
    y_h = hs[0] if dirs == 1 else n.add("concat", *hs, axis=0)
    y_c = None
    if kind == "LSTM":
        y_c = cs[0] if dirs == 1 else n.add("concat", *cs, axis=0)
    return _outputs(n, kind, layout, y, y_h, y_c)


def _outputs(n, kind, layout, y, y_h, y_c=None):
    """Y [seq, dirs, batch, H], Y_h and Y_c [dirs, batch, H] in the node's layout."""
    if layout == 1:
        y = n.add("transpose", y, perm=[2, 0, 1, 3])
        y_h = n.add("transpose", y_h, perm=[1, 0, 2])
        y_c = None if y_c is None else n.add("transpose", y_c, perm=[1, 0, 2])
    return [y, y_h, y_c] if kind == "LSTM" else [y, y_h]


@handler("LSTM")
def _lstm(n, x, w, r, b=None, seq_lens=None, h0=None, c0=None, p=None):
    return _recurrent("LSTM", n, x, w, r, b, seq_lens, h0, c0, p)


@handler("GRU")
def _gru(n, x, w, r, b=None, seq_lens=None, h0=None):
    return _recurrent("GRU", n, x, w, r, b, seq_lens, h0)


@handler("RNN")
def _rnn(n, x, w, r, b=None, seq_lens=None, h0=None):
    return _recurrent("RNN", n, x, w, r, b, seq_lens, h0)
