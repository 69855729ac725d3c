/* Squeeze-and-excitation over an NHWC tensor in one parallel region:
 *
 *   m = mean over H*W of x          [N, C]
 *   h = act1(m w1^T + b1)           [N, R]   w1 [R, C] (dot products along contiguous C)
 *   s = act2(h w2^T + b2)           [N, C]   w2b = w2^T in blocks of CB columns, [ceil(C/CB)][R][CB]
 *                                            (axpy rows along contiguous columns; a block's R x CB weights
 *                                            one contiguous stream, where rows of w2^T [R, C] made R short
 *                                            runs a page apart, which the prefetchers did not follow)
 *   y = x * s[n]                    [N, HW, C]
 *
 * Phases, separated by barriers:
 *   1. m[n][c]: each image's rows in chunks of CHUNK, the chunks shared across threads and summed over
 *      all channels (4 rows at a time, in double), then the chunk sums added in chunk order: each sum
 *      has one order whatever the team size, so the result does not depend on the thread count (the
 *      runtime gives calls made concurrently fewer threads, and their outputs equal a lone call's bit
 *      for bit);
 *   3. h: the R outputs split across threads, 8 dot products over C at a time for every n (the 8 w1
 *      rows are read once for all n);
 *   4. s: the C outputs split across threads in blocks of CB, each block accumulated over the R rows
 *      of w2b's block for every n;
 *   5. y = x * s, the N*HW rows split across threads.
 * Bytes: x read twice (the second time from cache when it fits), y written once, w1 and w2 read once.
 * y may be x itself: every row of x is read in phase 1 before any y is written, and phase 5 writes
 * y[i] from x[i] only.
 *
 * Precision: the row sums and both GEMVs accumulate in double (4 rows are added in float first).
 * With float accumulators the C = 960 dot products were off by up to ~1.5e-5 of |x| in y, as far as
 * torch's own float32 path, which fails a 1e-5 test against float64; in double they cost a convert per
 * weight, hidden behind the weight traffic (w1 and w2 are 1.8 MB at C = 960, R = 240).
 *
 * Scratch (malloc'd per call): double m[N][C], part[N][chunks][C]; float h[N][R], s[N][C] (or the
 * caller's gate, which then receives s).
 * NaN and Inf follow the torch formula: the activations are written so that NaN compares false and
 * passes through, and (+inf) + (-inf) in the sums gives NaN whatever the order of the additions.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

/*VECMATH*/

enum { A_NONE = 0, A_RELU, A_SILU, A_GELU, A_HARDSWISH, A_LEAKY, A_SIGMOID, A_HARDSIGMOID };
#define CB 64            /* channels of one GEMV2 block: 8 vectors of double accumulators per n */
#define CHUNK 32         /* rows of one partial mean (phase 1): its zeroing and combining cost ~3 rows */

KF_INLINE float clamp06(float t) { t = t < 0.0f ? 0.0f : t; return t > 6.0f ? 6.0f : t; }

/* v[0:n] = act(v[0:n]); one vectorised loop per activation. */
static void act_inplace(float *v, int64_t n, int act, float slope)
{
    switch (act) {
    case A_RELU:
        #pragma omp simd
        for (int64_t i = 0; i < n; i++) v[i] = v[i] < 0.0f ? 0.0f : v[i];
        break;
    case A_SILU:
        #pragma omp simd
        for (int64_t i = 0; i < n; i++) v[i] = v[i] / (1.0f + kf_exp(-v[i]));
        break;
    case A_GELU:
        #pragma omp simd
        for (int64_t i = 0; i < n; i++) v[i] = v[i] * kf_phi(v[i]);
        break;
    case A_HARDSWISH:
        #pragma omp simd
        for (int64_t i = 0; i < n; i++) v[i] = v[i] * clamp06(v[i] + 3.0f) / 6.0f;
        break;
    case A_LEAKY:
        #pragma omp simd
        for (int64_t i = 0; i < n; i++) v[i] = v[i] < 0.0f ? v[i] * slope : v[i];
        break;
    case A_SIGMOID:
        #pragma omp simd
        for (int64_t i = 0; i < n; i++) v[i] = 1.0f / (1.0f + kf_exp(-v[i]));
        break;
    case A_HARDSIGMOID:
        #pragma omp simd
        for (int64_t i = 0; i < n; i++) v[i] = clamp06(v[i] + 3.0f) / 6.0f;
        break;
    default:
        break;
    }
}

