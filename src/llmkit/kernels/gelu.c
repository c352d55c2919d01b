/* GELU for training: one pass writes the activation and, over its input, the derivative.
 *
 * Autograd keeps the GELU input and recomputes erf and exp in the backward (PyTorch's
 * gelu_backward), a second transcendental pass over [tokens, d_ff]. The derivative shares the
 * forward's exp: Phi(x) = 1 - erfc(x / sqrt 2) / 2 where erfc carries exp(-x^2 / 2), which is also
 * the density's. Written over the input (dead after the forward once its derivative is known), it
 * costs no extra memory, and the backward becomes one multiply (nn/mlp.py).
 *
 *   exact: gelu(x) = x Phi(x),          gelu'(x) = Phi(x) + x phi(x)
 *   tanh:  gelu(x) = x s,               gelu'(x) = s + 2 x s (1 - s) k (1 + 3 c x^2)
 *          with s = (1 + tanh u) / 2 = 1 / (1 + exp(-2u)), u = k (x + c x^3), k = sqrt(2 / pi), c = 0.044715
 *
 * Accurate relative to the value in the left tail, where gelu(x) and gelu'(x) are tiny (about
 * x exp(-x^2 / 2) / sqrt(2 pi)) and an absolute-error formula (A&S 7.1.26's erf, 1 + tanh u)
 * leaves nothing right: errors stay within a few units in the last place down to the smallest
 * normal float (tests/kernels/test_gelu_accuracy.py). Three things make it so:
 *   - the tail's erfc is exp(-x^2 / 2) times the scaled erfcx(|x| / sqrt 2), a function near
 *     1 / |x| that a polynomial in t = 1 / (1 + p |x|) fits to relative error 1.3e-8 over all x
 *     (weighted least squares towards minimax, coefficients rounded to float one at a time);
 *   - the exponent is exact: x^2 = hi + lo by FMA, exp(-hi / 2) (1 - lo / 2). The tanh form's
 *     2u = x (2k + 2kc x^2) is taken in double and reduced (2u = n ln 2 + r) before rounding, as
 *     a float 2u near -88 would be off by 4e-6 relative;
 *   - the exp is computed 2^64 too large and scaled back by the last multiplication, so a tail
 *     value rounds once and underflows gradually instead of at exp's own float range.
 * The scalar branch (other CPUs, and the last n mod 8 elements) works in double with libm.
 */
#include <math.h>

#define GELU_CHUNK 4096

#if defined(__AVX2__) && defined(__FMA__)
#define GELU_2P64 18446744073709551616.0f /* exp is returned scaled by this ... */
#define GELU_2M64 5.42101086242752217e-20f /* ... and scaled back by this, both exact */

/* 2^64 exp(n ln 2 + r) for |r| <= ln 2 / 2 (Cephes' expf polynomial), n <= 63; 0 where n < -150
 * (exp below half the smallest subnormal, 2^-150), whatever r is there (NaN included). */
static inline __m256 gelu_exp_2p64(__m256 r, __m256i n) {
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(n, _mm256_set1_epi32(127 + 64)), 23);
    __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(n, _mm256_set1_epi32(-151)));
    return _mm256_and_ps(_mm256_mul_ps(p, _mm256_castsi256_ps(bits)), keep);
}

/* x clamped to [-16, 16] (NaN becomes 16: the callers carry NaN through by other terms) */
static inline __m256 gelu_clamp16(__m256 x) {
    return _mm256_max_ps(_mm256_min_ps(x, _mm256_set1_ps(16.0f)), _mm256_set1_ps(-16.0f));
}

/* y, dy from the x < 0 (where `neg`) or x >= 0 results; NaN in, NaN out */
static inline void gelu_store8(__m256 x, __m256 neg, __m256 y_neg, __m256 y_pos, __m256 dy_neg, __m256 dy_pos,
                               float *y, float *dy) {
    __m256 nan = _mm256_cmp_ps(x, x, _CMP_UNORD_Q);
    _mm256_storeu_ps(y, _mm256_blendv_ps(_mm256_blendv_ps(y_pos, y_neg, neg), x, nan));
    _mm256_storeu_ps(dy, _mm256_blendv_ps(_mm256_blendv_ps(dy_pos, dy_neg, neg), x, nan));
}

