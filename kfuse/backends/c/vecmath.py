"""The vector math library of the C kernels: the coefficient tables, the generated C text of the
inline math functions (`VECMATH_C`) and the libmvec declarations (`VECMATH_H`), and the C function
each float primitive calls (`FLOAT_FN`)."""
from __future__ import annotations

import math

from ...kernels import LIBM_BINARY, LIBM_UNARY, _f32
from .literals import literal

# exp, erf and tanh are our own branch-free inline functions (VECMATH_C below, docs/vecmath.md):
# gcc inlines them into the `omp simd` loops and vectorises them (16 lanes, zmm), special values
# handled by clamps and selects, so no input takes a slow path. Earlier kernels called libmvec's
# expf, which redoes in scalar code every vector holding a lane outside |x| <= 87.3: a softmax with
# -inf mask entries ran ~4x slower than unmasked.
#
# The rest (log, log1p, sin, cos, pow) still come from glibc's libmvec: the declaration tells gcc
# it may call _ZGVeN16v_<name> from vectorised loops (-fno-math-errno in FLAGS makes that legal).
VECMATH_H = "".join(f"#pragma omp declare simd notinbranch\nfloat {f}({', '.join(['float'] * n)});\n"
                    for f, n in (("logf", 1), ("log1pf", 1), ("sinf", 1), ("cosf", 1), ("powf", 2)))

# Coefficients: float32 weighted-minimax fits (Lawson iterations in float64, each coefficient rounded
# to float32 in turn and the rest refitted), errors measured by the sweep in tests/ops/test_c_kernels.py.
VECMATH_C = """
#define KF_INLINE static inline __attribute__((always_inline))
typedef union { float f; uint32_t u; } kf_bits;
KF_INLINE float kf_asfloat(uint32_t u) { kf_bits b; b.u = u; return b.f; }
KF_INLINE uint32_t kf_asuint(float f) { kf_bits b; b.f = f; return b.u; }

/* e^x = 2^(n-1) * 2e^r: n = rint(x log2 e) by the 1.5*2^23 shifter (plus 126, so the low bits of t
   are n + 126, the exponent field of 2^(n-1)), r = x - n ln2 in two Cody-Waite steps (n*C1 is exact),
   2e^r by a degree-5 polynomial on |r| <= ln2/2, and one multiply by 2^(n-1) = t << 23. Only two
   guards: x is clamped below at -87.5 (NaN passes: its comparison is false), where n = -126 gives
   2^(n-1) = +0, so results under 2^-125.5 (1.7e-38) flush to 0 and no denormal is ever made (a
   denormal multiply costs a microcode assist: a -inf-masked softmax ran 2.3x slower); and n is
   capped at 128 by an unsigned min on t's bits (huge x, +inf and NaN bits included). Above the cap r
   grows, the polynomial (all coefficients positive) exceeds 2 and the product overflows to inf, as
   it should; a NaN x makes r NaN. exp(0) = 1 exactly (the polynomial's constant is 2).
   Against the clamp-and-select form with the exponent-field add (22 vector ops a vector, degree 6),
   these 13 ops made SwiGLU 1.4x faster. */
KF_INLINE float kf_exp(float x) {
    float xl = x < -0x1.5ep+6f ? -0x1.5ep+6f : x;
    uint32_t t = kf_asuint(fmaf(xl, 0x1.715476p+0f, 0x1.8p+23f + 126.0f));
    t = t < 0x4b4000feu ? t : 0x4b4000feu;    /* n + 126 <= 254: n <= 128 */
    float n = kf_asfloat(t) - (0x1.8p+23f + 126.0f);
    float r = fmaf(-n, 0x1.63p-1f, xl);
    r = fmaf(-n, -0x1.bd0106p-13f, r);
    float p = 0x1.0fa7d8p-6f;
    p = fmaf(p, r, 0x1.573ad0p-4f);
    p = fmaf(p, r, 0x1.555a6ep-2f);
    p = fmaf(p, r, 0x1.fffdc4p-1f);
    p = fmaf(p, r, 0x1.fffff6p+0f);
    p = fmaf(p, r, 2.0f);
    return p * kf_asfloat(t << 23);
}

%(ERF)s
/* tanh(x), on a = |x| with the sign of x put back last (tanh(-0) = -0). a <= 0.625: a + a s P(s),
   s = a^2. Above: 1 - 2 / (e^(2a) + 1); e^(2a) overflows to inf from a ~ 44.4 on, giving exactly 1. */
KF_INLINE float kf_tanh(float x) {
    float a = fabsf(x), s = x * x;
    float p = 0x1.1a2e3ep-9f;
    p = fmaf(p, s, -0x1.0c6020p-7f);
    p = fmaf(p, s, 0x1.63a57ep-6f);
    p = fmaf(p, s, -0x1.b9f18ap-5f);
    p = fmaf(p, s, 0x1.11107ap-3f);
    p = fmaf(p, s, -0x1.555554p-2f);
    float small = fmaf(a * s, p, a);
    float big = 1.0f - 2.0f / (kf_exp(a + a) + 1.0f);
    float y = a > 0.625f ? big : small;
    return kf_asfloat(kf_asuint(y) | (kf_asuint(x) & 0x80000000u));
}
"""

