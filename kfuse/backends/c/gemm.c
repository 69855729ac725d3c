/* Optimised at -O2, not the build's -O3: this file's loops are intrinsics and `omp simd` loops, and at -O3
   gcc spent 2.5x as long on it (7 -> 2.7 s a build, the kernels appending it likewise) for the same speed in
   the programs (MobileNetV2/V3, EfficientNet-B0, ResNet-50 compiled both ways and alternated: 0.99-1.01x).
   The generated row kernels stay at -O3 (add + LayerNorm 1.3x, softmax 1.5x slower at -O2). The pragma
   covers what follows it, so a kernel appending this file (depthwise + 1x1, Winograd) is built at -O2 too. */
#pragma GCC optimize ("O2")
/* NHWC convolution (any groups, kernel size, stride, padding, dilation) as an implicit GEMM with its
   epilogue in registers: out[m, n] = act(b[n] + sum_{tap, c} x[pixel(m, tap), c] w[n, tap, c] (+ r[m, n])),
   m over the N*OH*OW output pixels, tap over the KH*KW kernel positions, c over the input channels (of
   n's group), n over the output channels; a tap outside the input reads `zero` (C zeros). A 1x1 convolution with stride
   1 and a linear layer are the case KH = KW = 1, where row m reads x[m, :]. Rendered by gemm.py with the
   activation and the residual as constants; the geometry comes at the call.
   x [N, H, W, C], w packed [G][P][KH*KW*C/G][16] (16-column panels of a group's Cout/G, zero past them), b [Cout], r and out
   [M, Cout]; zero: KW C zeros. The products accumulate by explicit FMAs (the build has -ffp-contract=off). */
#include <math.h>
#include <omp.h>
#include <stdint.h>
#include <stdlib.h>

/*VECMATH*/

#define ACT %(act)d
#define RES %(res)d                /* 1: a residual r is added before the activation */
#define GLU %(glu)d                /* 1: gated (SwiGLU, GeGLU): a pair's panels are gate and up columns,
                                      out = act(gate + b) * (up + b'), 16 outputs per pair */
#if defined(__AVX2__) && defined(__FMA__) && !defined(__AVX512F__)
#define MR 6                       /* rows per register tile, AVX2: 6 rows x 1 panel (2 ymm), 12 accumulators */
#else
#define MR 8                       /* rows per register tile: 8 x 2 panels, 16 zmm accumulators */
#endif
#define MAX_TAPS 121               /* 11 x 11 (gemm.py checks) */
/* The register tiles' entry (tile_any) is not inlined into the OpenMP body: there, short of general registers,
   gcc kept some of the rows' pointers on the stack and reloaded them at every step of the K loop (AVX2: 3 loads
   and a spill per 12 FMAs; GEMMs 1.0-1.6x faster without them, 63 -> 98 GFLOP/s at 3136x64x256) */
#define TILE_ANY __attribute__((noinline))

/*CONV_ACT*/
/*SHARE*/

/* The next work item's panel pair, [next, end), fetched into L2 by the tiles of the current one a line at
   each K step k with k & mask zero (kf_gemm_conv) */
typedef struct {
    const char *next, *end;
    int64_t mask;
} kf_fetch;

/* panels (1 or 2) in panel pair pp of P 16-column panels: the last pair of an odd P has one */
static inline int pair_panels(int64_t pp, int64_t P) {
    return 2 * pp + 1 < P ? 2 : 1;
}

/* f set to fetch `bytes` from `next` over `steps` K steps: a line every 2^s steps, the sparsest spacing
   (at most 64) that covers them */
static inline void fetch_over(kf_fetch *f, const void *next, int64_t bytes, int64_t steps) {
    int64_t every = 1;
    while (every < 64 && 2 * every * (bytes / 64) <= steps)
        every *= 2;
    f->next = (const char *)next;
    f->end = f->next + bytes;
    f->mask = every - 1;
}

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

/* cols gated outputs of one row: act(gate + bg) * (up + bu) */
KF_INLINE void gated(float *restrict op, const float *restrict g, const float *restrict u, const float *restrict bg,
                     const float *restrict bu, int cols, float p0, float p1) {
    #pragma omp simd
    for (int l = 0; l < cols; l++)
        op[l] = act(g[l] + bg[l], p0, p1) * (u[l] + bu[l]);
}

/* (n, oh, ow) k output pixels on, k at most the pixels left in row oh */
KF_INLINE void advance(int64_t k, int64_t *n, int64_t *oh, int64_t *ow, int64_t OH, int64_t OW) {
    if ((*ow += k) == OW) {
        *ow = 0;
        if (++*oh == OH) {
            *oh = 0;
            ++*n;
        }
    }
}

#ifdef __AVX512F__
#include <immintrin.h>
/*EXP16*/

/* A tile's accumulators zeroed; its residual rows fetched now (read only after the K loop, their misses
   overlap the FMAs: a 1x1 K=64 convolution + residual 0.94x; prefetching the output lines too gained
   nothing) */
KF_INLINE void tile_start(const int mr, const int nv, __m512 acc[MR][2], const float *restrict r, int64_t ldc) {
    (void)nv; (void)r; (void)ldc;
    #pragma GCC unroll 8
    for (int i = 0; i < mr; i++) {
        acc[i][0] = acc[i][1] = _mm512_setzero_ps();
#if RES
        _mm_prefetch((const char *)(r + i * ldc), _MM_HINT_T0);
        if (nv > 1)
            _mm_prefetch((const char *)(r + i * ldc + 16), _MM_HINT_T0);
#endif
    }
}

/* act() of 16 lanes, its operations in its order (the same bits), every activation but tanh and erf-GELU;
   vmaxps/vminps return their second operand where either is NaN, as `p0 > v ? p0 : v` does */
#define REG_EPILOGUE16 (!GLU && ACT != 3 && ACT != 5)
KF_INLINE __m512 act16(__m512 v, __m512 p0, __m512 p1) {
    (void)p0; (void)p1;
#if ACT == 1
    return _mm512_max_ps(p0, v);
#elif ACT == 7
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(v, _mm512_setzero_ps(), _CMP_GT_OQ), _mm512_mul_ps(v, p0), v);
#elif ACT == 8
    return _mm512_max_ps(p0, _mm512_min_ps(p1, v));
#elif ACT == 2 || ACT == 4 || ACT == 6          /* sigmoid, SiLU, GELU (tanh form): x / (1 + e^-u) */
    const __m512 one = _mm512_set1_ps(1.0f);
    __m512 u = v;
    if (ACT == 6)       /* 0x1.988454p0f * (v + 0.044715f * v * v * v), as act() rounds it */
        u = _mm512_mul_ps(_mm512_set1_ps(0x1.988454p0f), _mm512_add_ps(v, _mm512_mul_ps(_mm512_mul_ps(
                _mm512_mul_ps(_mm512_set1_ps(0.044715f), v), v), v)));
    const __m512 neg = _mm512_castsi512_ps(_mm512_xor_si512(_mm512_castps_si512(u), _mm512_set1_epi32(INT32_MIN)));
    __m512 d = _mm512_add_ps(one, kf_exp16(neg));    /* -u by its sign bit (vxorps on zmm needs AVX512DQ) */
    return _mm512_div_ps(ACT == 2 ? one : v, d);
#elif ACT == 9 || ACT == 10
    __m512 t = _mm512_max_ps(p0, _mm512_min_ps(p1, _mm512_add_ps(v, _mm512_set1_ps(3.0f))));
    return _mm512_div_ps(ACT == 9 ? _mm512_mul_ps(v, t) : t, _mm512_set1_ps(6.0f));
#else
    return v;
#endif
}

