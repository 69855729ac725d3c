"""kfuse: a kernel operator fusion compiler for neural-network inference."""
from .errors import GraphError, InputError, KfuseError, ModelFileError, UnsupportedOpError
from .model import CompiledModel, compile

__all__ = ["compile", "CompiledModel", "KfuseError", "UnsupportedOpError", "ModelFileError", "InputError",
           "GraphError"]
__version__ = "0.1.0"

from .capture.dynamo import register as _register_dynamo_backend

_register_dynamo_backend()
