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
#define MR 8                       /* rows per register tile */
#define MAX_TAPS 121               /* 11 x 11 (gemm.py checks) */
#define MAX_RING 64                /* input rows an NCHW band holds, (KH - 1) DH + 1 (gemm.py checks) */

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

/* cols gated outputs of one row: act(gate + bg) * (up + bu) */
KF_INLINE void gated(float *restrict op, const float *restrict g, const float *restrict u, const float *restrict bg,
                     const float *restrict bu, int cols, float p0, float p1) {
    #pragma omp simd
    for (int l = 0; l < cols; l++)
        op[l] = act(g[l] + bg[l], p0, p1) * (u[l] + bu[l]);
}

#ifdef __AVX512F__
#include <immintrin.h>

/* A tile of mr rows by nv 16-column panels (at most 2): for each of the ntaps segments, row i reads cin
   adjacent inputs from ap[t * MR + i], the panels their rows t*cin.. from bp (second panel at bp + ps).
   cols: valid columns of the tile. */
KF_INLINE void tile(const int mr, const int nv, const float *const *ap, int ntaps, int64_t cin,
                    const float *restrict bp, int64_t ps, float *restrict c, int64_t ldc, int cols,
                    const float *restrict b, const float *restrict r, float p0, float p1) {
    __m512 acc[MR][2];
    #pragma GCC unroll 8
    for (int i = 0; i < mr; i++) {
        acc[i][0] = acc[i][1] = _mm512_setzero_ps();
#if RES
        /* the residual tile is read only after the K loop: fetched now, its misses overlap the FMAs
           (a 1x1 K=64 convolution + residual 0.94x; prefetching the output lines too gained nothing) */
        _mm_prefetch((const char *)(r + i * ldc), _MM_HINT_T0);
        if (nv > 1)
            _mm_prefetch((const char *)(r + i * ldc + 16), _MM_HINT_T0);
#endif
    }
    for (int t = 0; t < ntaps; t++) {
        const float *a[MR];
        #pragma GCC unroll 8
        for (int i = 0; i < mr; i++)
            a[i] = ap[t * MR + i];
        const float *restrict bt = bp + 16 * t * cin;
        for (int64_t k = 0; k < cin; k++) {
            __m512 b0 = _mm512_loadu_ps(bt + 16 * k);
            __m512 b1 = nv > 1 ? _mm512_loadu_ps(bt + ps + 16 * k) : b0;
            #pragma GCC unroll 8
            for (int i = 0; i < mr; i++) {
                __m512 ai = _mm512_set1_ps(a[i][k]);
                acc[i][0] = _mm512_fmadd_ps(ai, b0, acc[i][0]);
                if (nv > 1)
                    acc[i][1] = _mm512_fmadd_ps(ai, b1, acc[i][1]);
            }
        }
    }
#if GLU
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

#define TILE(MRC, NVC) tile(MRC, NVC, ap, ntaps, cin, bp, ps, c, ldc, cols, b, r, p0, p1)
#define ROWS(NVC)                                                                                   \
    switch (mr) {                                                                                   \
    case 8: TILE(8, NVC); break;  case 7: TILE(7, NVC); break;  case 6: TILE(6, NVC); break;        \
    case 5: TILE(5, NVC); break;  case 4: TILE(4, NVC); break;  case 3: TILE(3, NVC); break;        \
    case 2: TILE(2, NVC); break;  default: TILE(1, NVC); break;                                     \
    }

/* every shape of tile compiled with its row and panel counts as constants */
static void tile_any(int mr, int nv, const float *const *ap, int ntaps, int64_t cin, const float *restrict bp,
                     int64_t ps, float *restrict c, int64_t ldc, int cols, const float *restrict b,
                     const float *restrict r, float p0, float p1) {
    if (nv > 1) {
        ROWS(2)
    } else {
        ROWS(1)
    }
}
#else
/* without AVX-512: per row, the 16 columns of each panel as an `omp simd` vector */
static void tile_any(int mr, int nv, const float *const *ap, int ntaps, int64_t cin, const float *restrict bp,
                     int64_t ps, float *restrict c, int64_t ldc, int cols, const float *restrict b,
                     const float *restrict r, float p0, float p1) {
    for (int i = 0; i < mr; i++) {
        float sum[2][16] = {{0}};
        for (int v = 0; v < nv; v++)
            for (int t = 0; t < ntaps; t++) {
                const float *a = ap[t * MR + i], *pb = bp + v * ps + 16 * t * cin;
                for (int64_t k = 0; k < cin; k++) {
                    float ak = a[k];
                    #pragma omp simd
                    for (int l = 0; l < 16; l++)
                        sum[v][l] = fmaf(ak, pb[16 * k + l], sum[v][l]);
                }
            }
#if GLU
        gated(c + i * ldc, sum[0], sum[1], b, b + 16, cols, p0, p1);
#else
        for (int v = 0; v < nv; v++) {
            int n = cols - 16 * v < 16 ? cols - 16 * v : 16;
            epilogue(c + i * ldc + 16 * v, sum[v], b + 16 * v, RES ? r + i * ldc + 16 * v : 0, n, p0, p1);
        }
#endif
    }
}
#endif

/* The KH input rows that output row oh of image n reads, from NCHW x as NHWC rows of WB columns (column
   bc is input column bc - PW; zeros in the padding): rowp[ki] is that row, or 0 for one in the padding.
   The band is a ring of RING = (KH - 1) DH + 1 rows, slot ih %% RING, have[slot] the (n, ih) it holds
   (n H + ih): the next output row fills only the SH rows it does not share with this one. */
static void fill_band(const float *restrict x, float *restrict band, int64_t *have, const float **rowp, int64_t n,
                      int64_t oh, int64_t C, int64_t H, int64_t W, int64_t WB, int KH, int64_t SH, int64_t PH,
                      int64_t PW, int64_t DH) {
    const int64_t ring = (KH - 1) * DH + 1;
    for (int ki = 0; ki < KH; ki++) {
        const int64_t ih = oh * SH - PH + ki * DH, slot = ((ih %% ring) + ring) %% ring;
        float *row = band + slot * WB * C;
        rowp[ki] = ih >= 0 && ih < H ? row : 0;
        if (!rowp[ki] || have[slot] == n * H + ih)
            continue;
        have[slot] = n * H + ih;
        const int64_t lo = PW < WB ? PW : WB, hi = PW + W < WB ? PW + W : WB;
        for (int64_t j = 0; j < lo * C; j++)
            row[j] = 0.0f;
        for (int64_t j = hi * C; j < WB * C; j++)
            row[j] = 0.0f;
        const float *xp = x + (n * C * H + ih) * W - PW;     /* channel c, band column bc: xp[c H W + bc] */
        if (C == 3) {        /* RGB: the three planes in one pass, the stores contiguous */
            const float *x0 = xp, *x1 = xp + H * W, *x2 = xp + 2 * H * W;
            for (int64_t bc = lo; bc < hi; bc++) {
                row[3 * bc] = x0[bc];
                row[3 * bc + 1] = x1[bc];
                row[3 * bc + 2] = x2[bc];
            }
        } else
            for (int64_t bc = lo; bc < hi; bc++)
                for (int64_t c = 0; c < C; c++)
                    row[bc * C + c] = xp[c * H * W + bc];
    }
}

/* dims: M Cout (the weight's columns) MB (rows per work item, a multiple of MR), then the geometry N H W
   C OH OW KH KW SH SW PH PW DH DW, then nchw: x is [N, C, H, W] (a network's input, few channels), read through per-thread bands
   (fill_band: the KH rows an output row reads, transposed; tiles then stop at row ends), so the layout
   change costs no pass over memory of its own; then HWS: with `scale` (a direct kernel only), row m's
   inputs are x[m, c] * scale[m / HWS][c] (a squeeze-excitation's gate, folded into the 1x1 convolution
   after it: a row block is scaled into a per-thread buffer once for all its panel pairs, the product
   rounded as y = x * s would be, so the result is that of the convolution of y, never written); then G:
   groups (the input and output channels in G equal blocks, block g of the output reading block g of the
   input; the weight packed per group, [G][P][KH*KW*C/G][16], P panels of the group's N/G columns; with
   G > 1 no NCHW bands, scale or merged kernel rows); then F: out's columns, N, or with GLU (one group, no
   residual) the gated outputs, the weight's N columns then being ceil(F / 16) pairs of a gate panel and
   the matching up panel, and b likewise; then rows_first. A work item is MB rows by one pair of a
   group's panels; items are numbered group, then panel pair first, so a thread's contiguous range
   shares its panels, or with rows_first (gemm.py's choice; set with a scale) row block first, so it
   shares its rows. Returns 0, or -1 when the bands or buffers cannot be allocated. */
int kf_gemm_conv(const float *restrict x, const float *restrict wp, const float *restrict b,
                 const float *restrict r, const float *restrict zero, float *restrict out,
                 const float *restrict scale, const int64_t *dims, const float *prm, int nthreads) {
    const int64_t M = dims[0], N = dims[1], MB = dims[2];
    const int64_t H = dims[4], W = dims[5], C = dims[6], OH = dims[7], OW = dims[8];
    const int KH = (int)dims[9], KW = (int)dims[10];
    const int64_t SH = dims[11], SW = dims[12], PH = dims[13], PW = dims[14], DH = dims[15], DW = dims[16];
    const int nchw = (int)dims[17];
    const int ntaps = KH * KW;
    const int64_t G = dims[19], CG = C / G, NG = N / G;             /* channels of a group, in and out */
    const int64_t P = (NG + 15) / 16, NP2 = (P + 1) / 2, nmb = (M + MB - 1) / MB, ps = 16 * ntaps * CG;
    const float p0 = prm[0], p1 = prm[1];
    /* a 1x1 stride-1 unpadded convolution, or a linear: row m reads x[m, :] */
    const int direct = !nchw && ntaps == 1 && SH == 1 && SW == 1 && PH == 0 && PW == 0;
    const int merge = KW > 1 && DW == 1 && C < 64 && G == 1;      /* kernel rows as segments (below) */
    const int64_t WB = (OW - 1) * SW + (KW - 1) * DW + 1, band_floats = nchw ? ((KH - 1) * DH + 1) * WB * C : 0;
    const int64_t HWS = dims[18];
    const int64_t F = dims[20];      /* output columns: N, or with GLU the gated outputs (N / 2 padded to 16s) */
    const int rows_first = (int)dims[21];
    if ((scale && (!direct || HWS < 1)) || G < 1 || C %% G || N %% G || (G > 1 && (scale || nchw))
        || (GLU && (G > 1 || RES || N %% 32 || F > N / 2 || F <= N / 2 - 16)) || (!GLU && F != N))
        return -1;
    float *bands = nchw ? malloc(nthreads * band_floats * sizeof(float)) : 0;
    if (nchw && !bands)
        return -1;
    int failed = 0;
    #pragma omp parallel num_threads(nthreads)
    {
    float *scaled = scale ? malloc(MB * C * sizeof(float)) : 0;     /* a row block's rows times the gate */
    int64_t scaled_m0 = -1;                                          /* the row block it holds */
    if (scale && !scaled) {
        #pragma omp atomic write
        failed = 1;
    }
    #pragma omp for schedule(static)
    for (int64_t t = 0; t < G * NP2 * nmb; t++) {
        if (scale && !scaled)
            continue;
        /* row block first (gemm.py's choice, always with a scale: the block is scaled once into the
           buffer for all the panel pairs) */
        const int64_t g = t / (NP2 * nmb), tg = t %% (NP2 * nmb);
        const int64_t pp = rows_first ? tg %% NP2 : tg / nmb, m0 = (rows_first ? tg / NP2 : tg %% nmb) * MB;
        const int64_t m1 = m0 + MB < M ? m0 + MB : M, n0 = g * NG + 32 * pp, c0 = g * CG;
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
        const int nv = 2 * pp + 1 < P ? 2 : 1;
        /* a pair's valid output columns; with GLU its 16 gated outputs start at column 16 pp */
        const int cols = GLU ? (F - 16 * pp < 16 ? (int)(F - 16 * pp) : 16) : (NG - 32 * pp < 32 ? (int)(NG - 32 * pp) : 32);
        const float *ap[MAX_TAPS * MR];
        float *band = nchw ? bands + omp_get_thread_num() * band_floats : 0;
        const float *rowp[MAX_TAPS];
        int64_t have[MAX_RING];          /* the band's rows (fill_band) */
        for (int i = 0; i < MAX_RING; i++)
            have[i] = -1;
        int64_t band_row = -1;           /* the (n, oh) rowp points at, as n * OH + oh */
        /* the pixel (n, oh, ow) of row m0, then stepped row by row: no division per row */
        int64_t n = m0 / (OH * OW), oh = m0 / OW %% OH, ow = m0 %% OW;
        for (int64_t m = m0; m < m1; ) {
            int mr = m1 - m < MR ? (int)(m1 - m) : MR;
            if (nchw) {
                if (mr > OW - ow)
                    mr = (int)(OW - ow);
                if (band_row != n * OH + oh) {
                    fill_band(x, band, have, rowp, n, oh, C, H, W, WB, KH, SH, PH, PW, DH);
                    band_row = n * OH + oh;
                }
            }
            /* Segments: one per tap (C inputs each), or, where every row of the tile has its kernel's
               columns inside the input (or in a band, padding and all) and DW == 1, one per kernel row
               (its KW taps are KW C adjacent inputs, and their weights adjacent too): few input channels
               (a stem) then make long inner loops. A tap or kernel row in the padding reads zeros. */
            int nseg = ntaps, rows_merged = 0;
            int64_t seglen = CG;
            if (merge) {
                int64_t o = ow;
                int inside = 1;
                for (int i = 0; i < mr && inside && !nchw; i++, o = o + 1 == OW ? 0 : o + 1)
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
                else if (nchw)          /* band column ow SW is input column iw0 */
                    for (int ki = 0; ki < KH; ki++)
                        for (int kj = 0; kj < (rows_merged ? 1 : KW); kj++)
                            ap[(ki * (rows_merged ? 1 : KW) + kj) * MR + i] =
                                rowp[ki] ? rowp[ki] + (ow * SW + kj * DW) * C : zero;
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
                if (++ow == OW) {
                    ow = 0;
                    if (++oh == OH) {
                        oh = 0;
                        n++;
                    }
                }
            }
            tile_any(mr, nv, ap, nseg, seglen, wp + (g * P + 2 * pp) * ps, ps, out + m * F + (GLU ? n0 / 2 : n0), F, cols, b + n0,
                     RES ? r + m * N + n0 : 0, p0, p1);
            m += mr;
        }
    }
    free(scaled);
    }
    free(bands);
    return failed ? -1 : 0;
}