/* A tile's outputs from its sums: the epilogue (or the gating) per row and panel; cols valid columns. Whole
   panels of an activation act16 has are stored from the accumulators (REG_EPILOGUE16), without the sums'
   trip through memory and epilogue()'s loop. On Zen 5 (one process, both sources alternated, bits equal):
   1x1 convolutions K = 16 -> 96 [12544 rows] 0.89-0.92x the time with ReLU, 0.88-0.93x with sigmoid, SiLU or
   GELU-tanh; K = 64 0.97x (ReLU), 0.91-0.96x (exp forms); longer K 0.96-1.0x. */
KF_INLINE void tile_end(const int mr, const int nv, __m512 acc[MR][2], float *restrict c, int64_t ldc, int cols,
                        const float *restrict b, const float *restrict r, float p0, float p1) {
    (void)r;
#if REG_EPILOGUE16
    if (cols == 16 * nv) {
        const __m512 q0 = _mm512_set1_ps(p0), q1 = _mm512_set1_ps(p1);
        #pragma GCC unroll 2
        for (int v = 0; v < nv; v++) {
            const __m512 bv = _mm512_loadu_ps(b + 16 * v);
            #pragma GCC unroll 8
            for (int i = 0; i < mr; i++) {
                __m512 sv = _mm512_add_ps(acc[i][v], bv);
#if RES
                sv = _mm512_add_ps(sv, _mm512_loadu_ps(r + i * ldc + 16 * v));
#endif
                _mm512_storeu_ps(c + i * ldc + 16 * v, act16(sv, q0, q1));
            }
        }
        return;
    }
#endif
#if GLU
    (void)nv;
    #pragma GCC unroll 8
    for (int i = 0; i < mr; i++) {
        float g[16] __attribute__((aligned(64))), u[16] __attribute__((aligned(64)));
        _mm512_store_ps(g, acc[i][0]);
        _mm512_store_ps(u, acc[i][1]);
        gated(c + i * ldc, g, u, b, b + 16, cols, p0, p1);
    }
#else
    #pragma GCC unroll 8
    for (int i = 0; i < mr; i++)
        #pragma GCC unroll 2
        for (int v = 0; v < nv; v++) {
            float sum[16] __attribute__((aligned(64)));
            _mm512_store_ps(sum, acc[i][v]);
            int n = cols - 16 * v < 16 ? cols - 16 * v : 16;
            epilogue(c + i * ldc + 16 * v, sum, b + 16 * v, RES ? r + i * ldc + 16 * v : 0, n, p0, p1);
        }
#endif
}

/* A tile of mr rows by nv 16-column panels (at most 2): for each of the ntaps segments, row i reads cin
   adjacent inputs from ap[t * MR + i], the panels their rows t*cin.. from bp (second panel at bp + ps).
   cols: valid columns of the tile. f (0 in all but one compiled tile): lines to fetch into L2 as it goes. */
KF_INLINE void tile(const int mr, const int nv, const float *const *ap, int ntaps, int64_t cin,
                    const float *restrict bp, int64_t ps, float *restrict c, int64_t ldc, int cols,
                    const float *restrict b, const float *restrict r, float p0, float p1, kf_fetch *f) {
    __m512 acc[MR][2];
    const char *next = f ? f->next : 0, *end = f ? f->end : 0;
    const int64_t mask = f ? f->mask : 0;
    tile_start(mr, nv, acc, r, ldc);
    for (int t = 0; t < ntaps; t++) {
        const float *a[MR];
        #pragma GCC unroll 8
        for (int i = 0; i < mr; i++)
            a[i] = ap[t * MR + i];
        const float *restrict bt = bp + 16 * t * cin;
        for (int64_t k = 0; k < cin; k++) {
            __m512 b0 = _mm512_loadu_ps(bt + 16 * k);
            __m512 b1 = nv > 1 ? _mm512_loadu_ps(bt + ps + 16 * k) : b0;
            if (f && next < end && !(k & mask)) {
                _mm_prefetch(next, _MM_HINT_T1);
                next += 64;
            }
            #pragma GCC unroll 8
            for (int i = 0; i < mr; i++) {
                __m512 ai = _mm512_set1_ps(a[i][k]);
                acc[i][0] = _mm512_fmadd_ps(ai, b0, acc[i][0]);
                if (nv > 1)
                    acc[i][1] = _mm512_fmadd_ps(ai, b1, acc[i][1]);
            }
        }
    }
    if (f)
        f->next = next;
    tile_end(mr, nv, acc, c, ldc, cols, b, r, p0, p1);
}

