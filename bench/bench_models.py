"""End-to-end models: kfuse vs PyTorch eager, torch.compile (Inductor) and ONNX Runtime, side by side.

    python bench/bench_models.py [--models minilm-b1,minilm-b8,gpt2,llama] [--rounds N] [--repeat K] [--profile]
    python bench/bench_models.py --models cnn        # every built-in CNN at batch 1 and 8 (cnn-b1, cnn-b8: one)
    python bench/bench_models.py --models mobilenetv3-b1,unet-b8 --only ort

Models: the real all-MiniLM-L6-v2 (BertModel, tests/helpers.minilm()) at batch 1 and batch 8
x seq 128 with padding masks; the built-in GPT-2-style (hidden 384, 6 layers) and Llama-style (hidden
512, 8 layers, GQA 8/2 heads, FFN 1408) at batch 1 x seq 128; the built-in CNNs as NAME-bBATCH
(resnet50, mobilenetv2, mobilenetv3, efficientnet_b0, convnext_tiny, regnety_1_6gf at 224x224, unet at 64x64);
torchvision's classification and video models as tv:NAME-bBATCH (random weights, 224x224, Inception-v3 299x299,
video clips 8x112x112, S3D and MViT 16x224x224) where torchvision is installed (it is not a kfuse dependency).
Competitors, each tried in every configuration listed:
  - torch.compile: default; freezing + dynamic=False; freezing + dynamic=True;
  - ONNX Runtime (ORT_ENABLE_ALL): the dynamo and the TorchScript (legacy) exports, and each passed
    through onnxruntime.transformers' optimizer (model_type bert / gpt2) where that applies.
Each provider (each configuration) is built, checked and timed in its own process (`--worker MODEL
PROVIDER`, spawned by this script): ONNX Runtime's spinning intra-op threads slow torch's OpenMP pool
and each other, and Inductor's compile leaves state behind. The worker builds the model (seeded: the
same weights in every process), checks the provider's output against an eager run of it (max abs
error) and times it with common.measure. The parent exports the ONNX files once into a temp dir; the
ONNX Runtime workers load them. With `--repeat K` the whole set of processes runs K times in rotated
order and the run with the median time is reported per provider. Every child inherits this process's
env (common.py re-executes the script with the malloc thresholds and thread variables set: 2 threads).
A configuration that fails (export error, optimizer crash, wrong numbers) is printed with its reason and
skipped. `--only inductor` or `--only ort` keeps one competitor family (kfuse and eager always run);
`--only layout` adds kfuse with the channels-last pass off (`kfuse:nchw`, kfuse.compile(..., layout="nchw")).
`--only dynamic` adds kfuse through `torch.compile(model, backend="kfuse", dynamic=True)` (`kfuse:dynamic`: the
graph Dynamo hands over has symbolic sizes; its summary says how kfuse runs it), beside kfuse.compile's static
program: the cost of the symbolic path, printed as kfuse:dynamic / kfuse.
`--profile` times every kernel of kfuse's compiled program (in the kfuse worker) and prints where the
time goes, by kernel name and backend. `--baseline REV` adds `kfuse@REV`: kfuse as of git revision REV,
imported from a temporary worktree in its own process (the A/B of a change, both versions timed alike;
it is not one of the "others" the ratio is taken against, and is printed beside it):

    python bench/bench_models.py --models mobilenetv3-b1,resnet50-b1 --only ort --baseline ce107a6 --repeat 3

`--interleave` builds every provider's process first (one after another: a build's timings, kfuse's
autotuner among them, see an otherwise idle machine), then times them block by block in rotated rounds,
each still in its own process, waiting between blocks until the last worker's threads are idle (ONNX
Runtime's pool spins ~55 ms after a run). Processes timed one after another meet different spells of a
busy machine; here each round times every provider within a second or so, and the ratio of kfuse to the
fastest other is also given round by round (its median: "by round"):

    python bench/bench_models.py --models cnn-b1,gpt2,llama --only ort --interleave --rounds 15
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback

from common import (ROUNDS, Served, baseline_worktree, commit, interleaved,  # re-executes with the malloc/thread env
                    machine, measure, median_run, pct, run_worker, serve_blocks)

import torch
import torch.utils._pytree as pytree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
THREADS = torch.get_num_threads()
MODEL_BLOCK_S = 0.1     # a timed block of a model's calls lasts about this long

from kfuse.models import CNN_MODELS, build, token_inputs  # noqa: E402

MODELS = ["minilm-b1", "minilm-b8", "gpt2", "llama", "resnet50-b1", "mobilenetv2-b1"]
# every built-in CNN at batch 1 and 8, as NAME-bBATCH (not run by default): `--models cnn`, `cnn-b1`, `cnn-b8`
CNN_BATCHES = (1, 8)
SHORTHANDS = {"cnn": [f"{n}-b{b}" for n in CNN_MODELS for b in CNN_BATCHES],
              **{f"cnn-b{b}": [f"{n}-b{b}" for n in CNN_MODELS] for b in CNN_BATCHES}}


def model_names(spec: str) -> list[str]:
    """--models: comma-separated names and shorthands (cnn, cnn-b1, cnn-b8), duplicates dropped."""
    out = []
    for name in filter(None, spec.split(",")):
        for n in SHORTHANDS.get(name, [name]):
            if n not in out:
                out.append(n)
    return out


# torchvision models, random weights (`tv:NAME[-bBATCH]`; torchvision is not a kfuse dependency): the
# constructor's arguments where its defaults download weights or add training-only heads, and one sample's
# shape where it is not a 224x224 image (video models: 8 frames of 112x112)
TV_ARGS = {"inception_v3": dict(aux_logits=False, init_weights=True), "googlenet": dict(aux_logits=False, init_weights=True)}
TV_SHAPE = {"inception_v3": (3, 299, 299), "video": (3, 8, 112, 112), "s3d": (3, 16, 224, 224),
            "mvit_v1_b": (3, 16, 224, 224), "mvit_v2_s": (3, 16, 224, 224)}


def known(name: str) -> bool:
    arch, _, batch = name.partition("-b")
    if name.startswith("tv:"):
        return (not batch or batch.isdigit()) and _torchvision_model(arch[3:]) is not None
    if name.startswith("minilm"):
        return batch.isdigit()
    return name in ("gpt2", "llama") or (arch in CNN_MODELS and (not batch or batch.isdigit()))


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
    if name.startswith("tv:"):
        torch.manual_seed(0)
        ctor = _torchvision_model(arch[3:])
        video = ctor.__module__.startswith("torchvision.models.video")
        shape = TV_SHAPE.get(arch[3:], TV_SHAPE["video"] if video else (3, 224, 224))
        return ctor(weights=None, **TV_ARGS.get(arch[3:], {})).eval(), (torch.randn(int(batch or 1), *shape),), None
    if arch in CNN_MODELS:     # resnet50-b1, mobilenetv2-b8, ...: at the model's own size (IMAGE_MODELS)
        model, inputs = build(arch, batch=int(batch or 1))
        return model, inputs, None
    raise ValueError(f"unknown model {name!r}")


def _torchvision_model(arch: str):
    """torchvision.models.ARCH or torchvision.models.video.ARCH (a classification model's constructor), or None"""
    try:
        import torchvision
    except ImportError:
        return None
    return getattr(torchvision.models, arch, None) or getattr(torchvision.models.video, arch, None)


def leaves(out) -> list[torch.Tensor]:
    return [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor)]


