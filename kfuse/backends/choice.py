"""Timed choices among kernels that compute one function (ours and a library's): the timing closures,
and what our kernels need to run and be saved (the problems' names: autotune.problem)."""
from __future__ import annotations

from dataclasses import dataclass

from .. import config
from .c import autotune
from .c import depthwise as c_depthwise
from .c import dwpw as c_dwpw
from .c import gemm as c_gemm
from .c import squeeze_excite as c_squeeze_excite
from .c import winograd as c_winograd
from .conv import FrameConv


@dataclass
class Contest:
    """A kernel chosen among interchangeable ones by timing each alone, to be timed again in its program
    (runtime/settle.py): alone, a kernel finds its weights and input where the timing left them, and in
    a program they may not be (MobileNetV2's 320 -> 1280 1x1 convolution: oneDNN 0.44 ms alone, 0.73 in
    the program)."""
    key: str        # the cache key of the verdict (autotune.verdict_key)
    names: list     # the candidates
    chosen: str     # the one chosen alone
    make: object    # () -> {name: fn}: each candidate as the group's kernel (backends.make_kernel's fn)


def contest(problem: str, names: list, chosen: str, make, cold: bool = False) -> Contest | None:
    """The Contest of a choice among `names` made alone on `problem` (autotune.pick's), for settle.py to time
    again in the program; None where nothing is to be timed again (one candidate, tuning off, a verdict
    made in a program before)."""
    if len(names) < 2 or not config.get().autotune or autotune.settled(problem, names, cold):
        return None
    return Contest(autotune.verdict_key(problem, names, cold), names, chosen, make)


def timed(cands):
    """Timing closures, each candidate called as it will run: ours (which take `out`) write into one
    buffer, as into their planned one; a library's allocate its output, as they do."""
    def into(k):
        held = []

        def f(args):
            if not held:
                held.append(k(*args))
            return k(*args, out=held[0])
        return f
    return {n: into(k) if takes_out(k) else (lambda args, k=k: k(*args)) for n, k in cands.items()}


def conv_sources(k) -> list[str]:
    """The C sources of a convolution kernel of ours (for artifacts); none for a library's."""
    if isinstance(k, FrameConv):    # ours over a 3-D convolution's frames
        return conv_sources(k.k)
    if isinstance(k, c_depthwise.DepthwiseConv):
        return [c_depthwise.source(k.kh, k.kw, k.stride, k.dilation, k.act_code, wide=w) for w in c_depthwise.WIDTHS]
    if isinstance(k, c_gemm.GemmConv):
        return [c_gemm.source(k.act_code, k.residual, glu=k.glu)]
    if isinstance(k, c_winograd.WinogradConv):
        return [c_winograd.source(k.act_code, k.residual)]
    if isinstance(k, (c_dwpw.DepthwisePointwise, c_dwpw.PointwiseDepthwise)):
        # and its halves': the pair is made from them (a loaded artifact without a compiler makes them too)
        return [k.source(), *conv_sources(k.dw), *conv_sources(k.pw)]
    if isinstance(k, c_squeeze_excite.SqueezeExcite):
        return [c_squeeze_excite.SOURCE]
    if isinstance(k, c_squeeze_excite.SqueezeExcitePointwise):
        return [c_squeeze_excite.SOURCE, *conv_sources(k.pw)]
    return []


OUR_CONVS = (c_depthwise.DepthwiseConv, c_gemm.GemmConv, c_winograd.WinogradConv, c_dwpw.DepthwisePointwise,
              c_dwpw.PointwiseDepthwise, c_squeeze_excite.SqueezeExcite, c_squeeze_excite.SqueezeExcitePointwise)


def takes_out(k) -> bool:
    """Whether kernel k writes into an `out` it is given: our C kernels (and a pair of kernels ending in
    one); a library's allocate their outputs."""
    return isinstance(k, OUR_CONVS) or getattr(k, "takes_out", False)