/* The same tile for an NCHW input read in place (a network's input, few channels): the rows are adjacent
   pixels of output row oh from column ow on, and each tap (kernel row ki, column kj, channel ch; the
   packed weight's order) broadcasts pixel i's input from its channel plane, xn[ch][ih][iw + i SW]. A tap
   in the padding multiplies zeros (as a padded input would: a NaN weight still gives NaN). All MR rows
   are computed (a pixel past the row's end reads the padding's zeros or its right neighbours, in
   bounds) and the first mr stored: one compiled tile per panel count, where one per row count as well
   doubled the build time of this file. Against the bands of NHWC rows this replaced (each output row's
   input rows transposed, then a pointer per tile row and kernel row): a [1,3,224,224] 3x3/2 -> 32 stem
   0.225 -> 0.175 ms. A tap with every row's input inside is compiled without the per-row check (as the
   AVX2 form's): the one-conv [1,3,224,224] 7x7/2 -> 64 + ReLU program 0.62-0.66 -> 0.57-0.59 ms (warm),
   0.79-0.87 -> 0.68-0.70 (input from memory), four processes each. g: C H W KH KW SH SW PH PW DH DW. */
KF_INLINE void nchw_tap16(const int nv, __m512 acc[MR][2], const float *restrict bt, int64_t ps,
                          const float *restrict xn, int64_t C, int64_t H, int64_t W, int64_t ih, int64_t iw,
                          int64_t SW, const int edge) {
    for (int64_t ch = 0; ch < C; ch++) {
        __m512 b0 = _mm512_loadu_ps(bt + 16 * ch);
        __m512 b1 = nv > 1 ? _mm512_loadu_ps(bt + ps + 16 * ch) : b0;
        const float *xc = xn + (ch * H + ih) * W + iw;
        #pragma GCC unroll 8
        for (int i = 0; i < MR; i++) {
            const int64_t col = iw + i * SW;
            __m512 ai = !edge ? _mm512_set1_ps(xc[i * SW])
                              : _mm512_set1_ps(ih >= 0 && ih < H && col >= 0 && col < W ? xc[i * SW] : 0.0f);
            acc[i][0] = _mm512_fmadd_ps(ai, b0, acc[i][0]);
            if (nv > 1)
                acc[i][1] = _mm512_fmadd_ps(ai, b1, acc[i][1]);
        }
    }
}

KF_INLINE void tile_nchw(const int nv, int mr, const float *restrict xn, int64_t oh, int64_t ow, const int64_t *g,
                         const float *restrict bp, int64_t ps, float *restrict c, int64_t ldc, int cols,
                         const float *restrict b, const float *restrict r, float p0, float p1) {
    const int64_t C = g[0], H = g[1], W = g[2], KH = g[3], KW = g[4], SH = g[5], SW = g[6];
    const int64_t PH = g[7], PW = g[8], DH = g[9], DW = g[10], iw0 = ow * SW - PW;
    __m512 acc[MR][2];
    #pragma GCC unroll 8
    for (int i = 0; i < MR; i++)
        acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int64_t ki = 0; ki < KH; ki++) {
        const int64_t ih = oh * SH - PH + ki * DH;
        for (int64_t kj = 0; kj < KW; kj++) {
            const int64_t iw = iw0 + kj * DW;       /* row i reads column iw + i SW */
            const float *restrict bt = bp + 16 * (ki * KW + kj) * C;
            if (ih >= 0 && ih < H && iw >= 0 && iw + (MR - 1) * SW < W)
                nchw_tap16(nv, acc, bt, ps, xn, C, H, W, ih, iw, SW, 0);
            else
                nchw_tap16(nv, acc, bt, ps, xn, C, H, W, ih, iw, SW, 1);
        }
    }
    tile_end(mr, nv, acc, c, ldc, cols, b, r, p0, p1);
}

#define TILE(MRC, NVC) tile(MRC, NVC, ap, ntaps, cin, bp, ps, c, ldc, cols, b, r, p0, p1, 0)
#define ROWS(NVC)                                                                                   \
    switch (mr) {                                                                                   \
    case 8: TILE(8, NVC); break;  case 7: TILE(7, NVC); break;  case 6: TILE(6, NVC); break;        \
    case 5: TILE(5, NVC); break;  case 4: TILE(4, NVC); break;  case 3: TILE(3, NVC); break;        \
    case 2: TILE(2, NVC); break;  default: TILE(1, NVC); break;                                     \
    }

/* every shape of tile compiled with its row and panel counts as constants (a partial tile run as pieces
   of 4, 2 and 1 rows instead, 8 compiled shapes, halved this file's build time but made the fused
   1x1 -> depthwise kernel 1.02-1.10x slower); the full tile of two panels once more with fetches (f), so
   the other tiles' K loops stay free of the fetch's test */
static TILE_ANY void tile_any(int mr, int nv, const float *const *ap, int ntaps, int64_t cin, const float *restrict bp,
                     int64_t ps, float *restrict c, int64_t ldc, int cols, const float *restrict b,
                     const float *restrict r, float p0, float p1, kf_fetch *f) {
    if (nv > 1) {
        if (f && mr == MR && f->next < f->end)
            tile(MR, 2, ap, ntaps, cin, bp, ps, c, ldc, cols, b, r, p0, p1, f);
        else
            ROWS(2)
    } else {
        ROWS(1)
    }
}

