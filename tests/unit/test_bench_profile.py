"""bench_models.py --profile: every kernel of the compiled program timed in place, whether or not the
native runner has taken over the calls (it had, unnoticed, and the profile divided by zero)."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

BENCH = Path(__file__).parents[2] / "bench"


def test_profile_times_every_kernel():
    r = subprocess.run([sys.executable, str(BENCH / "bench_models.py"), "--worker", "gpt2", "kfuse",
                        "--rounds", "1", "--profile"], capture_output=True, text=True, timeout=600)
    out = r.stdout
    result = json.loads(out.split("RESULT ", 1)[1])
    assert "error" not in result, result
    head = re.search(r"kfuse profile: (\d+) kernels, ([\d.]+) ms inside kernels timed one by one, "
                     r"([\d.]+) ms per call", out)
    assert head, out[-2000:]
    kernels, inside, call = int(head[1]), float(head[2]), float(head[3])
    assert kernels > 10 and inside > 0 and call > 0
    rows = re.findall(r"^\s+(\w+)\s+(\S+)\s+(\d+)\s+([\d.]+)\s+([\d.]+)", out, re.M)
    names = {name for name, *_ in rows}
    assert {"attention", "gemm_bias"} & names, out[-2000:]
    assert sum(float(ms) for *_, ms, _pct in rows) <= inside * 1.01      # the top rows of the total
    assert max(float(pct) for *_, pct in rows) > 10                     # where the time goes, not zeros
