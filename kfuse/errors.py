"""kfuse's one exception family: every error kfuse raises on purpose derives from KfuseError."""


class KfuseError(Exception):
    """Base of all kfuse errors."""


class UnsupportedOpError(KfuseError):
    """A model contains an op kfuse has no handler for; names the op type and the node."""

    def __init__(self, op_type: str, node: str, source: str, detail: str = ""):
        self.op_type, self.node, self.source, self.detail = op_type, node, source, detail
        super().__init__(f"unsupported {source} op {op_type!r} at node {node!r}" + (f": {detail}" if detail else ""))


class ModelFileError(KfuseError):
    """A model file is missing, malformed or truncated."""


class InputError(KfuseError):
    """Inputs given at call time do not match what the model was compiled for."""


class GraphError(KfuseError):
    """The IR graph is inconsistent (a bug in a pass or a frontend)."""
