/* ONNX LSTM, GRU and RNN over a whole sequence in one call: the time loop runs here, in C.
 *
 * The input projection x W^T + b of every step is done before (one GEMM, xw [seq][batch][dirs*G*H]);
 * per step this kernel computes h_{t-1} R^T, a [batch, H] x [H, G*H] product, and the gate math.
 *
 * Packing (recurrent.py, once per weight): the hidden units are cut into blocks of 16 (one vector);
 * for block j the recurrent weights of all G gates are stored together, pk[d][j][k][g][16] =
 * R[d][g*H + 16j + l][k] (zero past H). The register tile is NB <= 4 batch rows x G gate vectors of
 * one block: per k, G vector loads of pk, NB broadcasts of h[b][k], NB*G FMAs; when k ends, the tile
 * holds every gate of those 16 hidden units, so the gate math follows at once and h_t is written
 * without a pass over a [batch, G*H] gates buffer. pk for one block is H*G*64 bytes (32 KiB at
 * H = 128, G = 4): it stays in L1 across batch tiles and streams from L2 step after step.
 *
 * The gate math runs on the tile's rows together, gate-major (v[g][row][16]), so each activation is
 * one loop over every row (LSTM: i, o and f in one loop of 12 vectors).
 *
 * GRU with linear_before_reset = 0 needs r for every unit before (r * h) Rh^T: phase 0 tiles the
 * z and r gates (pk: G = 2) and keeps z and r * h_{t-1}; phase 1 tiles rh by pk2 (G = 1).
 *
 * Threads: the work of a step is dirs x blocks units. With no more threads than directions, a thread
 * owns whole directions and never waits; with more, each thread owns a range of units and all meet
 * at a barrier after every step (and between GRU's two phases).
 *
 * Scratch (work, floats): h[2][dirs][batch][HP], c[dirs][batch][HP], z and rh [dirs][batch][HP] each.
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>

#define VL 16
#define BB 4
#define INL static inline __attribute__((always_inline))

typedef struct {
    const float *xw, *pk, *pk2, *rb, *h0, *c0, *p;
    const int64_t *lens;
    float *out, *work;
    int64_t seq, batch, hid, dirs, cell, lbr, input_forget, reverse, nthreads, has_clip;
    int64_t act[2][3];
    float clip;
} rec_args;

enum { LSTM = 0, GRU = 1, RNN = 2 };
enum { SIGMOID = 0, TANH = 1, RELU = 2 };

#ifdef __AVX512F__
#include <immintrin.h>
typedef __m512 vf;
INL vf vzero(void) { return _mm512_setzero_ps(); }
INL vf vset1(float x) { return _mm512_set1_ps(x); }
INL vf vload(const float *p) { return _mm512_loadu_ps(p); }
INL void vstore(float *p, vf x) { _mm512_storeu_ps(p, x); }
INL vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
#define KEEP(x) __asm__("" : "+v"(x))
#else /* portable: GCC vector extensions */
typedef float vf __attribute__((vector_size(64)));
INL vf vzero(void) { vf z = {0}; return z; }
INL vf vset1(float x) { return vzero() + x; }
INL vf vload(const float *p) { vf x; memcpy(&x, p, sizeof x); return x; }
INL void vstore(float *p, vf x) { memcpy(p, &x, sizeof x); }
INL vf vfma(vf a, vf b, vf c) { return a * b + c; }
#define KEEP(x) ((void)0)
#endif

/* acc[g][b] = sum_k h[b][k] pk[k][g][:] for NB rows of h (row stride hs), gate-major */
INL void tile(const float *pk, const float *h, int64_t hs, int64_t H, const int G, const int NB, float *acc)
{
    vf a[BB][4];
    for (int b = 0; b < BB; b++)
        for (int g = 0; g < 4; g++)
            a[b][g] = vzero();
    for (int64_t k = 0; k < H; k++) {
        const float *w = pk + k * G * VL;
        vf w0 = vload(w), w1 = G > 1 ? vload(w + VL) : w0, w2 = G > 2 ? vload(w + 2 * VL) : w0,
           w3 = G > 3 ? vload(w + 3 * VL) : w0;
        /* in registers: else gcc folds each load into every FMA that uses it (NB loads instead of one) */
        KEEP(w0); KEEP(w1); KEEP(w2); KEEP(w3);
        for (int b = 0; b < NB; b++) {
            vf x = vset1(h[b * hs + k]);
            a[b][0] = vfma(x, w0, a[b][0]);
            if (G > 1) a[b][1] = vfma(x, w1, a[b][1]);
            if (G > 2) a[b][2] = vfma(x, w2, a[b][2]);
            if (G > 3) a[b][3] = vfma(x, w3, a[b][3]);
        }
    }
    for (int b = 0; b < NB; b++)
        for (int g = 0; g < G; g++)
            vstore(acc + (g * BB + b) * VL, a[b][g]);
}

