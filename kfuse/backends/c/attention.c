/* Fused attention, FlashAttention style: softmax(q k^T * scale + mask) v, never materialising the
 * [Lq, Lk] score matrix. Compiled once per head dimension: attention.py prepends `#define HD <D>` (and
 * `#define HDV <Dv>` where v's head dimension differs: DeepSeek's MLA, LeViT).
 *
 * Two kernels, both with an online softmax (running max m, running sum l, rescaled accumulator):
 *
 * block kernel (many queries): a task is (batch, head, block of bq queries, key chunk); bq is BQ = 64, or
 *   16 where a causal or query-varying mask leaves the diagonal tiles mostly masked (attention.py).
 *   Queries live in the SIMD lanes: the query block is packed transposed, qt[HD][BQ], once per
 *   task; then for every key tile of BK = 64 keys
 *     st[BK][BQ] = K_tile . qt       (broadcast K[j][d] from the strided k rows, FMA with qt[d][:])
 *     st = st * scale + mask, causal -inf
 *     softmax update per lane (a lane is a query): max and sum over j are vertical, no shuffles
 *     ot[HDV][BQ] = ot * alpha + V_tile^T . st  (broadcast V[j][d], FMA with st[j][:])
 *   K and V are read straight from their strided rows; nothing is packed but the query block.
 *   Sizes: qt + ot = 2*HD*BQ*4 B (32 KiB at HD=64) and st = BK*BQ*4 B = 16 KiB stay in L1/L2;
 *   the register tiles are 4 keys x 4 vectors (S) and 4 dims x 4 vectors (PV): 16 accumulators.
 *
 * row kernel (few queries: decode): a task is (batch, kv head, group of up to 4 query rows that
 *   share that kv head, key chunk). The head dimension lives in the lanes: a score is a dot
 *   product q . K[j]; 16 of them are reduced together by a transpose-add tree (46 shuffles/adds
 *   per 16 keys instead of 16 horizontal sums); o += p[j] * V[j] is a broadcast FMA. Each K and
 *   V row is loaded once for all the rows of the group (GQA decode reads the cache once).
 *
 * split-KV: the keys are cut into chunks, each task writes its partial (m, l, unnormalised o)
 *   to part_*; attn_combine merges them: M = max m_c, L = sum l_c e^(m_c-M), O = sum o_c e^(m_c-M) / L.
 *
 * A row whose keys are all masked ends with l = 0 and o = 0, so o / l = NaN, like torch.softmax;
 * with zero_masked it is 0, like torch's scaled_dot_product_attention.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

#ifndef HD
#error "HD (head dimension) must be defined"
#endif
#ifndef HDV
#define HDV HD              /* v's (and the output's) head dimension, where it differs from q's and k's */
#endif
#define NC ((HD + 15) / 16) /* 16-float chunks of a head row */
#define HDP (NC * 16)       /* padded head dimension */
#define NCV ((HDV + 15) / 16)
#define HDVP (NCV * 16)
#define BQ 64               /* most queries per block-kernel task (4 vectors): the tiles' size */
#define BK 64               /* keys per tile */
#define RMAX 4              /* query rows per row-kernel task */
#define INL static inline __attribute__((always_inline))

typedef struct {
    const float *q, *k, *v;
    float *o;
    const void *mask;
    float *part;                               /* split-KV partials, NULL when not split */
    int64_t B, H, Hkv, Lq, Lk;
    int64_t sqb, sqh, sqi, skb, skh, skj, svb, svh, svj, sob, soh, soi;
    int64_t smb, smh, smi, smj;                /* mask strides, 0 on broadcast dims */
    int64_t mask_kind;                         /* 0 none, 1 additive float, 2 bool keep */
    int64_t causal, nthreads, nsplit, chunk;   /* chunk: keys per split, multiple of BK */
    int64_t zero_masked;                       /* a row with every key masked: 0, not NaN */
    double scale;
    const float *knew, *vnew;                  /* NULL, or rows written into k and v's last Lnew rows */
    int64_t Lnew, snkb, snkh, snkj, snvb, snvh, snvj;     /* (a decode step's append to its KV cache) */
    int64_t bq;                                /* queries per block-kernel task: 16 or BQ (attention.py) */
} attn_args;

/* exp (every vector layer's vexp): Cephes-style range reduction x = n ln2 + r, |r| <= ln2/2, ln2 split in
   two parts, then 1 + r + r^2 P5(r), P5's coefficients highest first */
#define EXP_LOG2E 1.44269504088896341f
#define EXP_LN2_HI 0.693359375f
#define EXP_LN2_LO (-2.12194440e-4f)
#define EXP_MIN (-87.3365f)     /* ln of the least normal float, 2^-126: exp of less is flushed to 0 */
static const float EXP_P5[6] = {1.9875691500e-4f, 1.3981999507e-3f, 8.3334519073e-3f, 4.1665795894e-2f,
                                1.6666665459e-1f, 5.0000001201e-1f};

/* ---------------------------------------------------------------- vector layer, 16 lanes
   VG: query vectors per register tile of the block kernel (4 keys or dims x VG vectors of 16 lanes in
   accumulators): 4 where 32 vector registers hold a vector each, fewer where there are 16 holding half */
#ifdef __AVX512F__
#include <immintrin.h>
typedef __m512 vf;
/* x held in a register from here: GCC otherwise folds a vector used by four FMAs into each of them as a
   memory operand, four 64-byte loads where one does (perf annotate); pinned, [1,8,128,64] went from
   101 to 91 us (2 threads) */
