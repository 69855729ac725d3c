"""The Triton backend on a CUDA GPU: fused memory-bound kernels, attention and whole models.

    python bench/bench_gpu.py [--quick] [--csv out.csv] [--only memory,attention,models]

Providers side by side, medians over rotated rounds (CUDA events), ratios against eager:
  - memory-bound kernels (add+LayerNorm, RMSNorm, SwiGLU, GeGLU, bias+GELU, scale+mask+softmax,
    rotary) in GB/s of the bytes the fused kernel must move, next to a device-to-device copy of the
    same bytes: eager, torch.compile, Liger-Kernel (where importable), kfuse backend="triton";
  - attention (causal and not, MHA and GQA): TFLOP/s of kfuse's Triton kernel vs SDPA; decode
    attention (one query, GQA and MHA): GB/s of the keys and values read, vs SDPA;
  - the built-in BERT and Llama end to end in bf16: eager, torch.compile (default, and reduce-overhead:
    CUDA graphs), kfuse (CUDA graph replay where it measures faster).
Exits cleanly with a message where there is no CUDA device. Sized to finish in under 5 minutes on an
H200 (fewer rounds with --quick). Measured numbers: bench/README.md, "The Triton backend on an H200".
"""
from __future__ import annotations

import argparse
import collections
import csv
import statistics
import sys
import time

import torch
import torch.nn.functional as F

ROUNDS, REPS = 7, 20


def _time_ms(fn, reps: int) -> float:
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def measure(providers: dict, rounds: int, reps: int) -> dict:
    """Median ms per provider: each warmed up once, then timed in rotated order each round."""
    live = {}
    for name, fn in providers.items():
        try:
            for _ in range(3):          # kfuse: the first call tunes, the second captures a CUDA graph (Inductor: the third)
                fn()
            torch.cuda.synchronize()
            live[name] = fn
        except Exception as e:       # noqa: BLE001 - a provider that cannot run this case is listed as such
            print(f"    {name}: skipped ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
    times = {n: [] for n in live}
    names = list(live)
    if not names:
        return {}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            times[n].append(_time_ms(live[n], reps))
    return {n: statistics.median(t) for n, t in times.items()}


def _compiled(fn, **kw):
    try:
        return torch.compile(fn, dynamic=False, **kw)
    except Exception:                # noqa: BLE001
        return None


def _kfuse(module, inputs):
    import kfuse
    return kfuse.compile(module.eval(), tuple(inputs), backend="triton")


class Fn(torch.nn.Module):
    def __init__(self, fn, *params):
        super().__init__()
        self.fn = fn
        self.params = torch.nn.ParameterList([torch.nn.Parameter(p, requires_grad=False) for p in params])

    def forward(self, *xs):
        return self.fn(*xs, *self.params)


def _liger():
    try:
        import liger_kernel.ops as lk   # noqa: F401
        from liger_kernel.transformers import functional as lf
        return lf
    except Exception:                # noqa: BLE001
        return None


def memory_cases(dtype):
    d = dict(device="cuda", dtype=dtype)
    H = 4096
    x, r = torch.randn(8192, H, **d), torch.randn(8192, H, **d)
    w, b = torch.randn(H, **d), torch.randn(H, **d)
    a, g = torch.randn(8192, 11008, **d), torch.randn(8192, 11008, **d)
    s, mask = torch.randn(8, 16, 1024, 1024, **d), torch.zeros(8, 1, 1, 1024, **d)
    q = torch.randn(8, 32, 1024, 128, **d)
    cos, sin = torch.randn(1024, 128, **d), torch.randn(1024, 128, **d)
    x4, r4 = torch.randn(32768, H, **d), torch.randn(32768, H, **d)

    def rope(q, cos, sin):
        q1, q2 = q[..., :64], q[..., 64:]
        return q * cos + torch.cat((-q2, q1), -1) * sin
    lf = _liger()
    liger = {}
    if lf is not None:      # only the functions this Liger-Kernel version has
        cands = {"rmsnorm": ("liger_rms_norm", lambda f: f(x, w, 1e-6)), "swiglu": ("liger_swiglu", lambda f: f(a, g)),
                 "geglu": ("liger_geglu", lambda f: f(a, g)),
                 "layernorm": ("liger_layer_norm", lambda f: f(x + r, w, b, 1e-5)),
                 "rmsnorm_large": ("liger_rms_norm", lambda f: f(x4, w, 1e-6)),
                 "layernorm_large": ("liger_layer_norm", lambda f: f(x4 + r4, w, b, 1e-5))}
        for key, (attr, call) in cands.items():
            if hasattr(lf, attr):
                liger[key] = (lambda c=call, f=getattr(lf, attr): c(f))
    return [
        ("add+LayerNorm [8192,4096]", lambda x, r, w, b: F.layer_norm(x + r, (H,), w, b, 1e-5), [x, r], [w, b],
         liger.get("layernorm")),
        ("RMSNorm [8192,4096]", lambda x, w: x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype) * w,
         [x], [w], liger.get("rmsnorm")),
        ("SwiGLU [8192,11008]", lambda a, g: F.silu(a) * g, [a, g], [], liger.get("swiglu")),
        ("GeGLU [8192,11008]", lambda a, g: F.gelu(a, approximate="tanh") * g, [a, g], [], liger.get("geglu")),
        ("bias+GELU [8192,11008]", lambda a, b2: F.gelu(a + b2), [a], [torch.randn(11008, **d)], None),
        ("scale+mask+softmax [8,16,1024,1024]", lambda s, m: torch.softmax(s * 0.125 + m, -1), [s, mask], [], None),
        ("rotary [8,32,1024,128]", rope, [q, cos, sin], [], None),
        # four times the rows: a call's CPU time (tens of microseconds) a smaller share of the kernel's
        ("add+LayerNorm [32768,4096]", lambda x, r, w, b: F.layer_norm(x + r, (H,), w, b, 1e-5), [x4, r4], [w, b],
         liger.get("layernorm_large")),
        ("RMSNorm [32768,4096]", lambda x, w: x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype) * w,
         [x4], [w], liger.get("rmsnorm_large")),
    ]


