/* The activation after a convolution, one of conv_act.py's ACTS (code ACT, a constant of the including
   template); clamps are comparisons, so NaN passes through. The clamps are written `bound < v ? bound : v`
   with the bound a variable (act_code gives relu's 0 and hardswish's 0 and 6 as p0, p1): GCC then emits
   one vminps or vmaxps each, NaN-propagating as written; with a literal bound, or the nested form, it
   emitted compares and blends, a third of a 3x3 depthwise convolution's time. */
KF_INLINE float act(float v, float p0, float p1) {
    (void)p0; (void)p1;
#if ACT == 1                                   /* relu; p0 = 0 */
    return p0 > v ? p0 : v;
#elif ACT == 2                                 /* sigmoid */
    return 1.0f / (1.0f + kf_exp(-v));
#elif ACT == 3                                 /* tanh */
    return kf_tanh(v);
#elif ACT == 4                                 /* swish (SiLU) */
    return v / (1.0f + kf_exp(-v));
#elif ACT == 5                                 /* gelu, erf */
    return v * kf_phi(v);
#elif ACT == 6                                 /* gelu, tanh approximation */
    /* 0.5 v (1 + tanh(u)) = v sigmoid(2u): one exp and one division, where tanh took both of its paths
       and a division (a [128,384] x [384,1536] GEMM's epilogue: 74 -> 42 us over the bare GEMM) */
    float u2 = 0x1.988454p0f * (v + 0.044715f * v * v * v);
    return v / (1.0f + kf_exp(-u2));
#elif ACT == 7                                 /* leaky_relu(p0) */
    return v > 0.0f ? v : v * p0;
#elif ACT == 8                                 /* hardtanh(p0, p1) */
    float t = p1 < v ? p1 : v;
    return p0 > t ? p0 : t;
#elif ACT == 9                                 /* hardswish; p0 = 0, p1 = 6 */
    float t = v + 3.0f;
    t = p1 < t ? p1 : t;
    t = p0 > t ? p0 : t;
    return v * t / 6.0f;
#elif ACT == 10                                /* hardsigmoid; p0 = 0, p1 = 6 */
    float t = v + 3.0f;
    t = p1 < t ? p1 : t;
    t = p0 > t ? p0 : t;
    return t / 6.0f;
#else
    return v;
#endif
}
