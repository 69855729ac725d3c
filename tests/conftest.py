"""Shared by every test: tests/helpers.py importable as `helpers`, and fixed seeds.

Each test runs with torch, random and numpy seeded from its own node id (the same seed on every
run, a different one per test), and each test module is imported with its own fixed seed, so
random data drawn at import time (parameter lists) does not depend on which modules ran before.
"""
from __future__ import annotations

import os
import sys

# The Triton backend's tests (tests/triton) run in Triton's CPU interpreter. Set before anything
# imports triton: importing kfuse imports torch._dynamo, which imports triton, and triton's own
# library functions are compiled or interpreted as the variable says when they are first imported.
os.environ.setdefault("TRITON_INTERPRET", "1")

# The tests keep their own kfuse cache (kernels and autotuner choices) beside the user's: kernel
# choices timed while a parallel test run loads every core would otherwise be what the user's
# models (and the benchmarks) run later on this machine.
if not os.environ.get("KFUSE_CACHE_DIR"):
    _base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    os.environ["KFUSE_CACHE_DIR"] = os.path.join(_base, "kfuse", "tests")

import pytest

_TESTS = os.path.dirname(os.path.abspath(__file__))
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

from helpers import seed_everything, seed_of


def pytest_collectstart(collector):
    if isinstance(collector, pytest.Module):
        seed_everything(seed_of(collector.nodeid))


@pytest.fixture(autouse=True)
def _fixed_seed(request):
    seed_everything(seed_of(request.node.nodeid))