def bench_memory(dtype, rounds, reps, rows):
    print(f"\nfused memory-bound kernels, {dtype}: GB/s of the bytes the fused kernel moves (median ms)")
    for name, fn, inputs, params, liger in memory_cases(dtype):
        module = Fn(fn, *params)
        nbytes = sum(t.numel() * t.element_size() for t in inputs + params)
        with torch.no_grad():
            out = module(*inputs)
        nbytes += out.numel() * out.element_size()
        src = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
        dst = torch.empty_like(src)
        providers = {"copy": lambda: dst.copy_(src), "eager": lambda: module(*inputs)}
        # one lambda's code for every case: without a reset, Dynamo's recompile limit (8) sends the ninth to eager
        torch._dynamo.reset()
        comp = _compiled(lambda *xs, _f=fn, _p=tuple(params): _f(*xs, *_p))   # (a module holding a lambda fails in Dynamo)
        if comp is not None:
            providers["torch.compile"] = lambda: comp(*inputs)
        if liger is not None:
            providers["liger"] = liger
        try:
            cm = _kfuse(module, inputs)
            providers["kfuse"] = lambda: cm(*inputs)
        except Exception as e:        # noqa: BLE001
            cm = None
            print(f"    kfuse: failed to compile ({type(e).__name__}: {e})")
        with torch.no_grad():
            ms = measure(providers, rounds, reps)
        _print_row(name, ms, nbytes, "GB/s", lambda t: nbytes / t / 1e6, rows)
        if cm is not None:
            _print_kfuse(cm, module, inputs)


def bench_attention(rounds, reps, rows):
    from kfuse.backends.triton.attention import attention
    print("\nattention, bf16: TFLOP/s (median ms)")
    for B, H, Hkv, L, D, causal in [(4, 32, 32, 4096, 128, False), (4, 32, 32, 4096, 128, True),
                                    (4, 32, 8, 4096, 128, True), (16, 16, 16, 1024, 64, False)]:
        d = dict(device="cuda", dtype=torch.bfloat16)
        q, k, v = torch.randn(B, H, L, D, **d), torch.randn(B, Hkv, L, D, **d), torch.randn(B, Hkv, L, D, **d)
        scale = D ** -0.5
        flops = 4 * B * H * L * L * D * (0.5 if causal else 1.0)
        rep = H // Hkv
        kk, vv = (k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)) if rep > 1 else (k, v)
        providers = {
            "sdpa": lambda: F.scaled_dot_product_attention(q, kk, vv, is_causal=causal, scale=scale),
            "kfuse": lambda: attention(q, k, v, scale=scale, causal=causal),
        }
        ms = measure(providers, rounds, reps)
        name = f"attn B{B} H{H}/{Hkv} L{L} D{D}{' causal' if causal else ''}"
        _print_row(name, ms, None, "TFLOP/s", lambda t: flops / t / 1e9, rows)
        _print_config()
    print("\ndecode attention, bf16: GB/s of the keys and values read (median ms)")
    for B, H, Hkv, L in [(1, 32, 8, 8192), (4, 32, 8, 4096), (1, 32, 32, 4096)]:
        d = dict(device="cuda", dtype=torch.bfloat16)
        q, k, v = torch.randn(B, H, 1, 128, **d), torch.randn(B, Hkv, L, 128, **d), torch.randn(B, Hkv, L, 128, **d)
        rep = H // Hkv
        kk, vv = (k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)) if rep > 1 else (k, v)
        nbytes = 2 * k.numel() * k.element_size()
        sdpa = lambda: F.scaled_dot_product_attention(q, kk, vv, scale=128 ** -0.5)    # noqa: E731
        ours = lambda: attention(q, k, v, scale=128 ** -0.5)                            # noqa: E731
        # one call each is CPU-bound at these sizes: replayed from a CUDA graph, the GPU's time alone
        providers = {"sdpa": sdpa, "kfuse": ours, "sdpa graph": _graphed(sdpa), "kfuse graph": _graphed(ours)}
        ms = measure(providers, rounds, reps)
        _print_row(f"decode B{B} H{H}/{Hkv} L{L} D128", ms, nbytes, "GB/s", lambda t: nbytes / t / 1e6, rows)
        _print_config()


