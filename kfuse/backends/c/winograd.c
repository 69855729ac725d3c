/* A 3x3 stride-1 NHWC convolution by Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray, 2016): each
   WM x WM = 2x2 block of outputs ("tile") from its 4x4 input patch d as Y = Aᵀ [U ⊙ V] A, V = Bᵀ d B per
   input channel, U = G g Gᵀ per (output, input) channel pair (packed by winograd.py), the sum over input
   channels of U ⊙ V being 16 GEMMs, one per position xi of the transform domain: 16 multiplies per tile
   and channel pair instead of 36, 2.25x fewer. The transforms' coefficients are 0, ±1 and 1/2: a few ulps
   from the direct sum. (F(4x4, 3x3), 4x fewer, was built and measured 1.2-1.4x faster than this at batch
   8, but its transforms' coefficients, up to 8 and 1/24, put 1.4e-5 of error on unit-scale outputs, over
   verify's 1e-5 floor for outputs near zero: a UNet convolution failed it.)

   Appended by winograd.py to gemm.c (its `tile_any` register tiles run the GEMMs, with an identity
   epilogue), then conv_act.c for this kernel's activation ACT; RES: a residual r is added before it.

   Per work item, a block of up to TB tiles: its V into a per-thread buffer [WA^2][TB][C], the GEMMs into
   another [WA^2][TB][Cout], then the outputs with bias, residual and activation; both buffers stay in L2.
   A tile whose outputs come out NaN or infinite (an Inf or NaN input, or an overflow of the transform:
   Winograd spreads a non-finite input over the whole tile, where the direct convolution keeps it to
   the outputs that read it) is computed again by the direct sum from wd [Cout][3][3][C], so non-finite
   values land where the direct convolution puts them.

   x [N, H, W, C]; u [WA^2][P][C][16] (P = ceil(Cout / 16) panels per xi, zero past Cout); wd; b [Cout];
   r, out [N, OH, OW, Cout]; zero: at least max(C, Cout) zeros. dims: N H W C OH OW Cout PH PW TB. */

#define WM 2                      /* outputs per tile side */
#define WA (WM + 2)                /* the transform's size: WM + 3 - 1 */
#define W_TILE_POS (WA * WA)

/* 16 channels as one vector (GCC's vector extension: AVX-512 here, halves or quarters elsewhere); the
   input transform is written on them: as an `omp simd` loop over channels with the patch in arrays, GCC
   left it scalar (F(2x2) 0.38 -> 0.67 ms at [1,56,56,64]) */
typedef float vf __attribute__((vector_size(64)));
typedef float vfu __attribute__((vector_size(64), aligned(4), may_alias));

KF_INLINE vf load_n(const float *p, int nc) {
    if (nc == 16)
        return *(const vfu *)p;
    vf v = {0};
    for (int l = 0; l < nc; l++)
        v[l] = p[l];
    return v;
}

KF_INLINE void store_n(float *p, vf v, int nc) {
    if (nc == 16) {
        *(vfu *)p = v;
        return;
    }
    for (int l = 0; l < nc; l++)
        p[l] = v[l];
}

/* Bᵀ d of one column d of the patch (WA values) */
KF_INLINE void in_1d(const vf *d, vf *t) {
    t[0] = d[0] - d[2];
    t[1] = d[1] + d[2];
    t[2] = d[2] - d[1];
    t[3] = d[1] - d[3];
}

/* Bᵀ d B of WA x WA patch pointers p[WA a + b] (row a, column b of the patch; a pixel in the padding
   points at zeros) for nc <= 16 channels from c0, into v[xi * vs] */
KF_INLINE void input_transform(const float *const *p, int64_t c0, float *restrict v, int64_t vs, int nc) {
    vf t[WA][WA], d[WA], u[WA];
    #pragma GCC unroll 4
    for (int j = 0; j < WA; j++) {               /* columns: Bᵀ d */
        #pragma GCC unroll 4
        for (int a = 0; a < WA; a++)
            d[a] = load_n(p[WA * a + j] + c0, nc);
        in_1d(d, u);
        #pragma GCC unroll 4
        for (int i = 0; i < WA; i++)
            t[i][j] = u[i];
    }
    #pragma GCC unroll 4
    for (int i = 0; i < WA; i++) {               /* rows: (Bᵀ d) B */
        in_1d(t[i], u);
        #pragma GCC unroll 4
        for (int j = 0; j < WA; j++)
            store_n(v + (WA * i + j) * vs, u[j], nc);
    }
}

