/* NHWC depthwise convolution (channel multiplier 1) + bias + activation: one template, rendered by
   depthwise.py with the tap geometry and the activation as numeric constants, so the KH x KW taps unroll.
   x [N, H, W, C], w [KH, KW, C] (channel innermost), b [C], out [N, OH, OW, C]; every loop over C is
   `omp simd` (16-float vectors). The taps accumulate by explicit fmaf (the build has -ffp-contract=off):
   half the vector ops of a multiply and an add. */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/*VECMATH*/

#define KH %(kh)d
#define KW %(kw)d
#define SH %(sh)d
#define SW %(sw)d
#define DH %(dh)d
#define DW %(dw)d
#define ACT %(act)d
#define TW %(tw)d                  /* output columns per register tile */
#define PAD_BYTES (128 << 10)      /* a padded block image up to this size is copied (kf_depthwise) */

/*CONV_ACT*/
/*SHARE*/

/* An output pixel whose taps all lie inside the input: xp is its top-left tap, rs the row stride (W C). */
KF_INLINE void pixel_inner(const float *restrict xp, const float *restrict w, const float *restrict b,
                           float *restrict op, int64_t c0, int64_t c1, int64_t rs, int64_t C, float p0, float p1) {
    #pragma omp simd
    for (int64_t c = c0; c < c1; c++) {
        float acc = b[c];
        #pragma GCC unroll 16
        for (int i = 0; i < KH; i++) {
            #pragma GCC unroll 16
            for (int j = 0; j < KW; j++)
                acc = fmaf(xp[i * DH * rs + j * DW * C + c], w[(i * KW + j) * C + c], acc);
        }
        op[c] = act(acc, p0, p1);
    }
}

/* TW adjacent output pixels of one row, all taps inside the input: each input vector is loaded once
   for every output it feeds (gcc merges the equal addresses of the unrolled taps), weights once per tile. */
KF_INLINE void tile_inner(const float *restrict xp, const float *restrict w, const float *restrict b,
                          float *restrict op, int64_t c0, int64_t c1, int64_t rs, int64_t C, float p0, float p1) {
    #pragma omp simd
    for (int64_t c = c0; c < c1; c++) {
        float acc[TW];
        #pragma GCC unroll 16
        for (int t = 0; t < TW; t++)
            acc[t] = b[c];
        #pragma GCC unroll 16
        for (int i = 0; i < KH; i++) {
            #pragma GCC unroll 16
            for (int j = 0; j < KW; j++) {
                float wv = w[(i * KW + j) * C + c];
                #pragma GCC unroll 16
                for (int t = 0; t < TW; t++)
                    acc[t] = fmaf(xp[i * DH * rs + (t * SW + j * DW) * C + c], wv, acc[t]);
            }
        }
        #pragma GCC unroll 16
        for (int t = 0; t < TW; t++)
            op[t * C + c] = act(acc[t], p0, p1);
    }
}

/* A pixel near a border: taps outside the input read `zero` (C zeros), as zero padding means. */
static void pixel_border(const float *restrict x, const float *restrict w, const float *restrict b,
                         const float *restrict zero, float *restrict op, int64_t ih0, int64_t iw0,
                         int64_t H, int64_t W, int64_t C, int64_t c0, int64_t c1, float p0, float p1) {
    const float *tap[KH * KW];
    for (int i = 0; i < KH; i++)
        for (int j = 0; j < KW; j++) {
            int64_t ih = ih0 + i * DH, iw = iw0 + j * DW;
            tap[i * KW + j] = (ih >= 0 && ih < H && iw >= 0 && iw < W) ? x + (ih * W + iw) * C : zero;
        }
    #pragma omp simd
    for (int64_t c = c0; c < c1; c++) {
        float acc = b[c];
        #pragma GCC unroll 128
        for (int t = 0; t < KH * KW; t++)
            acc = fmaf(tap[t][c], w[t * C + c], acc);
        op[c] = act(acc, p0, p1);
    }
}

