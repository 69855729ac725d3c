"""The backend-neutral kernel IR (`ir`), the lowering of a fused group into it (`lowering`), and the
scheduling of its values into passes (`schedule`)."""
from .ir import DTYPES, LIBM_BINARY, LIBM_UNARY, PRIMS, REDUCTIONS, TRANSCENDENTAL, FusedKernel, NotFusable, Value, _f32
from .lowering import _check_outputs, lower

__all__ = ["DTYPES", "LIBM_BINARY", "LIBM_UNARY", "PRIMS", "REDUCTIONS", "TRANSCENDENTAL", "FusedKernel",
           "NotFusable", "Value", "_check_outputs", "_f32", "lower"]
