"""ONNX handlers of the looping control-flow ops, unrolled at load time: Scan over its static
sequence length, Loop when its trip count and condition are known at compile time (constants, or
specialised by value like an If's condition). Each iteration converts the body graph once more, in
a scope that sees the enclosing one (as an inlined If's branch does)."""
from __future__ import annotations

import torch

from ..common import reshape
from .common import _axis, _slice_axis, handler, inline_graph

# A loop unrolled over more iterations than this is a clear error (each iteration is a copy of the body).
MAX_UNROLL = 4096


def _take(n, x, axis, t):
    """x's slice t along `axis`, that axis dropped."""
    s = _slice_axis(n, x, axis, t, t + 1, 1)
    return reshape(n, s, x.shape[:axis] + x.shape[axis + 1:])


def _stack(n, parts, axis):
    """The parts (of one shape) stacked along a new `axis`."""
    parts = [reshape(n, p, p.shape[:axis] + (1,) + p.shape[axis:]) for p in parts]
    return parts[0] if len(parts) == 1 else n.add("concat", *parts, axis=axis)


def _scan_steps(n, body, states, scans, in_axes, in_dirs, out_axes, out_dirs):
    """Scan-9's meaning: the final states and the stacked scan outputs."""
    lengths = {x.shape[a] for x, a in zip(scans, in_axes)}
    if len(lengths) != 1:
        n.fail(f"the scan inputs have different lengths {sorted(lengths)}")
    steps = lengths.pop()
    if steps == 0 or steps > MAX_UNROLL:
        n.unsupported(f"a scan over {steps} steps (1 to {MAX_UNROLL} are unrolled)")
    outs = None
    for t in range(steps):
        slices = [_take(n, x, a, steps - 1 - t if d else t) for x, a, d in zip(scans, in_axes, in_dirs)]
        result = inline_graph(n, body, list(states) + slices)
        states, step_outs = result[:len(states)], result[len(states):]
        outs = [[o] for o in step_outs] if outs is None else [acc + [o] for acc, o in zip(outs, step_outs)]
    stacked = []
    for k, parts in enumerate(outs):
        if out_dirs[k]:
            parts = parts[::-1]
        stacked.append(_stack(n, parts, _axis(out_axes[k], len(parts[0].shape) + 1)))
    return list(states) + stacked


@handler("Scan")
def _scan(n, *ins):
    body = n.attr("body")
    m = n.attr("num_scan_inputs")
    if n.opset < 9:   # Scan-8: sequence_lens first, a batch axis 0 on every input, the scan axis 1
        seq_lens, ins = ins[0], ins[1:]
        if seq_lens is not None:
            n.unsupported("sequence_lens")
        states, scans = ins[:len(ins) - m], ins[len(ins) - m:]
        dirs = n.attr("directions", [0] * m)
        k = len(body.output) - len(states)
        per_batch = []
        for b in range(scans[0].shape[0]):
            per_batch.append(_scan_steps(n, body, [_take(n, s, 0, b) for s in states], [_take(n, x, 0, b) for x in scans],
                                         [0] * m, dirs, [0] * k, [0] * k))
        return [_stack(n, list(parts), 0) for parts in zip(*per_batch)]
    states, scans = ins[:len(ins) - m], ins[len(ins) - m:]
    k = len(body.output) - len(states)
    in_axes = [_axis(a, len(x.shape)) for a, x in zip(n.attr("scan_input_axes", [0] * m), scans)]
    return _scan_steps(n, body, states, scans, in_axes, n.attr("scan_input_directions", [0] * m),
                       n.attr("scan_output_axes", [0] * k), n.attr("scan_output_directions", [0] * k))


@handler("Loop")
def _loop(n, trip_count, cond, *carried):
    """Unrolled: the trip count and each iteration's condition must be known at compile time."""
    body = n.attr("body")
    trips = MAX_UNROLL + 1 if trip_count is None else int(n.value(trip_count, "the trip count").reshape(-1)[0])
    go = True if cond is None else bool(n.value(cond, "the condition").reshape(-1)[0])
    carried, outs, i = list(carried), None, 0
    while go and i < trips:
        if i == MAX_UNROLL:
            n.unsupported(f"a loop of over {MAX_UNROLL} iterations")
        cond_in = n.const(True) if cond is None else n.const(go)
        result = inline_graph(n, body, [n.const(torch.tensor(i, dtype=torch.int64)), cond_in] + carried)
        go = bool(n.value(result[0], "the condition").reshape(-1)[0])
        carried, step_outs = result[1:1 + len(carried)], result[1 + len(carried):]
        outs = [[o] for o in step_outs] if outs is None else [acc + [o] for acc, o in zip(outs, step_outs)]
        i += 1
    k = len(body.output) - 1 - len(carried)
    if k and outs is None:
        n.unsupported("scan outputs of a loop that runs no iteration (their shape is unknown)")
    return carried + ([_stack(n, parts, 0) for parts in outs] if k else [])