/* Channels [c0, c1) of output row oh (any count): per pixel, `omp simd` over the channels. */
static void row_simd(const float *restrict xn, const float *restrict w, const float *restrict b,
                     const float *restrict zero, float *restrict orow, int64_t ih0, int64_t c0, int64_t c1,
                     int64_t H, int64_t W, int64_t C, int64_t OW, int64_t PW, int64_t lo, int64_t hi,
                     float p0, float p1) {
    for (int64_t ow = 0; ow < lo; ow++)
        pixel_border(xn, w, b, zero, orow + ow * C, ih0, ow * SW - PW, H, W, C, c0, c1, p0, p1);
    int64_t ow = lo;
    if (hi > lo) {
        const float *xr = xn + ih0 * W * C;
        for (; ow + TW <= hi; ow += TW)
            tile_inner(xr + (ow * SW - PW) * C, w, b, orow + ow * C, c0, c1, W * C, C, p0, p1);
        for (; ow < hi; ow++)
            pixel_inner(xr + (ow * SW - PW) * C, w, b, orow + ow * C, c0, c1, W * C, C, p0, p1);
    }
    for (; ow < OW; ow++)
        pixel_border(xn, w, b, zero, orow + ow * C, ih0, ow * SW - PW, H, W, C, c0, c1, p0, p1);
}

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
/* VB channels [c, c + VB) of a whole output row in vector registers (VB = 16 with AVX-512, 8 with AVX2's
   16 registers of 8 floats: a 3x3's 9 weights + a tile's 4 accumulators fit): the KH x KW weight vectors
   are loaded once per row and stay in registers (25 of the 32 zmm for 5x5; 7x7 and up spill some to L1),
   each tile of TW pixels loads every input vector it needs once. Per VB outputs of a 3x3 stride-1 row: 9
   FMAs and (TW + 2) * 3 / TW loads, against 18 loads for the per-pixel `omp simd` form. */
#include <immintrin.h>
#ifdef __AVX512F__
#define VB 16
#define NREG 32        /* vector registers */
typedef __m512 vb_t;
#define VB_LOAD _mm512_loadu_ps
#define VB_STORE _mm512_storeu_ps
#define VB_FMA _mm512_fmadd_ps
#else
#define VB 8
#define NREG 16
typedef __m256 vb_t;
#define VB_LOAD _mm256_loadu_ps
#define VB_STORE _mm256_storeu_ps
#define VB_FMA _mm256_fmadd_ps
#endif

/* lanes [skip, VB) of act(v) to op: a block's first `skip` lanes are another block's (the shifted last
   block, dw_row), written there */
KF_INLINE void store_act(float *restrict op, vb_t v, float p0, float p1, int skip) {
    float tmp[VB] __attribute__((aligned(64)));
    VB_STORE(tmp, v);
    if (!skip) {
        #pragma omp simd
        for (int l = 0; l < VB; l++)
            op[l] = act(tmp[l], p0, p1);
    } else {
        for (int l = skip; l < VB; l++)
            op[l] = act(tmp[l], p0, p1);
    }
}

KF_INLINE void pixelv_border(const float *restrict xn, const vb_t *wr, vb_t bv, float *restrict op,
                             int64_t ih0, int64_t iw0, int64_t H, int64_t W, int64_t C, float p0, float p1,
                             int skip) {
    vb_t acc = bv;
    #pragma GCC unroll 16
    for (int i = 0; i < KH; i++) {
        int64_t ih = ih0 + i * DH;
        if (ih < 0 || ih >= H)
            continue;
        #pragma GCC unroll 16
        for (int j = 0; j < KW; j++) {
            int64_t iw = iw0 + j * DW;
            if (iw >= 0 && iw < W)
                acc = VB_FMA(VB_LOAD(xn + (ih * W + iw) * C), wr[i * KW + j], acc);
        }
    }
    store_act(op, acc, p0, p1, skip);
}

/* T pixels starting at xp (their first tap; all taps inside the input). A row of input vectors the T
   pixels read (IN_COLS) is loaded into registers once where it fits beside the weights and accumulators
   (IN_REGS: 3x3 stride 1 with AVX-512), else each FMA reads its input from memory (gcc allocates a too
   large set of live vectors by spilling them to the stack: 5x5 took 1.3x as long). */
#define IN_COLS(T) (((T) - 1) * SW + (KW - 1) * DW + 1)
#define IN_REGS(T) (KH * KW + (T) + IN_COLS(T) <= NREG - 2)
#define TILEV(T)                                                                                    \
    do {                                                                                            \
        vb_t acc[T];                                                                                \
        _Pragma("GCC unroll 16") for (int t = 0; t < T; t++) acc[t] = bv;                           \
        _Pragma("GCC unroll 16") for (int i = 0; i < KH; i++) {                                     \
            const float *xi = xp + i * DH * rs;                                                     \
            if (IN_REGS(T)) {                                                                       \
                vb_t in[IN_COLS(T)];                                                                \
                _Pragma("GCC unroll 64") for (int k = 0; k < IN_COLS(T); k++)                       \
                    in[k] = VB_LOAD(xi + k * C);                                                    \
                _Pragma("GCC unroll 16") for (int j = 0; j < KW; j++)                               \
                    _Pragma("GCC unroll 16") for (int t = 0; t < T; t++)                            \
                        acc[t] = VB_FMA(in[t * SW + j * DW], wr[i * KW + j], acc[t]);               \
            } else {                                                                                \
                _Pragma("GCC unroll 16") for (int j = 0; j < KW; j++)                               \
                    _Pragma("GCC unroll 16") for (int t = 0; t < T; t++)                            \
                        acc[t] = VB_FMA(VB_LOAD(xi + (t * SW + j * DW) * C), wr[i * KW + j], acc[t]); \
            }                                                                                       \
        }                                                                                           \
        _Pragma("GCC unroll 16") for (int t = 0; t < T; t++) store_act(op + t * CO, acc[t], p0, p1, skip);\
    } while (0)

