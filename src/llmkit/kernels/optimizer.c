/* The optimizer step over all of a model's tensors in one call: gradient-norm clipping and AdamW.
 *
 * PyTorch's fused CPU AdamW and clip_grad_norm_ are vectorised, but for a small model the step is
 * dominated by what surrounds the arithmetic: grouping tensors, per-tensor norms, a stack, a
 * per-tensor scale, bias corrections computed per tensor in Python (training/optim.py measures
 * it). Here each is one call that splits the concatenation of all tensors evenly over the threads,
 * so a 52-tensor model costs what one 800k-float tensor costs.
 *
 * AdamW (Loshchilov & Hutter, 2019), per element, with t the tensor's step after incrementing:
 *   p <- p (1 - lr wd)
 *   m <- m + (1 - b1) (g - m)            v <- b2 v + (1 - b2) g^2
 *   p <- p - lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps)
 */
#include <math.h>
#include "threads.h"

static long total_of(long count, const long *n) {
    long total = 0;
    for (long i = 0; i < count; i++) total += n[i];
    return total;
}

/* [*b, *e): the part of a tensor of `len` elements, starting at `base` in the concatenation, that
 * lies in [lo, hi); false where none does. */
static int overlap(long base, long len, long lo, long hi, long *b, long *e) {
    *b = lo > base ? lo - base : 0;
    *e = hi < base + len ? hi - base : len;
    return *b < *e;
}

static double sum_squares(const float *g, long b, long e) {
    double total = 0.0;
    long i = b;
#if defined(__AVX2__) && defined(__FMA__)
    for (; i + 32 <= e;) {  /* float partials over at most 1024 elements, then into the double */
        __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
        for (long stop = i + 1024 < e ? i + 1024 : e; i + 32 <= stop; i += 32) {
            __m256 x0 = _mm256_loadu_ps(g + i), x1 = _mm256_loadu_ps(g + i + 8);
            __m256 x2 = _mm256_loadu_ps(g + i + 16), x3 = _mm256_loadu_ps(g + i + 24);
            a0 = _mm256_fmadd_ps(x0, x0, a0); a1 = _mm256_fmadd_ps(x1, x1, a1);
            a2 = _mm256_fmadd_ps(x2, x2, a2); a3 = _mm256_fmadd_ps(x3, x3, a3);
        }
        __m256 s = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
        float lanes[8];
        _mm256_storeu_ps(lanes, s);
        for (int l = 0; l < 8; l++) total += lanes[l];
    }
#endif
    for (; i < e; i++) total += (double)g[i] * g[i];
    return total;
}

/* The L2 norm of all gradients together; where it exceeds max_norm, every gradient is scaled by
 * max_norm / (norm + 1e-6) (as torch.nn.utils.clip_grad_norm_). A non-finite norm scales by the
 * same formula, so NaN propagates as it does there. Returns the norm before clipping. */
double llmkit_clip_grad_norm(long count, float **g, const long *n, double max_norm) {
    long total = total_of(count, n);
    double squares = 0.0;
#pragma omp parallel reduction(+ : squares)
    {
        long lo, hi, b, e;
        thread_share(total, &lo, &hi);
        for (long i = 0, base = 0; i < count && base < hi; base += n[i], i++)
            if (overlap(base, n[i], lo, hi, &b, &e)) squares += sum_squares(g[i], b, e);
    }
    double norm = sqrt(squares), coef = max_norm / (norm + 1e-6);
    if (!(coef >= 1.0)) {
        float c = (float)coef;
#pragma omp parallel
        {
            long lo, hi, b, e;
            thread_share(total, &lo, &hi);
            for (long i = 0, base = 0; i < count && base < hi; base += n[i], i++)
                if (overlap(base, n[i], lo, hi, &b, &e))
                    for (float *x = g[i]; b < e; b++) x[b] *= c;
        }
    }
    return norm;
}

typedef struct {
    float decay, lerp, beta2, one_minus_beta2, step_size, inv_bc2_sqrt, eps;
} adamw_scalars;

static adamw_scalars scalars_for(float step, double lr, double beta1, double beta2, double eps, double wd) {
    double bc1 = 1.0 - pow(beta1, step), bc2 = 1.0 - pow(beta2, step);
    adamw_scalars s = {(float)(1.0 - lr * wd), (float)(1.0 - beta1), (float)beta2, (float)(1.0 - beta2),
                       (float)(lr / bc1), (float)(1.0 / sqrt(bc2)), (float)eps};
    return s;
}

static void adamw_segment(float *p, const float *g, float *m, float *v, long b, long e, adamw_scalars s) {
    long i = b;
#if defined(__AVX2__) && defined(__FMA__)
    const __m256 decay = _mm256_set1_ps(s.decay), lerp = _mm256_set1_ps(s.lerp), beta2 = _mm256_set1_ps(s.beta2);
    const __m256 omb2 = _mm256_set1_ps(s.one_minus_beta2), step = _mm256_set1_ps(s.step_size);
    const __m256 ibc2 = _mm256_set1_ps(s.inv_bc2_sqrt), eps = _mm256_set1_ps(s.eps);
    for (; i + 8 <= e; i += 8) {
        __m256 gi = _mm256_loadu_ps(g + i), mi = _mm256_loadu_ps(m + i), vi = _mm256_loadu_ps(v + i);
        mi = _mm256_fmadd_ps(lerp, _mm256_sub_ps(gi, mi), mi);
        vi = _mm256_fmadd_ps(omb2, _mm256_mul_ps(gi, gi), _mm256_mul_ps(beta2, vi));
        __m256 denom = _mm256_fmadd_ps(_mm256_sqrt_ps(vi), ibc2, eps);
        __m256 pi = _mm256_mul_ps(_mm256_loadu_ps(p + i), decay);
        pi = _mm256_fnmadd_ps(step, _mm256_div_ps(mi, denom), pi);
        _mm256_storeu_ps(m + i, mi);
        _mm256_storeu_ps(v + i, vi);
        _mm256_storeu_ps(p + i, pi);
    }
#endif
    for (; i < e; i++) {
        float gi = g[i], mi = m[i] + s.lerp * (g[i] - m[i]);
        float vi = s.beta2 * v[i] + s.one_minus_beta2 * (gi * gi);
        float denom = sqrtf(vi) * s.inv_bc2_sqrt + s.eps;
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] * s.decay - s.step_size * (mi / denom);
    }
}

/* One AdamW step for `count` tensors sharing lr, betas, eps and weight decay (one param group).
 * steps[i] points at tensor i's step count (a float, as PyTorch keeps it), incremented here. */
void llmkit_adamw(long count, float **p, float **g, float **m, float **v, float **steps, const long *n,
                  double lr, double beta1, double beta2, double eps, double weight_decay) {
    long total = total_of(count, n);
    for (long i = 0; i < count; i++) *steps[i] += 1.0f;
#pragma omp parallel
    {
        long lo, hi, b, e;
        thread_share(total, &lo, &hi);
        for (long i = 0, base = 0; i < count && base < hi; base += n[i], i++)
            if (overlap(base, n[i], lo, hi, &b, &e))
                adamw_segment(p[i], g[i], m[i], v[i], b, e,
                              scalars_for(*steps[i], lr, beta1, beta2, eps, weight_decay));
    }
}
