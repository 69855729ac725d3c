"""Serving a saved kfuse artifact over HTTP with Ray Serve: each replica loads it once (`kfuse.load`,
no capture, no compiling) and answers JSON requests.

    python -m kfuse.serving ARTIFACT [--replicas N] [--host 127.0.0.1] [--port 8000] [--cpus-per-replica C]

or, in Python, `serve.run(kfuse.serving.deployment(ARTIFACT, num_replicas=2))`.
Make the artifact with `kfuse.compile(model, inputs).save(ARTIFACT)` or `kfuse compile MODEL.onnx -o ARTIFACT`.

Request: HTTP POST to the route (default "/"), a JSON object with the positional inputs as nested
lists (a bare number for a 0-d tensor) and one dtype name per input:

    {"inputs": [[[101, 2023, 102]], [[1, 1, 1]]], "dtypes": ["int64", "int64"]}

or keyword inputs (a model compiled with example_kwargs), the same keys in both objects:

    {"inputs": {"input_ids": [[101, 2023, 102]]}, "dtypes": {"input_ids": "int64"}}

dtypes: float32 float64 float16 bfloat16 int64 int32 int16 int8 uint8 bool. A value the dtype
cannot hold (1.5 for int64, 300 for uint8, 1e39 for float32) is refused, never rounded or wrapped.
Reply 200: the model's output tensors in order (flattened as torch's pytree does), with dtypes and shapes:

    {"outputs": [[[0.25, ...]]], "dtypes": ["float32"], "shapes": [[1, 3, 384]]}

Each float is written as the shortest decimal that reads back to the same value, so the outputs read
back bit for bit; NaN and infinities are written NaN, Infinity, -Infinity (Python's json reads them).
Errors: 400 {"error": message} for a body that is not such an object, an unknown dtype, ragged lists,
a value the dtype cannot hold, inputs the model was not compiled for (kfuse.InputError) or an index
out of range (IndexError, e.g. a token id past the vocabulary); 500
{"error": message} for anything else the model raises. Ray is imported only by `deployment` and
`main`: kfuse imports without it (`pip install "ray[serve]"` to serve).

Binary form: with `Content-Type: application/x-safetensors` the body is a safetensors file whose
tensors are named "args.0", "args.1", ... (positional) or "kwargs.NAME", and the reply is one with
"outputs.0", ...: no text encoding of numbers at all (for BERT's [1, 128, 384] output, JSON costs more
than the model). safetensors holds raw tensors and a JSON header, nothing that runs.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch
import torch.utils._pytree as pytree

from .errors import InputError, KfuseError

DTYPES = {
    "float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "int64": torch.int64, "int32": torch.int32, "int16": torch.int16, "int8": torch.int8, "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES = {d: n for n, d in DTYPES.items()}


class RequestError(KfuseError):
    """A request body kfuse.serving cannot turn into inputs (answered with HTTP 400)."""


def _tensor(value, dtype_name, where: str) -> torch.Tensor:
    dtype = DTYPES.get(dtype_name) if isinstance(dtype_name, str) else None
    if dtype is None:
        raise RequestError(f"{where}: unknown dtype {dtype_name!r}; expected one of {', '.join(DTYPES)}")
    if not isinstance(value, (list, int, float, bool)):
        raise RequestError(f"{where}: expected nested lists of numbers, got {type(value).__name__}")
    try:
        if dtype.is_floating_point:
            wide = torch.tensor(value, dtype=torch.float64)
            t = wide.to(dtype)
            if bool((torch.isfinite(wide) & ~torch.isfinite(t)).any()):
                raise RequestError(f"{where}: a value is out of the range of {dtype_name}")
            return t
        wide = torch.tensor(value)
        if wide.dtype not in (torch.int64, torch.bool):
            raise RequestError(f"{where}: dtype {dtype_name} takes {'true/false' if dtype == torch.bool else 'integers'}, "
                               "got non-integer values")
        t = wide.to(dtype)
        if not torch.equal(t.to(wide.dtype), wide):
            raise RequestError(f"{where}: a value is out of the range of {dtype_name}")
        return t
    except RequestError:
        raise
    except (TypeError, ValueError, RuntimeError, OverflowError) as e:   # ragged lists, strings, nulls, huge ints
        raise RequestError(f"{where}: not a tensor of {dtype_name}: {str(e).strip().splitlines()[0] if str(e).strip() else e}")


def decode(body) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """(positional, keyword) input tensors of a request body (bytes, str or the parsed JSON object)."""
    if isinstance(body, (bytes, bytearray, str)):
        try:
            body = json.loads(body)
        except (ValueError, RecursionError) as e:
            raise RequestError(f"the body is not JSON: {e}") from None
    form = 'expected a JSON object {"inputs": [nested lists, ...], "dtypes": ["float32", ...]}'
    if not isinstance(body, dict):
        raise RequestError(f"{form}, got a JSON {type(body).__name__}")
    extra = sorted(set(body) - {"inputs", "dtypes"})
    if extra or "inputs" not in body or "dtypes" not in body:
        raise RequestError(f"{form}; " + (f"unknown keys {extra}" if extra else "missing " + " and ".join(
            repr(k) for k in ("inputs", "dtypes") if k not in body)))
    inputs, dtypes = body["inputs"], body["dtypes"]
    if isinstance(inputs, list):
        if not isinstance(dtypes, list) or len(dtypes) != len(inputs):
            raise RequestError(f"'dtypes' must be a list with one dtype name per input ({len(inputs)})")
        return [_tensor(v, d, f"inputs[{i}]") for i, (v, d) in enumerate(zip(inputs, dtypes))], {}
    if isinstance(inputs, dict):
        if not isinstance(dtypes, dict) or set(dtypes) != set(inputs):
            raise RequestError(f"'dtypes' must be an object with the keys of 'inputs' ({sorted(inputs)})")
        return [], {k: _tensor(v, dtypes[k], f"inputs[{k!r}]") for k, v in inputs.items()}
    raise RequestError(f"{form}; 'inputs' is a JSON {type(inputs).__name__}")


BINARY = "application/x-safetensors"


def decode_binary(body: bytes) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    """(positional, keyword) inputs of a safetensors body with tensors "args.<i>" or "kwargs.<name>"."""
    from safetensors import SafetensorError
    from safetensors.torch import load
    try:
        tensors = load(bytes(body))
    except (SafetensorError, ValueError, TypeError) as e:
        raise RequestError(f"the body is not a safetensors file: {e}") from None
    args = {k.removeprefix("args."): t for k, t in tensors.items() if k.startswith("args.")}
    kwargs = {k.removeprefix("kwargs."): t for k, t in tensors.items() if k.startswith("kwargs.")}
    if len(args) + len(kwargs) != len(tensors) or sorted(args) != sorted(map(str, range(len(args)))):
        raise RequestError(f"tensor names must be args.0, args.1, ... or kwargs.<name>; got {sorted(tensors)}")
    return [args[str(i)] for i in range(len(args))], kwargs


def _leaves(outputs) -> list[torch.Tensor]:
    leaves = pytree.tree_leaves(outputs)
    bad = [type(t).__name__ for t in leaves if not isinstance(t, torch.Tensor)]
    if bad:
        raise KfuseError(f"the model returned non-tensor outputs ({', '.join(bad)}); kfuse.serving sends tensors only")
    return leaves


def encode_binary(outputs) -> bytes:
    from safetensors.torch import save
    return save({f"outputs.{i}": t.contiguous() for i, t in enumerate(_leaves(outputs))})


def encode(outputs) -> dict:
    """The reply for a model's outputs: {"outputs": nested lists, "dtypes": names, "shapes": shapes}."""
    leaves = _leaves(outputs)
    return {"outputs": [t.tolist() for t in leaves],
            "dtypes": [DTYPE_NAMES.get(t.dtype, str(t.dtype).removeprefix("torch.")) for t in leaves],
            "shapes": [list(t.shape) for t in leaves]}