/* C: the input's pixel stride; CO: the channel count (the output's pixel stride, the weights' tap stride);
   skip: the block's first lanes not stored (store_act) */
static void rowv(const float *restrict xn, const float *restrict w, const float *restrict b,
                 float *restrict orow, int64_t ih0, int64_t H, int64_t W, int64_t C, int64_t CO, int64_t OW,
                 int64_t PW, int64_t lo, int64_t hi, float p0, float p1, int skip) {
    vb_t wr[KH * KW];
    for (int t = 0; t < KH * KW; t++)
        wr[t] = VB_LOAD(w + t * CO);
    vb_t bv = VB_LOAD(b);
    for (int64_t ow = 0; ow < lo; ow++)
        pixelv_border(xn, wr, bv, orow + ow * CO, ih0, ow * SW - PW, H, W, C, p0, p1, skip);
    int64_t ow = lo;
    if (hi > lo) {
        const int64_t rs = W * C;
        const float *xr = xn + ih0 * rs;
        for (; ow + TW <= hi; ow += TW) {
            const float *xp = xr + (ow * SW - PW) * C;
            float *op = orow + ow * CO;
            TILEV(TW);
        }
        for (; ow < hi; ow++) {
            const float *xp = xr + (ow * SW - PW) * C;
            float *op = orow + ow * CO;
            TILEV(1);
        }
    }
    for (; ow < OW; ow++)
        pixelv_border(xn, wr, bv, orow + ow * CO, ih0, ow * SW - PW, H, W, C, p0, p1, skip);
}
#endif

/* the interior output columns [*lo, *hi): every tap's column inside the input */
static void interior_cols(int64_t W, int64_t OW, int64_t PW, int64_t *lo, int64_t *hi) {
    int64_t ow_lo = (PW + SW - 1) / SW, ow_hi = (W - 1 - (KW - 1) * DW + PW) / SW + 1;
    if (W - 1 - (KW - 1) * DW + PW < 0) ow_hi = 0;
    if (ow_hi > OW) ow_hi = OW;
    if (ow_lo > ow_hi) ow_lo = ow_hi;
    *lo = ow_lo;
    *hi = ow_hi;
}

/* channels [c, c1) of output row oh of image xn: VB-channel blocks in registers (AVX-512, AVX2); the
   channels past the last whole block too where the range has a whole block (the block ending at c1,
   shifted back over channels already done, storing its new lanes: every load stays inside the pixel and
   the chunk, no masked loads), else per pixel */
static void dw_row(const float *restrict xn, const float *restrict w, const float *restrict b,
                   const float *restrict zero, float *restrict orow, int64_t oh, int64_t c, int64_t c1, int64_t H,
                   int64_t W, int64_t C, int64_t OW, int64_t PH, int64_t PW, int64_t ow_lo, int64_t ow_hi,
                   float p0, float p1) {
    int64_t ih0 = oh * SH - PH;
    int full = ih0 >= 0 && ih0 + (KH - 1) * DH < H;
    int64_t lo = full ? ow_lo : OW, hi = full ? ow_hi : OW;
#ifdef VB
    const int64_t c0 = c;
    for (; c + VB <= c1; c += VB)
        rowv(xn + c, w + c, b + c, orow + c, ih0, H, W, C, C, OW, PW, lo, hi, p0, p1, 0);
    if (c < c1 && c1 - c0 >= VB) {
        rowv(xn + c1 - VB, w + c1 - VB, b + c1 - VB, orow + c1 - VB, ih0, H, W, C, C, OW, PW, lo, hi, p0, p1,
             (int)(c - (c1 - VB)));
        c = c1;
    }
#endif
    if (c < c1)
        row_simd(xn, w, b, zero, orow, ih0, c, c1, H, W, C, OW, PW, lo, hi, p0, p1);
}

/* dims: N H W C OH OW PH PW, nck (channel chunks per row: more work items when rows are few), ck
   (channels per chunk, a multiple of 16), block_major (AVX-512 and AVX2 only: items are (image, VB-channel
   block));
   prm: the activation's scalars. */
