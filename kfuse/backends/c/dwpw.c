/* A depthwise and a 1x1 convolution in one kernel, in either order (kf_dwpw, kf_pwdw below).
   Depthwise, then the 1x1 convolution that reads it: a block of the depthwise
   output's rows goes to a per-thread buffer (sized by dwpw.py to stay in L2), and the 1x1 GEMM's tiles
   read it from there; the depthwise output never goes to memory. Appended by dwpw.py to gemm.c (its
   act renamed pw_act) and depthwise.c (act renamed dw_act), whose constants KH..DW, ACT (depthwise)
   and RES (1x1) it uses. x [N, H, W, C], out and r [N, OH, OW, Cout]. Each thread mallocs its own RB OW C
   floats per call (64 KB: from the heap, not fresh pages), so concurrent calls never share a buffer.
   Returns 0, or -1 when a buffer cannot be allocated. */
#include <omp.h>
#include <stdlib.h>
#include <string.h>

/* dims: N H W C OH OW PH PW Cout NRB (work items per image: item i takes the depthwise output rows
   [i OH / NRB, (i + 1) OH / NRB), a row apart in size at most); prm: the depthwise activation's two scalars,
   then the 1x1's */
int kf_dwpw(const float *restrict x, const float *restrict dw_w, const float *restrict dw_b,
            const float *restrict zero, const float *restrict pw_w, const float *restrict pw_b,
            const float *restrict r, float *restrict out, const int64_t *dims, const float *prm, int nthreads) {
    const int64_t N = dims[0], H = dims[1], W = dims[2], C = dims[3], OH = dims[4], OW = dims[5];
    const int64_t PH = dims[6], PW = dims[7], CO = dims[8], nrb = dims[9] < 1 ? 1 : dims[9];
    const int64_t RB = (OH + nrb - 1) / nrb, P = (CO + 15) / 16, NP2 = (P + 1) / 2, ps = 16 * C;
    int64_t ow_lo, ow_hi;
    interior_cols(W, OW, PW, &ow_lo, &ow_hi);
    int failed = 0;
    kf_share shares[KF_SHARES];
    const int ns = kf_shares_init(shares, nthreads, N * nrb);
    #pragma omp parallel num_threads(nthreads)
    {
        float *buf = malloc(RB * OW * C * sizeof(float));
        const float *ap[MR];
        if (!buf) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp barrier
        int bad;
        #pragma omp atomic read
        bad = failed;
        if (!bad) {
            int step = 0;
            for (int64_t t; (t = kf_take(shares, ns, &step)) >= 0; ) {
                const int64_t n = t / nrb, oh0 = t % nrb * OH / nrb, oh1 = (t % nrb + 1) * OH / nrb;
                for (int64_t oh = oh0; oh < oh1; oh++)
                    dw_row(x + n * H * W * C, dw_w, dw_b, zero, buf + (oh - oh0) * OW * C, oh, 0, C, H, W, C, OW,
                           PH, PW, ow_lo, ow_hi, prm[0], prm[1]);
                const int64_t rows = (oh1 - oh0) * OW, base = (n * OH + oh0) * OW;
                for (int64_t pp = 0; pp < NP2; pp++) {
                    const int64_t n0 = 32 * pp;
                    const int nv = pair_panels(pp, P);
                    const int cols = CO - n0 < 32 ? (int)(CO - n0) : 32;
                    for (int64_t m = 0; m < rows; m += MR) {
                        const int mr = rows - m < MR ? (int)(rows - m) : MR;
                        for (int i = 0; i < mr; i++)
                            ap[i] = buf + (m + i) * C;
                        tile_any(mr, nv, ap, 1, C, pw_w + 2 * pp * ps, ps, out + (base + m) * CO + n0, CO, cols,
                                 pw_b + n0, RES ? r + (base + m) * CO + n0 : 0, prm[2], prm[3], 0);
                    }
                }
            }
        }
        free(buf);
    }
    return failed ? -1 : 0;
}

/* The other order: a 1x1 convolution (expand), then the depthwise convolution that reads it. A work item
   is one output row of one chunk of channels (the two convolutions' channels are independent: the 1x1's
   output columns are the depthwise's channels); each thread runs a contiguous range of items in order,
   computing each expanded input row's chunk once into a per-thread buffer of RB rows (W C floats each)
   that slides down the image: when the next output row's window would run past the buffer's end, the
   rows it still needs move to the front (a few rows every RB - window rows). The depthwise row then reads
   the buffer as the image (its row pointer offset by the buffer's first row), so the expanded tensor
   never goes to memory. x [N, H, W, CI] (its pixels XS floats apart), out [N, OH, OW, C]. dims: N H W CI C OH OW
   PH PW RB, nck (channel chunks: more items where rows are few), ck (channels per chunk, a multiple of 32),
   XS (CI, or more for a channel slice of a wider map read in place: ShuffleNet's chunk); prm: the depthwise
   activation's two scalars, then the 1x1's. */
