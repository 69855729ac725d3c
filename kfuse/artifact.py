"""A compiled model on disk: saved once, loaded without capture or a C compiler.

    ARTIFACT/
      manifest.json         line 1: sha256 of the rest of the file; then JSON: format, kfuse, torch and
                            compiler versions, the CPU's ISA flags, and the sha256 of every other file
      program.json          per input signature: the fused graph, its groups, the report of the passes,
                            the machine rates; the input and output structure (pytree specs)
      weights.safetensors   every constant of every graph (no pickle: loading runs no code from the file)
      kernels/<h>.c, <h>.so the generated C sources and the libraries built from them

Loading checks every byte (the manifest's own hash, then each file's), then rebuilds each program
from its fused graph and groups (no capture, no passes). C kernels load the stored libraries when
this CPU has every ISA flag of the machine that built them; otherwise they are rebuilt from the
stored sources with this machine's C compiler, and where there is none the error says what differs.
"""
from __future__ import annotations

import hashlib
import json
import os
import platform
import shutil
import tempfile
from pathlib import Path

import torch

from . import config
from ._version import __version__ as KFUSE_VERSION
from .backends.c import autotune, compiler
from .cost import Machine
from .errors import KfuseError
from .ir import KIND, Graph, Group, Node
from .report import Report, WhyNot
from .runtime import Program, assemble

FORMAT = 1
DTYPES = {str(d).removeprefix("torch."): d for d in (
    torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.int16,
    torch.int8, torch.uint8, torch.bool, torch.complex64)}


class ArtifactError(KfuseError):
    """An artifact is missing, truncated, corrupt, tampered with, or made for another machine."""


# -- values in JSON ------------------------------------------------------------------------------------
def _enc(v, where: str):
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    if isinstance(v, torch.dtype):
        return {"dtype": str(v).removeprefix("torch.")}
    if isinstance(v, tuple):
        return {"tuple": [_enc(x, where) for x in v]}
    if isinstance(v, list):
        return [_enc(x, where) for x in v]
    raise KfuseError(f"cannot save {where}: a {type(v).__name__} attribute")


def _dec(v):
    if isinstance(v, dict):
        if "dtype" in v:
            if v["dtype"] not in DTYPES:
                raise ArtifactError(f"program.json: unknown dtype {v['dtype']!r}")
            return DTYPES[v["dtype"]]
        return tuple(_dec(x) for x in v["tuple"])
    if isinstance(v, list):
        return [_dec(x) for x in v]
    return v


def _graph_json(g: Graph, consts: dict) -> dict:
    """The graph as JSON; constants go into `consts` ({id(tensor): (key, tensor)}: one entry per
    tensor however many graphs share it)."""
    index = {n: k for k, n in enumerate(g.nodes)}
    nodes = []
    for n in g.nodes:
        attrs, value = {}, None
        for a, v in n.attrs.items():
            if n.op == "const" and a == "value":
                value = consts.setdefault(id(v), (f"t{len(consts)}", v))[0]
            else:
                attrs[a] = _enc(v, f"node {n.label} ({n.op}), attribute {a}")
        nodes.append({"op": n.op, "inputs": [index[i] for i in n.inputs], "attrs": attrs, "value": value,
                      "shape": list(n.shape), "dtype": str(n.dtype).removeprefix("torch."), "name": n.name})
    return {"nodes": nodes, "inputs": [index[n] for n in g.inputs], "outputs": [index[n] for n in g.outputs],
            "input_names": g.input_names, "output_names": g.output_names, "mutated": g.mutated,
            "literals": {str(k): v for k, v in g.literals.items()}}