#define KEEP_IN_REGISTER(x) __asm__("" : "+v"(x))
INL vf vzero(void) { return _mm512_setzero_ps(); }
INL vf vset1(float x) { return _mm512_set1_ps(x); }
INL vf vload(const float *p) { return _mm512_loadu_ps(p); }
INL vf vloadn(const float *p, int n) { return _mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1), p); }
INL void vstore(float *p, vf x) { _mm512_storeu_ps(p, x); }
INL vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
INL vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
INL vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
INL vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
INL vf vfma(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
INL vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); } /* NaN in either: returns b */
INL float vhmax(vf x) { return _mm512_reduce_max_ps(x); }
INL float vhsum(vf x) { return _mm512_reduce_add_ps(x); }
/* m, with -inf replaced by 0 (the shift used while a row has seen no unmasked key) */
INL vf vsafe(vf m) {
    return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(m, vset1(-INFINITY), _CMP_EQ_OQ), m, vzero());
}
/* exp (EXP_P5 above), then scalef (exact 2^n, correct overflow). Lanes below EXP_MIN are set to exactly 0
 * (exp(-inf) = 0) and the rest computed from x clamped there, so no result is a denormal or underflows: each
 * such result costs a microcode assist on Intel cores (keys masked with -1e9 took the [8,12,128,128] block
 * kernel from 1.10 to 1.93 ms). The clamps return their second operand on NaN, and a NaN lane is kept, so
 * NaN propagates. Accuracy: tests/ops/test_attention_kernel.py. */