void kf_depthwise(const float *restrict x, const float *restrict w, const float *restrict b,
                  const float *restrict zero, float *restrict out, const int64_t *dims, const float *prm,
                  int nthreads) {
    const int64_t N = dims[0], H = dims[1], W = dims[2], C = dims[3], OH = dims[4], OW = dims[5];
    const int64_t PH = dims[6], PW = dims[7], nck = dims[8], ck = dims[9];
    const float p0 = prm[0], p1 = prm[1];
    int64_t ow_lo, ow_hi;
    interior_cols(W, OW, PW, &ow_lo, &ow_hi);
#ifdef VB
    if (dims[10]) {
        /* block-major: a work item is one VB-channel block of one image, its rows in order, so the
           kh input rows a row reads (kh W VB floats) are still in L1 from the rows before; the channels
           past the last whole block are one more block, shifted back (dw_row), where there is a whole one */
        const int64_t nb = C / VB, nbt = nb + (C %% VB && nb), HP = H + 2 * PH, WP = W + 2 * PW;
        /* a small padded image: each block is first copied into a zero-bordered per-thread buffer
           [HP][WP][VB], so every output pixel takes the unrolled interior tile; at 7x7 outputs half the
           pixels are border pixels, whose per-tap tests had made [1,14,14,672] 5x5/2 take 24 us against 3 us
           of FMAs (16 us with the copy). Larger images have few border pixels and go straight through. */
        const int padded = PH + PW > 0 && HP * WP * VB * (int64_t)sizeof(float) <= PAD_BYTES;
        kf_share shares[KF_SHARES];
        const int ns = kf_shares_init(shares, nthreads, N * nbt);
        #pragma omp parallel num_threads(nthreads)
        {
        float *pb = padded ? calloc(HP * WP * VB, sizeof(float)) : 0;
        int step = 0;
        for (int64_t t; (t = kf_take(shares, ns, &step)) >= 0; ) {
            const int64_t n = t / nbt, k = t - n * nbt, c = k < nb ? k * VB : C - VB;
            const int skip = (int)(k * VB - c);
            const float *xb = x + n * H * W * C + c;
            if (pb) {
                for (int64_t i = 0; i < H; i++)
                    for (int64_t j = 0; j < W; j++)
                        VB_STORE(pb + ((i + PH) * WP + j + PW) * VB, VB_LOAD(xb + (i * W + j) * C));
                for (int64_t oh = 0; oh < OH; oh++)
                    rowv(pb, w + c, b + c, out + (n * OH + oh) * OW * C + c, oh * SH, HP, WP, VB, C, OW, 0,
                          0, OW, p0, p1, skip);
                continue;
            }
            for (int64_t oh = 0; oh < OH; oh++) {
                int64_t ih0 = oh * SH - PH;
                int full = ih0 >= 0 && ih0 + (KH - 1) * DH < H;
                rowv(xb, w + c, b + c, out + (n * OH + oh) * OW * C + c, ih0, H, W, C, C, OW,
                      PW, full ? ow_lo : OW, full ? ow_hi : OW, p0, p1, skip);
            }
        }
        free(pb);
        }
        if (nbt * VB < C) {      /* fewer channels than a block */
            #pragma omp parallel for collapse(2) schedule(static) num_threads(nthreads)
            for (int64_t n = 0; n < N; n++)
                for (int64_t oh = 0; oh < OH; oh++) {
                    int64_t ih0 = oh * SH - PH;
                    int full = ih0 >= 0 && ih0 + (KH - 1) * DH < H;
                    row_simd(x + n * H * W * C, w, b, zero, out + (n * OH + oh) * OW * C, ih0, nb * VB, C, H, W, C,
                             OW, PW, full ? ow_lo : OW, full ? ow_hi : OW, p0, p1);
                }
        }
        return;
    }
#endif
    kf_share shares[KF_SHARES];
    const int ns = kf_shares_init(shares, nthreads, N * OH * nck);
    #pragma omp parallel num_threads(nthreads)
    {
    int step = 0;
    for (int64_t t; (t = kf_take(shares, ns, &step)) >= 0; ) {
        const int64_t n = t / (OH * nck), oh = t / nck %% OH, k = t %% nck;
        const int64_t c = k * ck, c1 = c + ck < C ? c + ck : C;
        dw_row(x + n * H * W * C, w, b, zero, out + (n * OH + oh) * OW * C, oh, c, c1, H, W, C, OW, PH, PW,
               ow_lo, ow_hi, p0, p1);
    }
    }
}
