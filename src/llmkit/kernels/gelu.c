/* GELU for training: one pass writes the activation and, over its input, the derivative.
 *
 * Autograd keeps the GELU input and recomputes erf and exp in the backward (PyTorch's
 * gelu_backward), a second transcendental pass over [tokens, d_ff]. The derivative shares the
 * forward's exp: Phi(x) = 1 - erfc(x / sqrt 2) / 2 where erfc carries exp(-x^2 / 2), which is also
 * the density's. Written over the input (dead after the forward once its derivative is known), it
 * costs no extra memory, and the backward becomes one multiply (nn/mlp.py).
 *
 *   exact: gelu(x) = x Phi(x),          gelu'(x) = Phi(x) + x phi(x)
 *   tanh:  gelu(x) = x (1 + t) / 2,     gelu'(x) = (1 + t) / 2 + x (1 - t^2) / 2 * k (1 + 3 c x^2)
 *          with t = tanh(k (x + c x^3)), k = sqrt(2 / pi), c = 0.044715
 * erfc by Abramowitz & Stegun 7.1.26 (absolute error < 1.5e-7), as PyTorch's vectorised erf.
 */
#include <math.h>

#define GELU_CHUNK 4096

#if defined(__AVX2__) && defined(__FMA__)
static inline void gelu_exact8(const float *x_in, float *y, float *dy) {
    const __m256 x = _mm256_loadu_ps(x_in), ax = _mm256_andnot_ps(_mm256_set1_ps(-0.0f), x);
    const __m256 one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f);
    __m256 z = _mm256_mul_ps(ax, _mm256_set1_ps(0.70710678118654752f));
    __m256 t = _mm256_div_ps(one, _mm256_fmadd_ps(_mm256_set1_ps(0.3275911f), z, one));
    __m256 p = _mm256_set1_ps(1.061405429f);
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-1.453152027f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(1.421413741f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(-0.284496736f));
    p = _mm256_fmadd_ps(p, t, _mm256_set1_ps(0.254829592f));
    p = _mm256_mul_ps(p, t);
    __m256 e = exp8(_mm256_mul_ps(_mm256_mul_ps(x, x), _mm256_set1_ps(-0.5f))); /* exp(-x^2 / 2) */
    __m256 q = _mm256_mul_ps(half, _mm256_mul_ps(p, e));                         /* erfc(|x| / sqrt 2) / 2 */
    __m256 neg = _mm256_cmp_ps(x, _mm256_setzero_ps(), _CMP_LT_OQ);
    __m256 phi_cdf = _mm256_blendv_ps(_mm256_sub_ps(one, q), q, neg);
    _mm256_storeu_ps(y, _mm256_mul_ps(x, phi_cdf));
    _mm256_storeu_ps(dy, _mm256_fmadd_ps(_mm256_mul_ps(x, e), _mm256_set1_ps(0.39894228040143268f), phi_cdf));
}

static inline void gelu_tanh_grad8(const float *x_in, float *y, float *dy) {
    const __m256 x = _mm256_loadu_ps(x_in), one = _mm256_set1_ps(1.0f), half = _mm256_set1_ps(0.5f);
    const __m256 k = _mm256_set1_ps(0.79788456080286536f), c = _mm256_set1_ps(0.044715f);
    __m256 x2 = _mm256_mul_ps(x, x);
    __m256 u = _mm256_mul_ps(k, _mm256_fmadd_ps(_mm256_mul_ps(c, x2), x, x));
    __m256 th = _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(exp8(_mm256_add_ps(u, u)), one)));
    __m256 hx = _mm256_mul_ps(half, x);
    _mm256_storeu_ps(y, _mm256_fmadd_ps(hx, th, hx));
    __m256 du = _mm256_mul_ps(k, _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(3.0f), c), x2, one));
    __m256 sech2 = _mm256_fnmadd_ps(th, th, one);
    _mm256_storeu_ps(dy, _mm256_fmadd_ps(_mm256_mul_ps(hx, sech2), du, _mm256_mul_ps(half, _mm256_add_ps(one, th))));
}
#endif

static void gelu_grad_scalar(float x, int tanh_form, float *y, float *dy) {
    if (tanh_form) {
        float k = 0.79788456080286536f, c = 0.044715f, th = tanhf(k * (x + c * x * x * x));
        *y = 0.5f * x * (1.0f + th);
        *dy = 0.5f * (1.0f + th) + 0.5f * x * (1.0f - th * th) * k * (1.0f + 3.0f * c * x * x);
    } else {
        float cdf = 0.5f * erfcf(-x * 0.70710678118654752f);
        *y = x * cdf;
        *dy = cdf + x * expf(-0.5f * x * x) * 0.39894228040143268f;
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