INL vf vexp(vf x) {
    const __mmask16 live = _mm512_cmp_ps_mask(x, vset1(EXP_MIN), _CMP_NLT_UQ);   /* x >= EXP_MIN, or NaN */
    x = _mm512_max_ps(vset1(EXP_MIN), x);
    x = _mm512_min_ps(vset1(100.0f), x);
    vf n = _mm512_roundscale_ps(vmul(x, vset1(EXP_LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    vf r = _mm512_fnmadd_ps(n, vset1(EXP_LN2_HI), x);
    r = _mm512_fnmadd_ps(n, vset1(EXP_LN2_LO), r);
    vf p = vset1(EXP_P5[0]);
    for (int i = 1; i < 6; i++) p = vfma(p, r, vset1(EXP_P5[i]));
    p = vfma(p, vmul(r, r), vadd(r, vset1(1.0f)));
    return _mm512_maskz_mov_ps(live, _mm512_scalef_ps(p, n));
}
/* s with lanes l < t set to -inf (the causal mask of one key across 16 queries) */
INL vf vmask_below(vf s, int64_t t) {
    __mmask16 k = t >= 16 ? 0xFFFF : t <= 0 ? 0 : (__mmask16)((1u << t) - 1);
    return _mm512_mask_mov_ps(s, k, vset1(-INFINITY));
}
/* s plus the mask of n <= 16 consecutive queries stored contiguously at p (lanes past n: 0 added,
   or masked out for a bool mask): kind 1 additive float, 2 bool keep */
INL vf vmask_lanes(vf s, const char *p, int kind, int n) {
    __mmask16 k = n >= 16 ? 0xFFFF : (__mmask16)((1u << n) - 1);
    if (kind == 1) return vadd(s, _mm512_maskz_loadu_ps(k, p));
    unsigned char t[16] = {0};
    if (n < 16) { memcpy(t, p, n > 0 ? n : 0); p = (const char *)t; }     /* never read past the mask */
    __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm512_mask_mov_ps(vset1(-INFINITY), _mm512_test_epi32_mask(b, b), s);
}
/* dst[c * ds + r] = src[r * ss + c] (with acc: dst[c * ds + r] += ...) over a 16 x 16 block: source rows
   r < nr and columns c < nc are read (the rest as 0), destination rows c < nc written, each in its columns
   r < nw. Unpacks, then two rounds of 128-bit lane shuffles: 64 shuffles, where 256 strided gathers had
   been slower than the FMAs they fed. */
INL void vtranspose16(const float *src, int64_t ss, int nr, int nc, float *dst, int64_t ds, int nw, int acc) {
    const __mmask16 lm = nc >= 16 ? 0xFFFF : (__mmask16)((1u << nc) - 1), wm = nw >= 16 ? 0xFFFF : (__mmask16)((1u << nw) - 1);
    __m512 r[16], t[16];
    for (int i = 0; i < 16; i++) r[i] = i < nr ? _mm512_maskz_loadu_ps(lm, src + i * ss) : vzero();
    for (int i = 0; i < 8; i++) {     /* lane L of t[2i]: r2i[4L], r2i+1[4L], r2i[4L+1], r2i+1[4L+1]; t[2i+1]: 4L+2, 4L+3 */
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int g = 0; g < 4; g++)        /* lane L of r[4g + k]: rows 4g..4g+3 of column 4L + k */
        for (int k = 0; k < 4; k++) {
            __m512d a = _mm512_castps_pd(t[4 * g + (k >> 1)]), b = _mm512_castps_pd(t[4 * g + 2 + (k >> 1)]);
            r[4 * g + k] = _mm512_castpd_ps(k & 1 ? _mm512_unpackhi_pd(a, b) : _mm512_unpacklo_pd(a, b));
        }
    for (int k = 0; k < 4; k++) {
        __m512 v0 = _mm512_shuffle_f32x4(r[k], r[4 + k], 0x88), v1 = _mm512_shuffle_f32x4(r[k], r[4 + k], 0xDD);
        __m512 v2 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0x88), v3 = _mm512_shuffle_f32x4(r[8 + k], r[12 + k], 0xDD);
        __m512 col[4] = {_mm512_shuffle_f32x4(v0, v2, 0x88), _mm512_shuffle_f32x4(v1, v3, 0x88),
                         _mm512_shuffle_f32x4(v0, v2, 0xDD), _mm512_shuffle_f32x4(v1, v3, 0xDD)};
        for (int L = 0; L < 4; L++)
            if (4 * L + k < nc) {
                float *d = dst + (4 * L + k) * ds;
                _mm512_mask_storeu_ps(d, wm, acc ? vadd(_mm512_maskz_loadu_ps(wm, d), col[L]) : col[L]);
            }
    }
}
/* out[k] = sum of the lanes of a[k], k < 16: transpose-add tree, 46 shuffles and adds */
INL vf vreduce16(const vf *a) {
    vf t[8], u[4], w[2];
    for (int i = 0; i < 8; i++)
        t[i] = vadd(_mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0x44), _mm512_shuffle_f32x4(a[2 * i], a[2 * i + 1], 0xEE));
    for (int i = 0; i < 4; i++)
        u[i] = vadd(_mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0x88), _mm512_shuffle_f32x4(t[2 * i], t[2 * i + 1], 0xDD));
    for (int i = 0; i < 2; i++)
        w[i] = vadd(_mm512_unpacklo_ps(u[2 * i], u[2 * i + 1]), _mm512_unpackhi_ps(u[2 * i], u[2 * i + 1]));
    vf z = vadd(_mm512_shuffle_ps(w[0], w[1], 0x44), _mm512_shuffle_ps(w[0], w[1], 0xEE));
    /* lane 4L+m holds key 4m+L */
    const __m512i idx = _mm512_set_epi32(15, 11, 7, 3, 14, 10, 6, 2, 13, 9, 5, 1, 12, 8, 4, 0);
    return _mm512_permutexvar_ps(idx, z);
}
#elif defined(__AVX2__) && defined(__FMA__)
/* AVX2 (Zen 2/3, Haswell ..): a vector is two 8-lane halves; same semantics as the AVX-512 layer */
#include <immintrin.h>
typedef struct { __m256 l, h; } vf;
#define KEEP_IN_REGISTER(x) __asm__("" : "+x"((x).l), "+x"((x).h))
#ifndef VG
#define VG 1
#endif
INL vf vpair(__m256 l, __m256 h) { vf r = {l, h}; return r; }
INL vf vzero(void) { return vpair(_mm256_setzero_ps(), _mm256_setzero_ps()); }
INL vf vset1(float x) { return vpair(_mm256_set1_ps(x), _mm256_set1_ps(x)); }
INL vf vload(const float *p) { return vpair(_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)); }
/* lanes l < n of the 16 (n <= 0: none), as the two halves' maskload masks */
INL __m256i vlanes(int n, int half) {
    return _mm256_cmpgt_epi32(_mm256_set1_epi32(n - 8 * half), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
INL vf vloadn(const float *p, int n) { return vpair(_mm256_maskload_ps(p, vlanes(n, 0)), _mm256_maskload_ps(p + 8, vlanes(n, 1))); }
INL void vstore(float *p, vf x) { _mm256_storeu_ps(p, x.l); _mm256_storeu_ps(p + 8, x.h); }
INL vf vdiv(vf a, vf b) { return vpair(_mm256_div_ps(a.l, b.l), _mm256_div_ps(a.h, b.h)); }
INL vf vadd(vf a, vf b) { return vpair(_mm256_add_ps(a.l, b.l), _mm256_add_ps(a.h, b.h)); }
INL vf vsub(vf a, vf b) { return vpair(_mm256_sub_ps(a.l, b.l), _mm256_sub_ps(a.h, b.h)); }
INL vf vmul(vf a, vf b) { return vpair(_mm256_mul_ps(a.l, b.l), _mm256_mul_ps(a.h, b.h)); }
INL vf vfma(vf a, vf b, vf c) { return vpair(_mm256_fmadd_ps(a.l, b.l, c.l), _mm256_fmadd_ps(a.h, b.h, c.h)); }
INL vf vmax(vf a, vf b) { return vpair(_mm256_max_ps(a.l, b.l), _mm256_max_ps(a.h, b.h)); } /* NaN in either: b */
INL float hmax8(__m256 x) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(x), _mm256_extractf128_ps(x, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    return _mm_cvtss_f32(_mm_max_ss(m, _mm_movehdup_ps(m)));
}
INL float vhmax(vf x) { return hmax8(_mm256_max_ps(x.l, x.h)); }
INL float vhsum(vf x) {
    __m256 t = _mm256_add_ps(x.l, x.h);
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
INL __m256 safe8(__m256 m) {
    return _mm256_blendv_ps(m, _mm256_setzero_ps(), _mm256_cmp_ps(m, _mm256_set1_ps(-INFINITY), _CMP_EQ_OQ));
}
INL vf vsafe(vf m) { return vpair(safe8(m.l), safe8(m.h)); }
/* exp as the AVX-512 layer's, with 2^n applied as two exact factors 2^(n>>1) 2^(n-(n>>1)) (each a normal
   float for the clamped n in [-126, 145]): p 2^(n>>1) is exact, so the one rounding is scalef's */
INL __m256 exp8(__m256 x) {
    const __m256 live = _mm256_cmp_ps(x, _mm256_set1_ps(EXP_MIN), _CMP_NLT_UQ);   /* as the 16-lane vexp */
    x = _mm256_max_ps(_mm256_set1_ps(EXP_MIN), x);
    x = _mm256_min_ps(_mm256_set1_ps(100.0f), x);
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(EXP_LOG2E)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_HI), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(EXP_LN2_LO), r);
    __m256 p = _mm256_set1_ps(EXP_P5[0]);
    for (int i = 1; i < 6; i++) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(EXP_P5[i]));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i ni = _mm256_cvtps_epi32(n), n1 = _mm256_srai_epi32(ni, 1), n2 = _mm256_sub_epi32(ni, n1);
    const __m256i bias = _mm256_set1_epi32(127);
    p = _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n1, bias), 23)));
    return _mm256_and_ps(live, _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(n2, bias), 23))));
}
INL vf vexp(vf x) { return vpair(exp8(x.l), exp8(x.h)); }
INL vf vmask_below(vf s, int64_t t) {
    const int n = t >= 16 ? 16 : t <= 0 ? 0 : (int)t;
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    return vpair(_mm256_blendv_ps(s.l, ninf, _mm256_castsi256_ps(vlanes(n, 0))),
                 _mm256_blendv_ps(s.h, ninf, _mm256_castsi256_ps(vlanes(n, 1))));
}
INL vf vmask_lanes(vf s, const char *p, int kind, int n) {
    if (kind == 1) return vadd(s, vloadn((const float *)p, n));
    unsigned char t[16] = {0};
    if (n < 16) { memcpy(t, p, n > 0 ? n : 0); p = (const char *)t; }     /* never read past the mask */
    const __m128i b = _mm_loadu_si128((const __m128i *)p);
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    __m256i lo = _mm256_cmpeq_epi32(_mm256_cvtepu8_epi32(b), _mm256_setzero_si256());
    __m256i hi = _mm256_cmpeq_epi32(_mm256_cvtepu8_epi32(_mm_srli_si128(b, 8)), _mm256_setzero_si256());
    return vpair(_mm256_blendv_ps(s.l, ninf, _mm256_castsi256_ps(lo)), _mm256_blendv_ps(s.h, ninf, _mm256_castsi256_ps(hi)));
}
/* the 8 x 8 transpose of r (unpacks, shuffles, 128-bit permutes) */
INL void transpose8(__m256 r[8]) {
    __m256 t[8], u[8];
    for (int i = 0; i < 4; i++) {
        t[2 * i] = _mm256_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm256_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    for (int g = 0; g < 2; g++) {
        u[4 * g + 0] = _mm256_shuffle_ps(t[4 * g], t[4 * g + 2], 0x44);
        u[4 * g + 1] = _mm256_shuffle_ps(t[4 * g], t[4 * g + 2], 0xEE);
        u[4 * g + 2] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0x44);
        u[4 * g + 3] = _mm256_shuffle_ps(t[4 * g + 1], t[4 * g + 3], 0xEE);
    }
    for (int k = 0; k < 4; k++) {
        r[k] = _mm256_permute2f128_ps(u[k], u[4 + k], 0x20);
        r[4 + k] = _mm256_permute2f128_ps(u[k], u[4 + k], 0x31);
    }
}
/* as the AVX-512 layer's: dst[c * ds + r] (+)= src[r * ss + c], rows r < nr and columns c < nc read,
   destination rows c < nc written in columns r < nw; four 8 x 8 blocks */
