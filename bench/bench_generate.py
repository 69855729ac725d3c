"""LLM decoding end to end: Hugging Face generate() with `model.forward = torch.compile(model.forward,
backend=...)` under torch.compile's default settings, kfuse against eager and Inductor, each
provider in its own process (built once, warmed up, then timed).

    python bench/bench_generate.py [--models gpt2,llama,mistral] [--batch 1,4] [--prompt 128] [--new 128]
                                   [--providers eager,inductor,kfuse] [--cache dynamic|static] [--rounds 3]
                                   [--device cpu|cuda] [--dtype float32|bfloat16]

Models: random weights from configs (seeded), GPT-2-style (MHA, GELU MLP), Llama-style (GQA 8/2,
RMSNorm, SwiGLU, rotary) and Mistral-style (Llama's with a sliding window), --layers/--hidden sized.
Prefill: median ms of generate(max_new_tokens=1). Decode: (N - 1) tokens over the median time of
generate(N) minus that of generate(1), as tokens/s. Roofline: a decode step reads every weight once
(batch 1 is a GEMV per linear): parameter bytes per step / step time, as a fraction of the copy
bandwidth the same process measures (bytes read + written per second copying a 256 MB tensor, on the
model's device). `--device cuda` runs the models on the GPU (kfuse's Triton backend), timed with the
GPU synchronised after each generate().
RSS MB: the process's resident memory after those runs (model, compiled programs, caches).
Every provider's tokens are compared with eager's. "inductor-max" (mode="max-autotune-no-cudagraphs")
is available, not run by default: on this CPU it spends minutes tuning.
`--lengths 100,77,...` also times prompts of lengths not seen before (after the run above): the
first generate(1) of each (what a new prompt length costs: compiling, then the prefill), the
median over those lengths, the steady prefill at those lengths, and the resident memory they added.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import THREADS, commit, machine  # noqa: E402

VOCAB = 8192


def build(arch: str, layers: int, hidden: int, prompt: int, new: int):
    import transformers
    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = transformers.GPT2Config(n_layer=layers, n_embd=hidden, n_head=hidden // 64, vocab_size=VOCAB,
                                      n_positions=prompt + new + 8, bos_token_id=0, eos_token_id=0)
        return transformers.GPT2LMHeadModel(cfg).eval()
    common = dict(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                  num_attention_heads=hidden // 64, num_key_value_heads=max(1, hidden // 256), vocab_size=VOCAB,
                  bos_token_id=0, eos_token_id=0, max_position_embeddings=prompt + new + 8)
    if arch == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(**common)).eval()
    return transformers.MistralForCausalLM(transformers.MistralConfig(**common, sliding_window=prompt + new // 2)).eval()


def _sync(device: str):
    if device == "cuda":
        torch.cuda.synchronize()


def bandwidth_gbs(device: str = "cpu") -> float:
    """Copy bandwidth, bytes read + written per second (median of 5)."""
    import time
    src = torch.randn(64 << 20, device=device)          # 256 MB
    dst = torch.empty_like(src)
    ts = []
    for _ in range(6):
        _sync(device)
        t = time.perf_counter()
        dst.copy_(src)
        _sync(device)
        ts.append(time.perf_counter() - t)
    return 2 * src.numel() * 4 / sorted(ts[1:])[2] / 1e9


def child(a):
    import time
    torch.set_num_threads(int(THREADS))
    model = build(a.arch, a.layers, a.hidden, a.prompt, a.new).to(a.device, getattr(torch, a.dtype))
    ids = torch.randint(1, VOCAB, (a.b, a.prompt), generator=torch.Generator().manual_seed(1)).to(a.device)
    kw = dict(do_sample=False, **({"cache_implementation": "static"} if a.cache == "static" else {}))
    if a.provider != "eager":
        backend = "kfuse" if a.provider == "kfuse" else "inductor"
        if backend == "kfuse":
            import kfuse  # noqa: F401 - registers the backend where kfuse runs from a source tree (no entry point)
        mode = "max-autotune-no-cudagraphs" if a.provider == "inductor-max" else None
        model.forward = torch.compile(model.forward, backend=backend, mode=mode)

    def gen(n):
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=n, min_new_tokens=n, **kw)
        _sync(a.device)
        return out

    t = time.perf_counter()
    tokens = gen(a.new)            # compiles (prefill and decode graphs) and warms up
    first_s = time.perf_counter() - t
    gen(1)
    t1, tn = [], []
    for _ in range(a.rounds):
        for n, ts in ((1, t1), (a.new, tn)):
            t = time.perf_counter()
            gen(n)
            ts.append(time.perf_counter() - t)
    med = lambda v: sorted(v)[len(v) // 2]   # noqa: E731
    rss = lambda: int(open("/proc/self/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20  # noqa: E731
    step = (med(tn) - med(t1)) / (a.new - 1)
    out = {"prefill_ms": med(t1) * 1e3, "step_ms": step * 1e3, "tok_s": a.b / step, "first_s": first_s,
           "rss_mb": rss(), "tokens": tokens.tolist(),
           "weight_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
           "bandwidth_gbs": bandwidth_gbs(a.device), "spread_ms": [(min(tn) - max(t1)) / (a.new - 1) * 1e3,
                                                          (max(tn) - min(t1)) / (a.new - 1) * 1e3]}
    if a.lengths:
        before, first, steady = rss(), [], []
        for n in map(int, a.lengths.split(",")):
            ids = torch.randint(1, VOCAB, (a.b, n), generator=torch.Generator().manual_seed(n)).to(a.device)
            for ts in (first, steady):
                t = time.perf_counter()
                gen(1)
                ts.append(time.perf_counter() - t)
        out["new_length"] = {"first_s": med(first), "prefill_ms": med(steady) * 1e3, "rss_mb": rss() - before}
    if a.provider == "kfuse":
        import kfuse.dynamo
        out["kfuse"] = [g.summary() for g in kfuse.dynamo.compilations()]
    print("RESULT " + json.dumps(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="gpt2,llama,mistral")
    ap.add_argument("--batch", default="1,4")
    ap.add_argument("--providers", default="eager,inductor,kfuse")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--layers", type=int, default=6)
    ap.add_argument("--hidden", type=int, default=512)
    ap.add_argument("--cache", default="dynamic", choices=["dynamic", "static"])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--lengths", default="", help="prompt lengths not seen before, timed after the run")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ap.add_argument("--child", nargs=3, metavar=("ARCH", "BATCH", "PROVIDER"))
    ap.add_argument("--verbose", action="store_true", help="print kfuse's strategy per Dynamo graph")
    a = ap.parse_args()
    if a.child:
        a.arch, a.b, a.provider = a.child[0], int(a.child[1]), a.child[2]
        return child(a)
    providers = a.providers.split(",")
    where = torch.cuda.get_device_name() if a.device == "cuda" else f"{machine()}, {THREADS} threads"
    print(f"{where}, commit {commit()}, torch {torch.__version__}, {a.dtype}; {a.layers} layers, "
          f"hidden {a.hidden}, vocab {VOCAB}; prompt {a.prompt} -> {a.new} new tokens, {a.cache} KV cache")
    print(f"{'model':<9}{'batch':>5}  {'provider':<13}{'prefill ms':>11}{'decode tok/s':>14}{'ms/token':>10}"
          f"{'roofline':>10}{'1st call s':>11}{'RSS MB':>8}  tokens")
    for arch in a.models.split(","):
        for b in map(int, a.batch.split(",")):
            res = {}
            for p in providers:
                cmd = [sys.executable, __file__, "--child", arch, str(b), p, *sys.argv[1:]]
                r = subprocess.run(cmd, capture_output=True, text=True)
                line = next((x for x in r.stdout.splitlines() if x.startswith("RESULT ")), None)
                if line is None:
                    print(f"{arch:<9}{b:>5}  {p:<13} failed: {(r.stderr.strip().splitlines() or ['?'])[-1][:150]}")
                    continue
                res[p] = json.loads(line[7:])
            for p, r in res.items():
                same = "=" if "eager" not in res or r["tokens"] == res["eager"]["tokens"] else "DIFFER"
                roof = r["weight_bytes"] / (r["step_ms"] / 1e3) / (r["bandwidth_gbs"] * 1e9)
                print(f"{arch:<9}{b:>5}  {p:<13}{r['prefill_ms']:>11.1f}{r['tok_s']:>14.1f}{r['step_ms']:>10.2f}"
                      f"{roof:>10.0%}{r['first_s']:>11.1f}{r['rss_mb']:>8.0f}  {same}")
                if "new_length" in r:
                    nl = r["new_length"]
                    print(f"{'':<16}new prompt lengths {a.lengths}: first call {nl['first_s']:.2f} s (median), then "
                          f"prefill {nl['prefill_ms']:.1f} ms; resident memory +{nl['rss_mb']:.0f} MB")
                if a.verbose and "kfuse" in r:
                    for s in r["kfuse"]:
                        print("      " + s)
            if "kfuse" in res:
                k = res["kfuse"]["step_ms"]
                ratios = ", ".join(f"{k / res[p]['step_ms']:.2f}x {p}'s" for p in res if p != "kfuse")
                print(f"{'':<16}kfuse decode step time: {ratios}")


if __name__ == "__main__":
    main()