#define TILE_CASE(G, NB) case G * 8 + NB: tile(pk, h, hs, H, G, NB, acc); break;
#define TILE_G(G) TILE_CASE(G, 1) TILE_CASE(G, 2) TILE_CASE(G, 3) TILE_CASE(G, 4)

static void tile_any(const float *pk, const float *h, int64_t hs, int64_t H, int G, int nb, float *acc)
{
    switch (G * 8 + nb) {
        TILE_G(1) TILE_G(2) TILE_G(3) TILE_G(4)
    }
}

/* -------------------------------------------------------------------- gate math on 16 lanes */
/*VECMATH*/

/* activations over N lanes (N a constant where inlined: the loops vectorise and overlap) */
INL void act_n(int64_t code, float *v, const int N)
{
    if (code == SIGMOID) {
        #pragma omp simd
        for (int l = 0; l < N; l++) v[l] = 1.0f / (1.0f + kf_exp(-v[l]));
    } else if (code == TANH) {
        #pragma omp simd
        for (int l = 0; l < N; l++) v[l] = kf_tanh(v[l]);
    } else {
        #pragma omp simd
        for (int l = 0; l < N; l++) v[l] = v[l] < 0.0f ? 0.0f : v[l];   /* NaN stays NaN */
    }
}

INL void clip_n(const rec_args *a, float *v, const int N)
{
    if (!a->has_clip) return;
    float c = a->clip;
    #pragma omp simd
    for (int l = 0; l < N; l++) v[l] = v[l] < -c ? -c : (v[l] > c ? c : v[l]);
}

/* ------------------------------------------------------------------------------ one unit */
typedef struct {
    const rec_args *a;
    int64_t H, HP, G, GP, nblk;
    float *hbuf, *cbuf, *zbuf, *rhbuf;
} ctx;

INL int live(const rec_args *a, int64_t b, int64_t t) { return a->lens == NULL || t < a->lens[b]; }

#define TL (BB * VL)   /* lanes of one gate over a tile's rows */

/* dst[r][0:n] = src + r * stride for the tile's rows (zeros past n and past nb) */
INL void gather(float *dst, const float *src, int64_t stride, int nb, int64_t n)
{
    if (n == VL) {                 /* whole vectors: inlined moves, no call to memcpy */
        if (nb < BB) memset(dst, 0, TL * sizeof(float));
        for (int r = 0; r < nb; r++)
            memcpy(dst + r * VL, src + r * stride, VL * sizeof(float));
    } else {
        memset(dst, 0, TL * sizeof(float));
        for (int r = 0; r < nb; r++)
            memcpy(dst + r * VL, src + r * stride, n * sizeof(float));
    }
}

/* dst[0:n] = src[0:n], a whole vector when n is 16 */
INL void copy_n(float *dst, const float *src, int64_t n)
{
    if (n == VL) memcpy(dst, src, VL * sizeof(float));
    else memcpy(dst, src, n * sizeof(float));
}

/* step s of direction d, hidden block j, all batch rows. Phase 0: the whole step, or for GRU with
   linear_before_reset = 0 its z and r * h_{t-1}; phase 1: that GRU's h gate. The tile's gates are
   kept gate-major, v[g][row][16], so each activation runs over every row of the tile at once. */
