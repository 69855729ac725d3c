"""share.c, the work items a C kernel's team shares (gemm, Winograd, depthwise, depthwise + 1x1): every
item is taken exactly once whatever the team, a thread starts on its own contiguous share in order, and a
thread that is held up has its remaining items taken by the others."""
from __future__ import annotations

import ctypes

import pytest
import torch

from kfuse.backends.c.compiler import load
from kfuse.backends.c.conv_act import SHARE_C

# twice, as the depthwise + 1x1 kernels (gemm.c and depthwise.c appended) include it: its guard keeps one
SOURCE = SHARE_C + SHARE_C + r"""
#include <time.h>
/* Items [0, T) over `team` threads with shares planned for `planned`; taker[t]: the thread that took
   item t (-1 before); order[t]: its rank among the taker's items. Thread `late` first sleeps 200 ms. */
void kf_test_take(int64_t T, int planned, int team, int late, int32_t *taker, int32_t *order) {
    kf_share shares[KF_SHARES];
    const int ns = kf_shares_init(shares, planned, T);
    #pragma omp parallel num_threads(team)
    {
        if (omp_get_thread_num() == late) {
            struct timespec d = {0, 200000000};
            nanosleep(&d, 0);
        }
        int step = 0, rank = 0;
        for (int64_t t; (t = kf_take(shares, ns, &step)) >= 0; ) {
            if (__atomic_exchange_n(&taker[t], omp_get_thread_num(), __ATOMIC_RELAXED) != -1)
                taker[t] = -2;       /* taken twice */
            order[t] = rank++;
        }
    }
}
"""


def take(T, planned, team, late=-1):
    f = load(SOURCE).kf_test_take
    f.argtypes = [ctypes.c_int64, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p]
    taker, order = torch.full((max(T, 1),), -1, dtype=torch.int32), torch.zeros(max(T, 1), dtype=torch.int32)
    f(T, planned, team, late, taker.data_ptr(), order.data_ptr())
    return taker[:T], order[:T]


@pytest.mark.parametrize("T,planned,team", [(0, 2, 2), (1, 2, 2), (7, 2, 2), (112, 2, 2), (5, 3, 3), (100, 4, 2),
                                            (100, 2, 4), (1000, 70, 70), (3, 8, 8)])
def test_every_item_is_taken_once(T, planned, team):
    """A team smaller than planned (the others' shares are taken over), larger (threads past the shares
    share one), more threads than KF_SHARES, fewer items than threads."""
    taker, _ = take(T, planned, team)
    assert (taker >= 0).all(), taker


def test_a_thread_takes_its_own_share_first_in_order():
    """(A thread that starts late may find its share taken: it then takes none of it.)"""
    T, n = 90, 3
    taker, order = take(T, n, n)
    for i in range(n):
        mine = [t for t in range(T * i // n, T * (i + 1) // n) if taker[t] == i]
        assert [int(order[t]) for t in mine] == list(range(len(mine))), (i, taker, order)


def test_a_late_thread_s_items_are_taken_by_the_others():
    T = 64
    taker, _ = take(T, 2, 2, late=0)
    assert (taker >= 0).all()
    assert (taker[: T // 2] == 1).sum() >= T // 4, taker      # thread 1 took most of thread 0's share
