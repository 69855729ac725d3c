"""The Triton backend's tests: run in Triton's CPU interpreter (TRITON_INTERPRET=1, set here before
triton is imported, unless the environment says otherwise), each marked `triton`
(`python -m pytest -m triton`). Skipped where Triton is not installed.

On a machine with a GPU, `TRITON_INTERPRET=0 KFUSE_TEST_DEVICE=cuda python -m pytest -m triton` runs
the same tests compiled for the GPU: tensors the tests make are then made on it (torch's default
device)."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

pytest.importorskip("triton")

if os.environ.get("KFUSE_TEST_DEVICE", "cpu") != "cpu":
    import torch

    from kfuse.backends.calibrate import machine
    machine()       # the CPU's calibration (cached), made before CPU tensors would be made on the GPU
    torch.set_default_device(os.environ["KFUSE_TEST_DEVICE"])

_HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if str(item.fspath).startswith(_HERE + os.sep):
            item.add_marker(pytest.mark.triton)
