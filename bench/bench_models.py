"""End-to-end models: kfuse vs PyTorch eager, torch.compile (Inductor) and ONNX Runtime, side by side.

    python bench/bench_models.py [--models minilm-b1,minilm-b8,gpt2,llama] [--rounds N] [--profile]
    python bench/bench_models.py --models mobilenetv3-b1,efficientnet_b0-b1,convnext_tiny-b1,regnety_1_6gf-b1,unet-b1

Models: the real all-MiniLM-L6-v2 (BertModel, tests/helpers.minilm()) at batch 1 and batch 8
x seq 128 with padding masks; the built-in GPT-2-style (hidden 384, 6 layers) and Llama-style (hidden
512, 8 layers, GQA 8/2 heads, FFN 1408) at batch 1 x seq 128. Everyone gets the same inputs and 2
threads (common.py re-executes the script with the malloc thresholds and thread variables set).
Competitors, each tried in every configuration listed, all timed in the same rotation:
  - torch.compile: default; freezing + dynamic=False; freezing + dynamic=True, each compiled in a
    fresh (never compiled) copy of the model;
  - ONNX Runtime (ORT_ENABLE_ALL): the dynamo and the TorchScript (legacy) exports, and each passed
    through onnxruntime.transformers' optimizer (model_type bert / gpt2) where that applies.
A configuration that fails (export error, optimizer crash) is printed with its reason and skipped.
The torch-based providers (kfuse, eager, Inductor) are timed in one rotation, then each ONNX Runtime
session alone: ORT's spinning intra-op threads otherwise slow whatever runs after them. `--only inductor` or `--only ort`
keeps one competitor family (kfuse and eager always run).
Every provider is checked against eager (max abs error) before timing. `--profile` times every
kernel of kfuse's compiled program and prints where the time goes, by kernel name and backend.
"""
from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time
import traceback

from common import ROUNDS, commit, machine, measure  # re-executes with the malloc/thread env first

import torch
import torch.utils._pytree as pytree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
THREADS = torch.get_num_threads()

import kfuse  # noqa: E402
from kfuse.models import CNN_MODELS, build, token_inputs  # noqa: E402

MODELS = ["minilm-b1", "minilm-b8", "gpt2", "llama", "resnet50-b1", "mobilenetv2-b1"]
# every built-in CNN, as NAME-bBATCH (not run by default): resnet50, mobilenetv2, mobilenetv3, efficientnet_b0,
# convnext_tiny, regnety_1_6gf (224x224) and unet (64x64)
CNNS = [f"{name}-b1" for name in CNN_MODELS]


def make_model(name: str):
    """(eager module, example inputs, ONNX transformer-optimizer args or None)."""
    if name.startswith("minilm"):
        from helpers import minilm
        model = minilm()[0].auto_model.eval()
        batch = int(name.split("-b")[1])
        cfg = model.config
        return model, token_inputs(batch, 128, vocab=cfg.vocab_size), dict(
            model_type="bert", num_heads=cfg.num_attention_heads, hidden_size=cfg.hidden_size)
    if name == "gpt2":
        model, inputs = build("gpt2", batch=1, seq=128)
        return model, inputs, dict(model_type="gpt2", num_heads=model.blocks[0].heads, hidden_size=384)
    if name == "llama":
        model, inputs = build("llama", batch=1, seq=128)
        return model, inputs, None      # ORT's transformer optimizer has no Llama type
    arch, _, batch = name.partition("-b")
    if arch in CNN_MODELS:     # resnet50-b1, mobilenetv2-b8, ...: at the model's own size (IMAGE_MODELS)
        model, inputs = build(arch, batch=int(batch or 1))
        return model, inputs, None
    raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS + CNNS[2:])}")


def leaves(out) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def fail(what: str, e: BaseException):
    msg = str(e).strip().splitlines()
    print(f"  {what}: FAILED, {type(e).__name__}: {msg[0][:200] if msg else ''}")


# -- competitors ------------------------------------------------------------------------------------

INDUCTOR = {  # name: (freezing, dynamic)
    "default": (False, None),
    "freezing+static": (True, False),
    "freezing+dynamic": (True, True),
}


