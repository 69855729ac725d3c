"""The Triton backend's tests: run in Triton's CPU interpreter (TRITON_INTERPRET=1, set here before
triton is imported, unless the environment says otherwise), each marked `triton`
(`python -m pytest -m triton`). Skipped where Triton is not installed."""
from __future__ import annotations

import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

pytest.importorskip("triton")

_HERE = os.path.dirname(os.path.abspath(__file__))


def pytest_collection_modifyitems(config, items):
    for item in items:
        if str(item.fspath).startswith(_HERE + os.sep):
            item.add_marker(pytest.mark.triton)