static TILE_ANY void tile_nchw_any(int mr, int nv, const float *restrict xn, int64_t oh, int64_t ow, const int64_t *g,
                          const float *restrict bp, int64_t ps, float *restrict c, int64_t ldc, int cols,
                          const float *restrict b, const float *restrict r, float p0, float p1) {
    if (nv > 1)
        tile_nchw(2, mr, xn, oh, ow, g, bp, ps, c, ldc, cols, b, r, p0, p1);
    else
        tile_nchw(1, mr, xn, oh, ow, g, bp, ps, c, ldc, cols, b, r, p0, p1);
}
#else
/* without AVX-512: a tile's sums in sum[row][panel][16], then its outputs from them row by row */
static void tile_rows(int mr, int nv, float sum[][2][16], float *restrict c, int64_t ldc, int cols,
                      const float *restrict b, const float *restrict r, float p0, float p1) {
#if GLU
    (void)nv;
    for (int i = 0; i < mr; i++)      /* (all rows' gates activated in one loop, as below: 1.09-1.2x the time) */
        gated(c + i * ldc, sum[i][0], sum[i][1], b, b + 16, cols, p0, p1);
#elif ACT != 0 && ACT != 1 && ACT != 7 && ACT != 8
    /* An activation with an exp, erf or division (AVX2: the tanh and erf-GELU tiles and the NCHW stem
       tile; the others are finished in registers, subtile): bias and residual row by row, the activation
       over the whole tile in one loop, then the valid columns out. Row by row (16 or 32 columns a loop) its
       constants were set up again for every row and its division's latency was not overlapped: a SiLU
       epilogue took as long as a K = 64 tile's FMAs (this way 0.77-0.99x the time; a clamp (relu, leaky
       relu, hardtanh), one instruction, is faster row by row: 1.0-1.1x this way). */
    for (int i = 0; i < mr; i++) {
        float *restrict si = sum[i][0];
        const float *restrict ri = RES ? r + i * ldc : 0;
        (void)ri;
        #pragma omp simd
        for (int l = 0; l < cols; l++) {
            float v = si[l] + b[l];         /* epilogue's order: (sum + b) + r */
#if RES
            v += ri[l];
#endif
            si[l] = v;
        }
    }
    if (nv == 2) {
        float *restrict s = sum[0][0];
        #pragma omp simd
        for (int j = 0; j < 32 * mr; j++)   /* both panels' sums (columns past cols: zero weights) */
            s[j] = act(s[j], p0, p1);
    } else
        for (int i = 0; i < mr; i++) {
            float *restrict si = sum[i][0];
            #pragma omp simd
            for (int l = 0; l < 16; l++)
                si[l] = act(si[l], p0, p1);
        }
    for (int i = 0; i < mr; i++) {
        const float *restrict si = sum[i][0];
        float *restrict ci = c + i * ldc;
        #pragma omp simd
        for (int l = 0; l < cols; l++)
            ci[l] = si[l];
    }
#else
    for (int i = 0; i < mr; i++)
        for (int v = 0; v < nv; v++) {
            int n = cols - 16 * v < 16 ? cols - 16 * v : 16;
            epilogue(c + i * ldc + 16 * v, sum[i][v], b + 16 * v, RES ? r + i * ldc + 16 * v : 0, n, p0, p1);
        }
#endif
}

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
/*EXP8*/
/* A full panel's outputs are stored from the accumulators, without the sums' trip through memory (stored,
   reloaded, stored again), for every activation but tanh and erf-GELU (tile_rows's whole-tile loop): 1x1
   convolutions with K = 16..64 0.61-0.84x the time (hardswish 0.73-0.84x, SiLU 0.85-0.92x), longer K
   0.9-1.0x (GELU-tanh [128,384] x [384,1536] 0.92x), bits unchanged. A gated pair (its gate activated in
   registers into sum, its outputs from the up panel's accumulators) was 1.0-1.05x: kept as tile_rows. */
#define REG_EPILOGUE (!GLU && ACT != 3 && ACT != 5)

/* act() of 8 lanes, the same operations in the same order (the same bits); vmaxps/vminps return their
   second operand where either is NaN, as `p0 > v ? p0 : v` does */
KF_INLINE __m256 act8(__m256 v, __m256 p0, __m256 p1) {
    (void)p0; (void)p1;
#if ACT == 1
    return _mm256_max_ps(p0, v);
#elif ACT == 7
    return _mm256_blendv_ps(_mm256_mul_ps(v, p0), v, _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_GT_OQ));
#elif ACT == 8
    return _mm256_max_ps(p0, _mm256_min_ps(p1, v));
#elif ACT == 2 || ACT == 4 || ACT == 6          /* sigmoid, SiLU, GELU (tanh form): x / (1 + e^-u) */
    const __m256 one = _mm256_set1_ps(1.0f);
    __m256 u = v;
    if (ACT == 6)       /* 0x1.988454p0f * (v + 0.044715f * v * v * v), as act() rounds it */
        u = _mm256_mul_ps(_mm256_set1_ps(0x1.988454p0f), _mm256_add_ps(v, _mm256_mul_ps(_mm256_mul_ps(
                _mm256_mul_ps(_mm256_set1_ps(0.044715f), v), v), v)));
    __m256 d = _mm256_add_ps(one, kf_exp8(_mm256_xor_ps(u, _mm256_set1_ps(-0.0f))));
    return _mm256_div_ps(ACT == 2 ? one : v, d);
#elif ACT == 9 || ACT == 10
    const __m256 six = _mm256_set1_ps(6.0f);
    __m256 t = _mm256_max_ps(p0, _mm256_min_ps(p1, _mm256_add_ps(v, _mm256_set1_ps(3.0f))));
    return _mm256_div_ps(ACT == 9 ? _mm256_mul_ps(v, t) : t, six);
#else
    return v;
#endif
}
/* AVX2 (16 vector registers of 8 floats): a tile panel by panel, MR = 6 rows x 2 vectors = 12
   accumulators + 2 panel vectors + a broadcast; rows of panel v into sum, or with c (a full panel,
   REG_EPILOGUE) their outputs into c. nvec 1: the panel's first 8 columns only (half_panel: a last panel
   with at most 8 valid, e.g. a group of 24 output channels, whose other 8 had been computed for nothing,
   a third of RegNetY's grouped convolutions' FMAs); its other 8 sums are stored as zeros */
