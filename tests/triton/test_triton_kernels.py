"""Elementwise chains, broadcasting, strided inputs, row reductions (norms, softmax) and half
precision through the Triton backend, in the interpreter, each against eager with outputs poisoned."""
import pytest
import torch
import torch.nn.functional as F

import kfuse
from kfuse.backends.triton import render as render_fk
from kfuse.kernels import lower
from kfuse.errors import KfuseError

from helpers import KERNEL_TOL, SMALL_TOL
from triton_helpers import check


class Fn(torch.nn.Module):
    def __init__(self, fn, *params):
        super().__init__()
        self.fn = fn
        self.params = torch.nn.ParameterList([torch.nn.Parameter(p, requires_grad=False) for p in params])

    def forward(self, *xs):
        return self.fn(*xs, *self.params)


# -- elementwise ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 7, 1000, 3000, 9000])     # 9000: longer than a row in registers
def test_bias_gelu_flat(n):
    check(Fn(lambda x, b: F.gelu(x + b), torch.randn(n)), [torch.randn(3, n)], tol=KERNEL_TOL, backends={"triton"})


def test_swiglu():
    check(Fn(lambda g, u: F.silu(g) * u), [torch.randn(5, 96), torch.randn(5, 96)], tol=KERNEL_TOL, backends={"triton"})


def test_gelu_tanh_chain():
    # tanh through the backend's own formula (no libdevice in the interpreter): small and large |x|
    x = torch.cat([torch.linspace(-12, 12, 999), torch.tensor([1e-6, -1e-7, 0.0])])
    check(Fn(lambda x: F.gelu(x * 2.0, approximate="tanh") - torch.tanh(x)), [x], tol=SMALL_TOL)


def test_math_functions():
    x = torch.rand(257) * 4 + 0.01
    fn = lambda x: torch.log1p(x) + torch.expm1(x * 0.1) + torch.sigmoid(-x) + torch.sqrt(x) + torch.exp(-x) \
        + torch.log(x) + torch.erf(x - 2) + torch.abs(x - 1) + torch.clamp(x, 0.5, 2.0) + torch.rsqrt(x)
    check(Fn(fn), [x], tol=SMALL_TOL, backends={"triton"})


def test_where_compare_and_int():
    x = torch.randn(6, 33)
    fn = lambda x: (torch.where(x > 0, x * 3.0, -x), torch.relu(x).amax(-1), (x > 0.5).sum(-1))
    check(Fn(fn), [x], tol=KERNEL_TOL)


# -- broadcasting and strides -------------------------------------------------------------------------

@pytest.mark.parametrize("shapes", [((4, 1, 6), (1, 5, 6)), ((2, 3, 4, 5), (3, 1, 1)), ((7,), (3, 1))])
def test_broadcast(shapes):
    a, b = (torch.randn(s) for s in shapes)
    check(Fn(lambda a, b: torch.tanh(a) * b + a), [a, b], tol=SMALL_TOL, backends={"triton"})


def test_transposed_input_is_read_through_strides():
    # a transpose feeding an elementwise chain: a strided read (or a copy), never a wrong answer
    x = torch.randn(8, 12)
    check(Fn(lambda x, b: F.relu(x.t() + b), torch.randn(8)), [x], tol=KERNEL_TOL)


def test_permuted_and_broadcast_inputs_in_one_flat_kernel():
    # one 1-D grid over a [5, 7, 9] loop: a permuted input (its strides nest nowhere) and one broadcast
    # along the middle dim, each offset worked out from the flat index
    x, y = torch.randn(9, 5, 7), torch.randn(5, 1, 9)
    check(Fn(lambda x, y: torch.sigmoid(x.permute(1, 2, 0)) * y + 1.0), [x, y], tol=KERNEL_TOL, backends={"triton"})


def test_slice_of_a_wide_tensor():
    x = torch.randn(4, 10, 64)
    check(Fn(lambda x: F.silu(x[..., :32]) * x[..., 32:]), [x], tol=KERNEL_TOL)


def test_scalar_output_of_a_flat_kernel():
    # a [1] output broadcast in a [7] loop: one invariant value, written once
    x, s = torch.randn(7), torch.randn(1)
    check(Fn(lambda x, s: (x * s, s * 2.0)), [x, s], tol=KERNEL_TOL)