INL void vtranspose16(const float *src, int64_t ss, int nr, int nc, float *dst, int64_t ds, int nw, int acc) {
    for (int rb = 0; rb < 16; rb += 8)
        for (int cb = 0; cb < 16 && cb < nc; cb += 8) {
            const __m256i lm = vlanes(nc - cb, 0), wm = vlanes(nw - rb, 0);
            __m256 r[8];
            for (int i = 0; i < 8; i++)
                r[i] = rb + i < nr ? _mm256_maskload_ps(src + (rb + i) * ss + cb, lm) : _mm256_setzero_ps();
            transpose8(r);
            for (int k = 0; k < 8 && cb + k < nc; k++) {
                float *d = dst + (cb + k) * ds + rb;
                _mm256_maskstore_ps(d, wm, acc ? _mm256_add_ps(_mm256_maskload_ps(d, wm), r[k]) : r[k]);
            }
        }
}
/* the lane sums of eight vectors, as one: hadd tree */
INL __m256 sum8x8(const __m256 *s) {
    __m256 t0 = _mm256_hadd_ps(s[0], s[1]), t1 = _mm256_hadd_ps(s[2], s[3]);
    __m256 t2 = _mm256_hadd_ps(s[4], s[5]), t3 = _mm256_hadd_ps(s[6], s[7]);
    __m256 u0 = _mm256_hadd_ps(t0, t1), u1 = _mm256_hadd_ps(t2, t3);
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}
INL vf vreduce16(const vf *a) {
    __m256 s[16];
    for (int k = 0; k < 16; k++) s[k] = _mm256_add_ps(a[k].l, a[k].h);
    return vpair(sum8x8(s), sum8x8(s + 8));
}
#else /* portable fallback: GCC vector extensions, scalar libm where there is no operator */
typedef float vf __attribute__((vector_size(64)));
#define KEEP_IN_REGISTER(x) ((void)0)
INL vf vzero(void) { vf z = {0}; return z; }
INL vf vset1(float x) { return vzero() + x; }
INL vf vload(const float *p) { vf x; memcpy(&x, p, sizeof x); return x; }
INL vf vloadn(const float *p, int n) { vf x = vzero(); for (int i = 0; i < n; i++) x[i] = p[i]; return x; }
INL void vstore(float *p, vf x) { memcpy(p, &x, sizeof x); }
INL vf vdiv(vf a, vf b) { return a / b; }
INL vf vadd(vf a, vf b) { return a + b; }
INL vf vsub(vf a, vf b) { return a - b; }
INL vf vmul(vf a, vf b) { return a * b; }
INL vf vfma(vf a, vf b, vf c) { return a * b + c; }
INL vf vmax(vf a, vf b) { vf r; for (int i = 0; i < 16; i++) r[i] = a[i] > b[i] ? a[i] : b[i]; return r; }
INL float vhmax(vf x) { float m = x[0]; for (int i = 1; i < 16; i++) m = x[i] > m ? x[i] : m; return m; }
INL float vhsum(vf x) { float s = 0; for (int i = 0; i < 16; i++) s += x[i]; return s; }
INL vf vsafe(vf m) { for (int i = 0; i < 16; i++) if (m[i] == -INFINITY) m[i] = 0; return m; }
INL vf vexp(vf x) { for (int i = 0; i < 16; i++) x[i] = expf(x[i]); return x; }
INL vf vreduce16(const vf *a) { vf r; for (int k = 0; k < 16; k++) r[k] = vhsum(a[k]); return r; }
INL void vtranspose16(const float *src, int64_t ss, int nr, int nc, float *dst, int64_t ds, int nw, int acc) {
    for (int c = 0; c < nc && c < 16; c++)
        for (int r = 0; r < nw && r < 16; r++) dst[c * ds + r] = (acc ? dst[c * ds + r] : 0.0f) + (r < nr ? src[r * ss + c] : 0.0f);
}
INL vf vmask_below(vf s, int64_t t) { for (int l = 0; l < 16 && l < t; l++) s[l] = -INFINITY; return s; }
INL vf vmask_lanes(vf s, const char *p, int kind, int n) {
    for (int l = 0; l < 16; l++) {
        if (kind == 1) s[l] += l < n ? ((const float *)p)[l] : 0.0f;
        else s[l] = l < n && p[l] ? s[l] : -INFINITY;
    }
    return s;
}
#endif

#ifndef VG
#define VG 4
#endif