# erf's two polynomials, highest degree first: erf(z) = z + z Q(z^2) for |z| <= 0.921875, and B(|z| - 2.4)
# above (erf in [0.8, 1): absolute error is what counts there, so no exp is needed). B is degree 12: its
# float32 error (~1.7e-7 absolute, rounding in the evaluation) is that of the degree-13 fit it replaced,
# and one FMA fewer made bias+GELU 0.193 -> 0.185 ms.
ERF_Q = ("-0x1.3a48e2p-11", "0x1.474a0ep-8", "-0x1.b68e66p-6", "0x1.ce1ab4p-4", "-0x1.8126e8p-2",
         "0x1.06eba6p-3")
ERF_B = ("-0x1.0afdccp-17", "0x1.0605e2p-15", "0x1.af4b3ap-16", "-0x1.531a3p-12", "0x1.2ea3b8p-11",
         "0x1.dc8366p-13", "-0x1.9a1ec2p-9", "0x1.02d9fcp-7", "-0x1.8c7aep-7", "0x1.987e88p-7",
         "-0x1.17b6f2p-7", "0x1.d211acp-9", "0x1.ffa5c4p-1")


def _erf_of_scaled(c: float, h: float = 1.0) -> str:
    """C statements leaving y = h erf(c x) (sign included) for the float x, with c and h (a power of 2,
    so exactly) folded into the coefficients: the scalings cost no multiply. On a = |x|, s = a^2,
    small: erf(c a) = a (c (1 + Q_0) + sum_k c^(2k+1) Q_k s^k), a degree-5 polynomial in s and one multiply;
    big:   B(c a - 2.4) = B'(min(a, 3.91/c) - 2.4/c), B'_k = c^k B_k. B' is exactly 1.0f at the clamp
           (for c = 1 and sqrt(1/2): tests/ops/test_c_kernels.py), so larger |x|, inf included, give
           exactly +-1 with no select; erf(3.91) is 1 - 1 ULP/2, and rounds to 1 from 3.9192.
    Both are computed side by side and one selected by a > 0.921875/c; the sign of x is put back last
    (erf(-0) = -0), which also keeps NaN (a NaN a fails the comparisons and takes the small branch)."""
    top = literal(_f32(3.91 / c), "f32")

    def horner(coefs, var, name):
        lines = [f"    float {name} = {literal(coefs[0], 'f32')};"]
        lines += [f"    {name} = fmaf({name}, {var}, {literal(k, 'f32')});" for k in coefs[1:]]
        return lines
    q = [float.fromhex(k) for k in ERF_Q]
    n = len(q) - 1
    small = [h * _f32(c ** (2 * (n - i) + 1) * k) for i, k in enumerate(q[:-1])] + [h * _f32(c * (1 + q[-1]))]
    b = [float.fromhex(k) for k in ERF_B]
    big = [h * _f32(c ** (len(b) - 1 - i) * k) for i, k in enumerate(b)]
    return "\n".join(
        ["    float a = fabsf(x), s = x * x;"] + horner(small, "s", "q")
        + [f"    float u = (a > {top} ? {top} : a) - {literal(_f32(2.4 / c), 'f32')};"] + horner(big, "u", "b")
        + [f"    float y = a > {literal(_f32(0.921875 / c), 'f32')} ? b : a * q;",
           "    y = kf_asfloat(kf_asuint(y) | (kf_asuint(x) & 0x80000000u));"])