KF_INLINE void subtile(const int mr, const int nvec, const float *const *ap, int ntaps, int64_t cin,
                       const float *restrict bp, float sum[][2][16], int v, float *restrict c, int64_t ldc,
                       const float *restrict b, const float *restrict r, float p0, float p1) {
    __m256 acc[MR][2];
    #pragma GCC unroll 6
    for (int i = 0; i < mr; i++)
        acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (int t = 0; t < ntaps; t++) {
        /* the rows' pointers as offsets from row 0's, in named variables: kept in an array, gcc left them
           on the stack and reloaded one per broadcast */
        const float *a = ap[t * MR];
        const int64_t o1 = mr > 1 ? ap[t * MR + 1] - a : 0, o2 = mr > 2 ? ap[t * MR + 2] - a : 0,
                      o3 = mr > 3 ? ap[t * MR + 3] - a : 0, o4 = mr > 4 ? ap[t * MR + 4] - a : 0,
                      o5 = mr > 5 ? ap[t * MR + 5] - a : 0;
        const float *restrict bt = bp + 16 * t * cin;
        for (int64_t k = 0; k < cin; k++, a++) {
            __m256 b0 = _mm256_loadu_ps(bt + 16 * k), b1 = nvec > 1 ? _mm256_loadu_ps(bt + 16 * k + 8) : b0, ai;
            __asm__("" : "+x"(b0), "+x"(b1));    /* in registers: gcc otherwise reloads them for every FMA */
#define ROW(i, off) if (mr > i) { ai = _mm256_broadcast_ss(a + off); acc[i][0] = _mm256_fmadd_ps(ai, b0, acc[i][0]); \
                                  if (nvec > 1) acc[i][1] = _mm256_fmadd_ps(ai, b1, acc[i][1]); }
            ROW(0, 0) ROW(1, o1) ROW(2, o2) ROW(3, o3) ROW(4, o4) ROW(5, o5)
#undef ROW
        }
    }
#if REG_EPILOGUE
    if (c) {            /* the panel's 16 columns all valid: its outputs straight from the accumulators */
        const __m256 b0 = _mm256_loadu_ps(b), b1 = _mm256_loadu_ps(b + 8);
        const __m256 q0 = _mm256_set1_ps(p0), q1 = _mm256_set1_ps(p1);
        #pragma GCC unroll 6
        for (int i = 0; i < mr; i++) {
            __m256 s0 = _mm256_add_ps(acc[i][0], b0), s1 = _mm256_add_ps(acc[i][1], b1);
#if RES
            s0 = _mm256_add_ps(s0, _mm256_loadu_ps(r + i * ldc));
            s1 = _mm256_add_ps(s1, _mm256_loadu_ps(r + i * ldc + 8));
#endif
            _mm256_storeu_ps(c + i * ldc, act8(s0, q0, q1));
            _mm256_storeu_ps(c + i * ldc + 8, act8(s1, q0, q1));
        }
        return;
    }
#else
    (void)c; (void)ldc; (void)b; (void)r; (void)p0; (void)p1;
#endif
    #pragma GCC unroll 6
    for (int i = 0; i < mr; i++) {
        _mm256_store_ps(sum[i][v], acc[i][0]);
        _mm256_store_ps(sum[i][v] + 8, acc[i][1]);
    }
}

/* A last panel with at most 8 valid columns, its first 8 computed into sum (its own function, out of
   tile_any's way: there the tiles without such a panel are the common case) */
static __attribute__((noinline)) void half_panel(int mr, const float *const *ap, int ntaps, int64_t cin,
                                                 const float *restrict bp, float sum[][2][16], int v) {
#define HALF(MRC) subtile(MRC, 1, ap, ntaps, cin, bp, sum, v, 0, 0, 0, 0, 0.0f, 0.0f)
    switch (mr) {
    case 6: HALF(6); break;  case 5: HALF(5); break;  case 4: HALF(4); break;
    case 3: HALF(3); break;  case 2: HALF(2); break;  default: HALF(1); break;
    }
#undef HALF
}

static TILE_ANY void tile_any(int mr, int nv, const float *const *ap, int ntaps, int64_t cin, const float *restrict bp,
                     int64_t ps, float *restrict c, int64_t ldc, int cols, const float *restrict b,
                     const float *restrict r, float p0, float p1, kf_fetch *f) {
    float sum[MR][2][16] __attribute__((aligned(32)));
    (void)f;
#if RES
    /* the residual rows fetched now, read after the K loop, where the panels the loop streams through L1
       (64 bytes a step each) fit in half of it: [3136,64] x [64,256] + residual 0.72-0.80x the time; after
       1408 steps they had been evicted again, 1.07x */
    if (ntaps * cin * nv <= 256)
        for (int i = 0; i < mr; i++)
            for (int v = 0; v < nv; v++)
                _mm_prefetch((const char *)(r + i * ldc + 16 * v), _MM_HINT_T0);
#endif
    for (int v = 0; v < nv; v++) {
        /* a panel whose 16 columns are all valid is finished in registers (cv: its outputs); one with at
           most 8 (not a gated pair's: its cols count gated outputs) is computed on 8 */
        float *cv = REG_EPILOGUE && cols >= 16 * v + 16 ? c + 16 * v : 0;
        const float *rv = RES ? r + 16 * v : 0;
        if (!GLU && cols <= 16 * v + 8) {
            half_panel(mr, ap, ntaps, cin, bp + v * ps, sum, v);
            continue;
        }
#define SUB(MRC) subtile(MRC, 2, ap, ntaps, cin, bp + v * ps, sum, v, cv, ldc, b + 16 * v, rv, p0, p1)
        switch (mr) {
        case 6: SUB(6); break;  case 5: SUB(5); break;  case 4: SUB(4); break;
        case 3: SUB(3); break;  case 2: SUB(2); break;  default: SUB(1); break;
        }
#undef SUB
    }
#if REG_EPILOGUE
    if (cols < 16 * nv)     /* the last panel's valid columns, from sum */
        for (int i = 0; i < mr; i++)
            epilogue(c + i * ldc + 16 * (nv - 1), sum[i][nv - 1], b + 16 * (nv - 1),
                     RES ? r + i * ldc + 16 * (nv - 1) : 0, cols - 16 * (nv - 1), p0, p1);
#else
    tile_rows(mr, nv, sum, c, ldc, cols, b, r, p0, p1);
#endif
}

