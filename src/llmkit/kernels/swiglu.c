/* SwiGLU's activation for training: one pass writes a = silu(g) * u and, over its inputs, the two
 * partial derivatives the backward multiplies by.
 *
 * Autograd keeps g, u and silu(g) and recomputes the sigmoid in the backward (silu_backward), then
 * runs two more elementwise passes. Here the forward's sigmoid serves both:
 *   a = silu(g) u,   da/dg = u s (1 + g (1 - s)),   da/du = silu(g) = g s,   s = 1 / (1 + exp(-g))
 * written over g and u (dead after the forward once these are known), so the backward is two
 * multiplies (nn/mlp.py).
 */
#include <math.h>

#define SWIGLU_CHUNK 4096

/* a = silu(g) * u; g <- da/dg, u <- da/du; n floats */
void llmkit_swiglu_with_grad(float *g, float *u, float *a, long n) {
    long chunks = (n + SWIGLU_CHUNK - 1) / SWIGLU_CHUNK;
#pragma omp parallel for schedule(static)
    for (long ch = 0; ch < chunks; ch++) {
        long i = ch * SWIGLU_CHUNK, end = i + SWIGLU_CHUNK < n ? i + SWIGLU_CHUNK : n;
#if defined(__AVX2__) && defined(__FMA__)
        const __m256 one = _mm256_set1_ps(1.0f);
        for (; i + 8 <= end; i += 8) {
            __m256 x = _mm256_loadu_ps(g + i), up = _mm256_loadu_ps(u + i);
            __m256 s = _mm256_div_ps(one, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), x))));
            /* exp8 clamps its input: below -87.3 the sigmoid is 0 (NaN and -inf then give NaN, as libm) */
            s = _mm256_and_ps(s, _mm256_cmp_ps(x, _mm256_set1_ps(-87.3f), _CMP_NLT_UQ));
            __m256 silu = _mm256_mul_ps(x, s);
            _mm256_storeu_ps(a + i, _mm256_mul_ps(silu, up));
            __m256 dsilu = _mm256_mul_ps(s, _mm256_fmadd_ps(x, _mm256_sub_ps(one, s), one));
            _mm256_storeu_ps(g + i, _mm256_mul_ps(up, dsilu));
            _mm256_storeu_ps(u + i, silu);
        }
#endif
        for (; i < end; i++) {
            float x = g[i], up = u[i], s = 1.0f / (1.0f + expf(-x)), silu = x * s;
            a[i] = silu * up;
            g[i] = up * s * (1.0f + x * (1.0f - s));
            u[i] = silu;
        }
    }
}