def fail(what: str, e: BaseException | str):
    if isinstance(e, BaseException):
        msg = str(e).strip().splitlines()
        e = f"{type(e).__name__}: {msg[0][:200] if msg else ''}"
    print(f"  {what}: FAILED, {e}", flush=True)


# -- competitors ------------------------------------------------------------------------------------

INDUCTOR = {  # name: (freezing, dynamic)
    "default": (False, None),
    "freezing+static": (True, False),
    "freezing+dynamic": (True, True),
}


def inductor_provider(model, inputs, cfgname: str):
    """torch.compile of a fresh (never compiled) model under one INDUCTOR configuration, first calls made."""
    import torch._inductor.config as icfg
    for limit in ("cache_size_limit", "recompile_limit"):
        if hasattr(torch._dynamo.config, limit):
            setattr(torch._dynamo.config, limit, 64)
    freezing, dynamic = INDUCTOR[cfgname]
    icfg.freezing = freezing
    t0 = time.perf_counter()
    c = torch.compile(model, dynamic=dynamic)
    with torch.no_grad():
        for _ in range(3):
            c(*inputs)
    print(f"inductor {cfgname}: compiled in {time.perf_counter() - t0:.1f} s")
    return lambda: c(*inputs)


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


def onnx_exports(model, inputs, opt: dict | None, tmp: str) -> dict:
    """{"ort:<config>": path}: the dynamo and legacy exports into tmp, each also through the transformer
    optimizer where `opt` names a model type. Failures are printed and left out."""
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
            print(f"  onnx export ({exporter}): {time.perf_counter() - t0:.1f} s", flush=True)
        except Exception as e:  # noqa: BLE001
            fail(f"onnx export ({exporter})", e)
            continue
        out[f"ort:{exporter}"] = path
        if opt is not None:
            dst = os.path.join(tmp, f"{exporter}_opt.onnx")
            why = optimize_in_subprocess(path, dst, opt)
            if why:
                print(f"  ORT transformer optimizer ({opt['model_type']}) on the {exporter} export: FAILED, {why}")
            else:
                out[f"ort:{exporter}+opt({opt['model_type']})"] = dst
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
    """Time every kernel of kfuse's last compiled program in place (one by one through
    `Program.kernel_calls`, in the program's own arena, as its calls run them) and print the time by
    name/backend beside the time of a whole call as the user makes it (native runner included)."""
    prog = cm._last
    infos = prog.report.kernels
    spent = [0.0] * len(prog.kernels)

    def timed(i, group, fn, args):
        t0 = time.perf_counter()
        r = fn(*args)
        spent[i] += time.perf_counter() - t0
        return r
    flat = pytree.tree_leaves(inputs)
    with torch.no_grad():
        for _ in range(3):
            cm(*inputs)
        t0 = time.perf_counter()
        for _ in range(calls):
            cm(*inputs)
        wall = (time.perf_counter() - t0) / calls * 1e3
        prog.kernel_calls(flat, prog.arena_buffers(), timed)
        spent[:] = [0.0] * len(spent)
        for _ in range(calls):
            prog.kernel_calls(flat, prog.arena_buffers(), timed)
    by: dict[tuple, list] = {}
    for i, info in enumerate(infos):
        key = (info.name, info.backend)
        e = by.setdefault(key, [0.0, 0, 0])
        e[0] += spent[i] / calls * 1e3
        e[1] += 1
        e[2] += info.flops
    total = sum(e[0] for e in by.values())
    print(f"\n  kfuse profile: {len(infos)} kernels, {total:.2f} ms inside kernels timed one by one, "
          f"{wall:.2f} ms per call as a user calls it (the difference: the call's own overhead, or what "
          f"running back to back gains)")
    print(f"  {'kernel':<30}{'backend':<26}{'count':>6}{'ms/call':>9}{'%':>6}{'GFLOP/s':>9}")
    for (name, backend), (ms, n, fl) in sorted(by.items(), key=lambda kv: -kv[1][0])[:15]:
        gf = f"{fl / ms / 1e6:9.1f}" if fl and ms > 0 else f"{'':>9}"
        print(f"  {name[:29]:<30}{backend[:25]:<26}{n:>6}{ms:>9.3f}{ms / total * 100:>6.1f}{gf}")