# -- reductions ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("n", [1, 7, 300, 5000])
def test_add_layernorm(n):
    ln = torch.nn.LayerNorm(n)
    torch.nn.init.normal_(ln.weight)
    torch.nn.init.normal_(ln.bias)

    class M(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.ln = ln

        def forward(self, x, r):
            return self.ln(x + r)
    check(M(), [torch.randn(3, n), torch.randn(3, n)], tol=SMALL_TOL, backends={"triton"})


@pytest.mark.parametrize("n", [1, 7, 300, 5000])
def test_rmsnorm(n):
    w = torch.randn(n)
    fn = lambda x, w: x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * w
    check(Fn(fn, w), [torch.randn(2, 3, n)], tol=SMALL_TOL, backends={"triton"})


@pytest.mark.parametrize("n", [1, 7, 300, 5000])
def test_scale_mask_softmax(n):
    mask = torch.zeros(2, 1, 1, n)
    mask[1, ..., n // 2 + 1:] = float("-inf")
    fn = lambda s, m: torch.softmax(s * 0.125 + m, dim=-1)
    check(Fn(fn), [torch.randn(2, 3, 4, n), mask], tol=SMALL_TOL, backends={"triton"})


def test_fully_masked_row_gives_nan_as_torch():
    m = torch.zeros(3, 9)
    m[1] = float("-inf")
    check(Fn(lambda s, m: torch.softmax(s + m, -1)), [torch.randn(3, 9), m], tol=KERNEL_TOL)


def test_log_softmax_and_max_with_nan():
    x = torch.randn(4, 50)
    x[2, 7] = float("nan")
    check(Fn(lambda x: (torch.log_softmax(x, -1), x.amax(-1, keepdim=True), x.amin(-1))), [x], tol=SMALL_TOL)


def test_looped_rows_match_registers():
    # the multi-pass looped form, forced at a small N by a small max_block, against the register form
    from kfuse.backends.triton import kernel as tk
    x = torch.randn(5, 300)
    cm = kfuse.compile(Fn(lambda x: torch.softmax(x, -1) + x.var(-1, keepdim=True)).eval(), (x,), backend="triton")
    g = cm._last.groups[[k.backend for k in cm.report().kernels].index("triton")]
    fk = lower(g.nodes, g.outputs, half=True)
    looped, regs = render_fk(fk, max_block=64), render_fk(fk)
    assert "for j0 in range" in looped.source and "for j0 in range" not in regs.source
    outs = []
    for r in (looped, regs):
        o = [torch.full(n.shape, float("nan"), dtype=n.dtype) for n in fk.outputs]
        with tk.quiet():
            tk.load(r.source).kf_kernel[r.grid](x, *o)
        outs.append(o)
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(outs[0][0], torch.softmax(x, -1) + x.var(-1, keepdim=True), atol=1e-5, rtol=1e-5)


def test_int64_indexing_switch():
    # offsets are int32 unless an argument spans 2^31 elements: the switch is in the rendered text
    x = torch.randn(4, 8)
    cm = kfuse.compile(Fn(lambda x: torch.softmax(x, -1)).eval(), (x,), backend="triton")
    g = cm._last.groups[-1]
    fk = lower(g.nodes, g.outputs, half=True)
    assert ".to(tl.int64)" not in render_fk(fk).source
    fk.shape = (2 ** 24, 256)
    fk.strides = [(256, 1)] * len(fk.strides)
    assert "tl.program_id(0).to(tl.int64)" in render_fk(fk).source
    cm = kfuse.compile(Fn(lambda x, b: F.gelu(x + b), torch.randn(8)).eval(), (x,), backend="triton")
    g = cm._last.groups[-1]
    fk = lower(g.nodes, g.outputs, half=True)          # the flat kernel: the bias read at offs % N
    assert "offs % 8" in render_fk(fk).source and ".to(tl.int64)" not in render_fk(fk).source
    fk.shape = (2 ** 24, 256)
    fk.strides = [(256, 1), (0, 1), (256, 1)]
    assert "tl.program_id(0).to(tl.int64)" in render_fk(fk).source and "offs % 256" in render_fk(fk).source


# -- half precision -----------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_layernorm_round_trip(dtype):
    n = 96
    w, b = torch.randn(n, dtype=dtype), torch.randn(n, dtype=dtype)
    x, r = torch.randn(4, n, dtype=dtype), torch.randn(4, n, dtype=dtype)
    m = Fn(lambda x, r, w, b: F.layer_norm(x + r, (n,), w, b, 1e-5), w, b)
    cm = kfuse.compile(m.eval(), (x, r), backend="triton")
    assert {k.backend for k in cm.report().kernels} == {"triton"}, [k.name for k in cm.report().kernels]
    got = cm(x, r)
    assert got.dtype == dtype
    # computed in fp32 from the loads, rounded once at the store
    # (the group may round x + r to the dtype before the norm, as eager does: within 2 ulp)
    want = F.layer_norm(x.float() + r.float(), (n,), w.float(), b.float(), 1e-5).to(dtype)
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(got.float(), want.float(), atol=2 * eps, rtol=4 * eps)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_elementwise_round_trip(dtype):
    x = torch.randn(1000, dtype=dtype)
    cm = kfuse.compile(Fn(lambda x: F.silu(x) * 2.0).eval(), (x,), backend="triton")
    got = cm(x)
    want = (F.silu(x.float()) * 2.0).to(dtype)
    assert got.dtype == dtype
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-2)


def test_half_rounding_eager_gives_eagers_bits():
    # float16 only: the interpreter converts fp32 to bfloat16 by truncation (a GPU rounds to nearest),
    # so bfloat16 bits can only be compared on a GPU
    torch.manual_seed(0)
    xs = [torch.randn(4, 300, dtype=torch.float16) for _ in range(3)]
    m = Fn(lambda a, b, c: (((a * b + c) / (a - 1.5)) * c - b, F.layer_norm(a + c, (300,))))
    want = m(*xs)
    eager = kfuse.compile(m.eval(), xs, backend="triton", rounding="eager")
    assert {k.backend for k in eager.report().kernels} == {"triton"}       # fused as without it
    assert len(eager.report().kernels) == len(kfuse.compile(m.eval(), xs, backend="triton").report().kernels)
    chain, norm = eager(*xs)
    assert torch.equal(chain, want[0])       # each op rounded to float16 as eager rounds it
    if xs[0].is_cuda:   # CUDA's layer_norm reduces in its own order with an approximate rsqrt: within an ulp
        torch.testing.assert_close(norm, want[1], atol=1e-3, rtol=1e-3)
    else:
        assert torch.equal(norm, want[1])
    outputs = kfuse.compile(m.eval(), xs, backend="triton")                # rounded at the outputs only
    chain, _ = outputs(*xs)
    assert not torch.equal(chain, want[0])
    torch.testing.assert_close(chain, want[0], atol=1e-2, rtol=1e-2)
    with pytest.raises(KfuseError, match="option rounding='each'"):
        kfuse.compile(m.eval(), xs, backend="triton", rounding="each")


def test_tuned_choice_is_timed_once_per_process_and_kept_on_disk(monkeypatch, tmp_path):
    # the attention and rope kernels' configs go through kernel.choice (the interpreter itself never tunes)
    from kfuse import config
    from kfuse.backends.c import autotune
    from kfuse.backends.triton import kernel as tk
    monkeypatch.setattr(tk, "autotune_enabled", lambda: True)
    monkeypatch.setenv("KFUSE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(config, "_config", config.from_env())
    monkeypatch.setattr(autotune, "_memo", {})
    monkeypatch.setattr(tk, "_chosen", {})
    calls = []
    slow = {"fast": 0, "slow": 2000, "broken": None}

    def launch(c):
        calls.append(c)
        if slow[c] is None:
            raise RuntimeError("out of shared memory")      # a config this GPU cannot compile: skipped
        sum(range(slow[c]))
    assert tk.choice("k", "src", (1, 2), ["slow", "broken", "fast"], launch) == "fast"
    timed = len(calls)
    assert tk.choice("k", "src", (1, 2), ["slow", "broken", "fast"], launch) == "fast" and len(calls) == timed
    autotune.flush()
    monkeypatch.setattr(autotune, "_memo", {})              # a new process: read from the file, nothing timed
    monkeypatch.setattr(tk, "_chosen", {})
    assert tk.choice("k", "src", (1, 2), ["slow", "broken", "fast"], launch) == "fast" and len(calls) == timed
    assert tk.choice("k", "src", (3,), ["slow", "fast"], launch) and len(calls) > timed     # another problem: timed


# -- api and report ------------------------------------------------------------------------------------

def test_unknown_backend_is_a_clear_error():
    with pytest.raises(KfuseError, match="unknown backend 'cuda'.*'triton'"):
        kfuse.compile(Fn(lambda x: x + 1).eval(), (torch.randn(3),), backend="cuda")


def test_report_names_the_backend_of_each_kernel():
    m = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.LayerNorm(32)).eval()
    cm = check(m, [torch.randn(4, 16)], tol=SMALL_TOL)
    backends = [k.backend for k in cm.report().kernels]
    assert any(b.startswith("library:torch") for b in backends) and "triton" in backends, backends


def test_generated_kernels_are_files_in_the_cache(tmp_path, monkeypatch):
    from kfuse import config
    from kfuse.backends.triton import kernel as tk
    monkeypatch.setattr(config, "_config", config.from_env({"KFUSE_CACHE_DIR": str(tmp_path)}))
    monkeypatch.setattr(tk, "_modules", {})
    cm = kfuse.compile(Fn(lambda x: torch.relu(x) * 3.0).eval(), (torch.randn(10),), backend="triton")
    files = list((tmp_path / "triton").glob("kt_*.py"))
    assert len(files) == 1 and "@triton.jit" in files[0].read_text()
    assert cm(torch.tensor([-1.0, 2.0] * 5)).tolist() == [0.0, 6.0] * 5


def test_model_names_never_reach_generated_code():
    class Evil(torch.nn.Module):
        def forward(self, x):
            return torch.exp(x) + 1
    cm = kfuse.compile(Evil().eval(), (torch.randn(5),), backend="triton")
    g = cm._last.groups[0]
    src = render_fk(lower(g.nodes, g.outputs, half=True)).source
    for n in g.nodes:
        assert n.name not in src or n.name in ("exp", "add")


def test_autotune_times_candidates_once_and_keeps_one(monkeypatch, tmp_path):
    from kfuse import config
    from kfuse.backends import triton as tr
    from kfuse.backends.c import autotune
    from kfuse.backends.triton import kernel as tk
    x = torch.randn(6, 300)
    cm = kfuse.compile(Fn(lambda x: torch.softmax(x, -1)).eval(), (x,), backend="triton")
    g = cm._last.groups[-1]
    fk = lower(g.nodes, g.outputs, half=True)
    monkeypatch.setattr(tk, "autotune_enabled", lambda: True)
    monkeypatch.setenv("KFUSE_CACHE_DIR", str(tmp_path))     # a cache of its own: nothing chosen yet
    monkeypatch.setattr(config, "_config", config.from_env())
    monkeypatch.setattr(autotune, "_memo", {})
    launches = []                                           # the jit function of each launch
    real = tk.Launch.__call__
    monkeypatch.setattr(tk.Launch, "__call__", lambda self, args: (launches.append(self.fn), real(self, args)))
    kern = tr.build(fk)
    assert len(kern.variants) > 1 and not kern._tuned
    out = torch.full((6, 300), float("nan"))
    kern([x], [out])
    chosen = [fn for _, r, fn in kern.variants if r is kern.rendered]
    assert kern._tuned and len(chosen) == 1
    assert len(launches) == 6 * len(kern.variants) + 1      # each timed (a warm-up and 5), then the call
    assert launches[-1] is chosen[0]
    torch.testing.assert_close(out, torch.softmax(x, -1))
    autotune.flush()
    monkeypatch.setattr(autotune, "_memo", {})              # as a new process: the choice from the file
    launches.clear()
    again = tr.build(fk)
    again([x], [torch.empty(6, 300)])
    assert len(launches) == 1 and again.rendered.source == kern.rendered.source
    assert launches == [fn for _, r, fn in again.variants if r is again.rendered]
    monkeypatch.undo()
    monkeypatch.setenv("KFUSE_TRITON_AUTOTUNE", "0")
    assert len(tr.build(fk).variants) == 1      # the interpreter (or KFUSE_TRITON_AUTOTUNE=0): the default alone


def test_launch_goes_straight_to_the_compiled_kernel_while_alignments_hold(monkeypatch):
    # on a GPU (faked here: the interpreter has no compiled kernels) the second launch skips Triton's
    # binding and goes to the kernel compiled by the first, with every parameter in the signature's
    # order, unless a pointer's 16-byte alignment or an integer changed
    import inspect

    from kfuse.backends.triton import kernel as tk
    from kfuse.backends.triton import rope
    calls = []

    class Compiled:
        def __getitem__(self, grid):
            return lambda *args: calls.append(("compiled", grid, args))

    class Jit:
        def __init__(self, arg_names):
            self.arg_names = arg_names

        def __getitem__(self, grid):
            def launch(*args, num_warps, **constexprs):
                calls.append(("jit", grid, args))
                return Compiled()
            return launch
    monkeypatch.setattr(tk, "interpreting", lambda: False)
    launch = tk.Launch(Jit(["a", "b", "n"]), (3,), 4)
    base = torch.zeros(64)
    a, b = base[:16], base[16:32]
    launch([a, b, 7])
    launch([a, b, 7])
    launch([b, a, 7])
    launch([base[1:17], b, 7])                  # 4 bytes off: another specialisation, through the jit
    launch([base[1:17], b, 8])                  # another integer: the jit again
    assert [c[0] for c in calls] == ["jit", "compiled", "compiled", "jit", "jit"]
    assert calls[2][2] == (b, a, 7) and calls[0][1] == (3,) and calls[1][1] == (3, 1, 1)    # a runner takes 3 dims

    # a runner gets every parameter in the kernel's own signature order, as Triton's call binds them: the
    # rope kernel, and attention's two kernels (split keys) as attention._launch calls them
    from kfuse.backends.triton import attention as tattn

    class Recording:                        # a jit function with a real kernel's signature
        def __init__(self, real):
            self.arg_names, self.sig, self.bound, self.ran = real.arg_names, inspect.signature(real.fn), [], []

        def __getitem__(self, grid):
            def launch(*args, num_warps, num_stages=None, **constexprs):
                self.bound.append(list(self.sig.bind(*args, **constexprs).arguments.values()))
                return Runner(self)
            return launch

    class Runner:                           # its compiled kernel
        def __init__(self, rec):
            self.rec = rec

        def __getitem__(self, grid):
            return lambda *args: self.rec.ran.append(list(args))
    rec = Recording(tk.load(rope.SOURCE).kf_rope)
    launch = tk.Launch(rec, (5,), 4, num_stages=2, WIDE=False, RB=4, D=8, SHARED=True, G=2, BH=4)
    for _ in range(2):
        launch([a, b, a, b, *range(1, 14)])
    mod = tk.load(tattn.SOURCE)

    class Mod:
        kf_attention, kf_combine = Recording(mod.kf_attention), Recording(mod.kf_combine)
    q, kv = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 40, 16)
    out = torch.empty_like(q)
    args = (q, kv, kv, out, q, 0.3, 4, 2, 1, 40, *q.stride()[:3], *kv.stride()[:3], *kv.stride()[:3],
            *out.stride()[:3], 0, 0, 0, 0)
    flags = dict(D=16, BD=16, MASK=0, CAUSAL=False, IEEE=True, ZERO_MASKED=False, FOLD=True)
    for _ in range(2):
        tattn._launch(Mod, (16, 16, 4, 2, False, 2, True), args, flags, 4)
    same = lambda x, y: (x.shape == y.shape and x.dtype == y.dtype) if isinstance(x, torch.Tensor) else x == y  # noqa: E731
    for r in (rec, Mod.kf_attention, Mod.kf_combine):
        assert r.ran and len(r.ran[-1]) == len(r.bound[-1]) and all(map(same, r.ran[-1], r.bound[-1])), r.arg_names