/* One tap of tile_nchw's AVX2 form: its C channels into the accumulators, row i reading column iw + i SW of
   input row ih; `edge` (a constant): some row's input is in the padding, so each is checked (reads zero).
   Without the check where no row needs it, the stems ran 1.2-1.3x faster. */
KF_INLINE void nchw_tap(__m256 acc[MR][2], const float *restrict bt, const float *restrict xn, int64_t C, int64_t H,
                        int64_t W, int64_t ih, int64_t iw, int64_t SW, const int edge) {
    for (int64_t ch = 0; ch < C; ch++) {
        __m256 b0 = _mm256_loadu_ps(bt + 16 * ch), b1 = _mm256_loadu_ps(bt + 16 * ch + 8);
        const float *xc = xn + (ch * H + ih) * W + iw;
        #pragma GCC unroll 6
        for (int i = 0; i < MR; i++) {
            const int64_t col = iw + i * SW;
            __m256 ai = !edge ? _mm256_broadcast_ss(xc + i * SW)
                              : _mm256_set1_ps(ih >= 0 && ih < H && col >= 0 && col < W ? xc[i * SW] : 0.0f);
            acc[i][0] = _mm256_fmadd_ps(ai, b0, acc[i][0]);
            acc[i][1] = _mm256_fmadd_ps(ai, b1, acc[i][1]);
        }
    }
}

/* tile_nchw's AVX2 form, panel by panel as subtile: all MR rows computed, the first mr stored */
KF_INLINE void subtile_nchw(const float *restrict xn, int64_t oh, int64_t ow, const int64_t *g,
                            const float *restrict bp, float sum[][2][16], int v) {
    const int64_t C = g[0], H = g[1], W = g[2], KH = g[3], KW = g[4], SH = g[5], SW = g[6];
    const int64_t PH = g[7], PW = g[8], DH = g[9], DW = g[10], iw0 = ow * SW - PW;
    __m256 acc[MR][2];
    #pragma GCC unroll 6
    for (int i = 0; i < MR; i++)
        acc[i][0] = acc[i][1] = _mm256_setzero_ps();
    for (int64_t ki = 0; ki < KH; ki++) {
        const int64_t ih = oh * SH - PH + ki * DH;
        for (int64_t kj = 0; kj < KW; kj++) {
            const int64_t iw = iw0 + kj * DW;
            const float *restrict bt = bp + 16 * (ki * KW + kj) * C;
            if (ih >= 0 && ih < H && iw >= 0 && iw + (MR - 1) * SW < W)
                nchw_tap(acc, bt, xn, C, H, W, ih, iw, SW, 0);
            else
                nchw_tap(acc, bt, xn, C, H, W, ih, iw, SW, 1);
        }
    }
    #pragma GCC unroll 6
    for (int i = 0; i < MR; i++) {
        _mm256_store_ps(sum[i][v], acc[i][0]);
        _mm256_store_ps(sum[i][v] + 8, acc[i][1]);
    }
}

/* (its sums out through memory: finished in registers as tile_any's are, with the row count a variable,
   the accumulators lived on the stack through the K loop, 1.35-1.67x the time) */
static TILE_ANY void tile_nchw_any(int mr, int nv, const float *restrict xn, int64_t oh, int64_t ow, const int64_t *g,
                                   const float *restrict bp, int64_t ps, float *restrict c, int64_t ldc, int cols,
                                   const float *restrict b, const float *restrict r, float p0, float p1) {
    float sum[MR][2][16] __attribute__((aligned(32)));
    for (int v = 0; v < nv; v++)
        subtile_nchw(xn, oh, ow, g, bp + v * ps, sum, v);
    tile_rows(mr, nv, sum, c, ldc, cols, b, r, p0, p1);
}
#else
static void tile_any(int mr, int nv, const float *const *ap, int ntaps, int64_t cin, const float *restrict bp,
                     int64_t ps, float *restrict c, int64_t ldc, int cols, const float *restrict b,
                     const float *restrict r, float p0, float p1, kf_fetch *f) {
    float sum[MR][2][16] = {{{0}}};
    (void)f;
    for (int i = 0; i < mr; i++)
        for (int v = 0; v < nv; v++)
            for (int t = 0; t < ntaps; t++) {
                const float *a = ap[t * MR + i], *pb = bp + v * ps + 16 * t * cin;
                for (int64_t k = 0; k < cin; k++) {
                    float ak = a[k];
                    #pragma omp simd
                    for (int l = 0; l < 16; l++)
                        sum[i][v][l] = fmaf(ak, pb[16 * k + l], sum[i][v][l]);
                }
            }
    tile_rows(mr, nv, sum, c, ldc, cols, b, r, p0, p1);
}

