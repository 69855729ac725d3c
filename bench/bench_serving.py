"""Serving under load: p50/p99 latency and throughput of eager and kfuse under M concurrent clients,
and the cost of kfuse's call path on a one-op model.

    python bench/bench_serving.py [--model bert] [--seq 128] [--clients 1,2,4,8] [--requests 40]
                                  [--overhead-calls 4000] [--http] [--replicas 2]

Load: M client threads (M in --clients) in this process, each sending --requests calls one after
another on its own inputs (same shapes, different token ids), all released together by a barrier
after one untimed call each. Latency is the time of one call in its client; throughput is all
calls over the wall time from the release to the last answer. Providers, each checked before
timing (max abs error against eager; the loaded artifact bit for bit against the compiled model):
  - eager: the nn.Module under torch.no_grad (in every client thread: grad mode is per thread);
  - kfuse: kfuse.compile(model, inputs), concurrent callers splitting the threads;
  - kfuse (artifact): kfuse.load of the compiled model's cm.save(...) (skipped if save/load fail);
  - --http (ray installed): kfuse.serving's Ray Serve deployment of the artifact, --replicas
    replicas of 1 CPU and 1 thread each, HTTP on 127.0.0.1; clients POST the JSON inputs with
    urllib; latency to the last byte of the reply (JSON encoding and transport included).
The in-process providers run one after another for each M, their order rotating with M; the HTTP
provider runs after all of them (Ray's own processes stay busy while it is up). common.py re-executes
the script with 2 threads (KFUSE_NUM_THREADS, OMP_NUM_THREADS) and the malloc thresholds set.

Call path: a one-op model (torch.nn.ReLU on a [1, 8] tensor), median time of one call over
--overhead-calls calls, each timed alone, in 5 rounds rotating the providers: eager, kfuse
(compiled), kfuse (artifact), and kfuse's runtime Program alone (the compiled wrapper without the
CompiledModel layer). Target: kfuse <= 25 us.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import tempfile
import threading
import time
import traceback

from common import commit, machine  # re-executes with the malloc/thread env first

import torch
import torch.utils._pytree as pytree

import kfuse
from kfuse.models import build

THREADS = torch.get_num_threads()
OVERHEAD_TARGET_US = 25.0


def leaves(out) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def same_bits(a, b) -> bool:
    return all(x.dtype == y.dtype and x.shape == y.shape and x.contiguous().numpy().tobytes() == y.contiguous().numpy().tobytes()
               for x, y in zip(leaves(a), leaves(b), strict=True))


def pct(sorted_s: list, q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    return sorted_s[max(0, min(len(sorted_s) - 1, math.ceil(q * len(sorted_s)) - 1))]


# -- load ---------------------------------------------------------------------------------------------

def run_clients(call, inputs: list, m: int, requests: int) -> dict:
    """m threads, client c calling call(*inputs[c % len(inputs)]) `requests` times; latencies in ms."""
    barrier = threading.Barrier(m + 1)
    lat: list[list[float]] = [[] for _ in range(m)]
    errors: list[BaseException] = []

    def client(c):
        args = inputs[c % len(inputs)]
        try:
            with torch.no_grad():
                call(*args)                     # untimed: a first call per thread (arena, thread pool)
                barrier.wait()
                for _ in range(requests):
                    t0 = time.perf_counter()
                    call(*args)
                    lat[c].append((time.perf_counter() - t0) * 1e3)
        except BaseException as e:              # noqa: BLE001 - reported by the main thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=client, args=(c,), daemon=True) for c in range(m)]
    for t in threads:
        t.start()
    barrier.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    if errors:
        raise errors[0]
    s = sorted(x for per in lat for x in per)
    return dict(p50=pct(s, 0.50), p99=pct(s, 0.99), rps=len(s) / wall, n=len(s), wall=wall)


def request_inputs(example, n: int) -> list[tuple]:
    """n input tuples of the example's shapes: other random token ids, the same masks, other noise
    for float inputs (the CNN's image)."""
    g = torch.Generator().manual_seed(1)

    def other(t):
        if t.is_floating_point():
            return torch.randn(t.shape, generator=g, dtype=t.dtype)
        if t.max() > 1:                                     # token ids (a mask holds 0 and 1)
            return torch.randint(0, 1000, t.shape, generator=g, dtype=t.dtype)
        return t.clone()
    return [tuple(other(t) for t in example) for _ in range(n)]


# -- HTTP (Ray Serve) ------------------------------------------------------------------------------------

class Served:
    """Ray (local, loopback) + kfuse.serving's deployment of `path`; .call(body) POSTs one request."""

    def __init__(self, path: str, replicas: int):
        import socket
        import urllib.request

        import ray
        from ray import serve

        from kfuse.serving import deployment
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}/"
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        self.ray, self.serve = ray, serve
        t0 = time.perf_counter()
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, configure_logging=False,
                 object_store_memory=96 << 20, _node_ip_address="127.0.0.1")
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(deployment(path, num_replicas=replicas, num_cpus=1, threads=1), name="kfuse-bench", route_prefix="/")
        print(f"  Ray Serve: {replicas} replicas up in {time.perf_counter() - t0:.1f} s at {self.url}")

    def post(self, body: bytes, media: str = "application/json") -> bytes:
        import urllib.request
        req = urllib.request.Request(self.url, data=body, headers={"Content-Type": media}, method="POST")
        with self.opener.open(req, timeout=120) as r:
            return r.read()

    def post_binary(self, body: bytes) -> bytes:
        from kfuse.serving import BINARY
        return self.post(body, BINARY)

    def close(self):
        try:
            self.serve.shutdown()
        finally:
            self.ray.shutdown()