/* a head row of HD floats as NC vectors (the last one zero-filled past HD) */
INL vf vchunk(const float *p, int c, int n) { return (c + 1) * 16 <= n ? vload(p + 16 * c) : vloadn(p + 16 * c, n - 16 * c); }
INL vf vrow(const float *p, int c) { return vchunk(p, c, HD); }
INL vf vrowv(const float *p, int c) { return vchunk(p, c, HDV); }     /* a v row, HDV floats */

static const float zero_row[HDP];

/* mask value added to the score of query i, key j (row pointer already offset for b, h) */
INL float mask_at(const attn_args *a, const char *mrow, int64_t i, int64_t j) {
    if (a->mask_kind == 1) return ((const float *)mrow)[i * a->smi + j * a->smj];
    return ((const uint8_t *)mrow)[i * a->smi + j * a->smj] ? 0.0f : -INFINITY;
}
INL const char *mask_base(const attn_args *a, int64_t b, int64_t h) {
    size_t esz = a->mask_kind == 1 ? 4 : 1;
    return (const char *)a->mask + (b * a->smb + h * a->smh) * esz;
}

/* the result of a task: normalised into out, or (split) partial m, l, o into part */
INL void emit_row(const attn_args *a, int64_t b, int64_t h, int64_t i, int64_t c, float m, float l, const float *o, int64_t ostride) {
    if (!a->part) {
        float *dst = a->o + b * a->sob + h * a->soh + i * a->soi;
        if (a->zero_masked && l == 0.0f) { for (int d = 0; d < HDV; d++) dst[d] = 0.0f; return; }
        for (int d = 0; d < HDV; d++) dst[d] = o[d * ostride] / l;
    } else {
        int64_t row = (b * a->H + h) * a->Lq + i;
        float *dst = a->part + (c * a->B * a->H * a->Lq + row) * (HDV + 2);
        dst[0] = m; dst[1] = l;
        for (int d = 0; d < HDV; d++) dst[2 + d] = o[d * ostride];
    }
}

/* Whether the mask of queries i0 .. i0 + nr - 1 is hard over keys [j0, j1): a bool mask false, a float one
 * <= -1e30 (finfo.min, -inf). */
static int hard_masked(const attn_args *a, const char *mrow, int64_t i0, int nr, int64_t j0, int64_t j1) {
    for (int i = 0; i < nr; i++)
        for (int64_t j = j0; j < j1; j++) {
            const int64_t at = (i0 + i) * a->smi + j * a->smj;
            if (a->mask_kind == 2 ? ((const uint8_t *)mrow)[at] != 0 : !(((const float *)mrow)[at] <= -1e30f))
                return 0;
        }
    return 1;
}

/* The end of the keys [ks, ke) a block of query rows visits: trailing BK-key tiles whose mask is hard for
 * every row are dropped, when that changes nothing. A bool mask's masked key adds exp(-inf) = 0. A float
 * mask value <= -1e30 adds exp(s + mask - m) = 0 once the row's max m comes from a key not so masked
 * (for scores |s| < 1e20), so a float mask's tiles are dropped only if every row keeps such a key: a row
 * masked everywhere, which finfo.min turns into a uniform average over all keys, is computed in full.
 * Causal + padding masks built by the model skip the tiles past the diagonal, right-padded batches their
 * padding. A NaN or Inf score at a dropped key is not spread over the row (as with bool and causal
 * masks, which replace the score). Checked before the tile loop: a test inside it cost the loop 8-30%. */
static int64_t masked_tail(const attn_args *a, const char *mrow, int64_t i0, int rows, int64_t ks, int64_t ke) {
    const int nr = a->smi ? rows : 1;         /* a mask constant along the queries: one row tells */
    int64_t end = ke;
    while (end > ks) {
        const int64_t j0 = ks + (end - ks - 1) / 16 * 16;     /* 16 keys at a time: a short tail tile */
        if (!hard_masked(a, mrow, i0, nr, j0, end))
            break;
        end = j0;
    }
    if (end == ke || a->mask_kind == 2)
        return end;
    for (int i = 0; i < nr; i++)
        if (hard_masked(a, mrow, i0 + i, 1, ks, end))
            return ke;
    return end;
}

