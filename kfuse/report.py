"""What a compiled program fused, what it saved, and why it did not fuse the rest."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class KernelInfo:
    name: str                 # e.g. "c:add+layer_norm", "linear+gelu", "attention"
    ops: list[str]            # IR ops inside the kernel
    bytes_before: int         # bytes the ops would move unfused (each op reads its inputs, writes its output)
    bytes_after: int          # bytes the kernel moves (external inputs read once, outputs written once)
    flops: int
    predicted_ms: float = 0.0
    backend: str = ""         # "c", "library", "torch" (reference fallback)
    note: str = ""            # e.g. why it fell back
    fusion: bool = False      # whether the kernel holds a fusion (its name is the fusion's)
    measured_ms: float | None = None   # filled in by Program.profile
    unfused_ms: float | None = None    # the same ops run one by one in torch (Program.profile)
    schedule: str = ""        # a C kernel's autotuned schedule and the times it was chosen on (backends/c/autotune.py)
    parts: tuple = ()         # a fused pair (dwconv_pwconv, pwconv_dwconv, se_pwconv): the fusions of its halves, as they
                              # are named where the pair measured slower and runs as two kernels


# Why-not codes: one stable snake_case identifier per reason a fusion did not happen. Tests and
# tools match on the code; `detail` is text for people. Documented in docs/ARCHITECTURE.md.
WHY_NOT_CODES = {
    # the automatic scheduler (passes/autofuse.py): a producer -> consumer pair left in two kernels
    "user_disabled": "an op or rule was excluded by the user (disable=[...])",
    "group_size_cap": "the group reached the user's max_group",
    "cycle": "one kernel for both would read another kernel's output that depends on it",
    "kernel_ir_cannot_express": "the kernel IR has no loop shape for the merged group",
    "cost_model_slowdown": "the cost model predicts the merged kernel slower (lost parallelism)",
    "measured_slower": "the fused kernel was built and timed on this machine: the separate kernels ran faster",
    "contraction_producer": "the producer is a contraction (GEMM or attention); only a GEMM by a constant weight "
                            "takes an epilogue (bias add, activation)",
    "contraction_consumer": "the consumer is a contraction (GEMM, attention); contractions take no prologue",
    "injective_producer": "the producer moves data (gather, concat, pad, ...) and runs as its own kernel",
    "injective_consumer": "the consumer moves data (gather, concat, pad, ...) and runs as its own kernel",
    "opaque_producer": "the producer has no fused kernel (pooling, topk, ...) and runs on torch",
    "opaque_consumer": "the consumer has no fused kernel (pooling, topk, ...) and runs on torch",
    "view": "one side is a view (reshape, transpose, slice, expand): no kernel, read in place",
    "placed_elsewhere": "the producer already sits in a group the consumer cannot join",
    # pattern rules (passes/patterns): a pattern that nearly matched
    "shared_intermediate": "a value the pattern would absorb is also read elsewhere",
    "pattern_order": "the ops are there but in an order the fused op does not compute",
    "pattern_shape": "the operands' shapes do not line up for the fused op",
}


@dataclass
class WhyNot:
    code: str                 # a key of WHY_NOT_CODES
    producer: str             # node (or rule) names, for the reader; from the model, only ever shown
    consumer: str
    detail: str = ""          # the specifics, as text

    def __post_init__(self):
        assert self.code in WHY_NOT_CODES, self.code

    def __str__(self):
        return f"{self.producer} -> {self.consumer}: {self.code}" + (f" ({self.detail})" if self.detail else "")


@dataclass
class Report:
    kernels: list[KernelInfo] = field(default_factory=list)
    fusions: dict[str, int] = field(default_factory=dict)   # fusion name -> kernels formed
    rules: dict[str, int] = field(default_factory=dict)     # rewrite rule -> times it fired
    why_not: list[WhyNot] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)
    peak_bytes: int = 0                 # planned peak of intermediate buffers
    unplanned_bytes: int = 0            # the same without buffer reuse
    fallbacks: list[str] = field(default_factory=list)
    capture: str = ""                   # how the graph was captured, where it is worth saying
    launch: str = ""                    # on a GPU: CUDA graph replay or kernel by kernel, and the times

    def fused(self, name: str):
        """A kernel holding the fusion `name` was formed."""
        self.fusions[name] = self.fusions.get(name, 0) + 1

    def fired(self, rule: str, times: int = 1):
        """A rewrite rule replaced a match (`times` matches)."""
        self.rules[rule] = self.rules.get(rule, 0) + times

    def refuse(self, code: str, producer: str, consumer: str, detail: str = ""):
        record = WhyNot(code, producer, consumer, detail)
        if record not in self.why_not:
            self.why_not.append(record)

    def why_not_counts(self) -> dict[str, int]:
        """code -> number of records."""
        counts: dict[str, int] = {}
        for w in self.why_not:
            counts[w.code] = counts.get(w.code, 0) + 1
        return counts

    @property
    def bytes_before(self) -> int:
        return sum(k.bytes_before for k in self.kernels)

    @property
    def bytes_after(self) -> int:
        return sum(k.bytes_after for k in self.kernels)

    def __str__(self):
        lines = [f"{len(self.kernels)} kernels; bytes moved {_mb(self.bytes_before)} unfused -> "
                 f"{_mb(self.bytes_after)} fused; intermediate memory {_mb(self.peak_bytes)} planned "
                 f"(vs {_mb(self.unplanned_bytes)} without reuse)"]
        if self.capture:
            lines.append(f"captured by {self.capture}")
        if self.launch:
            lines.append(f"launch: {self.launch}")
        if self.fusions:
            lines.append("fusions:")
            lines += [f"  {k:<24} {v:>4}" for k, v in sorted(self.fusions.items())]
        if self.splits:
            lines.append("splits:")
            lines += [f"  {s}" for s in self.splits]
        if self.fallbacks:
            lines.append("fallbacks to the reference path:")
            lines += [f"  {s}" for s in self.fallbacks]
        tuned = [k for k in self.kernels if k.schedule]
        if tuned:
            lines.append("C kernel schedules (autotuned; KFUSE_AUTOTUNE=0 turns it off):")
            lines += [f"  {k.name:<24} {k.schedule}" for k in tuned]
        if self.rules:
            lines.append("rewrite rules fired:")
            lines += [f"  {k:<24} {v:>4}" for k, v in sorted(self.rules.items())]
        if self.why_not:
            lines.append(f"not fused ({len(self.why_not)} pairs or patterns):")
            counts = self.why_not_counts()
            views = counts.pop("view", 0)
            for code, n in sorted(counts.items(), key=lambda kv: -kv[1]):
                example = next(w for w in self.why_not if w.code == code)
                lines.append(f"  {code:<26} {n:>4}  e.g. {example.producer} -> {example.consumer}"
                             + (f": {example.detail}" if example.detail else ""))
            if views:
                lines.append(f"  {views} pairs next to views (reshape, transpose, slice: no kernel, read in place)")
        return "\n".join(lines)


def fusion_table(report: Report) -> str:
    """One row per fusion: how often it fired, bytes moved and time before and after, and the cost
    model's prediction (the time columns need Program.profile to have run)."""
    rows: dict[str, list] = {}
    for k in report.kernels:
        if not k.fusion:
            continue
        r = rows.setdefault(k.name, [0, 0, 0, 0.0, 0.0, 0.0])
        r[0] += 1
        r[1] += k.bytes_before
        r[2] += k.bytes_after
        r[3] += k.unfused_ms or 0.0
        r[4] += k.measured_ms or 0.0
        r[5] += k.predicted_ms
    timed = any(k.measured_ms is not None for k in report.kernels)
    head = f"{'fusion':<20} {'count':>5} {'MB before':>10} {'MB after':>9}" + (
        f" {'ms before':>10} {'ms after':>9} {'speedup':>8} {'predicted':>10}" if timed else "")
    lines = [head, "-" * len(head)]
    for name, (n, b0, b1, t0, t1, p) in sorted(rows.items(), key=lambda kv: -kv[1][3]):
        line = f"{name:<20} {n:>5} {b0 / 1e6:>10.2f} {b1 / 1e6:>9.2f}"
        if timed:
            line += f" {t0:>10.3f} {t1:>9.3f} {t0 / t1 if t1 else float('nan'):>7.2f}x {p:>10.3f}"
        lines.append(line)
    return "\n".join(lines)


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f} MB"