/* Channels [c0, c1) of the 1x1 convolution of M consecutive pixels xr (CI channels each) into row (C
   channels each): the panel pairs covering the chunk, each over all M pixels (tiles run across row ends). */
static void expand_rows(const float *restrict xr, const float *restrict pw_w, const float *restrict pw_b,
                        float *restrict row, int64_t M, int64_t CI, int64_t XS, int64_t C, int64_t c0, int64_t c1,
                        float p0, float p1) {
    const int64_t P = (C + 15) / 16, ps = 16 * CI;
    const float *ap[MR];
    for (int64_t pp = c0 / 32; pp < (c1 + 31) / 32; pp++) {
        const int64_t n0 = 32 * pp;
        const int nv = pair_panels(pp, P);
        const int cols = C - n0 < 32 ? (int)(C - n0) : 32;
        for (int64_t m = 0; m < M; m += MR) {
            const int mr = M - m < MR ? (int)(M - m) : MR;
            for (int i = 0; i < mr; i++)
                ap[i] = xr + (m + i) * XS;
            tile_any(mr, nv, ap, 1, CI, pw_w + 2 * pp * ps, ps, row + m * C + n0, C, cols, pw_b + n0, 0, p0, p1, 0);
        }
    }
}

int kf_pwdw(const float *restrict x, const float *restrict pw_w, const float *restrict pw_b,
            const float *restrict dw_w, const float *restrict dw_b, const float *restrict zero,
            float *restrict out, const int64_t *dims, const float *prm, int nthreads) {
    const int64_t N = dims[0], H = dims[1], W = dims[2], CI = dims[3], C = dims[4], OH = dims[5], OW = dims[6];
    const int64_t PH = dims[7], PW = dims[8], RB = dims[9], nck = dims[10], ck = dims[11], rs = W * C;
    const int64_t XS = dims[12];        /* x's pixel stride: CI, or more for a channel slice read in place */
    const int64_t span = (KH - 1) * DH + 1;
    int64_t ow_lo, ow_hi;
    interior_cols(W, OW, PW, &ow_lo, &ow_hi);
    if (RB < (span < H ? span : H) || XS < CI || ck % 32)     /* a window fits; whole panel pairs */
        return -1;
    int failed = 0;
    #pragma omp parallel num_threads(nthreads)
    {
        /* a static contiguous range of items per thread, as `omp for schedule(static)` gives, computed here
           so a thread knows the last row of each (image, chunk) it runs */
        const int64_t T = N * nck * OH, nt = omp_get_num_threads(), id = omp_get_thread_num();
        const int64_t t0 = T * id / nt, t1 = T * (id + 1) / nt;
        float *buf = t1 > t0 ? malloc(RB * rs * sizeof(float)) : 0;
        int64_t cur = -1, base = 0, end = 0;     /* the (image, chunk) and its rows [base, end) the buffer holds */
        if (t1 > t0 && !buf) {
            #pragma omp atomic write
            failed = 1;
        }
        for (int64_t t = t0; buf && t < t1; t++) {
            const int64_t item = t / OH, n = item / nck, c0 = item % nck * ck, c1 = c0 + ck < C ? c0 + ck : C;
            const int64_t oh = t % OH, ih0 = oh * SH - PH;
            const int64_t lo = ih0 > 0 ? ih0 : 0, hi = ih0 + span < H ? ih0 + span : H;
            if (item != cur || lo >= end) {
                cur = item;
                base = end = lo;
            } else if (hi - base > RB) {
                memmove(buf, buf + (lo - base) * rs, (end - lo) * rs * sizeof(float));
                base = lo;
            }
            if (end < hi) {
                /* the rows this and the thread's later rows of the item read, as far as the buffer holds:
                   one GEMM over all of them, its tiles running across row ends */
                const int64_t last = (item + 1) * OH - 1 < t1 - 1 ? OH - 1 : (t1 - 1) % OH;
                int64_t to = last * SH - PH + span < H ? last * SH - PH + span : H;
                if (to > base + RB)
                    to = base + RB;
                expand_rows(x + (n * H + end) * W * XS, pw_w, pw_b, buf + (end - base) * rs, (to - end) * W, CI, XS, C, c0,
                            c1, prm[2], prm[3]);
                end = to;
            }
            dw_row(buf - base * rs, dw_w, dw_b, zero, out + (n * OH + oh) * OW * C, oh, c0, c1, H, W, C, OW, PH, PW,
                   ow_lo, ow_hi, prm[0], prm[1]);
        }
        free(buf);
    }
    return failed ? -1 : 0;
}
