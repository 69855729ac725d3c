"""kfuse: a kernel operator fusion compiler for neural-network inference."""
from .errors import GraphError, InputError, KfuseError, ModelFileError, UnsupportedOpError
from .model import CompiledModel, compile

__all__ = ["compile", "CompiledModel", "KfuseError", "UnsupportedOpError", "ModelFileError", "InputError",
           "GraphError"]
__version__ = "0.1.0"

from .capture.dynamo import register as _register_dynamo_backend

_register_dynamo_backend()


def _threads_from_env():
    """KFUSE_NUM_THREADS sets one thread count for torch (oneDNN, MKL) and our OpenMP kernels, which
    share torch's libgomp pool."""
    import os
    n = os.environ.get("KFUSE_NUM_THREADS")
    if n:
        import torch
        torch.set_num_threads(int(n))


_threads_from_env()
