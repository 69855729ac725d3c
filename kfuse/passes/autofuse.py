"""Automatic fusion by op kinds: partition any graph into kernels and say why each cut was made.

Legality is a lookup on kinds (ELEMENTWISE, BROADCAST and REDUCTION ops fuse into row kernels;
CONTRACTION ops are library or attention kernels; INJECTIVE views cost nothing and are read in
place by their consumers; other ops run alone), then three checks per candidate:
  - no cycle: the node's other inputs must not depend on the group it joins;
  - the kernel IR can express the merged group (kfuse.kernels.lower);
  - the cost model predicts the merged kernel no slower than the two apart (a row kernel with
    fewer rows than threads loses parallelism).
Producer-consumer fusion runs first (greedy, in topological order, as XLA and TVM's FuseOps do),
then horizontal fusion of independent groups that read the same input with the same loop shape.
Every pair of adjacent kernels left apart gets a why-not record.
"""
from __future__ import annotations

import heapq

from .. import cost
from ..ir import CONVS, VIEW_OPS, Graph, Group, Kind, Node
from ..kernels import NotFusable, lower
from ..kernels.conv import POINTWISE_PAIRS, as_conv
from ..kernels.linear import as_linear

FUSABLE = (Kind.ELEMENTWISE, Kind.BROADCAST, Kind.REDUCTION)


def fusable(n: Node) -> bool:
    return n.kind in FUSABLE


