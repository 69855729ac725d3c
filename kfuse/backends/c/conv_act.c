/* The activation after a convolution, one of conv_act.py's ACTS (code ACT, a constant of the including
   template); clamps are comparisons, so NaN passes through. */
KF_INLINE float act(float v, float p0, float p1) {
    (void)p0; (void)p1;
#if ACT == 1                                   /* relu */
    return v < 0.0f ? 0.0f : v;
#elif ACT == 2                                 /* sigmoid */
    return 1.0f / (1.0f + kf_exp(-v));
#elif ACT == 3                                 /* tanh */
    return kf_tanh(v);
#elif ACT == 4                                 /* swish (SiLU) */
    return v / (1.0f + kf_exp(-v));
#elif ACT == 5                                 /* gelu, erf */
    return v * kf_phi(v);
#elif ACT == 6                                 /* gelu, tanh approximation */
    float inner = 0x1.988454p-1f * (v + 0.044715f * v * v * v);
    return 0.5f * v * (1.0f + kf_tanh(inner));
#elif ACT == 7                                 /* leaky_relu(p0) */
    return v > 0.0f ? v : v * p0;
#elif ACT == 8                                 /* hardtanh(p0, p1) */
    return v < p0 ? p0 : (v > p1 ? p1 : v);
#elif ACT == 9                                 /* hardswish */
    float t = v + 3.0f;
    t = t < 0.0f ? 0.0f : (t > 6.0f ? 6.0f : t);
    return v * t / 6.0f;
#elif ACT == 10                                /* hardsigmoid */
    float t = v + 3.0f;
    t = t < 0.0f ? 0.0f : (t > 6.0f ? 6.0f : t);
    return t / 6.0f;
#else
    return v;
#endif
}