/* ---------------------------------------------------------------- block kernel */
INL void block_task_nv(const attn_args *a, int64_t b, int64_t h, int64_t qb, int64_t c, int64_t ks, int64_t ke, const int NV) {
    float qt[HD * BQ] __attribute__((aligned(64)));
    float ot[HDV * BQ] __attribute__((aligned(64)));
    float st[BK * BQ] __attribute__((aligned(64)));
    float mrun[BQ] __attribute__((aligned(64))), lrun[BQ] __attribute__((aligned(64)));
    const int64_t G = a->H / a->Hkv, hk = h / G, i0 = qb * a->bq;
    const int rows = (int)(a->Lq - i0 < a->bq ? a->Lq - i0 : a->bq);
    const int64_t off = a->Lk - a->Lq; /* causal: query i sees keys j <= i + off */
    const float *qp = a->q + b * a->sqb + h * a->sqh + i0 * a->sqi;
    const float *kp = a->k + b * a->skb + hk * a->skh;
    const float *vp = a->v + b * a->svb + hk * a->svh;
    const char *mrow = a->mask_kind ? mask_base(a, b, h) : 0;
    const float scale = (float)a->scale;
    const int64_t skj = a->skj, svj = a->svj;

    for (int v = 0; v < NV; v++)         /* qt[d][i] = q[i][d], lanes past the rows 0 */
        for (int cc = 0; cc < NC; cc++)
            vtranspose16(qp + 16 * v * a->sqi + 16 * cc, a->sqi, rows - 16 * v, HD - 16 * cc, qt + 16 * cc * BQ + 16 * v, BQ, 16, 0);
    for (int i = 0; i < NV * 16; i++) { mrun[i] = -INFINITY; lrun[i] = 0.0f; }
    for (int d = 0; d < HDV; d++)
        for (int v = 0; v < NV; v++) vstore(ot + d * BQ + 16 * v, vzero());

    int64_t jend = ke;
    if (a->causal && i0 + rows + off < jend) jend = i0 + rows + off; /* last row's last key + 1 */
    if (a->mask_kind) jend = masked_tail(a, mrow, i0, rows, ks, jend);
    for (int64_t j0 = ks; j0 < jend; j0 += BK) {
        const int n = (int)(jend - j0 < BK ? jend - j0 : BK);
        /* S^T tile: 4 keys x NV vectors per register tile */
        int j = 0;
        for (; j + 4 <= n; j += 4)
            for (int g = 0; g < NV; g += VG) {
                vf acc[4][4];
                for (int r = 0; r < 4; r++) for (int v = g; v < g + VG && v < NV; v++) acc[r][v - g] = vzero();
                const float *k0 = kp + (j0 + j) * skj;
                for (int d = 0; d < HD; d++) {
                    vf qv[4];
                    for (int v = g; v < g + VG && v < NV; v++) {
                        qv[v - g] = vload(qt + d * BQ + 16 * v);
                        KEEP_IN_REGISTER(qv[v - g]);
                    }
                    for (int r = 0; r < 4; r++) {
                        vf kb = vset1(k0[r * skj + d]);
                        for (int v = g; v < g + VG && v < NV; v++) acc[r][v - g] = vfma(kb, qv[v - g], acc[r][v - g]);
                    }
                }
                for (int r = 0; r < 4; r++)
                    for (int v = g; v < g + VG && v < NV; v++)
                        vstore(st + (j + r) * BQ + 16 * v, vmul(acc[r][v - g], vset1(scale)));
            }
        for (; j < n; j++) {
            vf acc[4];
            for (int v = 0; v < NV; v++) acc[v] = vzero();
            const float *k0 = kp + (j0 + j) * skj;
            for (int d = 0; d < HD; d++) {
                vf kb = vset1(k0[d]);
                for (int v = 0; v < NV; v++) acc[v] = vfma(kb, vload(qt + d * BQ + 16 * v), acc[v]);
            }
            for (int v = 0; v < NV; v++) vstore(st + j * BQ + 16 * v, vmul(acc[v], vset1(scale)));
        }
        /* mask, then causal */
        if (a->mask_kind == 1 && a->smi > 1 && a->smj == 1) {
            /* a float mask stored keys fastest (as a model builds it): added 16 x 16 blocks at a time,
               transposed on the way, so the caller makes no query-major copy of it */
            const float *mp = (const float *)mrow + i0 * a->smi + j0;
            for (int v = 0; v < NV; v++)
                for (j = 0; j < n; j += 16)
                    vtranspose16(mp + 16 * v * a->smi + j, a->smi, rows - 16 * v, n - j, st + j * BQ + 16 * v, BQ, 16, 1);
        } else if (a->mask_kind) {
            const size_t esz = a->mask_kind == 1 ? 4 : 1;
            for (j = 0; j < n; j++) {
                float *s = st + j * BQ;
                if (a->smi == 0) { /* one value per key: padding masks */
                    vf mv = vset1(mask_at(a, mrow, i0, j0 + j));
                    for (int v = 0; v < NV; v++) vstore(s + 16 * v, vadd(vload(s + 16 * v), mv));
                } else if (a->smi == 1) { /* queries contiguous (attention.py lays masks out so) */
                    const char *mp = mrow + (i0 + (j0 + j) * a->smj) * esz;
                    for (int v = 0; v < NV; v++) {
                        int left = rows - 16 * v;
                        vstore(s + 16 * v, vmask_lanes(vload(s + 16 * v), mp + 16 * v * esz, (int)a->mask_kind, left < 16 ? left : 16));
                    }
                } else {
                    for (int i = 0; i < rows; i++) s[i] += mask_at(a, mrow, i0 + i, j0 + j);
                }
            }
        }
        if (a->causal && j0 + n - 1 > i0 + off) { /* query i sees key j0 + j iff i >= j0 + j - i0 - off */
            for (j = 0; j < n; j++)
                for (int v = 0; v < NV; v++)
                    vstore(st + j * BQ + 16 * v, vmask_below(vload(st + j * BQ + 16 * v), j0 + j - i0 - off - 16 * v));
        }
        /* online softmax, one query per lane */
        vf alpha[4];
        for (int v = 0; v < NV; v++) {
            vf mold = vload(mrun + 16 * v), mx = mold;
            for (j = 0; j < n; j++) mx = vmax(mx, vload(st + j * BQ + 16 * v));
            vf ms = vsafe(mx), sum = vzero();
            alpha[v] = vexp(vsub(mold, ms));
            for (j = 0; j < n; j++) {
                vf p = vexp(vsub(vload(st + j * BQ + 16 * v), ms));
                vstore(st + j * BQ + 16 * v, p);
                sum = vadd(sum, p);
            }
            vstore(mrun + 16 * v, mx);
            vstore(lrun + 16 * v, vfma(vload(lrun + 16 * v), alpha[v], sum));
        }
        /* O^T = O^T * alpha + V^T P^T: 4 dims x NV vectors per register tile */
        int d = 0;
        for (; d + 4 <= HDV; d += 4)
            for (int g = 0; g < NV; g += VG) {
                vf acc[4][4];
                for (int r = 0; r < 4; r++)
                    for (int v = g; v < g + VG && v < NV; v++) acc[r][v - g] = vmul(vload(ot + (d + r) * BQ + 16 * v), alpha[v]);
                const float *v0 = vp + j0 * svj + d;
                for (j = 0; j < n; j++) {
                    vf pv[4];
                    for (int v = g; v < g + VG && v < NV; v++) pv[v - g] = vload(st + j * BQ + 16 * v);
                    for (int r = 0; r < 4; r++) {
                        vf vb = vset1(v0[j * svj + r]);
                        for (int v = g; v < g + VG && v < NV; v++) acc[r][v - g] = vfma(vb, pv[v - g], acc[r][v - g]);
                    }
                }
                for (int r = 0; r < 4; r++)
                    for (int v = g; v < g + VG && v < NV; v++) vstore(ot + (d + r) * BQ + 16 * v, acc[r][v - g]);
            }
        for (; d < HDV; d++) {
            vf acc[4];
            for (int v = 0; v < NV; v++) acc[v] = vmul(vload(ot + d * BQ + 16 * v), alpha[v]);
            for (j = 0; j < n; j++) {
                vf vb = vset1(vp[(j0 + j) * svj + d]);
                for (int v = 0; v < NV; v++) acc[v] = vfma(vb, vload(st + j * BQ + 16 * v), acc[v]);
            }
            for (int v = 0; v < NV; v++) vstore(ot + d * BQ + 16 * v, acc[v]);
        }
    }
    if (a->part) {
        for (int i = 0; i < rows; i++) emit_row(a, b, h, i0 + i, c, mrun[i], lrun[i], ot + i, BQ);
        return;
    }
    /* o / l, 16 queries a vector, then each query's row out of the transposed block */
    for (int v = 0; v < NV; v++) {
        if (a->zero_masked) /* every key masked: 0 / inf = 0 */
            for (int i = 0; i < 16; i++) lrun[16 * v + i] = lrun[16 * v + i] == 0.0f ? INFINITY : lrun[16 * v + i];
        vf l = vload(lrun + 16 * v);
        for (int d = 0; d < HDV; d++) vstore(ot + d * BQ + 16 * v, vdiv(vload(ot + d * BQ + 16 * v), l));
    }
    float *op = a->o + b * a->sob + h * a->soh + i0 * a->soi;
    for (int v = 0; v < NV; v++)
        for (int cc = 0; cc < NCV; cc++)
            vtranspose16(ot + 16 * cc * BQ + 16 * v, BQ, HDV - 16 * cc, rows - 16 * v, op + 16 * v * a->soi + 16 * cc, a->soi, HDV - 16 * cc, 0);
}