def handle(model, body, binary: bool = False) -> tuple[int, dict | bytes]:
    """(HTTP status, reply) for one request body: 200 with the outputs (a JSON object, or safetensors
    bytes for a `binary` request), 400 for a bad request, 500 for another error of the model (errors
    are JSON objects). Never raises (save for KeyboardInterrupt and the like)."""
    try:
        args, kwargs = decode_binary(body) if binary else decode(body)
    except RequestError as e:
        return 400, {"error": str(e)}
    try:
        with torch.no_grad():
            out = model(*args, **kwargs)
            return 200, encode_binary(out) if binary else encode(out)
    except InputError as e:
        return 400, {"error": f"inputs do not match the model: {e}"}
    except IndexError as e:     # a token id past the embedding table, raised by torch's gather
        return 400, {"error": f"an input value is out of range for the model: {e}"}
    except Exception as e:      # noqa: BLE001 - a server answers, it does not die
        return 500, {"error": f"{type(e).__name__}: {e}"}


def dumps(reply: dict) -> bytes:
    return json.dumps(reply, separators=(",", ":"), allow_nan=True).encode()


def respond(model, body, binary: bool = False) -> tuple[int, bytes, str]:
    """handle(), and the reply as bytes with its media type: what a replica runs off its event loop."""
    status, reply = handle(model, body, binary)
    if isinstance(reply, bytes):
        return status, reply, BINARY
    return status, dumps(reply), "application/json"


