/* A 3x3 stride-1 NHWC convolution by Winograd's minimal filtering F(2x2, 3x3) (Lavin & Gray, 2016): each
   2x2 block of outputs ("tile") from its 4x4 input patch d as Y = Aᵀ [U ⊙ V] A, V = Bᵀ d B per input
   channel, U = G g Gᵀ per (output, input) channel pair (packed by winograd.py), the sum over input
   channels of U ⊙ V being 16 GEMMs (one per position xi of the 4x4 transform domain): 16 multiplies per
   tile and channel pair instead of 36, 2.25x fewer. The transforms' coefficients are 0, ±1 (Bᵀ, Aᵀ) and
   1/2 (G): their rounding adds at most a few ulps to the direct sum's.

   Appended by winograd.py to gemm.c (its `tile_any` register tiles run the 16 GEMMs, with an identity
   epilogue), then conv_act.c for this kernel's activation ACT; RES: a residual r is added before it.

   Per work item, a block of up to TB tiles: its V into a per-thread buffer [16][TB][C], the GEMMs into
   another [16][TB][Cout], then the outputs with bias, residual and activation; both buffers stay in L2.
   A tile whose outputs come out NaN or infinite (an Inf or NaN input, or an overflow of the transform:
   Winograd spreads a non-finite input over the whole tile, where the direct convolution keeps it to
   the outputs that read it) is computed again by the direct sum from wd [Cout][3][3][C], so non-finite
   values land where the direct convolution puts them.

   x [N, H, W, C]; u [16][P][C][16] (P = ceil(Cout / 16) panels per xi, zero past Cout); wd; b [Cout];
   r, out [N, OH, OW, Cout]; zero: at least max(C, Cout) zeros. dims: N H W C OH OW Cout PH PW TB. */

#define W_TILE_POS 16

/* Bᵀ d B of 16 patch pointers p[4 a + b] (row a, column b of the patch; a pixel in the padding points at
   zeros) for nc channels, into v[xi * vs] */