/* Aᵀ m of one column m (WA values): WM outputs */
KF_INLINE void out_1d(const float *m, float *y) {
    y[0] = m[0] + m[1] + m[2];
    y[1] = m[1] - m[2] - m[3];
}

/* the direct sum of output (n, oh, ow), channel co: bias, residual and activation left to the caller */
static float direct(const float *restrict x, const float *restrict wd, int64_t n, int64_t oh, int64_t ow, int64_t co,
                    int64_t H, int64_t W, int64_t C, int64_t PH, int64_t PW) {
    float s = 0.0f;
    for (int ki = 0; ki < 3; ki++)
        for (int kj = 0; kj < 3; kj++) {
            const int64_t ih = oh - PH + ki, iw = ow - PW + kj;
            if (ih < 0 || ih >= H || iw < 0 || iw >= W)
                continue;
            const float *xp = x + ((n * H + ih) * W + iw) * C, *wp = wd + ((co * 3 + ki) * 3 + kj) * C;
            for (int64_t c = 0; c < C; c++)
                s = fmaf(xp[c], wp[c], s);
        }
    return s;
}

/* The WM x WM outputs of one tile, nc channels from c0: Aᵀ m A from m[xi * ms], then bias, residual and
   the activation; o[k], r[k]: output (and residual) pixel of position k = WM a + b, or 0 past the output's
   edge. Returns whether any came out NaN or infinite. */
KF_INLINE int output_transform(const float *restrict m, int64_t ms, const float *restrict b, float *const *o,
                               const float *const *r, int64_t c0, int nc, float p0, float p1) {
    int bad = 0;
    #pragma omp simd reduction(|:bad)
    for (int l = 0; l < nc; l++) {
        float s[WM][WA], col[WA], y[WM];
        #pragma GCC unroll 4
        for (int j = 0; j < WA; j++) {           /* columns: Aᵀ m */
            #pragma GCC unroll 4
            for (int a = 0; a < WA; a++)
                col[a] = m[(WA * a + j) * ms + l];
            out_1d(col, y);
            #pragma GCC unroll 4
            for (int i = 0; i < WM; i++)
                s[i][j] = y[i];
        }
        #pragma GCC unroll 4
        for (int i = 0; i < WM; i++) {           /* rows: (Aᵀ m) A */
            out_1d(s[i], y);
            #pragma GCC unroll 4
            for (int j = 0; j < WM; j++) {
                const int k = WM * i + j;
                float v = y[j] + b[c0 + l];
#if RES
                if (r[k])
                    v += r[k][c0 + l];
#endif
                v = act(v, p0, p1);
                bad |= !isfinite(v) && o[k];
                if (o[k])
                    o[k][c0 + l] = v;
            }
        }
    }
    (void)r;
    return bad;
}