static void tile_nchw_any(int mr, int nv, const float *restrict xn, int64_t oh, int64_t ow, const int64_t *g,
                          const float *restrict bp, int64_t ps, float *restrict c, int64_t ldc, int cols,
                          const float *restrict b, const float *restrict r, float p0, float p1) {
    const int64_t C = g[0], H = g[1], W = g[2], KH = g[3], KW = g[4], SH = g[5], SW = g[6];
    const int64_t PH = g[7], PW = g[8], DH = g[9], DW = g[10];
    float sum[MR][2][16] = {{{0}}};
    for (int i = 0; i < mr; i++)
        for (int v = 0; v < nv; v++)
            for (int64_t ki = 0; ki < KH; ki++)
                for (int64_t kj = 0; kj < KW; kj++)
                    for (int64_t ch = 0; ch < C; ch++) {
                        const int64_t ih = oh * SH - PH + ki * DH, iw = (ow + i) * SW - PW + kj * DW;
                        const float ak = ih >= 0 && ih < H && iw >= 0 && iw < W ? xn[(ch * H + ih) * W + iw] : 0.0f;
                        const float *pb = bp + v * ps + 16 * ((ki * KW + kj) * C + ch);
                        #pragma omp simd
                        for (int l = 0; l < 16; l++)
                            sum[i][v][l] = fmaf(ak, pb[l], sum[i][v][l]);
                    }
    tile_rows(mr, nv, sum, c, ldc, cols, b, r, p0, p1);
}
#endif
#endif

/* dims: M Cout (the weight's columns) NMB (row blocks: block i is register tiles [i T / NMB, (i + 1) T / NMB)
   of the T = ceil(M / MR), so blocks differ by a tile at most), then the geometry N H W
   C OH OW KH KW SH SW PH PW DH DW, then nchw: x is [N, C, H, W] (a network's input, few channels), read
   in place by tile_nchw (tiles then stop at row ends), so the layout change costs no pass over memory of
   its own; then HWS: with `scale` (a direct kernel only), row m's
   inputs are x[m, c] * scale[m / HWS][c] (a squeeze-excitation's gate, folded into the 1x1 convolution
   after it: a row block is scaled into a per-thread buffer once for all its panel pairs, the product
   rounded as y = x * s would be, so the result is that of the convolution of y, never written); then G:
   groups (the input and output channels in G equal blocks, block g of the output reading block g of the
   input; the weight packed per group, [G][P][KH*KW*C/G][16], P panels of the group's N/G columns; with
   G > 1 no NCHW input, scale or merged kernel rows); then F: out's columns, N, or with GLU (one group, no
   residual) the gated outputs, the weight's N columns then being ceil(F / 16) pairs of a gate panel and
   the matching up panel, and b likewise; then rows_first. A work item is a row block by one pair of a
   group's panels; items are numbered group, then panel pair first, so a thread's contiguous share
   (share.c: its own first, then what the others left) shares its panels, or with rows_first (gemm.py's
   choice; set with a scale) row block first, so it shares its rows. Returns 0, or -1 when a buffer
   cannot be allocated. */