KF_INLINE void input_transform(const float *const *p, float *restrict v, int64_t vs, int nc) {
    #pragma omp simd
    for (int l = 0; l < nc; l++) {
        float t[4][4];
        #pragma GCC unroll 4
        for (int j = 0; j < 4; j++) {            /* rows: Bᵀ d */
            const float d0 = p[j][l], d1 = p[4 + j][l], d2 = p[8 + j][l], d3 = p[12 + j][l];
            t[0][j] = d0 - d2;
            t[1][j] = d1 + d2;
            t[2][j] = d2 - d1;
            t[3][j] = d1 - d3;
        }
        #pragma GCC unroll 4
        for (int i = 0; i < 4; i++) {            /* columns: (Bᵀ d) B */
            v[(4 * i + 0) * vs + l] = t[i][0] - t[i][2];
            v[(4 * i + 1) * vs + l] = t[i][1] + t[i][2];
            v[(4 * i + 2) * vs + l] = t[i][2] - t[i][1];
            v[(4 * i + 3) * vs + l] = t[i][1] - t[i][3];
        }
    }
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

/* The 2x2 outputs of one tile, nc channels from c0: Aᵀ m A from m[xi * ms], then bias, residual and the
   activation; o[k], r[k]: output (and residual) row of position k = 2 a + b, or 0 past the output's edge.
   Returns whether any came out NaN or infinite. */
KF_INLINE int output_transform(const float *restrict m, int64_t ms, const float *restrict b, float *const *o,
                               const float *const *r, int nc, float p0, float p1) {
    int bad = 0;
    #pragma omp simd reduction(|:bad)
    for (int l = 0; l < nc; l++) {
        float s[4], q[4], y[4];
        #pragma GCC unroll 4
        for (int j = 0; j < 4; j++) {            /* rows: Aᵀ m */
            const float m0 = m[j * ms + l], m1 = m[(4 + j) * ms + l], m2 = m[(8 + j) * ms + l],
                        m3 = m[(12 + j) * ms + l];
            s[j] = m0 + m1 + m2;
            q[j] = m1 - m2 - m3;
        }
        y[0] = s[0] + s[1] + s[2];               /* columns: (Aᵀ m) A */
        y[1] = s[1] - s[2] - s[3];
        y[2] = q[0] + q[1] + q[2];
        y[3] = q[1] - q[2] - q[3];
        #pragma GCC unroll 4
        for (int k = 0; k < 4; k++) {
            float v = y[k] + b[l];
#if RES
            if (r[k])
                v += r[k][l];
#endif
            v = act(v, p0, p1);
            bad |= !isfinite(v) && o[k];
            if (o[k])
                o[k][l] = v;
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
    const int64_t TH = (OH + 1) / 2, TW = (OW + 1) / 2, T = N * TH * TW, nblk = (T + TB - 1) / TB;
    const int64_t P = (CO + 15) / 16, NP2 = (P + 1) / 2, ps = 16 * C, us = P * ps;
    /* the 16 planes of V and M a line apart from a multiple of 4 KB: at TB C floats apart, a tile's 16
       stores (and the output transform's 16 loads) fell into one L1 set ([8,28,28,128]: the transforms
       took 0.70 ms of 2.43) */
    const int64_t VS = TB * C + 16, MS = TB * CO + 16;
    const float p0 = prm[0], p1 = prm[1];
    int failed = 0;
    #pragma omp parallel num_threads(nthreads)
    {
    float *v = malloc(W_TILE_POS * VS * sizeof(float)), *mb = malloc(W_TILE_POS * MS * sizeof(float));
    if (!v || !mb) {
        #pragma omp atomic write
        failed = 1;
    }
    #pragma omp for schedule(static)
    for (int64_t blk = 0; blk < nblk; blk++) {
        if (!v || !mb)
            continue;
        const int64_t t0 = blk * TB, nt = T - t0 < TB ? T - t0 : TB;
        for (int64_t i = 0; i < nt; i++) {                       /* V of each tile */
            const int64_t t = t0 + i, n = t / (TH * TW), th = t / TW % TH, tw = t % TW;
            const float *p[16];
            for (int a = 0; a < 4; a++)
                for (int c = 0; c < 4; c++) {
                    const int64_t ih = 2 * th - PH + a, iw = 2 * tw - PW + c;
                    p[4 * a + c] = ih >= 0 && ih < H && iw >= 0 && iw < W ? x + ((n * H + ih) * W + iw) * C : zero;
                }
            for (int64_t c0 = 0; c0 < C; c0 += 16) {
                const float *pc[16];
                for (int k = 0; k < 16; k++)
                    pc[k] = p[k] + c0;
                input_transform(pc, v + i * C + c0, VS, C - c0 < 16 ? (int)(C - c0) : 16);
            }
        }
        for (int xi = 0; xi < W_TILE_POS; xi++)                  /* M[xi] = V[xi] U[xi] */
            for (int64_t pp = 0; pp < NP2; pp++) {
                const int nv = 2 * pp + 1 < P ? 2 : 1;
                const int cols = CO - 32 * pp < 32 ? (int)(CO - 32 * pp) : 32;
                for (int64_t m = 0; m < nt; m += MR) {
                    const int mr = nt - m < MR ? (int)(nt - m) : MR;
                    const float *ap[MR];
                    for (int i = 0; i < mr; i++)
                        ap[i] = v + xi * VS + (m + i) * C;
                    tile_any(mr, nv, ap, 1, C, u + xi * us + 2 * pp * ps, ps, mb + xi * MS + m * CO + 32 * pp, CO,
                             cols, zero, 0, 0.0f, 0.0f);
                }
            }
        for (int64_t i = 0; i < nt; i++) {                       /* Y of each tile */
            const int64_t t = t0 + i, n = t / (TH * TW), th = t / TW % TH, tw = t % TW;
            float *o[4];
            const float *rr[4];
            for (int k = 0; k < 4; k++) {
                const int64_t oh = 2 * th + k / 2, ow = 2 * tw + k % 2, at = ((n * OH + oh) * OW + ow) * CO;
                const int inside = oh < OH && ow < OW;
                o[k] = inside ? out + at : 0;
                rr[k] = inside && RES ? r + at : 0;
            }
            for (int64_t c0 = 0; c0 < CO; c0 += 16) {
                const int nc = CO - c0 < 16 ? (int)(CO - c0) : 16;
                float *oc[4];
                const float *rc[4];
                for (int k = 0; k < 4; k++) {
                    oc[k] = o[k] ? o[k] + c0 : 0;
                    rc[k] = rr[k] ? rr[k] + c0 : 0;
                }
                if (!output_transform(mb + i * CO + c0, MS, b + c0, oc, rc, nc, p0, p1))
                    continue;
                for (int k = 0; k < 4; k++)                      /* non-finite: the direct sum */
                    for (int l = 0; o[k] && l < nc; l++) {
                        const int64_t oh = 2 * th + k / 2, ow = 2 * tw + k % 2;
                        float s = direct(x, wd, n, oh, ow, c0 + l, H, W, C, PH, PW) + b[c0 + l];
#if RES
                        s += rc[k][l];
#endif
                        oc[k][l] = act(s, p0, p1);
                    }
            }
        }
    }
    free(v);
    free(mb);
    }
    return failed ? -1 : 0;
}
