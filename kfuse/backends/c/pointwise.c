/* NHWC 1x1 convolution (stride 1, no padding, one group) as a GEMM with its epilogue in registers:
   out[m, n] = act(b[n] + sum_k x[m, k] w[n, k] (+ r[m, n])), m over the N*H*W pixels, k over the input
   channels, n over the output channels. Rendered by pointwise.py with the activation and the residual
   as constants. x [M, K] (row stride K), w packed [P][K][16] (16-column panels, zero past N), b [N],
   r and out [M, N]. The products accumulate by explicit FMAs (the build has -ffp-contract=off). */
#include <math.h>
#include <stdint.h>

/*VECMATH*/

#define ACT %(act)d
#define RES %(res)d                /* 1: a residual r is added before the activation */
#define MR 8                       /* rows per register tile */

/*CONV_ACT*/

/* cols outputs of one row from their sums: bias, residual, activation */
KF_INLINE void epilogue(float *restrict op, const float *restrict sum, const float *restrict b,
                        const float *restrict rp, int cols, float p0, float p1) {
    (void)rp;
    #pragma omp simd
    for (int l = 0; l < cols; l++) {
        float v = sum[l] + b[l];
#if RES
        v += rp[l];
#endif
        op[l] = act(v, p0, p1);
    }
}

#ifdef __AVX512F__
#include <immintrin.h>

/* A tile of mr rows by nv 16-column panels (at most 2), over kc of the K products starting at column
   k0 of a and row k0 of the panels. `first`: the sums start at 0, else from the partial sums in out;
   `last`: the epilogue runs, else the partial sums are stored. cols: valid columns of the tile. */
KF_INLINE void tile(const int mr, const int nv, const float *restrict a, int64_t lda, const float *restrict bp,
                    int64_t ps, int64_t kc, float *restrict c, int64_t ldc, int cols, int first, int last,
                    const float *restrict b, const float *restrict r, float p0, float p1) {
    __m512 acc[MR][2];
    __mmask16 mask[2];
    for (int v = 0; v < 2; v++) {
        int n = cols - 16 * v;
        mask[v] = n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? 0 : (__mmask16)((1u << n) - 1);
    }
    #pragma GCC unroll 8
    for (int i = 0; i < mr; i++)
        #pragma GCC unroll 2
        for (int v = 0; v < nv; v++)
            acc[i][v] = first ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(mask[v], c + i * ldc + 16 * v);
    for (int64_t k = 0; k < kc; k++) {
        __m512 b0 = _mm512_loadu_ps(bp + 16 * k);
        __m512 b1 = nv > 1 ? _mm512_loadu_ps(bp + ps + 16 * k) : b0;
        #pragma GCC unroll 8
        for (int i = 0; i < mr; i++) {
            __m512 ai = _mm512_set1_ps(a[i * lda + k]);
            acc[i][0] = _mm512_fmadd_ps(ai, b0, acc[i][0]);
            if (nv > 1)
                acc[i][1] = _mm512_fmadd_ps(ai, b1, acc[i][1]);
        }
    }
    #pragma GCC unroll 8
    for (int i = 0; i < mr; i++)
        #pragma GCC unroll 2
        for (int v = 0; v < nv; v++) {
            float *op = c + i * ldc + 16 * v;
            int n = cols - 16 * v < 16 ? cols - 16 * v : 16;
            if (!last) {
                _mm512_mask_storeu_ps(op, mask[v], acc[i][v]);
                continue;
            }
            float sum[16] __attribute__((aligned(64)));
            _mm512_store_ps(sum, acc[i][v]);
            epilogue(op, sum, b + 16 * v, RES ? r + i * ldc + 16 * v : 0, n, p0, p1);
        }
}

