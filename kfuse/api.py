"""kfuse.compile and the compiled model it returns.

A compiled model holds one compiled program per input signature (shapes and dtypes): a new batch
size or sequence length captures and compiles once more, then hits the cache.
"""
from __future__ import annotations

import copy

import difflib
import os
import threading
import warnings
from pathlib import Path

import torch
import torch._dynamo.convert_frame
import torch.utils._pytree as pytree

from .errors import InputError, KfuseError, ModelFileError
from .ir import DTYPE_SHORT, Graph, on_device
from . import artifact, progress
from .ops.reference import run as run_reference
from .runtime import build_program
from .verify import ROUNDED, Verification, compare

# One compilation at a time in the process, Dynamo's included: torch.export and Dynamo's tracing keep
# process-wide state (the mode stack, the patcher, module keys, fake tensors). Two threads exporting at
# once (a model called with two new shapes) failed with "Trying to pop empty mode stack"; an export of a
# new size set in one thread while Dynamo traced in another, with "sN is not tracked with proxy". Hence
# Dynamo's own compile lock (re-entrant: a kfuse backend compiling inside Dynamo's compile holds it).
_COMPILING = getattr(torch._dynamo.convert_frame, "compile_lock", None) or threading.RLock()


LITERALS = (type(None), bool, int, float, str)     # non-tensor inputs kfuse.compile compiles in
_TENSOR = object()


def _signature(tensors) -> tuple:
    return tuple((tuple(t.shape), t.dtype) for t in tensors)


def _values(flat, indices) -> tuple:
    """The exact bytes of the inputs at `indices` (NaN equals NaN), the key of a specialised program."""
    def raw(t):
        t = t.detach().contiguous().reshape(-1)
        return t.view(torch.uint8).numpy().tobytes() if t.numel() else b""
    return tuple((i, raw(flat[i])) for i in indices)


def _positional(spec) -> int:
    """n when `spec` describes exactly n positional tensors (no keywords, no nesting), else -1: such
    calls skip pytree's walk (half of a small model's call path)."""
    n = spec.num_leaves
    return n if spec == pytree.tree_flatten(((0,) * n, {}))[1] else -1


def _input_name(spec, i: int) -> str:
    """Where leaf i of a call flattened as (args, kwargs) by `spec` came from: "keyword input 'mask'",
    "positional input 1", with any path below it ("keyword input 'cache'[0]")."""
    paths = [p for p, _ in pytree.tree_flatten_with_path(pytree.tree_unflatten(list(range(spec.num_leaves)), spec))[0]]
    where, key, *below = paths[i]
    head = f"positional input {key.idx}" if where.idx == 0 else f"keyword input {key.key!r}"
    return head + pytree.keystr(below)


def _onnx_runtime(ort, model, feeds: list) -> list[torch.Tensor]:
    """The outputs of ONNX model `model` (a path or serialized bytes) by ONNX Runtime's CPU provider with
    its graph optimizations off: the file's own semantics (they rewrite some: a quantized model's
    DequantizeLinear -> Conv -> QuantizeLinear becomes one integer kernel that rounds otherwise, 1-2
    quantization steps from the file's result)."""
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model, opts, providers=["CPUExecutionProvider"])
    return [torch.from_numpy(o) for o in sess.run(None, {i.name: a for i, a in zip(sess.get_inputs(), feeds)})]


def _with_literals(tensors: list, literals: dict) -> list:
    """The flat outputs: the program's tensors with the graph's Python-value outputs put back in place."""
    if not literals:
        return tensors
    it = iter(tensors)
    return [literals[k] if k in literals else next(it) for k in range(len(tensors) + len(literals))]


def _gpu_of(flat, source):
    """The GPU a program runs on: its tensor inputs', else its module's parameters' and buffers' (a
    Dynamo segment whose live inputs are CPU numbers or none at all, its weights held on the GPU),
    else the one its module names (`kfuse_device`: a Dynamo segment's values' device); None: the CPU."""
    tensors = list(flat)
    if isinstance(source, torch.nn.Module):
        tensors += [*source.parameters(), *source.buffers()]
    return next((t.device for t in tensors if t.is_cuda), getattr(source, "kfuse_device", None))


