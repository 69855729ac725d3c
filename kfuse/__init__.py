"""kfuse: a kernel operator fusion compiler for neural-network inference."""
__version__ = "0.1.0"    # the one version string (pyproject.toml reads it)

from .api import CompiledModel, compile  # noqa: E402
from .dynamo import register as _register_dynamo_backend  # noqa: E402
from .errors import GraphError, InputError, KfuseError, ModelFileError, UnsupportedOpError  # noqa: E402

__all__ = ["compile", "CompiledModel", "KfuseError", "UnsupportedOpError", "ModelFileError", "InputError",
           "GraphError"]

# torch.compile(backend="kfuse") finds the backend through the torch_dynamo_backends entry point of
# an installed kfuse; registering here too covers a source tree on sys.path.
_register_dynamo_backend()