def _graph_from_json(d: dict, consts: dict) -> tuple[Graph, list[Node]]:
    g = Graph()
    nodes: list[Node] = []
    for k, r in enumerate(d["nodes"]):
        if r["op"] not in KIND or r["dtype"] not in DTYPES:
            raise ArtifactError(f"program.json: unknown op or dtype in node {k}")
        attrs = {a: _dec(v) for a, v in r["attrs"].items()}
        if r["op"] == "const":
            attrs["value"] = consts[r["value"]]
        nodes.append(Node(r["op"], [nodes[i] for i in r["inputs"]], attrs, tuple(r["shape"]), DTYPES[r["dtype"]],
                          r["name"]))
    g.nodes = nodes
    g.inputs = [nodes[i] for i in d["inputs"]]
    g.outputs = [nodes[i] for i in d["outputs"]]
    g.input_names, g.output_names = list(d["input_names"]), list(d["output_names"])
    g.mutated = [int(i) for i in d.get("mutated", ())]
    g.literals = {int(k): v for k, v in d.get("literals", {}).items() if v is None or isinstance(v, (bool, int, float, str))}
    g.check()
    return g, nodes


# -- this machine ---------------------------------------------------------------------------------------
def cpu_flags() -> list[str]:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return sorted(set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return []


def _compiler_identity() -> str | None:
    try:
        return compiler.identity()
    except compiler.CompileError:
        return None


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- save -------------------------------------------------------------------------------------------------
def save(path, programs: list[tuple[tuple, tuple | None, Program]], meta: dict):
    """Write `programs` ((signature, specialised input values or None, Program)) and `meta` (JSON:
    specs, options) as an artifact
    directory at `path`, replacing it whole (written beside it, then renamed)."""
    from safetensors.torch import save_file
    path = Path(path)
    if path.exists() and not (path / "manifest.json").is_file():
        raise KfuseError(f"{path} exists and is not a kfuse artifact: not overwriting it")
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent if path.parent.exists() else None))
    try:
        consts: dict[int, tuple[str, torch.Tensor]] = {}
        sources: dict[str, str] = {}
        entries = []
        for sig, values, prog in programs:
            index = {n: k for k, n in enumerate(prog.graph.nodes)}
            for kernel in prog.kernels:
                for src in kernel.sources():
                    sources[_sha(src.encode())[:32]] = src
            rep = prog.report
            entries.append({
                "signature": [[list(s), str(d).removeprefix("torch.")] for s, d in sig],
                "specialised": None if values is None else [[i, v.hex()] for i, v in values],
                "graph": _graph_json(prog.graph, consts),
                "groups": [{"nodes": [index[n] for n in g.nodes], "outputs": [index[n] for n in g.outputs]}
                           for g in prog.groups],
                "reference": prog.reference,
                "machine": vars(prog.machine) if prog.machine is not None else None,
                "report": {"rules": rep.rules, "splits": rep.splits, "why_not": [vars(w) for w in rep.why_not]},
            })
        (tmp / "kernels").mkdir()
        for h, src in sorted(sources.items()):
            (tmp / "kernels" / f"{h}.c").write_text(src)
            shutil.copyfile(compiler.library_of(src), tmp / "kernels" / f"{h}.so")
        # cloned: safetensors refuses tensors that share storage (a weight and a slice of it)
        save_file({key: t.detach().clone().contiguous() for key, t in consts.values()}, str(tmp / "weights.safetensors"))
        (tmp / "program.json").write_text(json.dumps({**meta, "programs": entries, "choices": autotune.choices(),
                                                          "machine_key": autotune.machine_key(),
                                                          "threads": config.threads()}))
        files = {str(f.relative_to(tmp)): _sha(f.read_bytes()) for f in sorted(tmp.rglob("*")) if f.is_file()}
        body = json.dumps({"format": FORMAT, "kfuse": KFUSE_VERSION, "torch": torch.__version__,
                           "python": platform.python_version(), "compiler": _compiler_identity(),
                           "machine": platform.machine(), "cpu_flags": cpu_flags(), "files": files}, indent=1)
        (tmp / "manifest.json").write_text(_sha(body.encode()) + "\n" + body)
        if path.exists():
            shutil.rmtree(path)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# -- load -------------------------------------------------------------------------------------------------