def body_of(inputs) -> bytes:
    from kfuse.serving import DTYPE_NAMES
    return json.dumps({"inputs": [t.tolist() for t in inputs], "dtypes": [DTYPE_NAMES[t.dtype] for t in inputs]}).encode()


def binary_body_of(inputs) -> bytes:
    from safetensors.torch import save
    return save({f"args.{i}": t.contiguous() for i, t in enumerate(inputs)})


# -- call path ----------------------------------------------------------------------------------------------

def call_path(calls: int, rounds: int = 5) -> dict:
    """Median/p10/p90 microseconds of one call of each provider on ReLU [1, 8]."""
    model, x = torch.nn.ReLU(), torch.randn(1, 8)
    cm = kfuse.compile(model, (x,))
    providers = {"eager": lambda: model(x), "kfuse": lambda: cm(x)}
    try:
        with tempfile.TemporaryDirectory() as d:
            cm.save(os.path.join(d, "relu.kfuse"))
            lm = kfuse.load(os.path.join(d, "relu.kfuse"))
        providers["kfuse (artifact)"] = lambda: lm(x)
    except Exception as e:                                  # noqa: BLE001
        print(f"  call path: kfuse (artifact) skipped, {type(e).__name__}: {e}")
    prog = getattr(cm, "_last", None)
    if callable(prog):
        providers["kfuse Program only"] = lambda: prog([x])
    samples = {n: [] for n in providers}
    clock = time.perf_counter_ns
    with torch.no_grad():
        for f in providers.values():
            for _ in range(500):
                f()
        names = list(providers)
        for r in range(rounds):
            for n in names[r % len(names):] + names[:r % len(names)]:
                f, out = providers[n], samples[n]
                for _ in range(calls):
                    t0 = clock()
                    f()
                    out.append(clock() - t0)
        timer = []
        for _ in range(calls):
            t0 = clock()
            timer.append(clock() - t0)
    res = {}
    for n, s in samples.items():
        s.sort()
        res[n] = dict(us=statistics.median(s) / 1e3, p10=pct(s, 0.1) / 1e3, p90=pct(s, 0.9) / 1e3,
                      p99=pct(s, 0.99) / 1e3, n=len(s))
    timer.sort()
    res["(timer alone)"] = dict(us=statistics.median(timer) / 1e3, p10=pct(timer, 0.1) / 1e3, p90=pct(timer, 0.9) / 1e3,
                                p99=pct(timer, 0.99) / 1e3, n=len(timer))
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="bert", choices=["bert", "gpt2", "llama", "cnn"])
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--layers", type=int, default=None, help="override the built-in model's layer count")
    ap.add_argument("--clients", default="1,2,4,8")
    ap.add_argument("--requests", type=int, default=40, help="calls per client")
    ap.add_argument("--overhead-calls", type=int, default=4000, help="calls per provider per round (5 rounds)")
    ap.add_argument("--http", action="store_true", help="also load the Ray Serve deployment over HTTP (needs ray[serve])")
    ap.add_argument("--replicas", type=int, default=2)
    a = ap.parse_args()
    clients = [int(c) for c in a.clients.split(",")]
    mach, com = machine(), commit()
    print(f"{mach}, commit {com}, torch {torch.__version__}, {THREADS} threads, load average "
          f"{' '.join(f'{x:.1f}' for x in os.getloadavg())}")

    # -- call path
    res = call_path(a.overhead_calls)
    print(f"\ncall path: ReLU on [1, 8], one call timed alone, {a.overhead_calls} calls x 5 rotated rounds")
    print(f"  {'provider':<22}{'median us':>10}{'p10 us':>9}{'p90 us':>9}{'p99 us':>10}")
    for n, r in res.items():
        print(f"  {n:<22}{r['us']:>10.2f}{r['p10']:>9.2f}{r['p90']:>9.2f}{r['p99']:>10.1f}")
    k = res["kfuse"]["us"]
    print(f"  kfuse call path {k:.1f} us: target <= {OVERHEAD_TARGET_US:.0f} us "
          + ("met" if k <= OVERHEAD_TARGET_US else "NOT MET"))
    overhead_rows = [f"CSV,{mach},{com},call_path relu[1x8],{n},1,{r['us']:.3f},{r['p99']:.3f},,{r['n']}" for n, r in res.items()]

    # -- the model, its compiled and loaded forms, checked
    config = {"layers": a.layers} if a.layers else {}
    model, example = build(a.model, batch=1, seq=a.seq, **config)
    model.eval()
    case = f"{a.model} b1 x {a.seq}" + (f" ({a.layers} layers)" if a.layers else "")
    t0 = time.perf_counter()
    cm = kfuse.compile(model, example)
    print(f"\n{case}: compiled in {time.perf_counter() - t0:.1f} s, {len(cm.report().kernels)} kernels")
    inputs = request_inputs(example, max(clients))
    with torch.no_grad():
        eager_out = model(*example)
    providers = {"eager": model, "kfuse": cm}
    tmp = tempfile.TemporaryDirectory()
    path = os.path.join(tmp.name, f"{a.model}.kfuse")
    try:
        t0 = time.perf_counter()
        cm.save(path)
        saved = time.perf_counter() - t0
        t0 = time.perf_counter()
        lm = kfuse.load(path)
        print(f"  artifact: saved in {saved:.2f} s, loaded in {time.perf_counter() - t0:.2f} s")
        for args in inputs[:2]:
            if not same_bits(lm(*args), cm(*args)):
                raise AssertionError("kfuse.load's outputs differ from the compiled model's")
        providers["kfuse (artifact)"] = lm
    except Exception as e:                                  # noqa: BLE001
        print(f"  kfuse (artifact): skipped, {type(e).__name__}: {e}")
        path = None
    err = max((g - w).abs().max().item() for g, w in zip(leaves(cm(*example)), leaves(eager_out)))
    print(f"  kfuse max abs error against eager: {err:.2e}")

    # -- load, in process
    table: dict[str, dict[int, dict]] = {n: {} for n in providers}
    for i, m in enumerate(clients):
        names = list(providers)
        for n in names[i % len(names):] + names[:i % len(names)]:
            table[n][m] = run_clients(providers[n], inputs, m, a.requests)
        print(f"  M={m}: " + ", ".join(f"{n} {table[n][m]['p50']:.2f} ms" for n in providers))

    # -- load over HTTP, after the rest: Ray's own processes stay busy while it is up
    if a.http:
        served = None
        try:
            if path is None:
                raise RuntimeError("no artifact to serve")
            served = Served(path, a.replicas)
            bodies = [(body_of(args),) for args in inputs]
            from kfuse.serving import DTYPES
            reply = json.loads(served.post(bodies[0][0]))
            got = [torch.tensor(o, dtype=DTYPES[d]).reshape(s)
                   for o, d, s in zip(reply["outputs"], reply["dtypes"], reply["shapes"])]
            if not same_bits(got, leaves(lm(*inputs[0]))):
                raise AssertionError("the HTTP reply differs from kfuse.load in this process")
            from safetensors.torch import load as st_load
            binary = [(binary_body_of(args),) for args in inputs]
            got = st_load(served.post_binary(binary[0][0]))
            if not same_bits([got[f"outputs.{i}"] for i in range(len(got))], leaves(lm(*inputs[0]))):
                raise AssertionError("the binary HTTP reply differs from kfuse.load in this process")
            for name, post, data in ((f"ray-serve HTTP JSON ({a.replicas} replicas)", served.post, bodies),
                                     (f"ray-serve HTTP safetensors ({a.replicas} replicas)", served.post_binary, binary)):
                table[name] = {}
                for m in clients:
                    table[name][m] = run_clients(post, data, m, a.requests)
                    print(f"  M={m}: {name} {table[name][m]['p50']:.2f} ms")
        except Exception as e:                              # noqa: BLE001
            print(f"  HTTP: skipped, {type(e).__name__}: {e}")
            traceback.print_exc()
        finally:
            if served is not None:
                served.close()
    tmp.cleanup()

    print(f"\n{case}: M concurrent clients x {a.requests} requests each, {THREADS} threads "
          f"(p99 of {a.requests}-{a.requests * max(clients)} calls is near the slowest)")
    head = f"{'provider':<30}" + "".join(f"| M={m:<3}{'p50 ms':>9}{'p99 ms':>9}{'req/s':>8} " for m in clients)
    print(head)
    print("-" * len(head))
    for n, per in table.items():
        print(f"{n:<30}" + "".join(f"| {'':<5}{per[m]['p50']:>9.2f}{per[m]['p99']:>9.2f}{per[m]['rps']:>8.1f} " for m in clients))
    print("\nCSV,machine,commit,case,provider,clients,p50_ms,p99_ms,req_per_s,calls   (call_path rows: median us, p99 us)")
    for n, per in table.items():
        for m, r in per.items():
            print(f"CSV,{mach},{com},{case},{n},{m},{r['p50']:.3f},{r['p99']:.3f},{r['rps']:.2f},{r['n']}")
    for row in overhead_rows:
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
