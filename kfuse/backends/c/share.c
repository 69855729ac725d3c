/* Work items [0, T) shared by a team, in place of `omp for schedule(static)`: thread i of ns first takes
   the items of its own contiguous share [T i / ns, T (i + 1) / ns) in order (the static schedule's, so a
   thread's items stay adjacent: a row block's panel pairs, a kernel's per-thread buffer reused), then
   whatever is still unclaimed in the other shares. On a VM one vCPU is often slowed for a while (its host
   core shared) while the other is not, and under the static schedule the faster thread waited at the
   closing barrier: timing each thread of a [3136,64] x [64,256] GEMM over 20,000 calls, the slower took
   1.46x the faster's time on average in the slowest quarter of the calls (1.01x in the fastest quarter).
   Taking the slowed thread's remaining items cut the mean call 5-7 percent and the 90th percentile 7-10
   (gemm.c, both schedules alternated). A claim is one relaxed atomic add on a counter the owner mostly
   has to itself (each share on its own cache line); the parallel region's closing barrier orders the
   items' writes before the caller reads them. */
#ifndef KF_SHARE_C
#define KF_SHARE_C
#include <omp.h>
#include <stdint.h>

typedef struct { int64_t next, end; } __attribute__((aligned(64))) kf_share;
#define KF_SHARES 64                /* shares at most; threads past it share a share (still each item once) */

/* The shares of T items for a team of nthreads (before the parallel region); returns their count. */
static inline int kf_shares_init(kf_share *s, int nthreads, int64_t T) {
    const int ns = nthreads < 1 ? 1 : nthreads < KF_SHARES ? nthreads : KF_SHARES;
    for (int i = 0; i < ns; i++) {
        s[i].next = T * i / ns;
        s[i].end = T * (i + 1) / ns;
    }
    return ns;
}

/* The calling thread's next item, -1 when none is left. *step starts at 0: the shares it has found
   empty, its own first. */
static inline int64_t kf_take(kf_share *s, int ns, int *step) {
    const int tid = omp_get_thread_num(), own = tid - tid / ns * ns;   /* no modulo sign: this file goes */
    for (; *step < ns; ++*step) {                                       /* into Python format templates */
        kf_share *sh = &s[own + *step < ns ? own + *step : own + *step - ns];
        if (__atomic_load_n(&sh->next, __ATOMIC_RELAXED) >= sh->end)
            continue;
        const int64_t t = __atomic_fetch_add(&sh->next, 1, __ATOMIC_RELAXED);
        if (t < sh->end)
            return t;
    }
    return -1;
}
#endif
