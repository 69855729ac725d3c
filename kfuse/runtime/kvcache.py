"""Growable KV caches for decoding under torch.compile.

Hugging Face's DynamicCache grows by `torch.cat([past, new], dim=-2)` every token: each step copies
the whole cache of every layer to add one row. A Dynamo graph whose output is such a concatenation
(kfuse/dynamo.py finds them) hands the result out as a view of a larger buffer instead; the next
step's concatenation, given that view back, writes only the new rows into the buffer's spare rows and
returns a view one row longer. The values are the concatenation's, bit for bit.

A sliding-window cache (Mistral's: the step's keys are cat([past, new]), the cache keeps their last
w rows) keeps a `window` view of the same buffer, ending at its fill: appending to it extends it in
place too, and the buffer is copied (the window only) once its spare rows are used up.

A view is appended to in place only when it is the buffer's latest (it ends at the buffer's fill):
one grown from an older view gets a buffer of its own, so no tensor anyone holds ever changes (views
cover rows below the fill, appends write rows at and past it). The buffer rides on the view as an
attribute, so nothing global keeps it alive and no address is trusted.
Only caches that started empty (a lazily initialised DynamicCache layer) grow this way: a concatenation
of any other tensor stays torch.cat (no spare rows for tensors that are not caches), and so does a
cache cropped or reordered for beam search (new tensors, not views of ours).
"""
from __future__ import annotations

import threading

import torch

_lock = threading.Lock()     # a check-and-fill is one step, for caches shared across threads
ALIGN = 64                   # capacity granularity, in rows


class _Buffer:
    __slots__ = ("data", "dim", "fill", "ptr", "row", "strides", "dtype", "head", "tail")

    def __init__(self, data: torch.Tensor, dim: int, fill: int):
        self.data, self.dim, self.fill = data, dim, fill
        # what _latest compares a view with, read once (it runs twice per layer and decode step)
        self.ptr, self.row, self.strides, self.dtype = data.data_ptr(), data.stride(dim) * data.element_size(), \
            data.stride(), data.dtype
        self.head, self.tail = tuple(data.shape[:dim]), tuple(data.shape[dim + 1:])