/* [lo, hi) of thread t's share of n items cut in blocks of `align`. */
static void share(int64_t n, int64_t align, int t, int nt, int64_t *lo, int64_t *hi)
{
    int64_t blocks = (n + align - 1) / align, per = (blocks + nt - 1) / nt;
    int64_t a = (int64_t)t * per * align, b = a + per * align;
    *lo = a < n ? a : n;
    *hi = b < n ? b : n;
}

/* Returns 0, or -1 when the scratch cannot be allocated. */
int kf_squeeze_excite(const float *x, float *y, float *gate, const float *w1, const float *b1, const float *w2b,
                      const float *b2, int64_t N, int64_t HW, int64_t C, int64_t R,
                      int64_t act1, int64_t act2, float slope, int64_t nthreads)
{
    if (nthreads < 1) nthreads = 1;
    const int64_t nch = (HW + CHUNK - 1) / CHUNK;
    size_t doubles = (size_t)(N * C + N * nch * C), floats = (size_t)(N * R + N * C);
    double *scratch = malloc(doubles * sizeof(double) + floats * sizeof(float));
    if (!scratch) return -1;
    double *m = scratch;
    double *part = m + N * C;
    float *h = (float *)(part + N * nch * C), *s = gate ? gate : h + N * R;
    const int64_t rows = N * HW;
    const double hw = (double)HW;

    #pragma omp parallel num_threads(nthreads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t r0, r1, lo, hi;

        /* 1. the means: each image's rows cut in chunks of CHUNK rows,
              the chunks shared across threads, each summed over all C channels (contiguous rows, 4 at a
              time, in double) into part[n][k]; then m[n][c] = the chunks' sums added in chunk order.
              Every sum has one order whatever the team size, so the result does not depend on the
              thread count (the runtime gives calls made concurrently fewer threads, and their outputs
              equal a lone call's bit for bit) */
        share(N * nch, 1, t, nt, &lo, &hi);
        for (int64_t it = lo; it < hi; it++) {
            const int64_t n = it / nch, k = it % nch, i0 = k * CHUNK, i1 = i0 + CHUNK < HW ? i0 + CHUNK : HW;
            double *acc = part + it * C;
            const float *xn = x + n * HW * C;
            for (int64_t c = 0; c < C; c++) acc[c] = 0.0;
            int64_t i = i0;
            for (; i + 4 <= i1; i += 4) {
                const float *a = xn + i * C;
                #pragma omp simd
                for (int64_t c = 0; c < C; c++)
                    acc[c] += (a[c] + a[C + c]) + (a[2 * C + c] + a[3 * C + c]);
            }
            for (; i < i1; i++) {
                const float *a = xn + i * C;
                #pragma omp simd
                for (int64_t c = 0; c < C; c++) acc[c] += a[c];
            }
        }
        #pragma omp barrier
        share(N * C, 16, t, nt, &lo, &hi);
        for (int64_t j = lo; j < hi; j++) {
            const int64_t n = j / C, c = j % C;
            double v = 0.0;
            for (int64_t k = 0; k < nch; k++) v += part[(n * nch + k) * C + c];
            m[j] = v / hw;
        }
        #pragma omp barrier

        /* 3. h = act1(m w1^T + b1), R outputs split; 8 rows of w1 at a time give 8 independent
              accumulator chains (one chain was FMA-latency bound: 960 x 240, 1x1 took 25 us) */
        share(R, 1, t, nt, &lo, &hi);
        int64_t r = lo;
        for (; r + 8 <= hi; r += 8) {
            const float *w = w1 + r * C;
            for (int64_t n = 0; n < N; n++) {
                const double *mn = m + n * C;
                double a0 = 0.0, a1 = 0.0, a2 = 0.0, a3 = 0.0, a4 = 0.0, a5 = 0.0, a6 = 0.0, a7 = 0.0;
                #pragma omp simd reduction(+:a0, a1, a2, a3, a4, a5, a6, a7)
                for (int64_t c = 0; c < C; c++) {
                    const double v = mn[c];
                    a0 = fma(v, (double)w[c], a0);
                    a1 = fma(v, (double)w[C + c], a1);
                    a2 = fma(v, (double)w[2 * C + c], a2);
                    a3 = fma(v, (double)w[3 * C + c], a3);
                    a4 = fma(v, (double)w[4 * C + c], a4);
                    a5 = fma(v, (double)w[5 * C + c], a5);
                    a6 = fma(v, (double)w[6 * C + c], a6);
                    a7 = fma(v, (double)w[7 * C + c], a7);
                }
                const double acc[8] = {a0, a1, a2, a3, a4, a5, a6, a7};
                for (int k = 0; k < 8; k++) h[n * R + r + k] = (float)(b1 ? acc[k] + b1[r + k] : acc[k]);
            }
        }
        for (; r < hi; r++) {
            const float *w = w1 + r * C;
            for (int64_t n = 0; n < N; n++) {
                const double *mn = m + n * C;
                double acc = 0.0;
                #pragma omp simd reduction(+:acc)
                for (int64_t c = 0; c < C; c++) acc = fma(mn[c], (double)w[c], acc);
                h[n * R + r] = (float)(b1 ? acc + b1[r] : acc);
            }
        }
        for (int64_t n = 0; n < N && hi > lo; n++) act_inplace(h + n * R + lo, hi - lo, (int)act1, slope);
        #pragma omp barrier

        /* 4. s = act2(h w2^T + b2), C outputs split in blocks of CB; 4 rows of w2b's block per pass over the
              block's accumulators (in L1), so each accumulator vector is loaded and stored once per
              4 FMAs and the CB / 8 vectors are independent chains */
        share(C, CB, t, nt, &lo, &hi);
        for (int64_t c0 = lo; c0 < hi; c0 += CB) {
            const int64_t nc = hi - c0 < CB ? hi - c0 : CB;
            const float *wblk = w2b + c0 * R;               /* block c0 / CB: [R][CB] */
            for (int64_t n = 0; n < N; n++) {
                double acc[CB];
                #pragma omp simd
                for (int64_t j = 0; j < nc; j++) acc[j] = b2 ? b2[c0 + j] : 0.0;
                const float *hn = h + n * R;
                int64_t k = 0;
                for (; k + 4 <= R; k += 4) {
                    const double h0 = hn[k], h1 = hn[k + 1], h2 = hn[k + 2], h3 = hn[k + 3];
                    const float *w0 = wblk + k * CB, *wa = w0 + CB, *wb = w0 + 2 * CB, *wc = w0 + 3 * CB;
                    #pragma omp simd
                    for (int64_t j = 0; j < nc; j++)
                        acc[j] = fma(h3, (double)wc[j], fma(h2, (double)wb[j], fma(h1, (double)wa[j],
                                     fma(h0, (double)w0[j], acc[j]))));
                }
                for (; k < R; k++) {
                    const double hv = hn[k];
                    const float *w = wblk + k * CB;
                    #pragma omp simd
                    for (int64_t j = 0; j < nc; j++) acc[j] = fma(hv, (double)w[j], acc[j]);
                }
                float *sn = s + n * C + c0;
                #pragma omp simd
                for (int64_t j = 0; j < nc; j++) sn[j] = (float)acc[j];
                act_inplace(sn, nc, (int)act2, 0.0f);
            }
        }
        #pragma omp barrier

        /* 5. y = x * s, rows split (skipped when y is NULL: the gate s alone was asked for, the
              caller folds it into the 1x1 convolution that reads y) */
        share(y ? rows : 0, 1, t, nt, &r0, &r1);
        for (int64_t i = r0; i < r1;) {
            const int64_t n = i / HW, end = (n + 1) * HW < r1 ? (n + 1) * HW : r1;
            const float *sn = s + n * C;
            for (; i < end; i++) {
                const float *a = x + i * C;
                float *o = y + i * C;
                #pragma omp simd
                for (int64_t c = 0; c < C; c++) o[c] = a[c] * sn[c];
            }
        }
    }
    free(scratch);
    return 0;
}