static void unit(const ctx *k, int64_t d, int64_t j, int64_t s, int phase)
{
    const rec_args *a = k->a;
    int64_t H = k->H, HP = k->HP, B = a->batch, G = k->G, j0 = j * VL;
    int64_t t = (d == 1 || a->reverse) ? a->seq - 1 - s : s, n = H - j0 < VL ? H - j0 : VL;
    int64_t xrow = a->dirs * G * H;                  /* xw's row stride */
    const float *hin = k->hbuf + ((s & 1) * a->dirs + d) * B * HP;
    float *hout = k->hbuf + (((s + 1) & 1) * a->dirs + d) * B * HP;
    float *cb = k->cbuf + d * B * HP, *zb = k->zbuf + d * B * HP, *rhb = k->rhbuf + d * B * HP;
    const int64_t *act = a->act[d];
    const float *rb = a->rb ? a->rb + d * G * H + j0 : NULL;
    int two = a->cell == GRU && !a->lbr;
    int gp = two && phase == 1 ? 1 : (int)k->GP;
    const float *pk = two && phase == 1 ? a->pk2 + (d * k->nblk + j) * H * VL : a->pk + (d * k->nblk + j) * H * gp * VL;
    const float *hsrc = two && phase == 1 ? rhb : hin;
    float v[4 * TL], xs[4 * TL], hp[TL], hn[TL], c[TL], tmp[TL];
    for (int64_t b0 = 0; b0 < B; b0 += BB) {
        int nb = B - b0 < BB ? (int)(B - b0) : BB;
        const float *x0 = a->xw + (t * B + b0) * xrow + d * G * H + j0;
        if (nb < BB) memset(v, 0, sizeof v);
        tile_any(pk, hsrc + b0 * HP, HP, H, gp, nb, v);
        gather(hp, hin + b0 * HP + j0, HP, nb, VL);
        if (phase == 1) {                            /* GRU lbr=0: hh = g(xh + (r h) Rh^T + Rbh) */
            gather(xs, x0 + 2 * H, xrow, nb, n);
            gather(tmp, zb + b0 * HP + j0, HP, nb, VL);
            #pragma omp simd
            for (int l = 0; l < TL; l++) v[l] += xs[l] + (rb && l % VL < n ? rb[2 * H + l % VL] : 0.0f);
            clip_n(a, v, TL); act_n(act[1], v, TL);
            #pragma omp simd
            for (int l = 0; l < TL; l++) hn[l] = (1.0f - tmp[l]) * v[l] + tmp[l] * hp[l];
        } else {
            int direct = a->cell == GRU ? 2 : (int)G;     /* gates whose input part joins h R^T now */
            if (n == VL) {                           /* read xw in place */
                for (int g = 0; g < direct; g++)
                    for (int r = 0; r < nb; r++) {
                        float *vv = v + g * TL + r * VL;
                        const float *xx = x0 + r * xrow + g * H;
                        #pragma omp simd
                        for (int l = 0; l < VL; l++) vv[l] += xx[l];
                    }
            } else {
                for (int g = 0; g < direct; g++)
                    gather(xs + g * TL, x0 + g * H, xrow, nb, n);
                for (int l = 0; l < direct * TL; l++) v[l] += xs[l];
            }
            if (a->cell == GRU) gather(xs + 2 * TL, x0 + 2 * H, xrow, nb, n);
            if (rb)                                  /* R's bias joins h R^T (for GRU's h gate: before r) */
                for (int g = 0; g < gp; g++)
                    for (int l = 0; l < TL; l++)
                        v[g * TL + l] += (l % VL) < n ? rb[g * H + l % VL] : 0.0f;
        }
        if (phase == 0 && a->cell == LSTM) {        /* gates i o f c */
            float *gi = v, *go = v + TL, *gf = v + 2 * TL, *gc = v + 3 * TL;
            gather(c, cb + b0 * HP + j0, HP, nb, VL);
            if (a->p) {
                const float *pi = a->p + d * 3 * H + j0, *pf = pi + 2 * H;
                for (int l = 0; l < TL; l++)
                    if (l % VL < n) { gi[l] += pi[l % VL] * c[l]; gf[l] += pf[l % VL] * c[l]; }
                clip_n(a, gi, TL); clip_n(a, gf, TL); clip_n(a, gc, TL);
                act_n(act[0], gi, TL); act_n(act[0], gf, TL);
            } else {
                clip_n(a, v, 4 * TL);
                act_n(act[0], v, 3 * TL);            /* i, o and f at once */
            }
            if (a->input_forget) {
                #pragma omp simd
                for (int l = 0; l < TL; l++) gf[l] = 1.0f - gi[l];
            }
            act_n(act[1], gc, TL);
            #pragma omp simd
            for (int l = 0; l < TL; l++) c[l] = gf[l] * c[l] + gi[l] * gc[l];
            if (a->p) {
                const float *po = a->p + d * 3 * H + H + j0;
                for (int l = 0; l < TL; l++)
                    if (l % VL < n) go[l] += po[l % VL] * c[l];
                clip_n(a, go, TL); act_n(act[0], go, TL);
            }
            memcpy(tmp, c, sizeof tmp);
            act_n(act[2], tmp, TL);
            #pragma omp simd
            for (int l = 0; l < TL; l++) hn[l] = go[l] * tmp[l];
        } else if (phase == 0 && a->cell == GRU) {  /* gates z r h */
            float *gz = v, *gr = v + TL, *gh = v + 2 * TL;
            clip_n(a, v, 2 * TL);
            act_n(act[0], v, 2 * TL);
            if (!a->lbr) {                           /* keep z and r h_{t-1} for phase 1 */
                for (int r = 0; r < nb; r++) {
                    float *zz = zb + (b0 + r) * HP + j0, *rr = rhb + (b0 + r) * HP + j0;
                    #pragma omp simd
                    for (int l = 0; l < VL; l++) { zz[l] = gz[r * VL + l]; rr[l] = gr[r * VL + l] * hp[r * VL + l]; }
                }
                continue;
            }
            #pragma omp simd
            for (int l = 0; l < TL; l++) gh[l] = xs[2 * TL + l] + gr[l] * gh[l];
            clip_n(a, gh, TL); act_n(act[1], gh, TL);
            #pragma omp simd
            for (int l = 0; l < TL; l++) hn[l] = (1.0f - gz[l]) * gh[l] + gz[l] * hp[l];
        } else if (phase == 0) {                     /* RNN */
            clip_n(a, v, TL); act_n(act[0], v, TL);
            memcpy(hn, v, sizeof hn);
        }
        for (int r = 0; r < nb; r++) {              /* past an entry's length: keep the state, Y = 0 */
            int64_t b = b0 + r;
            float *y = a->out + ((t * a->dirs + d) * B + b) * H + j0, *ho = hout + b * HP + j0;
            if (live(a, b, t)) {
                memcpy(ho, hn + r * VL, VL * sizeof(float));
                copy_n(y, hn + r * VL, n);
                if (a->cell == LSTM) memcpy(cb + b * HP + j0, c + r * VL, VL * sizeof(float));
            } else {
                memcpy(ho, hp + r * VL, VL * sizeof(float));
                if (n == VL) memset(y, 0, VL * sizeof(float));
                else memset(y, 0, n * sizeof(float));
            }
        }
    }
}

