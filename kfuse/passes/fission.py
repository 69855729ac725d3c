"""Fission: where one kernel would leave threads idle, split it, and record why.

Split-KV attention for decoding: where the (batch x head x query-block) tasks leave threads idle, the
keys are cut into chunks computed in parallel and combined (FlashDecoding). The decision is the
attention kernel's own `plan` (one rule, used here to record it and by the kernel to run it).
GEMMs are not split here: oneDNN already splits K for small M internally.
"""
from __future__ import annotations

import torch

from ..ir import Graph
from ..kernels.attention import block_q, plan


def run(graph: Graph, options, report) -> Graph:
    for n in graph.nodes:
        if n.op != "attention" or len(n.shape) != 4 or n.dtype != torch.float32:
            continue
        b, h, lq, _ = n.shape
        hkv, lk = n.inputs[1].shape[1], n.inputs[1].shape[2]
        mask = n.inputs[3] if len(n.inputs) > 3 else None
        bq = block_q(bool(n.attrs.get("causal")), mask is not None and len(mask.shape) >= 2 and mask.shape[-2] > 1)
        kernel, nsplit, chunk = plan(b, h, lq, lk, Hkv=hkv, bq=bq)
        if nsplit:
            report.splits.append(f"attention [{b},{h},{lq},{lk}]: split-KV into {nsplit} chunks of {chunk} keys "
                                 f"(the {kernel} kernel's tasks would leave threads idle)")
    return graph