static inline void gelu_exact8(const float *x_in, float *y, float *dy) {
    const __m256 x = _mm256_loadu_ps(x_in), ax = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
    const __m256 one = _mm256_set1_ps(1.0f), down = _mm256_set1_ps(GELU_2M64);
    /* e = 2^64 exp(-x^2 / 2) with x^2 = hi + lo exactly; |x| capped at 16, where exp is 0 already */
    __m256 xc = _mm256_min_ps(ax, _mm256_set1_ps(16.0f));
    __m256 hi = _mm256_mul_ps(xc, xc), lo = _mm256_fmsub_ps(xc, xc, hi);
    __m256 a = _mm256_mul_ps(hi, _mm256_set1_ps(-0.5f));
    __m256 nf = _mm256_round_ps(_mm256_mul_ps(a, _mm256_set1_ps(1.44269504088896341f)),
                                _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(0.693359375f), a); /* exact */
    r = _mm256_fnmadd_ps(nf, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 e = gelu_exp_2p64(r, _mm256_cvtps_epi32(nf));
    e = _mm256_fmadd_ps(e, _mm256_mul_ps(lo, _mm256_set1_ps(-0.5f)), e); /* exp(-lo / 2) = 1 - lo / 2 */
    /* h = erfcx(|x| / sqrt 2) / 2 = t P(t), t = 1 / (1 + 0.35 |x|); then erfc(|x| / sqrt 2) / 2 = h e 2^-64 */
    __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(0.35f), ax, one));
    __m256 h = _mm256_set1_ps(1.931462437e-02f);
    h = _mm256_fmadd_ps(h, t, _mm256_set1_ps(-1.084586829e-01f));
    h = _mm256_fmadd_ps(h, t, _mm256_set1_ps(2.358909100e-01f));
    h = _mm256_fmadd_ps(h, t, _mm256_set1_ps(-2.259237319e-01f));
    h = _mm256_fmadd_ps(h, t, _mm256_set1_ps(6.957140565e-02f));
    h = _mm256_fmadd_ps(h, t, _mm256_set1_ps(-2.839596197e-02f));
    h = _mm256_fmadd_ps(h, t, _mm256_set1_ps(4.840295389e-02f));
    h = _mm256_fmadd_ps(h, t, _mm256_set1_ps(8.778654039e-02f));
    h = _mm256_fmadd_ps(h, t, _mm256_set1_ps(1.225529015e-01f));
    h = _mm256_fmadd_ps(h, t, _mm256_set1_ps(1.396292299e-01f));
    h = _mm256_fmadd_ps(h, t, _mm256_set1_ps(1.396297961e-01f));
    h = _mm256_mul_ps(h, t);
    __m256 q = _mm256_mul_ps(h, e);                                  /* 2^64 erfc(|x| / sqrt 2) / 2 */
    __m256 xs = gelu_clamp16(x);                   /* = x where e > 0: keeps 0 * inf out of the tails */
    __m256 xe = _mm256_mul_ps(_mm256_mul_ps(xs, e), _mm256_set1_ps(0.39894228040143268f)); /* 2^64 x phi(x) */
    /* x < 0: Phi = q, the tail: scaled back last. x >= 0: Phi = 1 - q. */
    __m256 y_neg = _mm256_mul_ps(_mm256_mul_ps(xs, q), down), dy_neg = _mm256_mul_ps(_mm256_add_ps(xe, q), down);
    __m256 cdf = _mm256_fnmadd_ps(q, down, one);
    __m256 y_pos = _mm256_mul_ps(x, cdf), dy_pos = _mm256_fmadd_ps(xe, down, cdf);
    gelu_store8(x, _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ), y_neg, y_pos, dy_neg, dy_pos, y, dy);
}

/* -2|u| = -|x (2k + 2kc x^2)| in double, reduced to n ln 2 + r, for 4 floats. Where n is out of
 * int range (|x| > 1e3, infinities, NaN) it converts to INT_MIN, which gelu_exp_2p64 maps to 0. */
