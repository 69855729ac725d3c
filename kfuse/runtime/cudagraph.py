"""A program on a GPU replayed as one CUDA graph: one launch for all its kernels.

A Triton launch costs tens of microseconds of Python and driver time, so a program of a few hundred
small kernels is launch-bound. `Graphed` wraps a program's launching call: the first call runs
plainly (Triton compiles and autotunes its kernels then), the second captures the whole call in a
CUDA graph on static copies of the inputs and times graph replay (inputs copied in, outputs copied
out) against plain launches, and keeps whichever is faster (the report says which, `launch`). Outputs
are copies: the graph's own output buffers are overwritten by the next replay. A program that cannot
be captured (it synchronises with the host, or reads a CPU tensor) keeps launching, with the reason.
Calls are serialised while a graph is in use: its static buffers are one set.
"""
from __future__ import annotations

import threading

import torch

from ..backends.triton.kernel import seconds


class Graphed:
    """`run(inputs) -> outputs` (a program's plain call), replayed from a CUDA graph where that
    measures faster; the choice, once made, is `report.launch`."""

    def __init__(self, run, report, always: bool = False):
        self.run, self.report, self.always = run, report, always     # always: replay without timing
        self.graph = None           # torch.cuda.CUDAGraph; False: launch plainly
        self.calls = 0
        self._lock = threading.Lock()

    def __call__(self, inputs):
        if self.graph is False:
            return self.run(inputs)
        with self._lock:
            if self.graph is None:
                self.calls += 1
                if self.calls == 1 or not self._capture(inputs):
                    return self.run(inputs)
            return self._replay(inputs)

    def _replay(self, inputs):
        for s, t in zip(self._inputs, inputs):
            s.copy_(t)
        self.graph.replay()
        return [o.clone() for o in self._outputs]

    def _capture(self, inputs) -> bool:
        """Capture a call and time it against plain launches; True where the graph is kept."""
        if not all(isinstance(t, torch.Tensor) and t.is_cuda for t in inputs):
            self.graph, self.report.launch = False, "one launch per kernel (an input is not on the GPU)"
            return False
        self._inputs = [t.clone() for t in inputs]
        side = torch.cuda.Stream()      # warm-up on a side stream before capture, as torch asks
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            self.run(self._inputs)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                self._outputs = self.run(self._inputs)
        except Exception as e:          # noqa: BLE001 - any failure to capture means: launch plainly
            torch.cuda.synchronize()
            self.graph, self._inputs = False, None
            self.report.launch = f"one launch per kernel (not capturable as a CUDA graph: {str(e).splitlines()[0][:160]})"
            return False
        self.graph = graph
        if self.always:
            self.report.launch = "CUDA graph replay (cuda_graphs=True)"
            return True
        replay = seconds(lambda: self._replay(inputs))
        plain = seconds(lambda: self.run(inputs))
        if plain <= replay:
            self.graph, self._inputs, self._outputs = False, None, None
            self.report.launch = f"one launch per kernel ({plain * 1e3:.3f} ms; CUDA graph replay {replay * 1e3:.3f} ms)"
            return False
        self.report.launch = f"CUDA graph replay ({replay * 1e3:.3f} ms; one launch per kernel {plain * 1e3:.3f} ms)"
        return True