def warn_if_grad(tensors, what: str, stacklevel: int) -> None:
    """kfuse computes inference only: say so where the inputs ask for gradients."""
    if torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors):
        warnings.warn(f"kfuse: {what} compiled with gradients enabled: kfuse computes inference only, its outputs do "
                      f"not require grad (call the model under torch.no_grad() or torch.inference_mode(); train with "
                      f"another backend)", stacklevel=stacklevel + 1)


def _fmt(sig) -> str:
    return ", ".join(f"{DTYPE_SHORT.get(d, d)}{list(s)}" for s, d in sig)


class CompiledModel:
    """The callable `kfuse.compile` returns: same outputs as the model, computed by fused kernels."""

    def __init__(self, source, example_inputs, example_kwargs: dict, options: dict, dynamic_shapes=None):
        self.source = source
        self.options = options
        # torch.export's dynamic_shapes: the model is exported once with those sizes symbolic and each
        # new size set is converted from that export (no trace per size set); `_symbolic` is that
        # export, None before the first call, False where it failed (`symbolic_why` says why)
        self._dynamic, self._symbolic, self.symbolic_why = dynamic_shapes, None, ""
        self.is_onnx = isinstance(source, (str, os.PathLike))
        if not self.is_onnx:
            from .capture.fx import register_cache_types
            register_cache_types(source)      # a KV cache among the inputs flattens into its tensors
        flat, self._in_spec = pytree.tree_flatten((tuple(example_inputs), dict(example_kwargs)))
        # non-tensor inputs (None, a flag, a number, a string: a pipeline's return_dict=False) are compiled in
        # as torch.export specialises them; a call must pass the same values
        self._literals = {} if self.is_onnx else {i: v for i, v in enumerate(flat) if isinstance(v, LITERALS)}
        self._n_positional = _positional(self._in_spec) if not self._literals else -1
        flat = self._tensors(flat)
        warn_if_grad(flat, "a model", stacklevel=3)
        self._complex = any(t.is_complex() for t in flat)      # fed to programs as their real views
        self._devices = tuple(t.device.type for t in flat)
        self._cpu = all(d == "cpu" for d in self._devices)
        self._out_spec = None
        self._flat_out = None       # (spec, whether it is a plain tuple of leaves), for __call__
        self._programs: dict[tuple, object] = {}    # signature -> its first program (rank/dtype checks, listing)
        # An ONNX input that feeds shape-like operands (a Reshape's shape, a TopK's k, an If's
        # condition) is specialised by its value at capture (graph.specialised): such programs are
        # keyed by the signature and those inputs' exact bytes, and a new value compiles once more.
        self._specialised: dict[tuple, tuple] = {}    # signature -> indices of specialised inputs
        self._by_value: dict[tuple, object] = {}      # (signature, _values) -> program
        self._last = self._program(flat)

    # -- compiling ------------------------------------------------------------------------------------
    def capture(self, flat_inputs) -> Graph:
        if self.is_onnx:
            from .capture.onnx import load_onnx
            return load_onnx(self.source, flat_inputs)
        from .capture.fx import export
        args, kwargs = pytree.tree_unflatten(self._with_inputs(flat_inputs), self._in_spec)
        if self._dynamic is not None:
            graph = self._from_symbolic(flat_inputs, args, kwargs)
            if graph is not None:
                return graph
        graph, self._out_spec = export(self.source, args, kwargs)
        if self._dynamic is not None:
            graph.capture_note = f"torch.export for this size set ({self.symbolic_why})"
        return graph

    def _from_symbolic(self, flat_inputs, args, kwargs) -> Graph | None:
        """The graph for these inputs converted from the one export with symbolic sizes (made on the
        first call), or None where that export failed or does not admit these sizes."""
        from .capture.fx import SizeMismatch, exported, symbolic_inputs, to_graph
        if self._symbolic is None:
            try:
                self._symbolic = exported(self.source, args, kwargs, self._dynamic)
            except KfuseError as e:
                self._symbolic, self.symbolic_why = False, f"no export with symbolic sizes: {str(e).splitlines()[0][:200]}"
                warnings.warn(f"kfuse: {self.symbolic_why}; each size set is traced on its own")
        if self._symbolic is False:
            return None
        try:
            graph, self._out_spec = to_graph(self._symbolic, [tuple(t.shape) for t in flat_inputs])
        except SizeMismatch as e:
            self.symbolic_why = f"not the export with symbolic sizes: {e}"
            return None
        dims = symbolic_inputs(self._symbolic)
        graph.capture_note = ("one torch.export with symbolic sizes (" + ", ".join(
            f"input {i} dim {'/'.join(map(str, d))}" for i, d in dims.items()) + "), converted for this size set")
        return graph

    def _program(self, flat):
        sig = _signature(flat)
        prog = self._compiled(sig, flat)
        if prog is not None:
            return prog
        if self.source is None:
            raise InputError(f"this model was loaded from an artifact compiled for {'; '.join(self.signatures)}; "
                             f"got {_fmt(sig)}: compile the model for this shape and save it again")
        with _COMPILING:
            return self._compiled(sig, flat) or self._compile(sig, flat)    # another thread may have just built it

    def _compiled(self, sig, flat):
        """The program built for these inputs' signature (and values, where it specialised on them), or None."""
        spec = self._specialised.get(sig)
        return self._by_value.get((sig, _values(flat, spec))) if spec else self._programs.get(sig)

    def _compile(self, sig, flat):
        """Capture and build the program for these inputs (under _COMPILING)."""
        device = _gpu_of(flat, self.source)              # constants live on the inputs' (or weights') GPU
        name = os.path.basename(self.source) if self.is_onnx else getattr(self.source, "kfuse_label", type(self.source).__name__)
        # torch's global generators as the user left them: nothing a compile draws (random inputs to time
        # kernels on) may change what a seeded program draws after it (generate(do_sample=True) compiles
        # on its first call)
        gpu = None if device is None else device.index if device.index is not None else torch.cuda.current_device()
        rng = torch.random.fork_rng(devices=[] if gpu is None else [gpu])
        with rng, on_device(device), progress.compiling(f"{name} for {_fmt(sig)}"):
            with progress.stage("capture (ONNX)" if self.is_onnx else "capture (torch.export)"):
                graph = self.capture(flat)
            specialised = tuple(sorted(getattr(graph, "specialised", None) or ()))   # read before the passes
            note = getattr(graph, "capture_note", "")
            prog = build_program(graph, self.options)
        prog.report.capture = note
        if specialised:
            self._specialised[sig] = specialised
            self._by_value[(sig, _values(flat, specialised))] = prog
        self._programs.setdefault(sig, prog)
        return prog

    def _tensors(self, flat) -> list:
        """The tensors of a call's flattened inputs, its non-tensor ones checked against those compiled in."""
        for i, t in enumerate(flat):
            want = self._literals.get(i, _TENSOR)
            if want is _TENSOR and isinstance(t, torch.Tensor):
                continue
            if want is _TENSOR:
                allowed = "a torch.Tensor" + ("" if self.is_onnx else " (or None, a bool, int, float or str compiled in)")
                raise InputError(f"input {i} ({_input_name(self._in_spec, i)}) is a {type(t).__name__}, expected "
                                 f"{allowed}")
            if type(t) is not type(want) or t != want:
                got = f"a tensor {t.dtype}{list(t.shape)}" if isinstance(t, torch.Tensor) else repr(t)
                raise InputError(f"input {i} ({_input_name(self._in_spec, i)}) is {got}, compiled with {want!r}: "
                                 f"a non-tensor input is compiled in (kfuse.compile again for another value)")
        return [t for i, t in enumerate(flat) if i not in self._literals] if self._literals else flat

    def _fed(self, flat) -> list:
        """The tensors a program takes: a complex input as torch.view_as_real's view of it (its pairs)."""
        return [torch.view_as_real(t) if t.is_complex() else t for t in flat] if self._complex else flat

    def _with_inputs(self, tensors) -> list:
        """The call's flattened inputs again: the tensors with the compiled-in values put back in place."""
        if not self._literals:
            return list(tensors)
        it = iter(tensors)
        return [self._literals[i] if i in self._literals else next(it) for i in range(self._in_spec.num_leaves)]

    def _flatten(self, inputs, kwargs):
        if not kwargs and len(inputs) == self._n_positional and all(type(t) is torch.Tensor for t in inputs):
            flat = list(inputs)
        else:
            flat = self._flatten_tree(inputs, kwargs)
        first = next(iter(self._programs))
        for i, ((shape, dtype), t, device) in enumerate(zip(first, flat, self._devices)):
            if t.dtype != dtype:
                raise InputError(f"{self._where(i)} has dtype {t.dtype}, compiled for {dtype}")
            if t.dim() != len(shape):
                raise InputError(f"{self._where(i)} has shape {list(t.shape)} (rank {t.dim()}), compiled for rank {len(shape)}")
            if device is not None and t.device.type != device:    # kernels would read another device's pointer
                raise InputError(f"{self._where(i)} is on device {t.device}, compiled for {device}")
        return flat

    def _hit(self, inputs):
        """The program for positional CPU tensors of a compiled signature, or None (then _flatten's checks
        and _program). The common call; _flatten's per-input checks cost ~1 us an input."""
        if len(inputs) != self._n_positional or not self._cpu or not all(type(t) is torch.Tensor and t.is_cpu
                                                                         for t in inputs):
            return None
        return self._compiled(_signature(inputs), inputs)

    def _where(self, i: int) -> str:
        """Input i as a message names it: "input 0 (keyword input 'mask')", "input 1 ('pixel_values')"."""
        if self.is_onnx:
            names = self._last.graph.input_names
            return f"input {i} ({names[i]!r})" if i < len(names) and names[i] else f"input {i}"
        leaf = [k for k in range(self._in_spec.num_leaves) if k not in self._literals][i]
        return f"input {leaf} ({_input_name(self._in_spec, leaf)})"

    def _flatten_tree(self, inputs, kwargs):
        flat, spec = pytree.tree_flatten((tuple(inputs), dict(kwargs)))
        if spec != self._in_spec:
            want_args, want_kwargs = pytree.tree_unflatten([0] * self._in_spec.num_leaves, self._in_spec)
            if len(inputs) == len(want_args) and sorted(kwargs) == sorted(want_kwargs):   # one input's structure
                pairs = [(f"input {i}", a, w) for i, (a, w) in enumerate(zip(inputs, want_args))] + \
                        [(f"keyword input {k!r}", kwargs[k], want_kwargs[k]) for k in sorted(kwargs)]
                for where, got, want in pairs:
                    if pytree.tree_structure(got) != pytree.tree_structure(want):
                        n = pytree.tree_structure(want).num_leaves
                        kind = "a torch.Tensor" if pytree.tree_structure(want).is_leaf() else \
                            f"a {type(want).__name__} of {n} tensor{'s' if n != 1 else ''}"
                        raise InputError(f"{where} is a {type(got).__name__}, compiled for {kind}")
            raise InputError(f"model was compiled for {len(want_args)} positional inputs and keyword inputs "
                             f"{sorted(want_kwargs)}; got {len(inputs)} positional "
                             f"({', '.join(type(a).__name__ for a in inputs)}) and keyword inputs {sorted(kwargs)} (calls with "
                             f"other inputs need a kfuse.compile of their own; for generate(), use "
                             f"torch.compile(model.forward, backend='kfuse'))")
        return self._tensors(flat)

    # -- running ----------------------------------------------------------------------------------------
    def __call__(self, *inputs, **kwargs):
        prog = None if kwargs else self._hit(inputs)
        if prog is None:
            flat = self._flatten(inputs, kwargs)
            prog = self._program(flat)
        else:
            flat = list(inputs)
        self._last = prog       # prog, not self._last, below: another thread may set that meanwhile
        outs = _with_literals(prog(self._fed(flat)), prog.graph.literals)
        spec = self._out_spec
        if spec is None:
            return outs[0] if len(outs) == 1 else tuple(outs)
        # a flat tuple of outputs (every Dynamo segment's): built directly, pytree's walk costs ~5 us a call
        known = self._flat_out
        if known is None or known[0] is not spec:
            known = self._flat_out = (spec, spec.type is tuple and all(c.is_leaf() for c in spec.children()))
        return tuple(outs) if known[1] else pytree.tree_unflatten(outs, spec)

    def reference(self, *inputs, **kwargs) -> list[torch.Tensor]:
        """Outputs of the original model (PyTorch eager, or ONNX Runtime for an ONNX file), flattened;
        for a model loaded from an artifact, the reference interpreter run on the saved graph."""
        flat = self._flatten(inputs, kwargs)
        if self.source is None:
            graph = self._program(flat).graph
            return _with_literals(run_reference(graph, self._fed(flat)), graph.literals)
        if self.is_onnx:
            try:
                import onnxruntime as ort
            except ImportError:
                raise KfuseError("verifying an ONNX model runs ONNX Runtime: pip install 'kfuse[onnxruntime]'") from None
            try:
                return _onnx_runtime(ort, str(self.source), [t.numpy() for t in flat])
            except Exception as e:   # noqa: BLE001 - ONNX Runtime's own error types: say it was the reference that failed
                raise KfuseError(f"ONNX Runtime, the reference, failed on inputs {_fmt(_signature(flat))}: "
                                 f"{str(e).splitlines()[0][:300]}") from None
        args, kwargs = pytree.tree_unflatten(self._with_inputs(flat), self._in_spec)
        with torch.no_grad():
            return pytree.tree_leaves(self.source(*args, **kwargs))

    def verify(self, *inputs, **kwargs) -> Verification:
        """Max abs and rel error of each output against the original model on `inputs` (kfuse.verify's
        policy); where that finds a mismatch, the model is run again in float64 (a PyTorch model by eager, an
        ONNX file by ONNX Runtime with its float types made double) and each output may also differ by a
        few times the reference's own worst float32 (or float16/bfloat16) error on it (verify.compare's want64)."""
        flat = self._flatten(inputs, kwargs)
        self._last = prog = self._program(flat)
        got = prog(self._fed(flat))
        names = prog.graph.output_names or [f"output{i}" for i in range(len(got))]
        against = "the saved graph's reference interpreter" if self.source is None else \
            "ONNX Runtime" if self.is_onnx else "PyTorch eager"
        literals = prog.graph.literals        # Python values among the outputs: not compared
        want = [w for k, w in enumerate(self.reference(*inputs, **kwargs)) if k not in literals]
        steps = None
        if self.is_onnx:
            from .capture.onnx import output_steps
            steps = output_steps(self.source)
        found = compare(names, got, want, against, steps)
        if found.ok:
            return found
        want64 = self._reference64(flat)
        if want64 is None or len(want64) != len(want):
            return found
        return compare(names, got, want, against + " (and in float64: its own rounding allowed)",
                       steps, [w for k, w in enumerate(want64) if k not in literals])

    def _reference64(self, flat) -> list[torch.Tensor] | None:
        """The model's outputs computed in float64 (a copy of a PyTorch model, float32/16 parameters, buffers
        and inputs in float64; an ONNX file widened, capture.onnx.widened), flattened; None for a saved
        artifact, or where the model does not run in float64. Taken only when a float32 comparison fails:
        a model whose values grow large (a random-weight Inception-v3's logits near 1e12) rounds in eager
        by more than verify's tolerance of its small outputs, and so may kfuse's program, by as much and
        no more."""
        if self.source is None:
            return None
        if self.is_onnx:        # the file with its float types made double, run by ONNX Runtime
            from onnx import TensorProto

            from .capture.onnx import read_model, widened
            try:
                import onnxruntime as ort
                model = read_model(self.source)
            except Exception:   # noqa: BLE001 - no ONNX Runtime, or the file gone: the verdict stands
                return None
            # where ONNX Runtime has no double kernel for an op (Erf), a float16 file's float32 evaluation
            for to, dtype in ((TensorProto.DOUBLE, torch.float64), (TensorProto.FLOAT, torch.float32)):
                wide = widened(model, to)
                if wide == model:       # no float16 in the file: float32 is the verdict already found
                    continue
                up = [t.to(dtype).numpy() if t.dtype in (torch.float16, torch.float32) else t.numpy() for t in flat]
                try:
                    return _onnx_runtime(ort, wide.SerializeToString(), up)
                except Exception:   # noqa: BLE001 - no kernel for an op, or over 2 GB: the verdict stands
                    pass
            return None
        f64_bytes = 8 * sum(t.numel() for t in (*self.source.parameters(), *self.source.buffers()))
        try:        # the copy takes at most half the memory free now (not there: a mismatch stands as found)
            if 2 * f64_bytes > os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"):
                return None
        except (ValueError, OSError, AttributeError):
            pass

        def up(t):
            return t.double() if isinstance(t, torch.Tensor) and t.dtype in ROUNDED else t
        args, kwargs = pytree.tree_unflatten([up(t) for t in self._with_inputs(flat)], self._in_spec)
        try:
            model = copy.deepcopy(self.source).to(torch.float64)
            with torch.no_grad():
                out = model(*args, **kwargs)
        except Exception:       # noqa: BLE001 - a model that does not run in float64: the float32 verdict stands
            return None
        return pytree.tree_leaves(out)

    def report(self):
        """What the last compiled program fused, and why not the rest."""
        return self._last.report

    @property
    def graph(self) -> Graph:
        return self._last.graph

    @property
    def signatures(self) -> list[str]:
        return [_fmt(s) for s in self._programs]

    # -- artifacts --------------------------------------------------------------------------------------
    def save(self, path):
        """Write every compiled signature to the directory `path` (kfuse.load reads it back without
        capture or a C compiler; see kfuse/artifact.py for what it holds)."""
        def spec(s):
            if s is None:
                return None
            try:
                return pytree.treespec_dumps(s)
            except Exception as e:   # noqa: BLE001 - a type pytree cannot name: say which
                raise KfuseError(f"cannot save the model's input/output structure ({s}): {e}") from None
        meta = {"in_spec": spec(self._in_spec), "out_spec": spec(self._out_spec), "is_onnx": self.is_onnx,
                "options": self.options, "devices": list(self._devices),
                "literals": [[i, v] for i, v in sorted(self._literals.items())]}
        programs = [(sig, None, p) for sig, p in self._programs.items() if sig not in self._specialised]
        programs += [(sig, values, p) for (sig, values), p in self._by_value.items()]
        artifact.save(path, programs, meta)

    @classmethod
    def _loaded(cls, meta: dict, programs: list) -> CompiledModel:
        def spec(s):
            if s is None:
                return None
            try:
                return pytree.treespec_loads(s)
            except Exception as e:   # noqa: BLE001 - a type not registered in this process: say which
                raise KfuseError(f"cannot rebuild the model's input/output structure: {e} (import the "
                                 f"module that defines the model's output type before kfuse.load)") from None
        self = cls.__new__(cls)
        self.source, self.options, self.is_onnx = None, dict(meta["options"]), bool(meta["is_onnx"])
        self._in_spec, self._out_spec = spec(meta["in_spec"]), spec(meta["out_spec"])
        self._flat_out = None
        self._literals = {int(i): v for i, v in meta.get("literals") or []}
        self._n_positional = _positional(self._in_spec) if not self._literals else -1
        n = self._in_spec.num_leaves - len(self._literals)
        self._devices = tuple(meta.get("devices") or [None] * n)   # None: saved before devices were
        self._cpu = all(d == "cpu" for d in self._devices)
        self._programs, self._specialised, self._by_value = {}, {}, {}
        self._complex = any(dtype.is_complex for sig, _, _ in programs for _, dtype in sig)
        for sig, values, prog in programs:
            self._programs.setdefault(sig, prog)
            if values is not None:
                self._specialised[sig] = tuple(i for i, _ in values)
                self._by_value[(sig, values)] = prog
        self._last = programs[0][2]
        return self