class Scheduler:
    def __init__(self, graph: Graph, options: dict, report, machine: cost.Machine):
        self.graph, self.report = graph, report
        self.disabled = set(options.get("disable", ()))
        self.max_group = int(options.get("max_group", 0)) or None
        self.order = {n: i for i, n in enumerate(graph.nodes)}
        self.users = graph.users()
        self.outputs = set(graph.outputs)
        self.group_of: dict[Node, int] = {}
        self.groups: list[list[Node]] = []
        self.refused: dict[tuple[Node, Node], tuple[str, str]] = {}   # (producer, consumer) -> (code, detail)
        self.machine = machine
        # the Triton backend computes float16/bfloat16 values in f32 (rounded at a kernel's outputs)
        self.half = options.get("backend") == "triton"

    # -- the checks ----------------------------------------------------------------------------------
    def needed_outside(self, nodes: list[Node]) -> list[Node]:
        inside = set(nodes)
        return [n for n in nodes if n in self.outputs or any(u not in inside for u in self.users[n])]

    def depends_on(self, nodes, group: set[Node]) -> bool:
        """Whether any of `nodes` is computed, through nodes outside `group`, from a node of `group`.
        A node already placed in a group depends on everything that group reads: the group runs as
        one kernel, so a path may leave through one of its members and come back through another."""
        stack, seen = list(nodes), set()
        while stack:
            m = stack.pop()
            if m in group:
                return True
            if m in seen:
                continue
            seen.add(m)
            stack.extend(m.inputs)
            gi = self.group_of.get(m)
            if gi is not None:
                stack.extend(self.groups[gi])
        return False

    def creates_cycle(self, a: list[Node], b: list[Node]) -> bool:
        """Whether one kernel for a and b would both feed and read another kernel: some input of
        the merged group is computed from the merged group (either way round, at group level)."""
        merged = set(a) | set(b)
        return self.depends_on([i for n in merged for i in n.inputs if i not in merged], merged)

    def why_not_merge(self, a: list[Node], b: list[Node]) -> tuple[str, str] | None:
        """None if groups a and b (b after a) may become one kernel, else (why-not code, detail)."""
        merged = a + b
        banned = next((n.op for n in merged if n.op in self.disabled), None)
        if banned:
            return "user_disabled", f"{banned} excluded from fusion by the user"
        if self.max_group and len(merged) > self.max_group:
            return "group_size_cap", f"group size capped at {self.max_group} ops by the user"
        if self.creates_cycle(a, b):
            return "cycle", "fusing would create a cycle"
        merged.sort(key=self.order.__getitem__)
        try:
            lower(merged, self.needed_outside(merged), half=self.half)
        except NotFusable as e:
            return "kernel_ir_cannot_express", e.reason
        apart = sum(self.predict(g) for g in (a, b))
        together = self.predict(merged)
        if together > apart:
            return "cost_model_slowdown", f"fused {together:.3f} ms > apart {apart:.3f} ms (lost parallelism)"
        return None

    def predict(self, nodes: list[Node]) -> float:
        inside = set(nodes)
        ins = {i for n in nodes for i in n.inputs if i not in inside}
        nbytes = sum(i.nbytes for i in ins) + sum(o.nbytes for o in self.needed_outside(nodes))
        rows = cost.rows_of(nodes)
        return cost.predicted_ms(self.machine, nbytes, sum(cost.flops(n) for n in nodes), False,
                                 min(rows, self.machine.threads))

    # -- the passes ------------------------------------------------------------------------------------
    def producer_consumer(self):
        for n in self.graph.nodes:
            if n.op in ("input", "const"):
                continue
            target = self.gemm_epilogue(n)
            if target is None and fusable(n) and n.op not in self.disabled:
                for i in dict.fromkeys(n.inputs):
                    gi = self.group_of.get(i)
                    if gi is None or not all(fusable(m) for m in self.groups[gi]) or (i, n) in self.refused:
                        continue
                    why = self.why_not_merge(self.groups[gi], [n])
                    if why is None:
                        target = gi
                        break
                    self.refused[(i, n)] = why
            if target is None:
                self.group_of[n] = len(self.groups)
                self.groups.append([n])
                continue
            self.group_of[n] = target
            self.groups[target].append(n)
            if not all(fusable(m) for m in self.groups[target]):
                continue            # a GEMM with its epilogue: nothing else joins it
            # n's other producers' groups may join too (a where fed by a mask and by the scores)
            for i in dict.fromkeys(n.inputs):
                gi = self.group_of.get(i)
                if gi is None or gi == target or not all(fusable(m) for m in self.groups[gi]):
                    continue
                a, b = sorted((self.groups[gi], self.groups[target]), key=lambda g: self.order[g[0]])
                why = self.why_not_merge(a, b)
                if why is None:
                    self.merge(gi, target)
                else:
                    self.refused[(i, n)] = why

    def gemm_epilogue(self, n: Node) -> int | None:
        """The group of a GEMM or convolution by a constant weight that n can finish as a library
        epilogue (a bias add, a residual add for convolutions, an activation: oneDNN post-ops), or None."""
        for i in n.inputs:
            gi = self.group_of.get(i)
            if gi is None or n.op in self.disabled or self.groups[gi][-1] is not i or len(self.users[i]) != 1 \
                    or i in self.outputs or self.groups[gi][0].op not in ("matmul", *CONVS):
                continue
            described = as_linear if self.groups[gi][0].op == "matmul" else as_conv
            if described(self.groups[gi] + [n]) is not None and not self.creates_cycle(self.groups[gi], [n]):
                if self.max_group and len(self.groups[gi]) + 1 > self.max_group:
                    self.refused[(i, n)] = "group_size_cap", f"group size capped at {self.max_group} ops by the user"
                    return None
                return gi
        return None

    def merge(self, src: int, dst: int):
        self.groups[dst] = sorted(self.groups[dst] + self.groups[src], key=self.order.__getitem__)
        for m in self.groups[src]:
            self.group_of[m] = dst
        self.groups[src] = []

    def horizontal(self):
        """Merge independent fusable groups that read the same non-constant input."""
        readers: dict[Node, list[int]] = {}
        for gi, nodes in enumerate(self.groups):
            if all(fusable(n) for n in nodes):
                inside = set(nodes)
                for i in {i for n in nodes for i in n.inputs if i not in inside and i.op != "const"}:
                    readers.setdefault(i, []).append(gi)
        for gis in readers.values():
            for a, b in zip(gis, gis[1:]):
                ga, gb = self.groups[a], self.groups[b]
                if not ga or not gb or a == b or len(ga) + len(gb) < 2:
                    continue
                first, second = (ga, gb) if self.order[ga[0]] < self.order[gb[0]] else (gb, ga)
                if cost.rows_of(first) != cost.rows_of(second) or self.why_not_merge(first, second):
                    continue
                self.merge(b, a)
                gis[gis.index(b)] = a
                self.report.fired("horizontal")

    def pointwise_pairs(self):
        """One group for a kernel and the convolution's kernel that alone reads it, where one kernel can
        compute both (kernels.conv.POINTWISE_PAIRS): a depthwise convolution's then a 1x1 (the depthwise
        output tile consumed while in cache), a 1x1's then a depthwise (the expanded rows computed into a
        buffer the depthwise reads), or a squeeze-excitation then a 1x1 (its gate scaling the
        convolution's inputs as they are read). The group's kernel computes both, or, where that
        measures slower, the pair is split in two (backends.split_pairs, with a why-not record).
        Groups are visited in order, so in an inverted residual block (1x1, depthwise, 1x1) the first
        1x1 pairs with the depthwise: its tensor is the larger where the depthwise has a stride.
        disable=["depthwise_pointwise"] (etc.) keeps such pairs apart."""
        pairs = [match for name, (match, _) in POINTWISE_PAIRS.items() if name not in self.disabled]
        for gb, b in enumerate(self.groups):
            if not b or b[0].op != "conv2d" or b[0].inputs[0] not in self.group_of:
                continue
            ga = self.group_of[b[0].inputs[0]]
            a = self.groups[ga]
            rule = _pointwise_pair(a[-1], b[0]) if a and a[-1] is b[0].inputs[0] else None
            if rule is not None and any(m(a) is not None for m, _ in POINTWISE_PAIRS.values()):
                self.refused[(a[-1], b[0])] = "contraction_consumer", (
                    f"{POINTWISE_PAIRS[rule][1]}: the first convolution is already in a pair with the one before "
                    f"it (a kernel computes two convolutions at most)")
                continue
            if ga == gb or a[-1] is not b[0].inputs[0] or self.needed_outside(a) != [a[-1]] or a[-1] in self.outputs \
                    or self.users[a[-1]] != [b[0]] or all(m(a + b) is None for m in pairs) \
                    or self.creates_cycle(a, b):
                continue
            for n in a:
                self.group_of[n] = gb
            self.groups[gb], self.groups[ga] = a + b, []

    def why_not_records(self):
        for n in self.graph.nodes:
            if n not in self.group_of:
                continue
            for i in dict.fromkeys(n.inputs):
                if i in self.group_of and self.group_of[i] != self.group_of[n]:
                    code, detail = self.refused.get((i, n)) or _kind_reason(i, n, self.disabled)
                    self.report.refuse(code, i.label, n.label, detail)


