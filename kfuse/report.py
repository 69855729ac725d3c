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


@dataclass
class WhyNot:
    what: str                 # the pair or pattern left unfused, e.g. "matmul -> softmax" or "attention"
    reason: str               # the rule or cost that refused it
    where: str = ""           # node names from the model, for the reader

    def __str__(self):
        return f"{self.what}: {self.reason}" + (f" (at {self.where})" if self.where else "")


@dataclass
class Report:
    kernels: list[KernelInfo] = field(default_factory=list)
    fusions: dict[str, int] = field(default_factory=dict)
    why_not: list[WhyNot] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)
    peak_bytes: int = 0                 # planned peak of intermediate buffers
    unplanned_bytes: int = 0            # the same without buffer reuse
    fallbacks: list[str] = field(default_factory=list)

    def fused(self, rule: str, n: int = 1):
        self.fusions[rule] = self.fusions.get(rule, 0) + n

    def refuse(self, what: str, reason: str, where: str = ""):
        record = WhyNot(what, reason, where)
        if record not in self.why_not:
            self.why_not.append(record)

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
        if self.fusions:
            lines.append("fusions:")
            lines += [f"  {k:<24} {v:>4}" for k, v in sorted(self.fusions.items())]
        if self.splits:
            lines.append("splits:")
            lines += [f"  {s}" for s in self.splits]
        if self.fallbacks:
            lines.append("fallbacks to the reference path:")
            lines += [f"  {s}" for s in self.fallbacks]
        if self.why_not:
            lines.append(f"not fused ({len(self.why_not)}):")
            counts: dict[str, int] = {}
            views = 0
            for w in self.why_not:
                if "is a view: no kernel" in w.reason:   # costs nothing; listed in why_not, counted here
                    views += 1
                    continue
                key = f"{w.what}: {w.reason}"
                counts[key] = counts.get(key, 0) + 1
            lines += [f"  {k}" + (f"  (x{n})" if n > 1 else "") for k, n in counts.items()]
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