void rec_forward(const rec_args *a)
{
    ctx k0;
    k0.a = a;
    k0.H = a->hid;
    k0.nblk = (a->hid + VL - 1) / VL;
    k0.HP = k0.nblk * VL;
    k0.G = a->cell == LSTM ? 4 : a->cell == GRU ? 3 : 1;
    k0.GP = a->cell == GRU && !a->lbr ? 2 : k0.G;
    int64_t plane = a->dirs * a->batch * k0.HP;
    k0.hbuf = a->work;
    k0.cbuf = a->work + 2 * plane;
    k0.zbuf = a->work + 3 * plane;
    k0.rhbuf = a->work + 4 * plane;
    int64_t units = a->dirs * k0.nblk;
    int T = (int)(a->nthreads < units ? a->nthreads : units);
    if (T < 1) T = 1;
    int by_dir = T <= a->dirs;                   /* a thread owns whole directions: no barriers */
    int two = a->cell == GRU && !a->lbr;
    const ctx *k = &k0;
    #pragma omp parallel num_threads(T)
    {
        int me = omp_get_thread_num(), nt = omp_get_num_threads();
        int64_t u0 = units * me / nt, u1 = units * (me + 1) / nt, B = a->batch, H = k->H, HP = k->HP;
#define MINE(u) (by_dir ? ((u) / k->nblk) % nt == me : (u) >= u0 && (u) < u1)
        for (int64_t u = 0; u < units; u++) {
            if (!MINE(u)) continue;
            int64_t d = u / k->nblk, j0 = (u % k->nblk) * VL, n = H - j0 < VL ? H - j0 : VL;
            for (int64_t b = 0; b < B; b++) {
                float *h = k->hbuf + (d * B + b) * HP + j0, *c = k->cbuf + (d * B + b) * HP + j0;
                memset(h, 0, VL * sizeof(float));
                memset(c, 0, VL * sizeof(float));
                if (a->h0) memcpy(h, a->h0 + (d * B + b) * H + j0, n * sizeof(float));
                if (a->c0) memcpy(c, a->c0 + (d * B + b) * H + j0, n * sizeof(float));
            }
        }
        if (!by_dir) {
            #pragma omp barrier
        }
        for (int64_t s = 0; s < a->seq; s++)
            for (int phase = 0; phase < 1 + two; phase++) {
                for (int64_t u = 0; u < units; u++)
                    if (MINE(u)) unit(k, u / k->nblk, u % k->nblk, s, phase);
                if (!by_dir) {
                    #pragma omp barrier
                }
            }
        for (int64_t u = 0; u < units; u++) {
            if (!MINE(u)) continue;
            int64_t d = u / k->nblk, j0 = (u % k->nblk) * VL, n = H - j0 < VL ? H - j0 : VL;
            for (int64_t b = 0; b < B; b++) {
                const float *h = k->hbuf + (((a->seq & 1) * a->dirs + d) * B + b) * HP + j0;
                memcpy(a->out + ((a->seq * a->dirs + d) * B + b) * H + j0, h, n * sizeof(float));
                if (a->cell == LSTM)
                    memcpy(a->out + (((a->seq + 1) * a->dirs + d) * B + b) * H + j0,
                           k->cbuf + (d * B + b) * HP + j0, n * sizeof(float));
            }
        }
#undef MINE
    }
}