# -- the worker: one provider of one model in this process --------------------------------------------------

def worker(model_name: str, provider: str, rounds: int, onnx: str | None, profile: bool, serve: bool = False) -> dict:
    """Build the model and the provider, check it against eager, time it (serve: the parent times it block
    by block, common.serve_blocks): the result for the parent."""
    model, inputs, _ = make_model(model_name)
    # a fresh, never-run copy for a compiler, made before the eager reference call
    fresh = copy.deepcopy(model) if provider.startswith(("kfuse", "inductor:")) else None
    with torch.no_grad():
        ref = leaves(model(*inputs))
    cm = None
    if provider.startswith("kfuse"):           # "kfuse", "kfuse:nchw" (the layout pass off), "kfuse@REV"
        import kfuse
        if "@" in provider:
            print(f"kfuse of {provider.split('@', 1)[1]}: {os.path.dirname(kfuse.__file__)}")
        t0 = time.perf_counter()
        if provider == "kfuse:dynamic":
            from kfuse.dynamo import compilations
            c = torch.compile(fresh, backend="kfuse", dynamic=True)
            with torch.no_grad():
                for _ in range(3):
                    c(*inputs)
            print(f"kfuse:dynamic: compiled in {time.perf_counter() - t0:.1f} s; "
                  + "; ".join(g.summary() for g in compilations()))
            f = lambda: c(*inputs)
        else:
            cm = kfuse.compile(fresh, tuple(inputs), **({"layout": "nchw"} if provider == "kfuse:nchw" else {}))
            cm(*inputs)
            print(f"kfuse: compiled in {time.perf_counter() - t0:.1f} s, {len(cm.report().kernels)} kernels")
            f = lambda: cm(*inputs)
    elif provider == "eager":
        f = lambda: model(*inputs)
    elif provider.startswith("inductor:"):
        f = inductor_provider(fresh, inputs, provider[len("inductor:"):])
    elif provider.startswith("ort:"):
        del model                      # only the reference was needed
        sess = ort_session(onnx)
        feeds = ort_feeds(sess, inputs)
        sess.run(None, feeds)
        f = lambda: sess.run(None, feeds)
    else:
        raise ValueError(f"unknown provider {provider!r}")
    with torch.no_grad():
        err = max_err(f(), ref)
    scale = max(1.0, max(r.abs().max().item() for r in ref))
    if not err <= 1e-4 * scale:
        return {"error": f"max abs error {err:.2e} against eager (computes another function), not timed"}
    if serve:
        serve_blocks(f, MODEL_BLOCK_S)
        res = {}
    else:
        res = measure({provider: f}, rounds, block_s=MODEL_BLOCK_S)[provider]
    res["err"] = err
    if profile and cm is not None:
        profile_kfuse(cm, inputs)
    return res