static inline void gelu_tanh_arg4(__m128 x4, __m128 *r, __m128i *n) {
    __m256d x = _mm256_cvtps_pd(x4);
    __m256d w = _mm256_mul_pd(x, _mm256_fmadd_pd(_mm256_set1_pd(0.071354816272600252), _mm256_mul_pd(x, x),
                                                 _mm256_set1_pd(1.5957691216057308)));
    w = _mm256_or_pd(w, _mm256_set1_pd(-0.0));
    __m256d nd = _mm256_round_pd(_mm256_mul_pd(w, _mm256_set1_pd(1.4426950408889634)),
                                 _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    *r = _mm256_cvtpd_ps(_mm256_fnmadd_pd(nd, _mm256_set1_pd(0.69314718055994531), w)); /* n ln2 off by < 1e-14 */
    *n = _mm256_cvtpd_epi32(nd);
}

static inline void gelu_tanh_grad8(const float *x_in, float *y, float *dy) {
    const __m256 x = _mm256_loadu_ps(x_in), one = _mm256_set1_ps(1.0f), down = _mm256_set1_ps(GELU_2M64);
    __m128 r0, r1;
    __m128i n0, n1;
    gelu_tanh_arg4(_mm256_castps256_ps128(x), &r0, &n0);
    gelu_tanh_arg4(_mm256_extractf128_ps(x, 1), &r1, &n1);
    __m256 E = gelu_exp_2p64(_mm256_insertf128_ps(_mm256_castps128_ps256(r0), r1, 1),
                             _mm256_inserti128_si256(_mm256_castsi128_si256(n0), n1, 1)); /* 2^64 exp(-2|u|) */
    __m256 rr = _mm256_div_ps(one, _mm256_fmadd_ps(E, down, one));     /* 1 / (1 + exp(-2|u|)) */
    /* du2 = 2 du/dx = 2k (1 + 3c x^2), of x clamped (= x where E > 0: keeps 0 * inf out of the tails) */
    __m256 xs = gelu_clamp16(x);
    __m256 du2 = _mm256_fmadd_ps(_mm256_set1_ps(0.21406444881780076f), _mm256_mul_ps(xs, xs),
                                 _mm256_set1_ps(1.5957691216057308f));
    /* x >= 0: s = rr, s (1 - s) = E rr^2. x < 0: s = E rr (the tail: scaled back last). */
    __m256 y_pos = _mm256_mul_ps(x, rr);
    __m256 dy_pos = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_mul_ps(xs, E), down), _mm256_mul_ps(_mm256_mul_ps(rr, rr), du2), rr);
    __m256 s = _mm256_mul_ps(E, rr);
    __m256 y_neg = _mm256_mul_ps(_mm256_mul_ps(xs, s), down);
    __m256 dy_neg = _mm256_mul_ps(_mm256_mul_ps(s, _mm256_fmadd_ps(_mm256_mul_ps(xs, rr), du2, one)), down);
    gelu_store8(x, _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ), y_neg, y_pos, dy_neg, dy_pos, y, dy);
}
#endif

static void gelu_grad_scalar(float x, int tanh_form, float *y, float *dy) {
    if (isnan(x)) {
        *y = *dy = x;
        return;
    }
    /* xs: x clamped to [-40, 40], where the tail terms are 0 already (no 0 * inf at the infinities) */
    double xd = x, xs = xd < -40.0 ? -40.0 : xd > 40.0 ? 40.0 : xd;
    if (tanh_form) {
        double k = 0.79788456080286536, c = 0.044715, u = k * (xs + c * xs * xs * xs);
        double e = exp(-2.0 * fabs(u)), r = 1.0 / (1.0 + e), s = u >= 0.0 ? r : e * r;
        *y = (float)(x < 0 ? xs * s : xd * s);
        *dy = (float)(s + 2.0 * xs * e * r * r * k * (1.0 + 3.0 * c * xs * xs));
    } else {
        double cdf = 0.5 * erfc(-xs * 0.70710678118654752);
        *y = (float)(x < 0 ? xs * cdf : xd * cdf);
        *dy = (float)(cdf + xs * exp(-0.5 * xs * xs) * 0.39894228040143268);
    }
}

/* y = gelu(x) and x <- gelu'(x), n floats; tanh_form selects the approximation */
void llmkit_gelu_with_grad(float *x, float *y, long n, int tanh_form) {
    long chunks = (n + GELU_CHUNK - 1) / GELU_CHUNK;
#pragma omp parallel for schedule(static)
    for (long ch = 0; ch < chunks; ch++) {
        long i = ch * GELU_CHUNK, end = i + GELU_CHUNK < n ? i + GELU_CHUNK : n;
#if defined(__AVX2__) && defined(__FMA__)
        if (tanh_form)
            for (; i + 8 <= end; i += 8) gelu_tanh_grad8(x + i, y + i, x + i);
        else
            for (; i + 8 <= end; i += 8) gelu_exact8(x + i, y + i, x + i);
#endif
        for (; i < end; i++) gelu_grad_scalar(x[i], tanh_form, y + i, x + i);
    }
}