def inductor_providers(fresh_copies: dict, inputs) -> dict:
    """torch.compile of a fresh copy per configuration; compiled (first calls) under its own config."""
    import torch._inductor.config as icfg
    torch._dynamo.reset()            # the previous model's compiled frames are no longer used
    for limit in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 64)
    out = {}
    for cfgname, (freezing, dynamic) in INDUCTOR.items():
        icfg.freezing = freezing
        try:
            t0 = time.perf_counter()
            c = torch.compile(fresh_copies[cfgname], dynamic=dynamic)
            with torch.no_grad():
                for _ in range(3):
                    c(*inputs)
            print(f"  inductor {cfgname}: compiled in {time.perf_counter() - t0:.1f} s")
            out[f"inductor:{cfgname}"] = (lambda c=c: c(*inputs))
        except Exception as e:  # noqa: BLE001 - report and move on
            fail(f"inductor {cfgname}", e)
        finally:
            icfg.freezing = False
    return out


def ort_session(path: str):
    import onnxruntime as ort
    so = ort.SessionOptions()
    so.intra_op_num_threads, so.inter_op_num_threads = THREADS, 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def ort_feeds(sess, inputs, names=("input_ids", "attention_mask")):
    ins = sess.get_inputs()
    by_name = dict(zip(names, inputs))
    if len(ins) == len(inputs):
        return {i.name: t.numpy() for i, t in zip(ins, inputs)}
    return {i.name: by_name[i.name].numpy() for i in ins}     # an exporter dropped an unused input


