"""Growable KV-cache buffers (runtime/kvcache.py): append is torch.cat in value, writes in place only
into the latest view of a buffer with room, and never changes a tensor anyone holds."""

import pytest
import torch
from helpers import in_threads

from kfuse.runtime import kvcache


def r(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def test_append_is_cat_and_writes_in_place_into_the_latest_view():
    past, rows = kvcache.adopt(r(2, 3, 5, 4), -2), []
    first = past.data_ptr()
    want = past.clone()
    for i in range(7):
        new = r(2, 3, 1 + i % 2, 4, seed=i + 1)
        want = torch.cat([want, new], -2)
        past = kvcache.append([past, new], dim=-2)
        rows.append(past.shape[-2])
        assert torch.equal(past, want)
        assert past.data_ptr() == first                       # no copy of the cache
    assert past.untyped_storage().nbytes() == 2 * 3 * kvcache.capacity(5) * 4 * 4


def test_older_views_never_change_and_branches_get_their_own_buffer():
    base = kvcache.adopt(r(1, 2, 4, 8), 2)
    a = kvcache.append([base, r(1, 2, 1, 8, seed=1)], 2)        # in place: base's buffer
    snapshot_base, snapshot_a = base.clone(), a.clone()
    b = kvcache.append([base, r(1, 2, 1, 8, seed=2)], 2)        # base is no longer the latest: a copy
    assert b.data_ptr() != a.data_ptr()
    assert torch.equal(a, snapshot_a) and torch.equal(base, snapshot_base)
    assert torch.equal(b, torch.cat([snapshot_base, r(1, 2, 1, 8, seed=2)], 2))
    cropped = a[:, :, :3]                                       # DynamicCache.crop
    c = kvcache.append([cropped, r(1, 2, 1, 8, seed=3)], 2)
    assert c.data_ptr() != a.data_ptr() and torch.equal(a, snapshot_a)


def test_full_buffer_regrows_and_other_inputs_fall_back_to_a_new_buffer():
    past = kvcache.adopt(r(1, 1, 3, 2), -2)
    cap = kvcache.capacity(3)
    big = r(1, 1, cap - 3 + 1, 2, seed=4)                         # one row more than fits
    grown = kvcache.append([past, big], -2)
    assert grown.data_ptr() != past.data_ptr() and torch.equal(grown, torch.cat([past, big], -2))
    plain = r(1, 1, 3, 2)                                         # not ours (e.g. beam search's reorder)
    out = kvcache.append([plain, big], -2)
    assert torch.equal(out, torch.cat([plain, big], -2))
    assert out.untyped_storage().nbytes() == out.numel() * 4     # torch.cat's: no spare rows
    assert not kvcache.growable(out) and kvcache.growable(grown)
    empty = torch.tensor([])                                      # a lazily initialised cache
    assert torch.equal(kvcache.append([empty, plain], -2), plain)
    with pytest.raises(RuntimeError):                             # shapes that torch.cat refuses
        kvcache.append([past, r(1, 2, 1, 2)], -2)


def test_concurrent_appends_to_one_view_copy_all_but_one():
    base = kvcache.adopt(r(1, 2, 16, 8), 2)
    news = [r(1, 2, 1, 8, seed=10 + i) for i in range(8)]
    outs = [None] * 8

    def run(i):
        outs[i] = kvcache.append([base, news[i]], 2)
    in_threads(8, run)
    for o, n in zip(outs, news):
        assert torch.equal(o, torch.cat([base, n], 2))
    assert sum(o.data_ptr() == base.data_ptr() for o in outs) == 1


def test_reserve_leaves_only_in_place_rows_to_the_caller():
    """reserve: where the rows go into the buffer in place, the view one append longer and True (the
    caller writes its last rows: the decode step's attention kernel); anywhere else append's result."""
    past = kvcache.adopt(r(1, 2, 4, 8), -2)
    new = r(1, 2, 1, 8, seed=1)
    view, pending = kvcache.reserve([past, new], dim=-2)
    assert pending and view.shape[-2] == 5 and view.data_ptr() == past.data_ptr()
    assert torch.equal(view[:, :, :4], past)
    view[:, :, 4:] = new
    assert torch.equal(kvcache.append([view, new], -2), torch.cat([past, new, new], -2))
    older, pending = kvcache.reserve([past, new], dim=-2)     # not the latest view: a new buffer, written
    assert not pending and torch.equal(older, torch.cat([past, new], -2))
    plain, pending = kvcache.reserve([r(1, 2, 4, 8), new], dim=-2)   # not a cache: torch.cat
    assert not pending and plain.shape[-2] == 5


def test_sliding_window_appends_in_place_and_copies_only_the_window_when_full():
    """Mistral's cache: the step's keys are cat([past, new]), the cache keeps their last w rows. The
    window is a view of the same buffer and appends in place; once the spare rows are used up only
    the window moves into a new buffer; older windows never change."""
    w = 6
    past = kvcache.window(kvcache.adopt(r(1, 2, 4, 8), 2), w, 2)
    want = past.clone()
    cap, moves, held = kvcache.capacity(4), 0, []
    for i in range(cap + 3):
        new = r(1, 2, 1, 8, seed=i + 1)
        full = kvcache.append([past, new], 2)
        want_full = torch.cat([want, new], 2)
        assert torch.equal(full, want_full)
        moves += full.untyped_storage().data_ptr() != past.untyped_storage().data_ptr()
        held.append((past, past.clone()))
        past, want = kvcache.window(full, w, 2), want_full[:, :, -w:]
        assert torch.equal(past, want) and past.shape[2] == min(w, 5 + i)
    assert moves == 1                                          # one regrowth, the window copied
    assert past.untyped_storage().nbytes() == 2 * kvcache.capacity(w + 1) * 8 * 4
    assert all(torch.equal(t, snapshot) for t, snapshot in held)
    stale = held[-3][0]                                        # an older window: its own buffer
    grown = kvcache.append([stale, r(1, 2, 1, 8)], 2)
    assert grown.untyped_storage().data_ptr() != past.untyped_storage().data_ptr()
    plain = r(1, 2, 9, 8)
    assert torch.equal(kvcache.window(plain, 4, 2), plain[:, :, -4:]) and not kvcache.growable(kvcache.window(plain, 4, 2))