def capacity(rows: int) -> int:
    """Rows to allocate for `rows`: half as many again, at least 256 spare (a generation of a few
    hundred tokens never regrows), rounded up to ALIGN; growth by 1.5x keeps regrowth amortised O(1)."""
    want = rows + max(rows // 2, 256)
    return -(-want // ALIGN) * ALIGN


def _latest(t: torch.Tensor, dim: int) -> tuple[_Buffer, int] | None:
    """(the buffer, the row `t` starts at) where `t` is a latest view of one: rows of it along dim
    that end at its fill, whole along the other dims."""
    b = getattr(t, "_kfuse_kv", None)
    if b is None or b.dim != dim or t.dtype != b.dtype or t.stride() != b.strides:
        return None
    shape = t.shape
    if shape[:dim] != b.head or shape[dim + 1:] != b.tail:
        return None
    start, rest = divmod(t.data_ptr() - b.ptr, b.row)
    if rest or start < 0 or start + shape[dim] != b.fill:
        return None
    return b, start


def _view(b: _Buffer, start: int = 0) -> torch.Tensor:
    v = b.data.narrow(b.dim, start, b.fill - start)
    v._kfuse_kv = b
    return v


def _fresh(parts: list[torch.Tensor], dim: int) -> torch.Tensor:
    """A new buffer holding the concatenation of `parts` along `dim`, and its view."""
    rows = sum(p.shape[dim] for p in parts)
    shape = list(parts[-1].shape)
    shape[dim] = capacity(rows)
    dtype = parts[0].dtype if len(parts) == 1 else torch.promote_types(parts[0].dtype, parts[1].dtype)
    data = torch.empty(shape, dtype=dtype, device=parts[-1].device)
    b = _Buffer(data, dim, rows)
    torch.cat(parts, dim=dim, out=data.narrow(dim, 0, rows))
    return _view(b)


def window(t: torch.Tensor, rows: int, dim: int) -> torch.Tensor:
    """t's last `rows` rows along dim (all of them where it has fewer), as `t[..., -rows:, ...]` gives
    them; a view of t's buffer, appended to in place, where t is a growable cache."""
    n = t.shape[dim]
    v = t.narrow(dim, max(n - rows, 0), min(rows, n))
    b = getattr(t, "_kfuse_kv", None)
    if b is not None:
        v._kfuse_kv = b
    return v


def growable(t: torch.Tensor) -> bool:
    """Whether t is a cache that grows into buffers with spare rows: a view of one (the latest or not),
    or the empty 1-D tensor a lazily initialised cache starts from. Other tensors concatenated the same
    way are not caches kfuse started, and get no spare rows."""
    return hasattr(t, "_kfuse_kv") or (t.dim() == 1 and t.numel() == 0)


def append(tensors, dim: int = 0) -> torch.Tensor:
    """torch.cat([past, new], dim) for a cache: in place into past's buffer when past is its latest
    view and the rows fit, else into a new buffer with spare rows; torch.cat itself where past is not
    a growable cache."""
    out, pending = reserve(tensors, dim)
    if pending:
        write_rows(out, tensors[1], dim)
    return out


def write_rows(view: torch.Tensor, new: torch.Tensor, dim: int) -> None:
    """The rows `reserve` left pending: `new` into the last new.shape[dim] rows of `view` along dim."""
    view.narrow(dim, view.shape[dim] - new.shape[dim], new.shape[dim]).copy_(new)


def reserve(tensors, dim: int = 0) -> tuple[torch.Tensor, bool]:
    """(append(tensors, dim), False), or (the view one append longer, True) where the new rows go into
    past's buffer in place and are left for the caller to write (its last rows along dim): the decode
    step's attention kernel writes them as it starts (kfuse/dynamo.py, sdpa_appending)."""
    past, new = tensors
    if not growable(past):
        return torch.cat(tensors, dim), False
    dim = dim % new.dim()
    if past.dim() == new.dim() and past.device == new.device:
        with _lock:
            found = _room(past, new.shape, new.dtype, dim)
            if found is not None:
                b, start = found
                b.fill += new.shape[dim]
                return _view(b, start), True
    if past.numel() == 0 and past.dim() == 1:     # a lazily initialised cache: torch.cat skips it
        return _fresh([new], dim), False
    return _fresh([past, new], dim), False


def _room(past: torch.Tensor, shape, dtype, dim: int) -> tuple[_Buffer, int] | None:
    """(buffer, start) where rows of `shape` and `dtype` append to `past` in place: it is the latest view of
    its buffer, the rows fit in the spare ones and match it along the other dims (under _lock)."""
    found = _latest(past, dim)      # past's shape but along dim is its buffer's (head, tail)
    if found is None:
        return None
    b = found[0]
    if b.dtype != dtype or b.fill + shape[dim] > b.data.shape[dim] or shape[:dim] != b.head or shape[dim + 1:] != b.tail:
        return None
    return found


def grow(caches: list, dim: int) -> list[torch.Tensor] | None:
    """For (past, rows' shape, dtype) of each cache: the view `reserve` returns where the rows append in place
    (their writing left to the caller), for all of them or for none (None: one is not the latest view of its
    buffer with the rows to spare). A decode step composed into one C call grows every layer's cache first."""
    with _lock:
        found = []
        for past, shape, dtype in caches:
            f = _room(past, shape, dtype, dim) if past.is_cpu else None
            if f is None or any(f[0] is b for b, _, _ in found):
                return None
            found.append((*f, shape[dim]))
        for b, _, rows in found:
            b.fill += rows
        return [_view(b, start) for b, start, _ in found]


def adopt(t: torch.Tensor, dim: int) -> torch.Tensor:
    """`t` (a cache a graph computed) as the latest view of a buffer with spare rows: itself when it
    already is one, else copied into a new buffer."""
    if _latest(t, dim % t.dim()) is not None:
        return t
    return _fresh([t], dim % t.dim())
