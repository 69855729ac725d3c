"""kfuse.serving: the request format (always), and a Ray Serve deployment of a saved artifact (where
ray is installed): a local Ray instance, 2 replicas, HTTP on 127.0.0.1 only, 16 concurrent requests
from 4 threads, each reply checked bit for bit against kfuse.load of the same artifact in this process."""
from __future__ import annotations

import json
import socket
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

import kfuse
from kfuse.models import build
from kfuse.serving import BINARY, DTYPE_NAMES, decode, dumps, handle

THREADS, REQUESTS, TIMEOUT_S = 4, 16, 60
# never through a proxy from the environment: everything here stays on the loopback interface
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def body_of(inputs) -> bytes:
    return json.dumps({"inputs": [t.tolist() for t in inputs], "dtypes": [DTYPE_NAMES[t.dtype] for t in inputs]}).encode()


def tensors_of(reply: dict) -> list[torch.Tensor]:
    from kfuse.serving import DTYPES
    return [torch.tensor(o, dtype=DTYPES[d]).reshape(s) for o, d, s in zip(reply["outputs"], reply["dtypes"], reply["shapes"])]


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and a.contiguous().numpy().tobytes() == b.contiguous().numpy().tobytes()


def post(url: str, body: bytes, media: str = "application/json") -> tuple[int, dict | bytes]:
    req = urllib.request.Request(url, data=body, headers={"Content-Type": media}, method="POST")
    try:
        with OPENER.open(req, timeout=TIMEOUT_S) as r:
            data = r.read()
            return r.status, data if r.headers.get("Content-Type", "").startswith(BINARY) else json.loads(data)
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def binary_body(inputs) -> bytes:
    from safetensors.torch import save
    return save({f"args.{i}": t.contiguous() for i, t in enumerate(inputs)})


def binary_outputs(data: bytes) -> list[torch.Tensor]:
    from safetensors.torch import load
    out = load(data)
    return [out[f"outputs.{i}"] for i in range(len(out))]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    model, inputs = build("bert", batch=1, seq=16, layers=1)
    path = tmp_path_factory.mktemp("serving") / "bert.kfuse"
    kfuse.compile(model, inputs).save(str(path))
    return str(path), inputs


def request_inputs(example, n: int) -> list[tuple]:
    """n different inputs of the example's shapes: random token ids, masks with padding at the end."""
    ids, mask = example
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        m = torch.ones_like(mask)
        m[:, mask.shape[1] - i % 5:] = 0
        out.append((torch.randint(0, 1000, ids.shape, generator=g, dtype=ids.dtype), m))
    return out


def test_handle_round_trips_and_refuses_bad_bodies(artifact):
    path, example = artifact
    model = kfuse.load(path)
    status, reply = handle(model, body_of(example))
    assert status == 200, reply
    assert same_bits(tensors_of(json.loads(dumps(reply)))[0], model(*example))
    bad = {b"not json": "not JSON", b"[1, 2]": "JSON object", b'{"inputs": [[1]]}': "missing 'dtypes'",
           b'{"inputs": [[1.5]], "dtypes": ["int64"]}': "integers", b'{"inputs": [[300]], "dtypes": ["uint8"]}': "range",
           b'{"inputs": [[1], [2, 3]], "dtypes": ["int64", "int64"]}': "compiled for",
           b'{"inputs": [[[1, 2], [3]]], "dtypes": ["int64"]}': "not a tensor", b'{"inputs": [1], "dtypes": ["int4"]}': "dtype",
           body_of((example[0] + 10 ** 9, example[1])): "out of range"}
    for body, words in bad.items():
        status, reply = handle(model, body)
        assert status == 400 and words in reply["error"], (body[:60], status, reply)
    assert decode({"inputs": {"x": [[1.0, -0.0]]}, "dtypes": {"x": "bfloat16"}})[1]["x"].dtype == torch.bfloat16


def test_binary_bodies_round_trip_and_bad_ones_are_refused(artifact):
    path, example = artifact
    model = kfuse.load(path)
    status, reply = handle(model, binary_body(example), binary=True)
    assert status == 200 and same_bits(binary_outputs(reply)[0], model(*example))
    from safetensors.torch import save
    for body, words in ((b"garbage", "not a safetensors"), (save({"x": example[0]}), "args.0"),
                        (save({"args.1": example[0]}), "args.0"), (binary_body(example[:1]), "compiled for")):
        status, reply = handle(model, body, binary=True)
        assert status == 400 and words in reply["error"], (status, reply)


def test_ray_serve_two_replicas_answer_concurrent_requests_exactly(artifact):
    ray = pytest.importorskip("ray", reason="Ray Serve test needs ray: pip install 'ray[serve]' (in the dev extra)")
    serve = pytest.importorskip("ray.serve", reason="Ray Serve test needs ray[serve]: pip install 'ray[serve]'")
    from kfuse.serving import deployment

    path, example = artifact
    reference = kfuse.load(path)
    cases = request_inputs(example, REQUESTS)
    expected = [reference(*c) for c in cases]          # serial, in this process

    port = free_port()
    url = f"http://127.0.0.1:{port}/"
    t0 = time.perf_counter()
    ray.init(num_cpus=2, include_dashboard=False, object_store_memory=96 << 20, log_to_driver=False,
             configure_logging=False, namespace="kfuse-serving-test", _node_ip_address="127.0.0.1")
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(deployment(path, num_replicas=2, num_cpus=1), name="kfuse-test", route_prefix="/")
        started = time.perf_counter() - t0
        states = serve.status().applications["kfuse-test"].deployments["kfuse"].replica_states
        assert states.get("RUNNING") == 2, states

        with ThreadPoolExecutor(THREADS) as pool:
            futures = [pool.submit(post, url, body_of(c)) for c in cases]
            results = [f.result(timeout=TIMEOUT_S * 2) for f in futures]
        for i, ((status, reply), want) in enumerate(zip(results, expected)):
            assert status == 200, (i, reply)
            assert reply["dtypes"] == ["float32"] and reply["shapes"] == [list(want.shape)]
            assert same_bits(tensors_of(reply)[0], want), f"request {i}: reply differs from kfuse.load in this process"

        status, reply = post(url, b'{"inputs": [[[1, 2], [3]]], "dtypes": ["int64"]}')
        assert status == 400 and "inputs[0]" in reply["error"], (status, reply)
        status, reply = post(url, body_of(cases[0]))      # the replicas still answer after a bad request
        assert status == 200 and same_bits(tensors_of(reply)[0], expected[0])
        for case, want in zip(cases[:4], expected):       # the binary (safetensors) form
            status, reply = post(url, binary_body(case), BINARY)
            assert status == 200 and same_bits(binary_outputs(reply)[0], want)
        print(f"Ray + Serve + 2 replicas up in {started:.1f} s; {REQUESTS} requests in "
              f"{time.perf_counter() - t0 - started:.1f} s")
    finally:
        try:
            serve.shutdown()
        finally:
            ray.shutdown()
