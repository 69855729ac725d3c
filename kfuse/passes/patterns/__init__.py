"""Pattern fusions from the literature, one file per family; `run` applies them in order.

Norms first (so attention and linears see their inputs plainly), then attention, then linears:
bias before the horizontal merge of projections, activations after it (a merged GEMM carries no
activation; on the CPU backend a merged gate/up GEMM whose halves feed act(gate) * up becomes one
gated_linear, the gating in the GEMM's epilogue; elsewhere the automatic fuser fuses the gating).
"""
from __future__ import annotations

from ...rewrite import apply
from .. import fold
from . import attention, conv, linear_act, norm, rope


def names() -> set[str]:
    """The pattern rules' names (what `disable` may name besides IR op types and the layout's rules)."""
    families = (norm.RULES, conv.RULES, rope.RULES, attention.RULES, linear_act.RULES, linear_act.GATED_RULES,
                linear_act.ACT_RULES)
    return {name for family in families for name, _ in family} | {"horizontal_gemm"}


def run(graph, options, report):
    disabled = set(options.get("disable", ()))

    def rules(family):
        return [(name, fn) for name, fn in family if name not in disabled]

    apply(graph, rules(norm.RULES) + rules(conv.RULES), report)
    apply(graph, rules(rope.RULES), report)
    apply(graph, rules(attention.RULES), report)
    apply(graph, rules(linear_act.RULES), report)
    if "horizontal_gemm" not in disabled:
        linear_act.horizontal(graph, report)
    gated = rules(linear_act.GATED_RULES) if options.get("backend", "cpu") == "cpu" else []
    apply(graph, gated + rules(linear_act.ACT_RULES) + fold.RULES, report)
    return graph