static void block_task(const attn_args *a, int64_t b, int64_t h, int64_t qb, int64_t c, int64_t ks, int64_t ke) {
    const int64_t left = a->Lq - qb * a->bq, rows = left < a->bq ? left : a->bq;
    int nv = (int)((rows + 15) / 16);
    switch (nv) {
    case 1: block_task_nv(a, b, h, qb, c, ks, ke, 1); break;
    case 2: block_task_nv(a, b, h, qb, c, ks, ke, 2); break;
    case 3: block_task_nv(a, b, h, qb, c, ks, ke, 3); break;
    default: block_task_nv(a, b, h, qb, c, ks, ke, 4); break;
    }
}

/* ---------------------------------------------------------------- row kernel */
INL void row_task_r(const attn_args *a, int64_t b, int64_t hk, int64_t rg, int64_t c, int64_t ks, int64_t ke, const int R) {
    float s[RMAX][BK] __attribute__((aligned(64)));
    float ob[RMAX][HDVP] __attribute__((aligned(64)));
    vf q[RMAX][NC];
    float mrun[RMAX], lrun[RMAX];
    const char *mrow[RMAX];
    int64_t hr[RMAX], ir[RMAX], lim[RMAX];
    const int64_t G = a->H / a->Hkv, off = a->Lk - a->Lq;
    const float *kp = a->k + b * a->skb + hk * a->skh;
    const float *vp = a->v + b * a->svb + hk * a->svh;
    const float scale = (float)a->scale;
    int64_t jend = ks;
    for (int r = 0; r < R; r++) {
        int64_t rr = rg * RMAX + r; /* row within this kv head: (query head in group, query) */
        hr[r] = hk * G + rr / a->Lq; ir[r] = rr % a->Lq;
        const float *qp = a->q + b * a->sqb + hr[r] * a->sqh + ir[r] * a->sqi;
        for (int cc = 0; cc < NC; cc++) q[r][cc] = vrow(qp, cc);
        mrun[r] = -INFINITY; lrun[r] = 0.0f;
        for (int cc = 0; cc < NCV; cc++) vstore(ob[r] + 16 * cc, vzero());
        mrow[r] = a->mask_kind ? mask_base(a, b, hr[r]) : 0;
        lim[r] = a->causal ? (ir[r] + off + 1 < ke ? ir[r] + off + 1 : ke) : ke;
        if (lim[r] > jend) jend = lim[r];
    }
    for (int64_t j0 = ks; j0 < jend; j0 += BK) {
        const int n = (int)(jend - j0 < BK ? jend - j0 : BK);
        /* scores, 16 keys at a time, one transpose-add reduction per row */
        for (int j = 0; j < n; j += 16) {
            const float *kr[16];
            for (int t = 0; t < 16; t++) kr[t] = j + t < n ? kp + (j0 + j + t) * a->skj : zero_row;
            for (int r = 0; r < R; r++) {
                vf acc[16];
                for (int t = 0; t < 16; t++) {
                    acc[t] = vmul(q[r][0], vrow(kr[t], 0));
                    for (int cc = 1; cc < NC; cc++) acc[t] = vfma(q[r][cc], vrow(kr[t], cc), acc[t]);
                }
                vstore(s[r] + j, vmul(vreduce16(acc), vset1(scale)));
            }
        }
        for (int r = 0; r < R; r++) {
            float *sr = s[r];
            if (a->mask_kind)
                for (int j = 0; j < n; j++) sr[j] += mask_at(a, mrow[r], ir[r], j0 + j);
            for (int j = 0; j < n; j++)
                if (j0 + j >= lim[r]) sr[j] = -INFINITY;
            for (int j = n; j < (n + 15) / 16 * 16; j++) sr[j] = -INFINITY;
            vf mx = vset1(mrun[r]);
            for (int j = 0; j < n; j += 16) mx = vmax(mx, vload(sr + j));
            float m = vhmax(mx);
            float ms = m == -INFINITY ? 0.0f : m;
            vf msv = vset1(ms), sum = vzero();
            for (int j = 0; j < n; j += 16) {
                vf p = vexp(vsub(vload(sr + j), msv));
                vstore(sr + j, p);
                sum = vadd(sum, p);
            }
            float alpha = expf(mrun[r] - ms);
            lrun[r] = lrun[r] * alpha + vhsum(sum);
            mrun[r] = m;
            for (int cc = 0; cc < NCV; cc++) vstore(ob[r] + 16 * cc, vmul(vload(ob[r] + 16 * cc), vset1(alpha)));
        }
        /* o_r += p_r[j] V[j]; V rows loaded once for all R rows */
        vf o[RMAX][NCV];
        for (int r = 0; r < R; r++) for (int cc = 0; cc < NCV; cc++) o[r][cc] = vload(ob[r] + 16 * cc);
        for (int j = 0; j < n; j++) {
            const float *vr = vp + (j0 + j) * a->svj;
            for (int cc = 0; cc < NCV; cc++) {
                vf vv = vrowv(vr, cc);
                for (int r = 0; r < R; r++) o[r][cc] = vfma(vset1(s[r][j]), vv, o[r][cc]);
            }
        }
        for (int r = 0; r < R; r++) for (int cc = 0; cc < NCV; cc++) vstore(ob[r] + 16 * cc, o[r][cc]);
    }
    for (int r = 0; r < R; r++) emit_row(a, b, hr[r], ir[r], c, mrun[r], lrun[r], ob[r], 1);
}

