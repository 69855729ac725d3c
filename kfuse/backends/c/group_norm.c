/* GroupNorm over an NHWC tensor, optionally followed by SiLU, in one parallel region:
 *
 *   x [N, HW, C], G groups of Cg = C / G consecutive channels
 *   mean[n][g], var[n][g] over the HW * Cg values of (n, g) (biased variance, as F.group_norm)
 *   y = (x - mean) * rstd * w[c] + b[c], rstd = 1 / sqrt(var + eps); then y = y * sigmoid(y) if silu
 *
 * Phases, separated by barriers:
 *   1. the N*HW rows of C floats are cut into one contiguous range per thread; each thread sums its
 *      rows (4 at a time) into its own partial sums part[t][n] = {S1[C], S2[C]}, in double, of the
 *      values shifted by K[n][c] = x[n][0][c] (the first row of image n):
 *          S1 = sum (x - K),  S2 = sum (x - K)^2;
 *   2. the (n, g) pairs are split across threads: each adds up the partial sums of its channels over
 *      the threads that had rows of image n, takes per channel mean_c = K + S1 / HW and
 *      M2_c = S2 - S1^2 / HW, combines the channels of the group with Chan's formula
 *          mean = avg_c mean_c,  M2 = sum_c M2_c + HW sum_c (mean_c - mean)^2,  var = M2 / (HW Cg)
 *      and writes the per-(n, c) coefficients of phase 3 (mean split into float hi + lo, a = rstd w[c]);
 *   3. y = fma((x - mean_hi) - mean_lo, a, b) (+ silu) over the same rows as phase 1, so each thread
 *      rereads the rows it summed (still in its own L2 when x fits).
 * Bytes: x read twice (the second time from cache when it fits), y written once.
 * y may be x itself: phase 1 reads every row of x and phase 2 the rows K, all before the second
 * barrier; phase 3 then writes y[i] from x[i] only.
 *
 * Precision. The shifted sums are one pass over x and safe for inputs with a large common offset:
 * K is a sample of the channel, and any sample's squared deviation from the channel mean is at most
 * HW var_c, so the cancellation in S2 - S1^2 / HW loses at most a factor HW of double's 2^-53 relative
 * to M2_c (plain sum / sum-of-squares loses (mean / std)^2 instead: 1e6 for x + 1000 with std 1, still
 * fine in double, but unbounded). The group combination adds non-negative terms only. In phase 3 the
 * mean is carried as two floats: x - mean_hi is exact when x is near the mean (Sterbenz), so a large
 * offset costs no float rounding of the mean (a single float mean is off by up to half an ulp of the
 * offset, 3e-5 at 1000, i.e. 3e-5 in y at std 1).
 *
 * NaN and Inf: a NaN or Inf anywhere in (n, g) makes S1 or S2 NaN or Inf, M2 NaN (inf - inf), rstd NaN,
 * so the whole (n, g) becomes NaN, as torch's formula gives; other groups are untouched.
 *
 * Scratch (malloc'd per call): double part[T][N][2][C], stat[N][2][C]; float coef[N][4][C]; int64 span[T][2].
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

/*VECMATH*/

/* [lo, hi) of thread t's share of n items cut in blocks of `align`. */
static void share(int64_t n, int64_t align, int t, int nt, int64_t *lo, int64_t *hi)
{
    int64_t blocks = (n + align - 1) / align, per = (blocks + nt - 1) / nt;
    int64_t a = (int64_t)t * per * align, b = a + per * align;
    *lo = a < n ? a : n;
    *hi = b < n ? b : n;
}