def worker_main(argv: list[str]):
    ap = argparse.ArgumentParser()
    ap.add_argument("--worker", nargs=2, metavar=("MODEL", "PROVIDER"))
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--onnx")
    ap.add_argument("--profile", action="store_true")
    ap.add_argument("--serve", action="store_true")
    a = ap.parse_args(argv)
    try:
        res = worker(*a.worker, a.rounds, a.onnx, a.profile, a.serve)
    except Exception as e:  # noqa: BLE001 - the parent prints the reason and moves on
        traceback.print_exc()
        msg = str(e).strip().splitlines()
        res = {"error": f"{type(e).__name__}: {msg[0][:200] if msg else ''}"}
    print("RESULT " + json.dumps(res), flush=True)


# -- the parent: processes per model and provider, tables ----------------------------------------------------

def bench_model(name: str, rounds: int, profile: bool, only: tuple = (), repeat: int = 1,
                baseline: tuple | None = None, interleave: bool = False) -> dict | None:
    """baseline: (revision, path of its worktree): also the provider kfuse@revision, that kfuse imported
    from the worktree (its own Python and C sources) in its own process. interleave: all the providers'
    processes built first (one after another), then timed block by block in rotated rounds."""
    print(f"\n=== {name} ===", flush=True)
    names = ["kfuse", "eager"] + (["kfuse:nchw"] if "layout" in only else [])
    names += ["kfuse:dynamic"] if "dynamic" in only else []
    names += [f"kfuse@{baseline[0]}"] if baseline else []
    if not only or "inductor" in only:
        names += [f"inductor:{c}" for c in INDUCTOR]
    with tempfile.TemporaryDirectory() as tmp:
        onnx = {}
        if not only or "ort" in only:
            try:
                model, inputs, opt = make_model(name)
                onnx = onnx_exports(model, inputs, opt, tmp)
                del model
            except Exception as e:  # noqa: BLE001 - the torch providers still run
                fail("onnx export", e)
        names += list(onnx)

        def process(n: str, first: bool) -> tuple[list, dict | None]:
            """(argv, env) of provider n's worker"""
            argv = [os.path.abspath(__file__), "--worker", name, n, "--rounds", str(rounds)]
            argv += ["--onnx", onnx[n]] if n in onnx else []
            argv += ["--profile"] if profile and n == "kfuse" and first else []
            argv += ["--serve"] if interleave else []
            env = None
            if baseline and n == f"kfuse@{baseline[0]}":
                env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, (baseline[1],
                                                                               os.environ.get("PYTHONPATH")))))
            return argv, env

        runs: dict = {n: [] for n in names}
        failed = set()

        def take(n: str, r: dict) -> bool:
            """r, a worker's result, kept for provider n; False (reported) where it is an error"""
            if "error" in r:
                fail(n, r["error"])
                failed.add(n)
                return False
            runs[n].append(r)
            return True

        if interleave:
            for n, r in interleaved_run(names, process, rounds).items():
                take(n, r)
        for turn in range(0 if interleave else repeat):   # in turns, rotated: a busy spell hits one turn
            order = names[turn % len(names):] + names[:turn % len(names)]
            if repeat > 1:
                print(f"  -- turn {turn + 1}/{repeat}: {', '.join(n for n in order if n not in failed)}", flush=True)
            for n in order:
                if n in failed:
                    continue
                if turn == 0:
                    print(f"  {n}: building in its own process", flush=True)
                r = run_worker(*process(n, turn == 0), echo="    " if turn == 0 else None)
                if take(n, r):
                    print(f"    {n}: {r['ms']:.3f} ms, max abs err {r['err']:.2e}", flush=True)
    res = {n: median_run(r) for n, r in runs.items() if r and n not in failed}
    if not res:
        return None
    how = (f", all built first, then timed in {rounds} rotated rounds" if interleave
           else f", median of {repeat} processes each" if repeat > 1 else "")
    print(f"\n  {name}: median over {rounds} rounds, {THREADS} threads, each provider in its own process{how}")
    cpu = all(r.get("cpu") for r in res.values())     # KFUSE_BENCH_THREADS=1: cpu ms of the calling thread
    print(f"  {'provider':<32}{'median ms':>10}{'p10-p90 ms':>18}{'calls/block':>12}{'faults/call':>12}"
          f"{'max abs err':>13}" + (f"{'cpu ms':>10}" if cpu else ""))
    for n, r in sorted(res.items(), key=lambda kv: kv[1]["ms"]):
        print(f"  {n:<32}{r['ms']:>10.3f}{r['p10']:>9.3f}-{r['p90']:<8.3f}{r['calls']:>12}{r['faults']:>12.1f}"
              f"{r['err']:>13.2e}" + (f"{r['cpu']:>10.3f}" if cpu else ""))
    paired = round_ratios(res)
    if paired:
        paired.sort()
        print(f"  kfuse / the best other in the same round: median {pct(paired, 0.5):.3f}x "
              f"(p10-p90 {pct(paired, 0.1):.3f}-{pct(paired, 0.9):.3f}, {len(paired)} rounds)")
    return res


