"""kfuse: a kernel operator fusion compiler for neural-network inference."""
from ._version import __version__
from .api import CompiledModel, compile, load
from .dynamo import register as _register_dynamo_backend
from .errors import GraphError, InputError, KfuseError, ModelFileError, UnsupportedOpError

__all__ = ["__version__", "compile", "load", "CompiledModel", "KfuseError", "UnsupportedOpError", "ModelFileError", "InputError",
           "GraphError"]

# torch.compile(backend="kfuse") finds the backend through the torch_dynamo_backends entry point of
# an installed kfuse; registering here too covers a source tree on sys.path.
_register_dynamo_backend()