static void row_task(const attn_args *a, int64_t b, int64_t hk, int64_t rg, int64_t c, int64_t ks, int64_t ke) {
    int64_t rows = (a->H / a->Hkv) * a->Lq - rg * RMAX;
    switch (rows >= RMAX ? RMAX : (int)rows) {
    case 1: row_task_r(a, b, hk, rg, c, ks, ke, 1); break;
    case 2: row_task_r(a, b, hk, rg, c, ks, ke, 2); break;
    case 3: row_task_r(a, b, hk, rg, c, ks, ke, 3); break;
    default: row_task_r(a, b, hk, rg, c, ks, ke, 4); break;
    }
}

/* ---------------------------------------------------------------- drivers */
/* merge the split-KV partials of one row: M = max m_c, L = sum l_c e^(m_c - M), O = sum o_c e^(m_c - M) / L */
static void combine_row(const attn_args *a, int64_t row) {
    const int64_t nrows = a->B * a->H * a->Lq;
    float M = -INFINITY, L = 0.0f, acc[HDV];
    for (int64_t c = 0; c < a->nsplit; c++) {
        float m = a->part[(c * nrows + row) * (HDV + 2)];
        if (m > M || m != m) M = m;
    }
    float ms = M == -INFINITY ? 0.0f : M;
    for (int d = 0; d < HDV; d++) acc[d] = 0.0f;
    for (int64_t c = 0; c < a->nsplit; c++) {
        const float *p = a->part + (c * nrows + row) * (HDV + 2);
        float w = expf(p[0] - ms); /* a chunk that saw only masked keys: m = -inf, w = 0 */
        L += p[1] * w;
        for (int d = 0; d < HDV; d++) acc[d] += p[2 + d] * w;
    }
    int64_t h = (row / a->Lq) % a->H, b = row / (a->Lq * a->H), i = row % a->Lq;
    float *dst = a->o + b * a->sob + h * a->soh + i * a->soi;
    if (a->zero_masked && L == 0.0f) L = INFINITY;   /* every key masked: 0 / inf = 0 */
    for (int d = 0; d < HDV; d++) dst[d] = acc[d] / L; /* every chunk masked: 0 / 0 = NaN */
}

/* vexp over n floats, for the accuracy test */
void attn_exp(const float *x, float *y, int64_t n) {
    int64_t i = 0;
    for (; i + 16 <= n; i += 16) vstore(y + i, vexp(vload(x + i)));
    for (; i < n; i++) { float t[16] = {0}; t[0] = x[i]; vf e = vexp(vload(t)); vstore(t, e); y[i] = t[0]; }
}

int attn_max_threads(void) { return omp_get_max_threads(); }
int attn_head_dim(void) { return HD; }
int attn_v_head_dim(void) { return HDV; }
int attn_block_q(void) { return BQ; }
int attn_block_k(void) { return BK; }
int attn_row_group(void) { return RMAX; }

/* kernel: 0 block, 1 row. a->part non-NULL: split into a->nsplit chunks of a->chunk keys,
 * combined in the same parallel region (one fork/join per call). */
void attn_forward(const attn_args *a, int kernel) {
    const int64_t ns = a->part ? a->nsplit : 1, chunk = a->part ? a->chunk : a->Lk;
    const int64_t G = a->H / a->Hkv;
    const int64_t nqb = (a->Lq + a->bq - 1) / a->bq, nrg = (G * a->Lq + RMAX - 1) / RMAX;
    const int64_t ntask = kernel == 0 ? a->B * a->H * nqb * ns : a->B * a->Hkv * nrg * ns;
    const int64_t nrows = a->B * a->H * a->Lq;
    if (a->knew)        /* a few rows per call (one per head in a decode step): not worth a team */
        for (int64_t b = 0; b < a->B; b++)
            for (int64_t h = 0; h < a->Hkv; h++)
                for (int64_t j = 0; j < a->Lnew; j++) {
                    const int64_t row = a->Lk - a->Lnew + j;
                    memcpy((float *)a->k + b * a->skb + h * a->skh + row * a->skj,
                           a->knew + b * a->snkb + h * a->snkh + j * a->snkj, HD * sizeof(float));
                    memcpy((float *)a->v + b * a->svb + h * a->svh + row * a->svj,
                           a->vnew + b * a->snvb + h * a->snvh + j * a->snvj, HDV * sizeof(float));
                }
#pragma omp parallel num_threads(a->nthreads)
    {
#pragma omp for schedule(dynamic, 1)
        for (int64_t t = 0; t < ntask; t++) {
            int64_t c = t % ns, u = t / ns;
            int64_t ks = c * chunk, ke = ks + chunk < a->Lk ? ks + chunk : a->Lk;
            if (kernel == 0) block_task(a, u / nqb / a->H, u / nqb % a->H, u % nqb, c, ks, ke);
            else row_task(a, u / nrg / a->Hkv, u / nrg % a->Hkv, u % nrg, c, ks, ke);
        }
        if (a->part) {
#pragma omp for schedule(static)
            for (int64_t row = 0; row < nrows; row++) combine_row(a, row);
        }
    }
}