def interleaved_run(names: list, process, rounds: int) -> dict:
    """Every provider's worker built in turn (serving blocks), then common.interleaved: name -> result."""
    workers, res = {}, {}
    try:
        for n in names:
            print(f"  {n}: building in its own process", flush=True)
            w = Served(*process(n, True))
            why = w.ready()
            if why:
                res[n] = {"error": why}
            else:
                workers[n] = w
        print(f"  timing {len(workers)} providers in {rounds} rotated rounds", flush=True)
        timed = interleaved(workers, rounds)
        for n, w in workers.items():
            done = w.finish()                   # the worker's check (err) and profile, after the timing
            res[n] = timed[n] if "error" in timed[n] else done if "error" in done else dict(timed[n], **done)
    finally:
        for w in workers.values():
            w.close()
    return {n: res[n] for n in names if n in res}


def round_ratios(res: dict) -> list:
    """Interleaved runs: kfuse's time over the fastest other provider's, round by round."""
    others = [r["samples"] for n, r in res.items() if not n.startswith("kfuse") and "samples" in r]
    if "samples" not in res.get("kfuse", {}) or not others:
        return []
    return [k / min(round_) for k, *round_ in zip(res["kfuse"]["samples"], *others)]


def main():
    if "--worker" in sys.argv[1:]:
        return worker_main(sys.argv[1:])
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default=",".join(MODELS),
                    help="comma-separated: minilm-bB, gpt2, llama, CNN-bB, and cnn / cnn-b1 / cnn-b8 "
                    "(every built-in CNN)")
    ap.add_argument("--rounds", type=int, default=ROUNDS)
    ap.add_argument("--repeat", type=int, default=1,
                    help="run every provider's process K times, in rotated turns; the median one is reported")
    ap.add_argument("--profile", action="store_true", help="time each kfuse kernel and print the top 15")
    ap.add_argument("--only", default="", help="comma-separated competitor families to include besides "
                    "kfuse and eager: inductor, ort, layout (kfuse with layout=\"nchw\"), dynamic (kfuse through "
                    "torch.compile(dynamic=True)); layout and dynamic are not in the default")
    ap.add_argument("--interleave", action="store_true",
                    help="build every provider's process first, then time them block by block in rotated rounds "
                    "(each still in its own process): a busy spell of the machine falls on all alike; the "
                    "ratio of kfuse to the best other is also given round by round")
    ap.add_argument("--baseline", metavar="REV", help="also kfuse as of git revision REV (a temporary worktree), "
                    "in its own process: the A/B of a change; not counted among the others")
    a = ap.parse_args()
    if a.interleave and a.repeat > 1:
        ap.error("--interleave times every provider in the same rounds: --repeat does not apply")
    models = model_names(a.models)
    unknown = [m for m in models if not known(m)]
    if unknown:
        ap.error(f"unknown model(s) {', '.join(unknown)}; choose from {', '.join(MODELS[:4])}, "
                 f"NAME-bBATCH for NAME in {', '.join(CNN_MODELS)}, {', '.join(SHORTHANDS)}, or tv:NAME-bBATCH (torchvision)")
    mach, com = machine(), commit()
    print(f"{mach}, commit {com}, torch {torch.__version__}, {THREADS} threads, "
          f"MALLOC_MMAP_THRESHOLD_={os.environ.get('MALLOC_MMAP_THRESHOLD_')}, each provider in its own process"
          f" (x{a.repeat})", flush=True)
    results = {}
    only = tuple(filter(None, a.only.split(",")))
    with baseline_worktree(a.baseline) as baseline:
        for name in models:
            try:
                results[name] = bench_model(name, a.rounds, a.profile, only, a.repeat, baseline, a.interleave)
            except Exception as e:  # noqa: BLE001 - one model failing never ends the run
                fail(name, e)
                traceback.print_exc()

    w = max([11, *(len(n) + 1 for n in results)])
    print(f"\n{'model':<{w}}| kfuse ms | eager ms | inductor ms (config)          | ORT ms (config)                  "
          "| kfuse / best other")
    rows = []
    for name, res in results.items():
        if not res:
            continue
        ind, ort = best(res, "inductor:"), best(res, "ort:")
        others = [r["ms"] for n, r in res.items() if not n.startswith("kfuse")]
        k, e = res.get("kfuse"), res.get("eager")
        ran = lambda fam: not only or fam in only
        cell = lambda b, p: f"{b[1]['ms']:6.2f} ({b[0][len(p):]})" if b else "failed" if ran(p[:-1]) else "not run"
        ratio = f"{k['ms'] / min(others):.2f}x" if k and others else "-"
        paired = sorted(round_ratios(res))
        ratio += f" ({pct(paired, 0.5):.2f}x by round)" if paired else ""
        base = res.get(f"kfuse@{a.baseline}") if a.baseline else None
        dyn = res.get("kfuse:dynamic")
        print(f"{name:<{w}}| {k['ms'] if k else float('nan'):8.2f} | {e['ms'] if e else float('nan'):8.2f} | "
              f"{cell(ind, 'inductor:'):<30}| {cell(ort, 'ort:'):<33}| {ratio}"
              + (f"  (kfuse@{a.baseline} {base['ms']:.2f} ms: kfuse / it {k['ms'] / base['ms']:.3f}x)"
                 if base and k else "")
              + (f"  (kfuse:dynamic {dyn['ms']:.2f} ms: {dyn['ms'] / k['ms']:.3f}x kfuse's)" if dyn and k else ""))
        rows += [(name, n, r) for n, r in res.items()]
    print("\nCSV,machine,commit,model,provider,median_ms,p10,p90")
    for name, n, r in rows:
        print(f"CSV,{mach},{com},{name},{n},{r['ms']:.4f},{r['p10']:.4f},{r['p90']:.4f}")


if __name__ == "__main__":
    main()