def _read_manifest(path: Path) -> dict:
    mf = path / "manifest.json"
    try:
        raw = mf.read_bytes()
    except OSError as e:
        raise ArtifactError(f"{mf}: cannot read the manifest ({e.strerror or e}); is {path} a kfuse artifact?") from None
    head, _, body = raw.partition(b"\n")
    if head.decode("ascii", "replace") != _sha(body):
        raise ArtifactError(f"{mf}: the manifest does not match its own hash (truncated, corrupt or changed)")
    manifest = json.loads(body)
    if manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mf}: artifact format {manifest.get('format')}, this kfuse reads format {FORMAT}")
    return manifest


def _check_files(path: Path, manifest: dict):
    for name, digest in manifest["files"].items():
        f = (path / name).resolve()
        if path.resolve() not in f.parents:
            raise ArtifactError(f"{path / 'manifest.json'}: file name {name!r} points outside the artifact")
        try:
            data = f.read_bytes()
        except OSError:
            raise ArtifactError(f"{f}: missing from the artifact") from None
        if _sha(data) != digest:
            raise ArtifactError(f"{f}: does not match the manifest's hash (truncated, corrupt or changed)")


def _usable_libraries(path: Path, manifest: dict) -> bool:
    """Whether this machine can run the stored libraries; else whether it can rebuild them; else an
    error naming what differs."""
    missing = sorted(set(manifest["cpu_flags"]) - set(cpu_flags()))
    if manifest["machine"] == platform.machine() and not missing:
        return True
    if _compiler_identity() is not None:
        return False        # rebuild every kernel from the stored sources with this compiler
    what = f"a {manifest['machine']} CPU" if manifest["machine"] != platform.machine() else \
        f"CPU flags this CPU lacks: {', '.join(missing[:12])}" + (" ..." if len(missing) > 12 else "")
    raise ArtifactError(f"{path}: its kernels were built for {what}; no C compiler here to rebuild them from the "
                        f"stored sources (set CC to a working compiler)")


def load(path) -> tuple[dict, list[tuple[tuple, tuple | None, Program]]]:
    """(meta, [(signature, specialised values or None, Program)]) from an artifact directory, every
    byte checked first."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    path = Path(path)
    manifest = _read_manifest(path)
    _check_files(path, manifest)
    if _usable_libraries(path, manifest):
        compiler.provide({(path / "kernels" / f"{h}.c").read_text(): path / "kernels" / f"{h}.so"
                          for h in (Path(n).stem for n in manifest["files"] if n.endswith(".c"))})
    try:
        consts = load_file(str(path / "weights.safetensors"))
        doc = json.loads((path / "program.json").read_text())
        autotune.adopt(doc.pop("choices", {}))      # the kernels and schedules chosen at compile time
        programs = []
        # the choices hit without a compiler too, and at another thread count
        with autotune.compiled_on(doc.pop("machine_key", None), doc.pop("threads", None)):
            for e in doc.pop("programs"):
                graph, nodes = _graph_from_json(e["graph"], consts)
                groups = [Group([nodes[i] for i in g["nodes"]], [nodes[i] for i in g["outputs"]]) for g in e["groups"]]
                report = Report(rules=dict(e["report"]["rules"]), splits=list(e["report"]["splits"]),
                                why_not=[WhyNot(**w) for w in e["report"]["why_not"]])
                machine = Machine(**e["machine"]) if e["machine"] else None
                sig = tuple((tuple(s), DTYPES[d]) for s, d in e["signature"])
                values = None if e["specialised"] is None else tuple((int(i), bytes.fromhex(v))
                                                                     for i, v in e["specialised"])
                program = assemble(graph, groups, report, e["reference"], machine, settle_choices=False)
                programs.append((sig, values, program))
    except (KeyError, TypeError, ValueError, IndexError, SafetensorError) as err:
        raise ArtifactError(f"{path}: program.json or weights.safetensors is inconsistent "
                            f"({type(err).__name__}: {err})") from None
    return doc, programs


def describe(path) -> str:
    """One line about an artifact (for the command line)."""
    m = _read_manifest(Path(path))
    return (f"kfuse {m['kfuse']}, torch {m['torch']}, {m['machine']}, {len(m['files'])} files, "
            f"{sum(n.endswith('.so') for n in m['files'])} kernel libraries")


__all__ = ["save", "load", "describe", "ArtifactError", "cpu_flags"]