def optimize_in_subprocess(src: str, dst: str, opt: dict) -> str | None:
    """onnxruntime.transformers' optimizer in a child process, since it may crash hard. None if fine."""
    code = ("import sys; from onnxruntime.transformers import optimizer as o\n"
            f"m = o.optimize_model({src!r}, model_type={opt['model_type']!r}, num_heads={opt['num_heads']},"
            f" hidden_size={opt['hidden_size']})\n"
            "print('fused ops:', {k: v for k, v in m.get_fused_operator_statistics().items() if v})\n"
            f"m.save_model_to_file({dst!r})\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if p.returncode != 0 or not os.path.exists(dst):
        tail = [line for line in (p.stderr or p.stdout).strip().splitlines() if line.strip()]
        return f"exit {p.returncode}: {tail[-1][:200] if tail else '(no message)'}"
    print("   ", p.stdout.strip().splitlines()[-1][:300])
    return None


class Positional(torch.nn.Module):
    """The model called as f(input_ids, attention_mask) -> tuple of tensors, for the exporters (the
    TorchScript one passes a Hugging Face model's keyword defaults twice when called directly)."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids, attention_mask):
        return tuple(leaves(self.model(input_ids, attention_mask=attention_mask)))


def ort_providers(model, inputs, opt: dict | None, tmp: str) -> dict:
    out = {}
    tokens = len(inputs) == 2 and not inputs[0].dtype.is_floating_point
    model = Positional(model).eval() if tokens else model.eval()
    names = ["input_ids", "attention_mask"] if tokens else [f"input{i}" for i in range(len(inputs))]
    for exporter, dynamo in (("dynamo", True), ("legacy", False)):
        path = os.path.join(tmp, f"{exporter}.onnx")
        try:
            t0 = time.perf_counter()
            kw = dict(dynamo=True, optimize=True) if dynamo else dict(dynamo=False, opset_version=17)
            torch.onnx.export(model, tuple(inputs), path, input_names=names, **kw)
            print(f"  onnx export ({exporter}): {time.perf_counter() - t0:.1f} s")
        except Exception as e:  # noqa: BLE001
            fail(f"onnx export ({exporter})", e)
            continue
        variants = [(f"ort:{exporter}", path)]
        if opt is not None:
            dst = os.path.join(tmp, f"{exporter}_opt.onnx")
            why = optimize_in_subprocess(path, dst, opt)
            if why:
                print(f"  ORT transformer optimizer ({opt['model_type']}) on the {exporter} export: FAILED, {why}")
            else:
                variants.append((f"ort:{exporter}+opt({opt['model_type']})", dst))
        for name, p in variants:
            try:
                sess = ort_session(p)
                feeds = ort_feeds(sess, inputs)
                sess.run(None, feeds)
                out[name] = (lambda s=sess, f=feeds: s.run(None, f))
            except Exception as e:  # noqa: BLE001
                fail(name, e)
    return out


# -- checking, timing, reporting --------------------------------------------------------------------

def max_err(got, ref: list[torch.Tensor]) -> float:
    got = [torch.as_tensor(g) for g in (got if isinstance(got, list) else leaves(got))]
    if len(got) < len(ref) and len(got) >= 1:
        ref = ref[:len(got)]
    return max((g.float() - r.float()).abs().max().item() for g, r in zip(got, ref))


def best(res: dict, prefix: str):
    names = [n for n in res if n.startswith(prefix)]
    if not names:
        return None
    n = min(names, key=lambda n: res[n]["ms"])
    return n, res[n]


def profile_kfuse(cm, inputs, calls: int = 20):
    """Time every kernel of kfuse's last compiled program in place (each callable the generated
    wrapper calls, k<i> in its globals, wrapped with a timer) and print the time by name/backend."""
    prog = cm._last
    infos = prog.report.kernels
    spent = [0.0] * len(prog.kernels)
    glob = prog._fn.__globals__

    def timed(i, k):
        def run(*args):
            t0 = time.perf_counter()
            r = k(*args)
            spent[i] += time.perf_counter() - t0
            return r
        return run
    bound = {i: k.fn for i, k in enumerate(prog.kernels) if k.inline is None}   # views are inlined: no call
    if any(glob.get(f"k{i}") is not fn for i, fn in bound.items()):
        print("  kfuse profile: the generated wrapper no longer binds kernels as k<i>; skipped")
        return
    flat = pytree.tree_leaves(inputs)
    try:
        for i, fn in bound.items():
            glob[f"k{i}"] = timed(i, fn)
        with torch.no_grad():
            for _ in range(3):
                cm(*inputs)
            spent[:] = [0.0] * len(spent)
            t0 = time.perf_counter()
            for _ in range(calls):
                prog(flat)
            wall = (time.perf_counter() - t0) / calls * 1e3
    finally:
        for i, fn in bound.items():
            glob[f"k{i}"] = fn
    by: dict[tuple, list] = {}
    for i, info in enumerate(infos):
        key = (info.name, info.backend)
        e = by.setdefault(key, [0.0, 0, 0])
        e[0] += spent[i] / calls * 1e3
        e[1] += 1
        e[2] += info.flops
    total = sum(e[0] for e in by.values())
    print(f"\n  kfuse profile: {len(infos)} kernels, {total:.2f} ms inside kernels, {wall:.2f} ms per call "
          f"with the timers ({wall - total:.2f} ms Python glue + timer overhead)")
    print(f"  {'kernel':<30}{'backend':<26}{'count':>6}{'ms/call':>9}{'%':>6}{'GFLOP/s':>9}")
    for (name, backend), (ms, n, fl) in sorted(by.items(), key=lambda kv: -kv[1][0])[:15]:
        gf = f"{fl / ms / 1e6:9.1f}" if fl and ms > 0 else f"{'':>9}"
        print(f"  {name[:29]:<30}{backend[:25]:<26}{n:>6}{ms:>9.3f}{ms / total * 100:>6.1f}{gf}")


def bench_model(name: str, rounds: int, profile: bool, only: tuple = ()) -> dict | None:
    print(f"\n=== {name} ===")
    model, inputs, opt = make_model(name)
    # fresh, never-compiled copies for every compiler, made before anything is compiled
    copies = {k: copy.deepcopy(model) for k in ["kfuse", *INDUCTOR]}
    with torch.no_grad():
        ref = leaves(model(*inputs))
    providers = {}
    t0 = time.perf_counter()
    try:
        cm = kfuse.compile(copies["kfuse"], tuple(inputs))
        cm(*inputs)
        print(f"  kfuse: compiled in {time.perf_counter() - t0:.1f} s, {len(cm.report().kernels)} kernels")
        providers["kfuse"] = lambda: cm(*inputs)
    except Exception as e:  # noqa: BLE001
        fail("kfuse", e)
        traceback.print_exc()
        cm = None
    providers["eager"] = lambda: model(*inputs)
    if not only or "inductor" in only:
        providers.update(inductor_providers(copies, inputs))
    with tempfile.TemporaryDirectory() as tmp:
        if not only or "ort" in only:
            providers.update(ort_providers(model, inputs, opt, tmp))

    print("  max abs error against eager:")
    for n, f in list(providers.items()):
        try:
            with torch.no_grad():
                err = max_err(f(), ref)
            print(f"    {n:<32}{err:.2e}")
            if not err <= 1e-4 * max(1.0, max(r.abs().max().item() for r in ref)):
                print(f"    {n}: error too large (computes another function), not timed")
                del providers[n]
        except Exception as e:  # noqa: BLE001
            fail(n, e)
            del providers[n]

    # ONNX Runtime's intra-op threads keep spinning after its calls and slow whatever torch-based
    # provider runs next in the process (measured on MiniLM b1: kfuse 7.6 ms alone or beside Inductor,
    # 10.3 ms median when rotated with three ORT sessions; Inductor 8.8 -> 9.1-10.0). So the torch
    # family (kfuse, eager, Inductor) and the ORT family are each timed in their own rotation.
    # For the same reason each ORT session is timed alone: rotated together, each session's spinning
    # threads slowed the next one (GPT-2, dynamo export: p10 7.95 ms, median 9.43 ms).
    torch_family = {n: f for n, f in providers.items() if not n.startswith("ort:")}
    res = measure(torch_family, rounds, block_s=0.1)
    for n, f in providers.items():
        if n.startswith("ort:"):
            res.update(measure({n: f}, rounds, block_s=0.1))
    print(f"\n  {name}: median over {rounds} rounds, {THREADS} threads")
    print(f"  {'provider':<32}{'median ms':>10}{'p10-p90 ms':>18}{'calls/block':>12}{'faults/call':>12}")
    for n, r in sorted(res.items(), key=lambda kv: kv[1]["ms"]):
        print(f"  {n:<32}{r['ms']:>10.3f}{r['p10']:>9.3f}-{r['p90']:<8.3f}{r['calls']:>12}{r['faults']:>12.1f}")
    if profile and cm is not None:
        profile_kfuse(cm, inputs)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS))
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--profile", action="store_true", help="time each kfuse kernel and print the top 15")
    ap.add_argument("--only", default="", help="comma-separated competitor families to include besides "
                    "kfuse and eager: inductor, ort (default: all)")
    a = ap.parse_args()
    mach, com = machine(), commit()
    print(f"{mach}, commit {com}, torch {torch.__version__}, {THREADS} threads, "
          f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_')}")
    results = {}
    for name in a.models.split(","):
        try:
            results[name] = bench_model(name, a.rounds, a.profile, tuple(filter(None, a.only.split(","))))
        except Exception as e:  # noqa: BLE001 - one model failing never ends the run
            fail(name, e)
            traceback.print_exc()

    print("\nmodel      | kfuse ms | eager ms | inductor ms (config)          | ORT ms (config)                  "
          "| kfuse / best other")
    rows = []
    for name, res in results.items():
        if not res:
            continue
        ind, ort = best(res, "inductor:"), best(res, "ort:")
        others = [r["ms"] for n, r in res.items() if n != "kfuse"]
        k = res.get("kfuse")
        cell = lambda b, p: f"{b[1]['ms']:6.2f} ({b[0][len(p):]})" if b else "failed"
        ratio = f"{k['ms'] / min(others):.2f}x" if k and others else "-"
        print(f"{name:<11}| {k['ms'] if k else float('nan'):8.2f} | {res['eager']['ms']:8.2f} | "
              f"{cell(ind, 'inductor:'):<30}| {cell(ort, 'ort:'):<33}| {ratio}")
        rows += [(name, n, r) for n, r in res.items()]
    print("\nCSV,machine,commit,model,provider,median_ms,p10,p90")
    for name, n, r in rows:
        print(f"CSV,{mach},{com},{name},{n},{r['ms']:.4f},{r['p10']:.4f},{r['p90']:.4f}")


if __name__ == "__main__":
    main()
