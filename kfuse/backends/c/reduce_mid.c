/* A sum, mean, max or min over a block of middle axes: x viewed as [outer, R, inner] (contiguous), out
   [outer, inner]. A global average pool over an NHWC tensor is [N, H*W, C] -> [N, C]; the row kernels
   (kernels/lowering.py) reduce only the last axis. Work items are (outer, 64-value block of inner), each
   summed by one thread in one order over R, so the result does not depend on the thread count; the
   inner loop runs across the block (contiguous, `omp simd`). Sums accumulate in double (a sequential
   float sum over thousands of values drifts past torch's pairwise one); max and min propagate NaN, as
   torch does. */
#include <stdint.h>

enum { SUM = 0, MEAN = 1, MAX = 2, MIN = 3 };
#define BLOCK 64

void kf_reduce_mid(const float *restrict x, float *restrict out, int64_t outer, int64_t R, int64_t inner,
                   int op, int nthreads) {
    const int64_t nb = (inner + BLOCK - 1) / BLOCK;
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t t = 0; t < outer * nb; t++) {
        const int64_t o = t / nb, i0 = (t % nb) * BLOCK, n = inner - i0 < BLOCK ? inner - i0 : BLOCK;
        const float *restrict xo = x + o * R * inner + i0;
        double acc[BLOCK];
        #pragma omp simd
        for (int64_t i = 0; i < n; i++)
            acc[i] = op <= MEAN ? 0.0 : xo[i];
        for (int64_t r = op <= MEAN ? 0 : 1; r < R; r++) {
            const float *restrict xr = xo + r * inner;
            if (op <= MEAN) {
                #pragma omp simd
                for (int64_t i = 0; i < n; i++)
                    acc[i] += xr[i];
            } else if (op == MAX) {
                #pragma omp simd
                for (int64_t i = 0; i < n; i++)
                    acc[i] = xr[i] > acc[i] || xr[i] != xr[i] ? xr[i] : acc[i];
            } else {
                #pragma omp simd
                for (int64_t i = 0; i < n; i++)
                    acc[i] = xr[i] < acc[i] || xr[i] != xr[i] ? xr[i] : acc[i];
            }
        }
        float *restrict oo = out + o * inner + i0;
        #pragma omp simd
        for (int64_t i = 0; i < n; i++)
            oo[i] = (float)(op == MEAN ? acc[i] / (double)R : acc[i]);
    }
}
