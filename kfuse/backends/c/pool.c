/* NHWC max pooling: out[n, oh, ow, c] = max of x[n, oh SH - PH + i DH, ow SW - PW + j DW, c] over the KH x KW
   taps that lie inside the input (the padding is -inf, as torch's), NaN if any tap is NaN (torch's
   max_pool2d propagates NaN). x [N, H, W, C], out [N, OH, OW, C]; every loop over C is `omp simd`.
   Sizes come at the call: one library serves every shape. */
#include <math.h>
#include <omp.h>
#include <stdint.h>

#define MAX_TAPS 256                 /* pool.py checks KH KW <= MAX_TAPS */

/* dims: N H W C OH OW KH KW SH SW PH PW DH DW */
void kf_max_pool_nhwc(const float *restrict x, float *restrict out, const int64_t *dims, int nthreads) {
    const int64_t N = dims[0], H = dims[1], W = dims[2], C = dims[3], OH = dims[4], OW = dims[5];
    const int64_t KH = dims[6], KW = dims[7], SH = dims[8], SW = dims[9], PH = dims[10], PW = dims[11];
    const int64_t DH = dims[12], DW = dims[13];
    #pragma omp parallel for collapse(2) schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++)
        for (int64_t oh = 0; oh < OH; oh++) {
            const float *tap[MAX_TAPS];
            for (int64_t ow = 0; ow < OW; ow++) {
                int nt = 0;
                for (int64_t i = 0; i < KH; i++) {
                    const int64_t ih = oh * SH - PH + i * DH;
                    if (ih < 0 || ih >= H)
                        continue;
                    for (int64_t j = 0; j < KW; j++) {
                        const int64_t iw = ow * SW - PW + j * DW;
                        if (iw >= 0 && iw < W)
                            tap[nt++] = x + ((n * H + ih) * W + iw) * C;
                    }
                }
                float *restrict op = out + ((n * OH + oh) * OW + ow) * C;
                if (nt == 0) {                 /* a window wholly in the padding */
                    for (int64_t c = 0; c < C; c++)
                        op[c] = -INFINITY;
                    continue;
                }
                /* tap by tap over the output row (in L1): a NaN, once in, stays (o < v is false) */
                const float *restrict t0 = tap[0];
                #pragma omp simd
                for (int64_t c = 0; c < C; c++)
                    op[c] = t0[c];
                for (int t = 1; t < nt; t++) {
                    const float *restrict tp = tap[t];
                    #pragma omp simd
                    for (int64_t c = 0; c < C; c++) {
                        const float v = tp[c], o = op[c];
                        op[c] = o < v || v != v ? v : o;
                    }
                }
            }
        }
}

/* NHWC average pooling, torch's: the taps inside the input summed in order, each window's sum divided by
   its size counted with the padding (INCLUDE_PAD: its rows and columns up to H + PH, W + PW) or without.
   dims: N H W C OH OW KH KW SH SW PH PW INCLUDE_PAD */
void kf_avg_pool_nhwc(const float *restrict x, float *restrict out, const int64_t *dims, int nthreads) {
    const int64_t N = dims[0], H = dims[1], W = dims[2], C = dims[3], OH = dims[4], OW = dims[5];
    const int64_t KH = dims[6], KW = dims[7], SH = dims[8], SW = dims[9], PH = dims[10], PW = dims[11];
    const int include_pad = (int)dims[12];
    #pragma omp parallel for collapse(2) schedule(static) num_threads(nthreads)
    for (int64_t n = 0; n < N; n++)
        for (int64_t oh = 0; oh < OH; oh++) {
            int64_t h0 = oh * SH - PH, h1 = h0 + KH < H + PH ? h0 + KH : H + PH;
            const int64_t hsize = h1 - h0;
            h0 = h0 > 0 ? h0 : 0;
            h1 = h1 < H ? h1 : H;
            for (int64_t ow = 0; ow < OW; ow++) {
                int64_t w0 = ow * SW - PW, w1 = w0 + KW < W + PW ? w0 + KW : W + PW;
                const int64_t wsize = w1 - w0;
                w0 = w0 > 0 ? w0 : 0;
                w1 = w1 < W ? w1 : W;
                const float div = (float)(include_pad ? hsize * wsize : (h1 - h0) * (w1 - w0));
                float *restrict op = out + ((n * OH + oh) * OW + ow) * C;
                #pragma omp simd
                for (int64_t c = 0; c < C; c++)
                    op[c] = 0.0f;
                for (int64_t ih = h0; ih < h1; ih++)
                    for (int64_t iw = w0; iw < w1; iw++) {
                        const float *restrict tp = x + ((n * H + ih) * W + iw) * C;
                        #pragma omp simd
                        for (int64_t c = 0; c < C; c++)
                            op[c] += tp[c];
                    }
                #pragma omp simd
                for (int64_t c = 0; c < C; c++)
                    op[c] /= div;
            }
        }
}
