"""Command line: `kfuse demo`, `kfuse compile MODEL.onnx`."""
from __future__ import annotations

import argparse
import importlib.util
import sys

import torch

from . import artifact, progress
from .api import compile
from .errors import KfuseError
from .models import IMAGE_MODELS, MODELS, build
from .report import fusion_table
from .runtime import median_ms


def step(what: str):
    """Show progress on anything that may take more than a moment (a compile's own stages show within
    it where stderr is a terminal: kfuse/progress.py)."""
    return progress.stage(what, always="  ")


def cmd_demo(args) -> int:
    torch.set_num_threads(args.threads) if args.threads else None
    with step(f"building the {args.model} model"):
        model, inputs = build(args.model, batch=args.batch, seq=args.seq)
    positions = getattr(model, "pos", None) or getattr(model, "wpe", None)    # a learned position table
    if args.model not in IMAGE_MODELS and positions is not None and args.seq > positions.num_embeddings:
        raise KfuseError(f"--seq {args.seq}: the built-in {args.model} has {positions.num_embeddings} positions")
    size = f"{inputs[0].shape[-2]}x{inputs[0].shape[-1]} images" if args.model in IMAGE_MODELS else f"seq {args.seq}"
    print(f"kfuse demo: built-in {args.model} (seeded random weights), batch {args.batch} x {size}")
    with step("capturing (torch.export), fusing and compiling kernels"):
        cm = compile(model, inputs)
    print("\ngraph:", cm.graph.summary())
    print("\n" + str(cm.report()))
    with step("verifying against PyTorch eager"):
        v = cm.verify(*inputs)
    print("\n" + str(v))
    with torch.no_grad(), step("profiling each fused kernel against its ops run one by one"):
        cm._last.profile(list(inputs))
    print("\n" + fusion_table(cm.report()))
    with torch.no_grad(), step("timing (median of 20 calls each, the two alternating)"):
        t_eager, t_kfuse = median_ms([model, cm], inputs)
    print(f"\n  PyTorch eager  {t_eager:8.2f} ms\n  kfuse          {t_kfuse:8.2f} ms   "
          f"({t_eager / t_kfuse:.2f}x eager)")
    return 0 if v.ok else 1


def _onnx_inputs(path: str, dims: dict[str, int]):
    """Example inputs for an ONNX file: symbolic dims from --dim (default 1; a name the file does not
    have is an error); integer inputs are ones
    (valid token ids and an all-ones mask), float inputs seeded normal."""
    import onnx
    from .capture.onnx import read_model
    model = read_model(path)
    named = {d.dim_param for i in model.graph.input for d in i.type.tensor_type.shape.dim if d.HasField("dim_param")}
    unknown = sorted(set(dims) - named)
    if unknown:
        raise KfuseError(f"--dim {unknown[0]}: {path} has no such symbolic dimension (it has: "
                         f"{', '.join(sorted(named)) or 'none'})")
    inits = {i.name for i in model.graph.initializer}
    g = torch.Generator().manual_seed(0)
    out = []
    for inp in model.graph.input:
        if inp.name in inits:
            continue
        tt = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else dims.get(d.dim_param, 1) for d in tt.shape.dim]
        dtype = getattr(torch, onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name)
        out.append(torch.randn(shape, generator=g).to(dtype) if dtype.is_floating_point
                   else torch.ones(shape, dtype=dtype))
    return out


def cmd_compile(args) -> int:
    dims = {}
    for d in args.dim or []:
        name, _, value = d.partition("=")
        if not value.isdigit():
            raise KfuseError(f"--dim takes NAME=SIZE, got {d!r}")
        dims[name] = int(value)
    inputs = _onnx_inputs(args.model, dims)
    print(f"kfuse compile {args.model}: inputs " + ", ".join(f"{list(t.shape)}" for t in inputs))
    with step("loading, fusing and compiling kernels"):
        cm = compile(args.model, inputs)
    print("\ngraph:", cm.graph.summary())
    print("\n" + str(cm.report()))
    if args.output:
        with step(f"saving the artifact to {args.output}"):
            cm.save(args.output)
        print(f"  {artifact.describe(args.output)}; load it with kfuse.load({str(args.output)!r})")
    if importlib.util.find_spec("onnxruntime") is None:
        print("\nnot verified: ONNX Runtime is not installed (pip install 'kfuse[onnxruntime]')")
        return 0
    with step("verifying against ONNX Runtime"):
        v = cm.verify(*inputs)
    print("\n" + str(v))
    return 0 if v.ok else 1


def _at_least(low: int):
    """An argparse type: an integer >= low (argparse turns the ValueError into a usage error)."""
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise ValueError(text)
        return value
    parse.__name__ = f"integer >= {low}"     # argparse names the type in its message
    return parse


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="kfuse", description="kfuse: kernel operator fusion compiler for inference")
    sub = p.add_subparsers(dest="cmd", required=True)
    d = sub.add_parser("demo", help="compile a built-in model, verify it and time it against eager",
                       description="Compile a built-in model (no download), print the graph summary, the "
                                   "fusions, the verification against PyTorch eager and the time against eager.")
    d.add_argument("--model", default="bert", choices=sorted(MODELS))
    d.add_argument("--batch", type=_at_least(1), default=1)
    d.add_argument("--seq", type=_at_least(1), default=128)
    d.add_argument("--threads", type=_at_least(0), default=0, help="torch's and kfuse's threads (default: torch's setting)")
    d.set_defaults(fn=cmd_demo)
    c = sub.add_parser("compile", help="compile an ONNX file, print the summary and verification, save it",
                       description="Compile MODEL.onnx, verify it against ONNX Runtime, and with -o save the "
                                   "compiled model as an artifact that kfuse.load reads without a C compiler.")
    c.add_argument("model", help="path to an .onnx file")
    c.add_argument("-o", "--output", help="directory to save the compiled model to (an artifact)")
    c.add_argument("--dim", action="append", metavar="NAME=SIZE", help="size of a symbolic dimension (default 1)")
    c.set_defaults(fn=cmd_compile)
    args = p.parse_args(argv)
    try:
        return args.fn(args)
    except KfuseError as e:
        print(f"\nkfuse: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