BACKENDS = ("cpu", "triton", "reference")
# option -> (check, what it takes)
OPTIONS = {
    "patterns": (lambda v: isinstance(v, bool), "True or False"),
    "horizontal": (lambda v: isinstance(v, bool), "True or False"),
    "disable": (lambda v: isinstance(v, (list, tuple, set, frozenset)) and all(isinstance(x, str) for x in v),
                "a list of op types or fusion names"),
    "max_group": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 0, "an integer >= 0 (0: no cap)"),
    "layout": (lambda v: v in ("auto", "nchw"), "'auto' (channels-last around convolutions) or 'nchw'"),
    "cuda_graphs": (lambda v: v == "auto" or isinstance(v, bool), "'auto', True or False"),
    "rounding": (lambda v: v in ("outputs", "eager"), "'outputs' or 'eager'"),
}


def check_options(backend: str, options: dict) -> dict:
    """The options as kfuse.compile uses them; a clear KfuseError for an unknown name or a bad value."""
    if backend not in BACKENDS:
        raise KfuseError(f"unknown backend {backend!r}: expected one of {', '.join(map(repr, BACKENDS))}")
    if backend == "triton":
        from .backends.triton import kernel as triton_kernel
        if triton_kernel.triton_version() is None:
            raise KfuseError("backend='triton' needs Triton: pip install triton (or use backend='cpu')")
    for name, value in options.items():
        if name not in OPTIONS:
            close = difflib.get_close_matches(name, OPTIONS, n=1)
            raise KfuseError(f"unknown option {name!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                             + f": kfuse.compile takes backend, {', '.join(OPTIONS)}")
        ok, what = OPTIONS[name]
        if not ok(value):
            raise KfuseError(f"option {name}={value!r}: expected {what}")
    known = _disable_names() if options.get("disable") else set()
    for name in options.get("disable", ()):
        if name not in known:
            close = difflib.get_close_matches(name, known, n=1)
            raise KfuseError(f"disable: {name!r} names no op type or fusion" + (f" (did you mean {close[0]!r}?)" if close
                             else "") + "; the fusions are the names in cm.report().fusions and .rules")
    return {"backend": backend, **options}


def _disable_names() -> set[str]:
    """What `disable` may name: IR op types, pattern rules, the layout pass's and the pairs' fusions."""
    from .ir import KIND
    from .kernels.conv import POINTWISE_PAIRS
    from .passes import patterns
    return set(KIND) | patterns.names() | set(POINTWISE_PAIRS) | {"squeeze_excite"}


def load(path) -> CompiledModel:
    """A compiled model saved by `cm.save(path)`: every file's hash checked, no capture and no C
    compiler needed (on a CPU without the saver's ISA flags, kernels are rebuilt from the stored
    sources). A missing, truncated or changed file is a KfuseError naming it."""
    meta, programs = artifact.load(path)
    if not programs:
        raise artifact.ArtifactError(f"{path}: the artifact holds no compiled program")
    return CompiledModel._loaded(meta, programs)


def _on_cuda(example_inputs, example_kwargs) -> bool:
    leaves = pytree.tree_leaves((tuple(example_inputs), dict(example_kwargs or {})))
    return any(isinstance(t, torch.Tensor) and t.is_cuda for t in leaves)


def compile(model, example_inputs=(), example_kwargs=None, *, backend: str | None = None, dynamic_shapes=None,
            **options) -> CompiledModel:
    """Compile an nn.Module (captured with torch.export) or a path to an .onnx file.

    `example_inputs` (a tuple of positional inputs) and `example_kwargs` (a dict of keyword inputs,
    PyTorch only) fix the shapes of the first compilation; other shapes compile on first use.
    Options: `backend` ("cpu"; "triton" for Triton kernels, the default when the example inputs are
    CUDA tensors; or "reference" to run the unfused interpreter), `patterns` (False turns
    the pattern rules off), `horizontal` (False: no horizontal merging of independent kernels),
    `disable` (op types or fusion names never fused), `max_group` (ops per group), `layout` ("auto":
    convolutional regions run channels-last, NHWC; "nchw": as captured), `cuda_graphs` (backend "triton"
    on a GPU: "auto", the default, replays each program as one CUDA graph where that measures faster than
    launching its kernels one by one; True: replay wherever it can be captured; False: never),
    `rounding` (backend "triton": float16/bfloat16 values are computed in fp32 and rounded at each
    kernel's outputs, "outputs", the default; "eager" rounds after every op as PyTorch eager does, for
    eager's bits at some speed).
    Anything else is a KfuseError.
    `dynamic_shapes` (PyTorch only; torch.export's argument, e.g. `{"ids": {1: Dim.AUTO}}`): export the
    model once with those sizes symbolic; each new size set then compiles a static program converted
    from that export, without tracing the model again (the report's `capture` line says which).
    """
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    if backend is None:
        backend = "triton" if _on_cuda(example_inputs, example_kwargs) else "cpu"
    options = check_options(backend, options)
    if isinstance(model, (str, os.PathLike)):
        if not Path(model).is_file():
            raise ModelFileError(f"{model}: no such file")
    elif not isinstance(model, torch.nn.Module):
        raise KfuseError(f"kfuse.compile takes an nn.Module or a path to an .onnx file, not {type(model).__name__}")
    if not isinstance(example_inputs, (tuple, list)):
        example_inputs = (example_inputs,)
    if dynamic_shapes is not None and isinstance(model, (str, os.PathLike)):
        raise KfuseError("dynamic_shapes is torch.export's argument: an ONNX file's symbolic dims (dim_param) "
                         "need no such argument")
    return CompiledModel(model, example_inputs, example_kwargs or {}, options, dynamic_shapes)