/* Returns 0, or -1 when the scratch cannot be allocated. */
int kf_group_norm_nhwc(const float *x, float *y, const float *w, const float *b, int64_t N, int64_t HW,
                       int64_t C, int64_t G, double eps, int64_t silu, int64_t nthreads)
{
    if (nthreads < 1) nthreads = 1;
    const int64_t Cg = C / G, rows = N * HW, NC = N * C;
    size_t doubles = (size_t)(nthreads * 2 * NC + 2 * NC), floats = (size_t)(4 * NC);
    double *scratch = malloc(doubles * sizeof(double) + floats * sizeof(float) + 2 * nthreads * sizeof(int64_t));
    if (!scratch) return -1;
    double *part = scratch, *stat = part + nthreads * 2 * NC;
    float *coef = (float *)(stat + 2 * NC);
    int64_t *span = (int64_t *)(coef + 4 * NC);
    const double hw = (double)HW, count = (double)HW * (double)Cg;

    #pragma omp parallel num_threads(nthreads)
    {
        const int t = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t r0, r1, lo, hi;

        /* 1. shifted partial sums of this thread's rows, over the images [n0, n1) they belong to */
        share(rows, 1, t, nt, &r0, &r1);
        const int64_t n0 = r1 > r0 ? r0 / HW : 0, n1 = r1 > r0 ? (r1 - 1) / HW + 1 : 0;
        span[2 * t] = n0;
        span[2 * t + 1] = n1;
        double *mine = part + (int64_t)t * 2 * NC;
        if (n1 > n0) memset(mine + n0 * 2 * C, 0, (size_t)((n1 - n0) * 2 * C) * sizeof(double));
        for (int64_t i = r0; i < r1;) {
            const int64_t n = i / HW, end = (n + 1) * HW < r1 ? (n + 1) * HW : r1;
            const float *k = x + n * HW * C;
            double *s1 = mine + n * 2 * C, *s2 = s1 + C;
            for (; i + 4 <= end; i += 4) {
                const float *a = x + i * C;
                #pragma omp simd
                for (int64_t c = 0; c < C; c++) {
                    const double kc = k[c];
                    const double d0 = a[c] - kc, d1 = a[C + c] - kc, d2 = a[2 * C + c] - kc, d3 = a[3 * C + c] - kc;
                    s1[c] += (d0 + d1) + (d2 + d3);
                    s2[c] = fma(d3, d3, fma(d2, d2, fma(d1, d1, fma(d0, d0, s2[c]))));
                }
            }
            for (; i < end; i++) {
                const float *a = x + i * C;
                #pragma omp simd
                for (int64_t c = 0; c < C; c++) {
                    const double d = a[c] - (double)k[c];
                    s1[c] += d;
                    s2[c] = fma(d, d, s2[c]);
                }
            }
        }
        #pragma omp barrier

        /* 2. statistics of this thread's (n, g) pairs and the coefficients of their channels */
        share(N * G, 1, t, nt, &lo, &hi);
        for (int64_t q = lo; q < hi; q++) {
            const int64_t n = q / G, c0 = (q % G) * Cg;
            const float *k = x + n * HW * C + c0;
            double *s1 = stat + n * 2 * C + c0, *s2 = s1 + C;     /* reused: mean_c, M2_c */
            memset(s1, 0, (size_t)Cg * sizeof(double));
            memset(s2, 0, (size_t)Cg * sizeof(double));
            for (int u = 0; u < nt; u++) {
                if (n < span[2 * u] || n >= span[2 * u + 1]) continue;
                const double *p1 = part + (int64_t)u * 2 * NC + n * 2 * C + c0, *p2 = p1 + C;
                #pragma omp simd
                for (int64_t j = 0; j < Cg; j++) {
                    s1[j] += p1[j];
                    s2[j] += p2[j];
                }
            }
            double mean = 0.0;
            #pragma omp simd reduction(+:mean)
            for (int64_t j = 0; j < Cg; j++) {
                const double d = s1[j];
                s1[j] = k[j] + d / hw;
                s2[j] = s2[j] - d * d / hw;
                mean += s1[j];
            }
            mean /= (double)Cg;
            double m2 = 0.0;
            #pragma omp simd reduction(+:m2)
            for (int64_t j = 0; j < Cg; j++) {
                const double d = s1[j] - mean, mj = s2[j] < 0.0 ? 0.0 : s2[j];  /* rounding; NaN passes */
                m2 += fma(hw * d, d, mj);
            }
            double var = m2 / count;
            var = var < 0.0 ? 0.0 : var;
            const double rstd = 1.0 / sqrt(var + eps);
            const float mhi = (float)mean, mlo = (float)(mean - (double)mhi);
            float *ch = coef + n * 4 * C + c0, *cl = ch + C, *ca = cl + C, *cb = ca + C;
            #pragma omp simd
            for (int64_t j = 0; j < Cg; j++) {
                ch[j] = mhi;
                cl[j] = mlo;
                ca[j] = (float)(w ? rstd * (double)w[c0 + j] : rstd);
                cb[j] = b ? b[c0 + j] : 0.0f;
            }
        }
        #pragma omp barrier

        /* 3. y over the rows of phase 1 */
        for (int64_t i = r0; i < r1;) {
            const int64_t n = i / HW, end = (n + 1) * HW < r1 ? (n + 1) * HW : r1;
            const float *ch = coef + n * 4 * C, *cl = ch + C, *ca = cl + C, *cb = ca + C;
            if (silu) {
                for (; i < end; i++) {
                    const float *a = x + i * C;
                    float *o = y + i * C;
                    #pragma omp simd
                    for (int64_t c = 0; c < C; c++) {
                        const float v = fmaf((a[c] - ch[c]) - cl[c], ca[c], cb[c]);
                        o[c] = v / (1.0f + kf_exp(-v));
                    }
                }
            } else {
                for (; i < end; i++) {
                    const float *a = x + i * C;
                    float *o = y + i * C;
                    #pragma omp simd
                    for (int64_t c = 0; c < C; c++) o[c] = fmaf((a[c] - ch[c]) - cl[c], ca[c], cb[c]);
                }
            }
        }
    }
    free(scratch);
    return 0;
}