def _pointwise_pair(producer: Node, consumer: Node) -> str | None:
    """The pair rule (pointwise_pairs) whose form producer -> consumer has, if any: consumer is a 1x1
    convolution and producer ends a depthwise convolution's kernel (the conv, then elementwise ops) or
    is a squeeze-excitation; or consumer is a depthwise convolution and producer ends a 1x1's kernel."""
    if consumer.op != "conv2d":
        return None
    if producer.op == "squeeze_excite":
        return "squeeze_excite_pointwise" if _is_pointwise(consumer) else None
    while producer.kind == Kind.ELEMENTWISE and len(producer.inputs) == 1:
        producer = producer.inputs[0]
    if producer.op != "conv2d":
        return None
    if _is_depthwise(producer) and _is_pointwise(consumer):
        return "depthwise_pointwise"
    if _is_pointwise(producer) and _is_depthwise(consumer):
        return "pointwise_depthwise"
    return None


def _is_pointwise(conv: Node) -> bool:
    return conv.inputs[1].shape[2:] == (1, 1) and conv.attrs["groups"] == 1


def _is_depthwise(conv: Node) -> bool:
    return conv.attrs["groups"] > 1 and conv.attrs["groups"] == conv.inputs[1].shape[0]


def _kind_reason(producer: Node, consumer: Node, disabled) -> tuple[str, str]:
    for n in (consumer, producer):
        if n.op in disabled:
            return "user_disabled", f"{n.op} excluded from fusion by the user"
    pair = _pointwise_pair(producer, consumer)
    if pair in disabled:
        return "user_disabled", f"{pair} pairs kept apart by the user"
    if pair is not None:
        return "contraction_consumer", (
            f"{POINTWISE_PAIRS[pair][1]}: the first kernel's output is read elsewhere too, or "
            f"the pair is not a form the fused kernel takes (a depthwise multiplier of 1, a 1x1 stride-1 unpadded "
            f"conv of one group, channels-last)")
    for n, role in ((producer, "producer"), (consumer, "consumer")):
        if n.op in VIEW_OPS:
            return "view", f"{role} {n.op} is a view"
        if n.kind == Kind.CONTRACTION:
            return f"contraction_{role}", f"{role} {n.op} is a contraction"
        if n.kind in (Kind.INJECTIVE, Kind.OPAQUE):
            by_torch = f" ({n.attrs['target']}, run by torch)" if n.op == "torch_op" else ""
            return f"{n.kind.name.lower()}_{role}", f"{role} {n.op}{by_torch} runs as its own kernel"
    return "placed_elsewhere", f"{producer.op} -> {consumer.op}"


def schedule(graph: Graph, options: dict, report, machine: cost.Machine):
    """Partition the graph's compute nodes into Groups (one kernel each), in topological order."""
    s = Scheduler(graph, options, report, machine)
    s.producer_consumer()
    if options.get("horizontal", True):
        s.horizontal()
    s.pointwise_pairs()
    s.why_not_records()
    groups = [Group(nodes, s.needed_outside(nodes)) for nodes in s.groups if nodes]
    return _topological(groups)


def _topological(groups):
    """Groups in an order where each runs after the groups it reads from (Kahn's algorithm, keeping
    the original order among ready groups)."""
    produced = {o: gi for gi, g in enumerate(groups) for o in g.nodes}
    deps = [{produced[i] for i in g.inputs if i in produced} for g in groups]
    readers: dict[int, list[int]] = {}
    for gi, d in enumerate(deps):
        for p in d:
            readers.setdefault(p, []).append(gi)
    waiting = [len(d) for d in deps]
    ready = [gi for gi, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        gi = heapq.heappop(ready)
        order.append(groups[gi])
        for r in readers.get(gi, ()):
            waiting[r] -= 1
            if waiting[r] == 0:
                heapq.heappush(ready, r)
    assert len(order) == len(groups), "groups form a cycle"
    return order
