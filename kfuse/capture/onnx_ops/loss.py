"""ONNX handlers of the loss ops NegativeLogLikelihoodLoss and SoftmaxCrossEntropyLoss, as their
ONNX function bodies define them: loss[n, d...] = -input[n, target[n, d...], d...] * weight[target],
0 where the target is ignore_index; reduction none, sum, or mean (the sum divided by the sum of the
weights of the targets that are not ignored)."""
from __future__ import annotations

import torch

from ..common import reshape
from .common import handler


def _nll(n, x, target, weight=None):
    """The loss of log-probabilities x [N, C, d...] at integer targets [N, d...]."""
    ignore = n.attr("ignore_index")
    t = n.add("cast", target, dtype=torch.int64)
    zero = n.const(0, dtype=torch.int64)
    keep = None
    if ignore is not None:   # an ignored target may be out of range: gather at 0, then mask
        keep = n.add("ne", t, n.const(int(ignore), dtype=torch.int64))
        t = n.add("where", keep, t, zero)
    shape = list(t.shape)
    picked = n.add("gather_elements", x, reshape(n.g, t, [shape[0], 1, *shape[1:]]), axis=1)
    loss = n.add("neg", reshape(n.g, picked, shape))
    w = n.add("gather", weight, t, axis=0) if weight is not None else None
    if keep is not None:
        mask = n.add("cast", keep, dtype=x.dtype)
        w = mask if w is None else n.add("mul", w, mask)
    if w is not None:
        loss = n.add("mul", loss, w)
    reduction = n.attr("reduction", "mean")
    axes = list(range(len(shape)))
    if reduction == "none":
        return loss
    total = n.add("reduce_sum", loss, axes=axes)
    if reduction == "sum":
        return total
    if reduction != "mean":
        n.fail(f"reduction {reduction!r}")
    if w is None:
        return n.add("div", total, n.const(float(t.numel), dtype=x.dtype))
    return n.add("div", total, n.add("reduce_sum", w, axes=axes))


@handler("NegativeLogLikelihoodLoss")
def _negative_log_likelihood_loss(n, x, target, weight=None):
    return _nll(n, x, target, weight)


@handler("SoftmaxCrossEntropyLoss")
def _softmax_cross_entropy_loss(n, scores, labels, weights=None):
    log_prob = n.add("log_softmax", scores, axis=1)
    loss = _nll(n, log_prob, labels, weights)
    return [loss, log_prob] if n.n_outputs() > 1 else loss