#ifndef KF_GEMM_ENTRY       /* static and unused where a kernel appends this file for its tiles (gemm.py */
#define KF_GEMM_ENTRY       /* source(tiles_only=True)): gcc then drops it */
#endif
KF_GEMM_ENTRY int kf_gemm_conv(const float *restrict x, const float *restrict wp, const float *restrict b,
                 const float *restrict r, const float *restrict zero, float *restrict out,
                 const float *restrict scale, const int64_t *dims, const float *prm, int nthreads) {
    const int64_t M = dims[0], N = dims[1], T = (M + MR - 1) / MR, nmb = dims[2] < 1 ? 1 : dims[2];
    const int64_t MB = (T + nmb - 1) / nmb * MR;                    /* a block's rows, at most */
    const int64_t H = dims[4], W = dims[5], C = dims[6], OH = dims[7], OW = dims[8];
    const int KH = (int)dims[9], KW = (int)dims[10];
    const int64_t SH = dims[11], SW = dims[12], PH = dims[13], PW = dims[14], DH = dims[15], DW = dims[16];
    const int nchw = (int)dims[17];
    const int ntaps = KH * KW;
    const int64_t G = dims[19], CG = C / G, NG = N / G;             /* channels of a group, in and out */
    const int64_t P = (NG + 15) / 16, NP2 = (P + 1) / 2, ps = 16 * ntaps * CG;
    const float p0 = prm[0], p1 = prm[1];
    /* a 1x1 stride-1 unpadded convolution, or a linear: row m reads x[m, :] */
    const int direct = !nchw && ntaps == 1 && SH == 1 && SW == 1 && PH == 0 && PW == 0;
    const int merge = KW > 1 && DW == 1 && C < 64 && G == 1;      /* kernel rows as segments (below) */
    const int64_t HWS = dims[18];
    const int64_t F = dims[20];      /* output columns: N, or with GLU the gated outputs (N / 2 padded to 16s) */
    const int rows_first = (int)dims[21];
    const int64_t geometry[11] = {C, H, W, KH, KW, SH, SW, PH, PW, DH, DW};     /* tile_nchw's */
    if ((scale && (!direct || HWS < 1)) || G < 1 || C %% G || N %% G || (G > 1 && (scale || nchw))
        || (GLU && (G > 1 || RES || N %% 32 || F > N / 2 || F <= N / 2 - 16)) || (!GLU && F != N))
        return -1;
    int failed = 0;
    kf_share shares[KF_SHARES];
    const int ns = kf_shares_init(shares, nthreads, G * NP2 * nmb);
    #pragma omp parallel num_threads(nthreads)
    {
    float *scaled = scale ? malloc(MB * C * sizeof(float)) : 0;     /* a row block's rows times the gate */
    int64_t scaled_m0 = -1;                                          /* the row block it holds */
    if (scale && !scaled) {
        #pragma omp atomic write
        failed = 1;
    }
    int step = 0;
    kf_fetch fetch = {0, 0, 0};
    int64_t first_rb = -1;
    for (int64_t t; (t = kf_take(shares, ns, &step)) >= 0; ) {
        if (scale && !scaled)
            continue;
        /* row block first (gemm.py's choice, always with a scale: the block is scaled once into the
           buffer for all the panel pairs) */
        const int64_t g = t / (NP2 * nmb), tg = t %% (NP2 * nmb);
        const int64_t pp = rows_first ? tg %% NP2 : tg / nmb, rb = rows_first ? tg / NP2 : tg %% nmb;
        const int64_t m0 = rb * T / nmb * MR, m1e = (rb + 1) * T / nmb * MR, m1 = m1e < M ? m1e : M;
        const int64_t n0 = g * NG + 32 * pp, c0 = g * CG;
        if (scale && scaled_m0 != m0) {
            for (int64_t m = m0; m < m1; m++) {
                const float *xr = x + m * C, *sr = scale + m / HWS * C;
                float *d = scaled + (m - m0) * C;
                #pragma omp simd
                for (int64_t k = 0; k < C; k++)
                    d[k] = xr[k] * sr[k];
            }
            scaled_m0 = m0;
        }
        const int nv = pair_panels(pp, P);
        /* The weight of the thread's next item, where that is another panel pair likely still in memory,
           fetched into L2 by this item's full tiles as they go (a line every `every` K steps, spread over
           the item's steps), so the next pair's first tile does not wait on memory line by line: pairs
           first, the item after a pair's last row block (in a thread's own share, the next pair); rows
           first, the next pair of the thread's first row block (the later blocks find the weight in L2).
           Measured on an Intel VM (2 MB L2, memory slow past it; 2 threads): called directly with the
           caches overwritten, [1,7,7,512] 3x3 -> 512 0.88-0.95 -> 0.84-0.86 ms, [1,7,7,512] -> 2048 +
           residual 0.44 -> 0.39; in the programs (the same kernel choices, alternated in one process, 15
           rounds) ResNet-50 b1 0.941x the time, RegNetY 0.930x, GPT-2-style 0.935x, Llama-style 0.949x,
           MiniLM 0.963x, the other CNNs 0.986-1.005x. On Zen 4 (pairs first only) it had measured
           0.99-1.01x in the programs: no loss there. */
        fetch.next = fetch.end = 0;
        if (first_rb < 0)
            first_rb = rb;
        if (!nchw && t + 1 < G * NP2 * nmb && (rows_first ? rb == first_rb && pp + 1 < NP2 : (t + 1) %% nmb == 0)) {
            const int64_t g1 = (t + 1) / (NP2 * nmb), pp1 = rows_first ? pp + 1 : (t + 1) %% (NP2 * nmb) / nmb;
            fetch_over(&fetch, wp + (g1 * P + 2 * pp1) * ps, pair_panels(pp1, P) * ps * (int64_t)sizeof(float),
                       ntaps * CG * ((m1 - m0 + MR - 1) / MR));
        }
        /* a pair's valid output columns; with GLU its 16 gated outputs start at column 16 pp */
        const int cols = GLU ? (F - 16 * pp < 16 ? (int)(F - 16 * pp) : 16) : (NG - 32 * pp < 32 ? (int)(NG - 32 * pp) : 32);
        const float *ap[MAX_TAPS * MR];
        /* the pixel (n, oh, ow) of row m0, then stepped row by row: no division per row */
        int64_t n = m0 / (OH * OW), oh = m0 / OW %% OH, ow = m0 %% OW;
        for (int64_t m = m0; m < m1; ) {
            int mr = m1 - m < MR ? (int)(m1 - m) : MR;
            if (nchw) {          /* pixels of one output row, read from the NCHW image in place */
                if (mr > OW - ow)
                    mr = (int)(OW - ow);
                tile_nchw_any(mr, nv, x + n * C * H * W, oh, ow, geometry, wp + 2 * pp * ps, ps, out + m * F + n0, F,
                              cols, b + n0, RES ? r + m * N + n0 : 0, p0, p1);
                advance(mr, &n, &oh, &ow, OH, OW);
                m += mr;
                continue;
            }
            /* Segments: one per tap (C inputs each), or, where every row of the tile has its kernel's
               columns inside the input and DW == 1, one per kernel row
               (its KW taps are KW C adjacent inputs, and their weights adjacent too): few input channels
               (a stem) then make long inner loops. A tap or kernel row in the padding reads zeros. */
            int nseg = ntaps, rows_merged = 0;
            int64_t seglen = CG;
            if (merge) {
                int64_t o = ow;
                int inside = 1;
                for (int i = 0; i < mr && inside; i++, o = o + 1 == OW ? 0 : o + 1)
                    inside = o * SW - PW >= 0 && o * SW - PW + KW - 1 < W;
                if (inside) {
                    nseg = KH;
                    seglen = KW * C;
                    rows_merged = 1;
                }
            }
            for (int i = 0; i < mr; i++) {
                const int64_t ih0 = oh * SH - PH, iw0 = ow * SW - PW;
                if (scaled)
                    ap[i] = scaled + (m + i - m0) * C;
                else if (direct)
                    ap[i] = x + (m + i) * C + c0;
                else if (rows_merged)
                    for (int ki = 0; ki < KH; ki++) {
                        const int64_t ih = ih0 + ki * DH;
                        ap[ki * MR + i] = ih >= 0 && ih < H ? x + ((n * H + ih) * W + iw0) * C : zero;
                    }
                else
                    for (int ki = 0; ki < KH; ki++)
                        for (int kj = 0; kj < KW; kj++) {
                            const int64_t ih = ih0 + ki * DH, iw = iw0 + kj * DW;
                            ap[(ki * KW + kj) * MR + i] =
                                ih >= 0 && ih < H && iw >= 0 && iw < W ? x + ((n * H + ih) * W + iw) * C + c0 : zero;
                        }
                advance(1, &n, &oh, &ow, OH, OW);
            }
            tile_any(mr, nv, ap, nseg, seglen, wp + (g * P + 2 * pp) * ps, ps, out + m * F + (GLU ? n0 / 2 : n0), F, cols, b + n0,
                     RES ? r + m * N + n0 : 0, p0, p1, &fetch);
            m += mr;
        }
    }
    free(scaled);
    }
    return failed ? -1 : 0;
}