ERF_C = f"""
/* erf(x): _erf_of_scaled with c = 1 (docs/vecmath.md). */
KF_INLINE float kf_erf(float x) {{
{_erf_of_scaled(1.0)}
    return y;
}}

/* Phi(x) = 0.5 + 0.5 erf(x / sqrt 2), the normal CDF of gelu(x) = x Phi(x): the 1/sqrt(2) and the 0.5
   folded into erf's coefficients save gelu two multiplies (bias+GELU [1024,1536] 0.230 -> 0.193 ms with
   the clamp that needs no select; docs/vecmath.md); Phi is exactly 1 from x ~ 5.53 on and exactly 0
   below -5.53. */
KF_INLINE float kf_phi(float x) {{
{_erf_of_scaled(math.sqrt(0.5), 0.5)}
    return 0.5f + y;
}}
"""
VECMATH_C = VECMATH_C % {"ERF": ERF_C}

# kf_exp on 8 lanes (AVX2), for a template that marks where with /*EXP8*/ (gemm.c, after its own
# immintrin.h): not in VECMATH_C, which every kernel includes, because immintrin.h costs ~0.5 s a build
# (0.06 -> 0.6 s for a small kernel; a test suite of cold builds 33 -> 50 min)
EXP8_C = """
/* kf_exp on 8 lanes, its operations in its order (the same bits), for a kernel whose values are in AVX2
   registers (gemm.c's epilogue); vmaxps(c, x) keeps a NaN x, as `x < c ? c : x` does. */
KF_INLINE __m256 kf_exp8(__m256 x) {
    const __m256 shift = _mm256_set1_ps(0x1.8p+23f + 126.0f);
    __m256 xl = _mm256_max_ps(_mm256_set1_ps(-0x1.5ep+6f), x);
    __m256i t = _mm256_castps_si256(_mm256_fmadd_ps(xl, _mm256_set1_ps(0x1.715476p+0f), shift));
    t = _mm256_min_epu32(t, _mm256_set1_epi32(0x4b4000fe));
    __m256 n = _mm256_sub_ps(_mm256_castsi256_ps(t), shift);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0x1.63p-1f), xl);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-0x1.bd0106p-13f), r);
    __m256 p = _mm256_set1_ps(0x1.0fa7d8p-6f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0x1.573ad0p-4f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0x1.555a6ep-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0x1.fffdc4p-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(0x1.fffff6p+0f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(2.0f));
    return _mm256_mul_ps(p, _mm256_castsi256_ps(_mm256_slli_epi32(t, 23)));
}
"""

# the same on 16 lanes (AVX-512), for a template marking /*EXP16*/ (gemm.c): the 8-lane text with its types
# and intrinsics widened, so the two cannot drift apart
EXP16_C = (EXP8_C.replace("__m256", "__m512").replace("_mm256_", "_mm512_").replace("si256", "si512")
           .replace("kf_exp8", "kf_exp16").replace("on 8 lanes", "on 16 lanes").replace("AVX2", "AVX-512"))

FLOAT_FN = {"abs": "fabsf", "exp": "kf_exp", "log": "logf", "log1p": "log1pf", "sqrt": "sqrtf",
            "sin": "sinf", "cos": "cosf", "tanh": "kf_tanh", "erf": "kf_erf", "phi": "kf_phi", "floor": "floorf",
            "ceil": "ceilf", "pow": "powf", "round": "nearbyintf", "trunc": "truncf",
            **{f: f + "f" for f in LIBM_UNARY + LIBM_BINARY}}
