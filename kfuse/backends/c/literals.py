"""How kernel-IR dtypes and constants are written in C: `CTYPE` and `literal`."""
from __future__ import annotations

import math

CTYPE = {"f32": "float", "i64": "int64_t", "bool": "unsigned char"}


def literal(x, dtype: str) -> str:
    """An exact C literal: hex floats for f32 (round-trip exact), INFINITY/NAN for the specials."""
    if dtype == "bool":
        return "1" if x else "0"
    if dtype == "i64":
        return "(-9223372036854775807LL - 1)" if x == -2**63 else f"{int(x)}LL"
    if math.isnan(x):
        return "NAN"
    if math.isinf(x):
        return "INFINITY" if x > 0 else "(-INFINITY)"
    return f"{float(x).hex()}f" if x >= 0 else f"(-{float(-x).hex()}f)"