def deployment(artifact_path, *, num_replicas: int = 1, num_cpus: float = 1.0, threads: int | None = None,
               max_ongoing_requests: int = 8, name: str = "kfuse"):
    """A bound Ray Serve application serving the artifact at `artifact_path` (a directory written by
    `CompiledModel.save`, readable at that path wherever a replica runs: one machine, or a shared
    filesystem); run it with `ray.serve.run(app, route_prefix="/")`. Each of `num_replicas`
    replicas reserves `num_cpus` Ray CPUs, loads the artifact once in its constructor and runs its
    kernels on `threads` OpenMP threads (default: num_cpus, at least 1); `max_ongoing_requests`
    bounds the requests one replica holds at once (they share its threads)."""
    from ray import serve
    from starlette.responses import Response

    from .api import load

    path = os.path.abspath(os.fspath(artifact_path))
    if not os.path.exists(path):
        raise KfuseError(f"{path}: no such artifact (write one with CompiledModel.save)")
    threads = max(1, int(threads if threads is not None else num_cpus))
    env = {"OMP_NUM_THREADS": str(threads), "KFUSE_NUM_THREADS": str(threads)}

    @serve.deployment(name=name, num_replicas=num_replicas, max_ongoing_requests=max_ongoing_requests,
                      ray_actor_options={"num_cpus": num_cpus, "runtime_env": {"env_vars": env}})
    class KfuseReplica:
        def __init__(self, path: str):
            torch.set_num_threads(threads)
            self.path = path
            self.model = load(path)

        async def __call__(self, request):
            import asyncio
            if request.method != "POST":
                status, data, media = 405, dumps({"error": "POST a JSON or safetensors body (see kfuse.serving)"}), \
                    "application/json"
            else:
                body = await request.body()     # decoding, the model and encoding run off the event loop
                binary = request.headers.get("content-type", "").split(";")[0].strip() == BINARY
                status, data, media = await asyncio.get_running_loop().run_in_executor(
                    None, respond, self.model, body, binary)
            return Response(data, status_code=status, media_type=media)

    return KfuseReplica.bind(path)


def main(argv=None):
    p = argparse.ArgumentParser(prog="python -m kfuse.serving", description="Serve a kfuse artifact over HTTP with Ray Serve.")
    p.add_argument("artifact", help="directory written by CompiledModel.save (or `kfuse compile MODEL.onnx -o PATH`)")
    p.add_argument("--replicas", type=int, default=1)
    p.add_argument("--cpus-per-replica", type=float, default=1.0, help="Ray CPUs each replica reserves (its kernel threads)")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--route", default="/")
    a = p.parse_args(argv)
    if not os.path.exists(a.artifact):
        p.error(f"{a.artifact}: no such artifact (write one with CompiledModel.save or `kfuse compile MODEL.onnx -o PATH`)")
    import ray
    from ray import serve

    import signal
    import threading

    ray.init(include_dashboard=False)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))     # `kill` stops it as cleanly as Ctrl-C
    try:
        serve.start(http_options={"host": a.host, "port": a.port})
        serve.run(deployment(a.artifact, num_replicas=a.replicas, num_cpus=a.cpus_per_replica), route_prefix=a.route)
        print(f"serving {a.artifact} with {a.replicas} replica(s) on http://{a.host}:{a.port}{a.route} "
              "(Ctrl-C or SIGTERM stops)", flush=True)
        threading.Event().wait()
    except KeyboardInterrupt:
        pass
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()

if __name__ == "__main__":
    # run the importable module's copy: Ray pickles functions of __main__ by value into every replica
    from kfuse.serving import main as _main
    _main()