#define TILE(MRC, NVC) tile(MRC, NVC, a, lda, bp, ps, kc, c, ldc, cols, first, last, b, r, p0, p1)
#define ROWS(NVC)                                                                                   \
    switch (mr) {                                                                                   \
    case 8: TILE(8, NVC); break;  case 7: TILE(7, NVC); break;  case 6: TILE(6, NVC); break;        \
    case 5: TILE(5, NVC); break;  case 4: TILE(4, NVC); break;  case 3: TILE(3, NVC); break;        \
    case 2: TILE(2, NVC); break;  default: TILE(1, NVC); break;                                     \
    }

/* every shape of tile compiled with its row and panel counts as constants */
static void tile_any(int mr, int nv, const float *restrict a, int64_t lda, const float *restrict bp, int64_t ps,
                     int64_t kc, float *restrict c, int64_t ldc, int cols, int first, int last,
                     const float *restrict b, const float *restrict r, float p0, float p1) {
    if (nv > 1) {
        ROWS(2)
    } else {
        ROWS(1)
    }
}
#else
/* without AVX-512: per row, the 16 columns of each panel as an `omp simd` vector */
static void tile_any(int mr, int nv, const float *restrict a, int64_t lda, const float *restrict bp, int64_t ps,
                     int64_t kc, float *restrict c, int64_t ldc, int cols, int first, int last,
                     const float *restrict b, const float *restrict r, float p0, float p1) {
    for (int i = 0; i < mr; i++)
        for (int v = 0; v < nv; v++) {
            float *op = c + i * ldc + 16 * v;
            const float *pb = bp + v * ps;
            int n = cols - 16 * v < 16 ? cols - 16 * v : 16;
            float sum[16];
            for (int l = 0; l < 16; l++)
                sum[l] = first || l >= n ? 0.0f : op[l];
            for (int64_t k = 0; k < kc; k++) {
                float ak = a[i * lda + k];
                #pragma omp simd
                for (int l = 0; l < 16; l++)
                    sum[l] = fmaf(ak, pb[16 * k + l], sum[l]);
            }
            if (last)
                epilogue(op, sum, b + 16 * v, RES ? r + i * ldc + 16 * v : 0, n, p0, p1);
            else
                for (int l = 0; l < n; l++)
                    op[l] = sum[l];
        }
}
#endif

/* dims: M K N, MB (rows per work item, a multiple of MR), KC (products per pass over a tile: partial
   sums go through out when K is longer). A work item is MB rows by one pair of panels; items are
   numbered panel pair first, so a thread's contiguous range shares its panels (or its rows). */
void kf_pointwise(const float *restrict x, const float *restrict wp, const float *restrict b,
                  const float *restrict r, float *restrict out, const int64_t *dims, const float *prm, int nthreads) {
    const int64_t M = dims[0], K = dims[1], N = dims[2], MB = dims[3], KC = dims[4];
    const int64_t P = (N + 15) / 16, NP2 = (P + 1) / 2, nmb = (M + MB - 1) / MB, ps = 16 * K;
    const float p0 = prm[0], p1 = prm[1];
    #pragma omp parallel for schedule(static) num_threads(nthreads)
    for (int64_t t = 0; t < NP2 * nmb; t++) {
        const int64_t pp = t / nmb, m0 = (t %% nmb) * MB, m1 = m0 + MB < M ? m0 + MB : M, n0 = 32 * pp;
        const int nv = 2 * pp + 1 < P ? 2 : 1;
        const int cols = N - n0 < 32 ? (int)(N - n0) : 32;
        for (int64_t k0 = 0; k0 < K; k0 += KC) {
            const int64_t kc = K - k0 < KC ? K - k0 : KC;
            for (int64_t m = m0; m < m1; m += MR) {
                const int mr = m1 - m < MR ? (int)(m1 - m) : MR;
                tile_any(mr, nv, x + m * K + k0, K, wp + 2 * pp * ps + 16 * k0, ps, kc, out + m * N + n0, N, cols,
                         k0 == 0, k0 + kc >= K, b + n0, RES ? r + m * N + n0 : 0, p0, p1);
            }
        }
    }
}
