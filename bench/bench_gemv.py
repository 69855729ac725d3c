"""GEMV-shaped linears (a decode step's projections: M = batch rows against a weight read whole from
memory), y = x @ W.T + b: eager, torch.compile, kfuse (`cm(x)`), kfuse with its packed weight left in
4 KB pages (KFUSE_HUGEPAGES=0), and a copy of the same bytes. Each provider in its own process.

    python bench/bench_gemv.py [case ...] [--providers ...] [--repeat 3]

Bytes moved: the weight and bias read, x read, y written (the weight is all of it). Every weight here
is larger than the last-level cache (32 MiB on the project's machine), so each call streams it from
memory, as a decode step does with a model's weights; kfuse's packed copy is moved into 2 MB pages at
compile time (kfuse/backends/hugepages.py), which "kfuse (4 KB pages)" turns off. The copy provider's
buffers are in 4 KB pages, as torch allocates them.
"""
import common  # noqa: F401
import torch

from common import Case, main

PROVIDERS = ("eager", "torch.compile", "kfuse", "kfuse (4 KB pages)", "copy")


class Gemv(Case):
    def __init__(self, rows: int, k: int, n: int):
        lin = torch.nn.Linear(k, n).eval()
        super().__init__(lin, [torch.randn(rows, k)], None, weights=True, atol=1e-4)
        self.nbytes = 4 * (k * n + n + rows * (k + n))

    def bytes(self) -> int:
        return self.nbytes


CASES = {
    "m1_2048x5632": lambda: Gemv(1, 2048, 5632),      # a 1.5B-class MLP up-projection, 46 MB
    "m1_4096x4096": lambda: Gemv(1, 4096, 4096),      # a 7B-class attention projection, 67 MB
    "m1_5632x2048": lambda: Gemv(1, 5632, 2048),      # the down-projection, K-major
    "m4_2048x5632": lambda: Gemv(4, 2048, 5632),      # four sequences decoding together
}

if __name__ == "__main__":
    main("gemv", CASES, PROVIDERS)