int kf_winograd(const float *restrict x, const float *restrict u, const float *restrict wd, const float *restrict b,
                const float *restrict r, const float *restrict zero, float *restrict out, const int64_t *dims,
                const float *prm, int nthreads) {
    const int64_t N = dims[0], H = dims[1], W = dims[2], C = dims[3], OH = dims[4], OW = dims[5], CO = dims[6];
    const int64_t PH = dims[7], PW = dims[8], TB = dims[9];
    const int64_t TH = (OH + WM - 1) / WM, TW = (OW + WM - 1) / WM, T = N * TH * TW, nblk = (T + TB - 1) / TB;
    const int64_t P = (CO + 15) / 16, NP2 = (P + 1) / 2, ps = 16 * C, us = P * ps;
    /* the planes of V and M a line apart from a multiple of 4 KB: at TB C floats apart, a tile's 16
       stores (and the output transform's 16 loads) fell into one L1 set ([8,28,28,128]: the transforms
       took 0.70 ms of 2.43) */
    const int64_t VS = TB * C + 16, MS = TB * CO + 16;
    const float p0 = prm[0], p1 = prm[1];
    int failed = 0;
    kf_share shares[KF_SHARES];
    const int ns = kf_shares_init(shares, nthreads, nblk);
    #pragma omp parallel num_threads(nthreads)
    {
    float *v = malloc(W_TILE_POS * VS * sizeof(float)), *mb = malloc(W_TILE_POS * MS * sizeof(float));
    if (!v || !mb) {
        #pragma omp atomic write
        failed = 1;
    }
    int step = 0;
    kf_fetch fetch = {0, 0, 0};
    for (int64_t blk; (blk = kf_take(shares, ns, &step)) >= 0; ) {
        if (!v || !mb)
            continue;
        const int64_t t0 = blk * TB, nt = T - t0 < TB ? T - t0 : TB;
        for (int64_t i = 0; i < nt; i++) {                       /* V of each tile */
            const int64_t t = t0 + i, n = t / (TH * TW), th = t / TW % TH, tw = t % TW;
            const float *p[W_TILE_POS];
            for (int a = 0; a < WA; a++)
                for (int c = 0; c < WA; c++) {
                    const int64_t ih = WM * th - PH + a, iw = WM * tw - PW + c;
                    p[WA * a + c] = ih >= 0 && ih < H && iw >= 0 && iw < W ? x + ((n * H + ih) * W + iw) * C : zero;
                }
            for (int64_t c0 = 0; c0 < C; c0 += 16)
                input_transform(p, c0, v + i * C + c0, VS, C - c0 < 16 ? (int)(C - c0) : 16);
        }
        /* M[xi] = V[xi] U[xi]; U's panel pairs are read in the order they are stored, and the tiles of
           each fetch the next pair into L2 as they go (gemm.c's fetch_over): on an Intel VM with 2 MB of
           L2 per core, ResNet-50 b1 0.971x the time, the UNet block 0.978x (the same kernel choices,
           alternated in one process, 15 rounds) */
        for (int xi = 0; xi < W_TILE_POS; xi++)
            for (int64_t pp = 0; pp < NP2; pp++) {
                const int nv = pair_panels(pp, P);
                const int cols = CO - 32 * pp < 32 ? (int)(CO - 32 * pp) : 32;
                const float *pair = u + xi * us + 2 * pp * ps;
                fetch.next = fetch.end = 0;
                if (xi + 1 < W_TILE_POS || pp + 1 < NP2) {   /* the next pair follows this one in memory */
                    const int64_t bytes = pair_panels(pp + 1 < NP2 ? pp + 1 : 0, P) * ps * (int64_t)sizeof(float);
                    fetch_over(&fetch, pair + nv * ps, bytes, C * ((nt + MR - 1) / MR));
                }
                for (int64_t m = 0; m < nt; m += MR) {
                    const int mr = nt - m < MR ? (int)(nt - m) : MR;
                    const float *ap[MR];
                    for (int i = 0; i < mr; i++)
                        ap[i] = v + xi * VS + (m + i) * C;
                    tile_any(mr, nv, ap, 1, C, pair, ps, mb + xi * MS + m * CO + 32 * pp, CO,
                             cols, zero, 0, 0.0f, 0.0f, &fetch);
                }
            }
        for (int64_t i = 0; i < nt; i++) {                       /* Y of each tile */
            const int64_t t = t0 + i, n = t / (TH * TW), th = t / TW % TH, tw = t % TW;
            float *o[WM * WM];
            const float *rr[WM * WM];
            for (int k = 0; k < WM * WM; k++) {
                const int64_t oh = WM * th + k / WM, ow = WM * tw + k % WM, at = ((n * OH + oh) * OW + ow) * CO;
                const int inside = oh < OH && ow < OW;
                o[k] = inside ? out + at : 0;
                rr[k] = inside && RES ? r + at : 0;
            }
            for (int64_t c0 = 0; c0 < CO; c0 += 16) {
                const int nc = CO - c0 < 16 ? (int)(CO - c0) : 16;
                if (!output_transform(mb + i * CO + c0, MS, b, o, rr, c0, nc, p0, p1))
                    continue;
                for (int k = 0; k < WM * WM; k++)                /* non-finite: the direct sum */
                    for (int64_t c = c0; o[k] && c < c0 + nc; c++) {
                        const int64_t oh = WM * th + k / WM, ow = WM * tw + k % WM;
                        float s = direct(x, wd, n, oh, ow, c, H, W, C, PH, PW) + b[c];
#if RES
                        s += rr[k][c];
#endif
                        o[k][c] = act(s, p0, p1);
                    }
            }
        }
    }
    free(v);
    free(mb);
    }
    return failed ? -1 : 0;
}