def _graphed(fn):
    """fn captured in a CUDA graph after three plain calls (the tuner times its configs in the first):
    the replay's time is the GPU's alone, no Python or launch time per call."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def _print_config():
    from kfuse.backends.triton import kernel as tk
    last = [c for (kernel, _), c in tk._chosen.items() if kernel == "attention"][-1]
    print(f"    kfuse config (BLOCK_M, BLOCK_N, warps, stages, warp-specialised, key splits): {last}")


def bench_models(rounds, reps, rows):
    from kfuse.models import build
    print("\nmodels end to end, bf16 (median ms)")
    for name, kw in [("bert", dict(batch=8, seq=512)), ("llama", dict(batch=4, seq=512))]:
        model, inputs = build(name, **kw)
        model = model.to("cuda", torch.bfloat16).eval()
        inputs = [t.cuda() for t in inputs]
        inputs = [t.to(torch.bfloat16) if t.is_floating_point() else t for t in inputs]
        providers = {"eager": lambda: model(*inputs)}
        comp = _compiled(model)
        if comp is not None:
            providers["torch.compile"] = lambda: comp(*inputs)
        graphs = _compiled(model, mode="reduce-overhead")      # Inductor with CUDA graphs
        if graphs is not None:
            providers["torch.compile reduce-overhead"] = lambda: graphs(*inputs)
        cm = None
        try:
            import kfuse
            t = time.perf_counter()
            cm = kfuse.compile(model, tuple(inputs))      # CUDA inputs: backend="triton" by default
            backends = collections.Counter(k.backend for k in cm.report().kernels)
            print(f"    kfuse compiled in {time.perf_counter() - t:.1f} s; kernels: {dict(backends)}; "
                  f"fusions: {cm.report().fusions}")
            providers["kfuse"] = lambda: cm(*inputs)
        except Exception as e:        # noqa: BLE001
            print(f"    kfuse: failed to compile ({type(e).__name__}: {str(e)[:200]})")
        with torch.no_grad():
            ms = measure(providers, max(3, rounds // 2), max(3, reps // 4))
        _print_row(f"{name} {kw}", ms, None, None, None, rows)
        if cm is not None:
            _print_kfuse(cm, model, inputs)


def _print_kfuse(cm, module, inputs):
    """kfuse's largest error against eager (relative to each output's scale) and how it launched."""
    with torch.no_grad():
        want = module(*inputs)
        got = cm(*inputs)
    want = [want] if isinstance(want, torch.Tensor) else list(want)
    got = [got] if isinstance(got, torch.Tensor) else list(got)
    rel = max(((g.float() - w.float()).abs().max() / w.float().abs().max().clamp_min(1e-30)).item()
              for g, w in zip(got, want))
    print(f"    kfuse vs eager: max error {rel:.2e} of the output's scale; launch: {cm.report().launch or '-'}; "
          f"CPU time per call {_cpu_us(lambda: cm(*inputs)):.0f} us")


def _cpu_us(fn, n: int = 100) -> float:
    """Microseconds of CPU time per call, the GPU not waited for: where this exceeds the GPU's time per
    call, back-to-back calls are bound by the host."""
    with torch.no_grad():
        fn()
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(n):
            fn()
        us = (time.perf_counter() - t) / n * 1e6
        torch.cuda.synchronize()
    return us


def _print_row(name, ms, nbytes, unit, rate, rows):
    base = ms.get("eager") or ms.get("sdpa")
    cells = []
    for p, t in ms.items():
        cell = f"{p} {t:.4f} ms"
        if rate is not None:
            cell += f" {rate(t):.0f} {unit}"
        if base and p not in ("eager", "sdpa", "copy"):
            cell += f" ({base / t:.2f}x)"
        cells.append(cell)
        rows.append({"case": name, "provider": p, "ms": f"{t:.5f}", unit or "rate": f"{rate(t):.2f}" if rate else ""})
    print(f"  {name:40s} " + " | ".join(cells))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer rounds")
    ap.add_argument("--csv", help="write one row per measurement")
    ap.add_argument("--only", default="memory,attention,models", help="sections to run (comma-separated)")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu.py: no CUDA device here; this benchmark measures the Triton backend on a GPU. Nothing run.")
        return 0
    try:
        import triton
    except ImportError:
        print("bench_gpu.py: Triton is not installed (pip install triton). Nothing run.")
        return 0
    rounds, reps = (3, 5) if args.quick else (ROUNDS, REPS)
    print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    rows: list[dict] = []
    sections = {"memory": lambda: bench_memory(torch.bfloat16, rounds, reps, rows),
                "attention": lambda: bench_attention(rounds, reps, rows), "models": lambda: bench_models(rounds, reps, rows)}
    for name in args.only.split(","):
        sections[name]()
    if args.csv:
        keys = sorted({k for r in rows for k in r})
        with open(args.csv, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys)
            w.writeheader()
            w.writerows(rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
