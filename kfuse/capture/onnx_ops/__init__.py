"""The ONNX op handlers, one module per family (elementwise, nn, shape, fused); importing this package
fills HANDLERS, the table from ONNX op type to handler (common.py says how a handler is called)."""
from . import elementwise, fused, nn, shape  # noqa: F401  (each registers its handlers)
from . import contrib  # noqa: F401  (the com.microsoft ops: keys ("com.microsoft", op type))
from . import recurrent  # noqa: F401  (LSTM, GRU, RNN)
from . import loss, unsigned  # noqa: F401  (the loss ops; uint16/32/64 and the bitwise ops)
from . import sampling  # noqa: F401  (GridSample, AffineGrid, Col2Im, Det, RoiAlign)
from . import spectral  # noqa: F401  (DFT, STFT)
from . import control  # noqa: F401  (Scan, Loop: unrolled)
from . import dynamic  # noqa: F401  (NonZero, Unique, NonMaxSuppression by value; TensorScatter, MaxUnpool)
from . import ml  # noqa: F401  (TfIdfVectorizer; ai.onnx.ml Binarizer, ArrayFeatureExtractor)
from . import quant  # noqa: F401  (QuantizeLinear, DequantizeLinear, QLinearMatMul, ...)
from .common import HANDLERS, handler

__all__ = ["HANDLERS", "handler"]
