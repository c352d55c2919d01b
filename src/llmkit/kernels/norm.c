/* LayerNorm and RMSNorm for training: a forward that keeps each row's statistics, and the backward.
 *
 * PyTorch's layer_norm forward and backward cost ~180 us per call pair at nanoGPT's CPU shape (768
 * rows of 128), ~1.6 ms of a 35 ms step over nine norms; the arithmetic is a few microseconds.
 * Here a row is one small loop nest, rows are split over threads, and the weight and bias
 * gradients are reduced from per-thread partials in a fixed order (deterministic for a thread
 * count). `center` selects LayerNorm (subtract the mean, bias allowed) over RMSNorm.
 *
 *   xhat = (x - mean) * rstd,  rstd = 1 / sqrt(var + eps)     (RMSNorm: mean = 0, var = mean(x^2))
 *   y = xhat * w + b
 *   dx = rstd * (g - mean(g) - xhat * mean(g * xhat)),  g = dy * w   (RMSNorm: no mean(g) term)
 *   dw = sum over rows of dy * xhat,  db = sum over rows of dy
 */
#include <math.h>
#include <stdlib.h>
#include "threads.h"

/* Row sums for the statistics. The AVX2 paths keep four independent accumulators: one would wait
 * on the add latency every 8 floats (measured: 2x slower at d = 128). */
static float row_sum(const float *x, long d) {
    long i = 0;
    float s = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; i + 32 <= d; i += 32) {
        a0 = _mm256_add_ps(a0, _mm256_loadu_ps(x + i));
        a1 = _mm256_add_ps(a1, _mm256_loadu_ps(x + i + 8));
        a2 = _mm256_add_ps(a2, _mm256_loadu_ps(x + i + 16));
        a3 = _mm256_add_ps(a3, _mm256_loadu_ps(x + i + 24));
    }
    for (; i + 8 <= d; i += 8) a0 = _mm256_add_ps(a0, _mm256_loadu_ps(x + i));
    s = hadd8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#endif
    for (; i < d; i++) s += x[i];
    return s;
}

static float row_centered_squares(const float *x, float mu, long d) {
    long i = 0;
    float s = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
    const __m256 m = _mm256_set1_ps(mu);
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; i + 32 <= d; i += 32) {
        __m256 c0 = _mm256_sub_ps(_mm256_loadu_ps(x + i), m), c1 = _mm256_sub_ps(_mm256_loadu_ps(x + i + 8), m);
        __m256 c2 = _mm256_sub_ps(_mm256_loadu_ps(x + i + 16), m), c3 = _mm256_sub_ps(_mm256_loadu_ps(x + i + 24), m);
        a0 = _mm256_fmadd_ps(c0, c0, a0);
        a1 = _mm256_fmadd_ps(c1, c1, a1);
        a2 = _mm256_fmadd_ps(c2, c2, a2);
        a3 = _mm256_fmadd_ps(c3, c3, a3);
    }
    for (; i + 8 <= d; i += 8) {
        __m256 c = _mm256_sub_ps(_mm256_loadu_ps(x + i), m);
        a0 = _mm256_fmadd_ps(c, c, a0);
    }
    s = hadd8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
#endif
    for (; i < d; i++) s += (x[i] - mu) * (x[i] - mu);
    return s;
}

/* y = norm(x) * w (+ b); mean (LayerNorm only) and rstd per row are kept for the backward */
void llmkit_norm_fwd(const float *x, const float *w, const float *b, float *y, float *mean, float *rstd,
                     long rows, long d, float eps, int center) {
#pragma omp parallel
    {
        long lo, hi;
        thread_share(rows, &lo, &hi);
        for (long r = lo; r < hi; r++) {
            const float *xr = x + r * d;
            float *yr = y + r * d;
            float mu = center ? row_sum(xr, d) / (float)d : 0.0f;
            float rs = 1.0f / sqrtf(row_centered_squares(xr, mu, d) / (float)d + eps);
            if (center) mean[r] = mu;
            rstd[r] = rs;
            long i = 0;
#if defined(__AVX2__) && defined(__FMA__)
            const __m256 m = _mm256_set1_ps(mu), r = _mm256_set1_ps(rs);
            for (; i + 8 <= d; i += 8) {
                __m256 xh = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(xr + i), m), r);
                __m256 bias = b ? _mm256_loadu_ps(b + i) : _mm256_setzero_ps();
                _mm256_storeu_ps(yr + i, _mm256_fmadd_ps(xh, _mm256_loadu_ps(w + i), bias));
            }
#endif
            for (; i < d; i++) yr[i] = (xr[i] - mu) * rs * w[i] + (b ? b[i] : 0.0f);
        }
    }
}

/* sum(g) and sum(g * xhat) over a row, g = dy * w, xhat = (x - mu) * rs */
static void row_grad_sums(const float *x, const float *dy, const float *w, float mu, float rs, long d,
                          float *sg, float *sgx) {
    long i = 0;
    float a = 0.0f, c = 0.0f;
#if defined(__AVX2__) && defined(__FMA__)
    const __m256 m = _mm256_set1_ps(mu), r = _mm256_set1_ps(rs);
    __m256 g0 = _mm256_setzero_ps(), g1 = g0, x0 = g0, x1 = g0;
    for (; i + 16 <= d; i += 16) {
        __m256 ga = _mm256_mul_ps(_mm256_loadu_ps(dy + i), _mm256_loadu_ps(w + i));
        __m256 gb = _mm256_mul_ps(_mm256_loadu_ps(dy + i + 8), _mm256_loadu_ps(w + i + 8));
        g0 = _mm256_add_ps(g0, ga);
        g1 = _mm256_add_ps(g1, gb);
        x0 = _mm256_fmadd_ps(ga, _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), m), r), x0);
        x1 = _mm256_fmadd_ps(gb, _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i + 8), m), r), x1);
    }
    for (; i + 8 <= d; i += 8) {
        __m256 ga = _mm256_mul_ps(_mm256_loadu_ps(dy + i), _mm256_loadu_ps(w + i));
        g0 = _mm256_add_ps(g0, ga);
        x0 = _mm256_fmadd_ps(ga, _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), m), r), x0);
    }
    a = hadd8(_mm256_add_ps(g0, g1));
    c = hadd8(_mm256_add_ps(x0, x1));
#endif
    for (; i < d; i++) {
        float g = dy[i] * w[i];
        a += g;
        c += g * ((x[i] - mu) * rs);
    }
    *sg = a;
    *sgx = c;
}

/* dx = rs * (g - sg - xhat * sgx) for one row (dx NULL: skipped), and into acc (NULL: skipped)
 * its dw and db terms, dy * xhat and dy */
static void row_grads(const float *x, const float *dy, const float *w, float mu, float rs, float sg, float sgx,
                      long d, float *dx, float *acc) {
    long i = 0;
#if defined(__AVX2__) && defined(__FMA__)
    const __m256 m = _mm256_set1_ps(mu), r = _mm256_set1_ps(rs), vsg = _mm256_set1_ps(sg), vsgx = _mm256_set1_ps(sgx);
    for (; i + 8 <= d; i += 8) {
        __m256 g = _mm256_loadu_ps(dy + i), xh = _mm256_mul_ps(_mm256_sub_ps(_mm256_loadu_ps(x + i), m), r);
        if (dx) {
            __m256 t = _mm256_fnmadd_ps(xh, vsgx, _mm256_sub_ps(_mm256_mul_ps(g, _mm256_loadu_ps(w + i)), vsg));
            _mm256_storeu_ps(dx + i, _mm256_mul_ps(r, t));
        }
        if (acc) {
            _mm256_storeu_ps(acc + i, _mm256_fmadd_ps(g, xh, _mm256_loadu_ps(acc + i)));
            _mm256_storeu_ps(acc + d + i, _mm256_add_ps(g, _mm256_loadu_ps(acc + d + i)));
        }
    }
#endif
    for (; i < d; i++) {
        float xh = (x[i] - mu) * rs;
        if (dx) dx[i] = rs * (dy[i] * w[i] - sg - xh * sgx);
        if (acc) {
            acc[i] += dy[i] * xh;
            acc[d + i] += dy[i];
        }
    }
}

/* dx (NULL: not needed), dw and db (NULL: not needed) from dy and the forward's statistics.
 * Returns 0, or -1 where the partials could not be allocated (nothing written then). */
long llmkit_norm_bwd(const float *x, const float *w, const float *mean, const float *rstd, const float *dy,
                     float *dx, float *dw, float *db, long rows, long d, int center) {
#ifdef _OPENMP
    long max_threads = omp_get_max_threads();
#else
    long max_threads = 1;
#endif
    /* per thread: double totals for dw and db, and float sums over at most 64 rows */
    double *partial = NULL;
    float *sums = NULL;
    if (dw || db) {
        partial = calloc((size_t)(max_threads * 2 * d), sizeof(double));
        sums = malloc((size_t)(max_threads * 2 * d) * sizeof(float));
        if (!partial || !sums) {
            free(partial);
            free(sums);
            return -1;
        }
    }
#pragma omp parallel
    {
        long lo, hi;
        thread_share(rows, &lo, &hi);
#ifdef _OPENMP
        long me = omp_get_thread_num();
#else
        long me = 0;
#endif
        double *mine = partial ? partial + me * 2 * d : NULL;
        float *acc = sums ? sums + me * 2 * d : NULL;
        for (long start = lo; start < hi; start += 64) {
            long stop = start + 64 < hi ? start + 64 : hi;
            if (acc)
                for (long i = 0; i < 2 * d; i++) acc[i] = 0.0f;
            for (long r = start; r < stop; r++) {
                const float *xr = x + r * d, *gr = dy + r * d;
                float mu = center ? mean[r] : 0.0f, rs = rstd[r], sg, sgx;
                row_grad_sums(xr, gr, w, mu, rs, d, &sg, &sgx);
                sg = center ? sg / (float)d : 0.0f;
                sgx /= (float)d;
                row_grads(xr, gr, w, mu, rs, sg, sgx, d, dx ? dx + r * d : NULL, acc);
            }
            if (acc)
                for (long i = 0; i < 2 * d; i++) mine[i] += acc[i];
        }
    }
    if (partial) {
        for (long i = 0; i < d; i++) {
            double sw = 0.0, sb = 0.0;
            for (long t = 0; t < max_threads; t++) { /* unused threads' rows are zero */
                sw += partial[t * 2 * d + i];
                sb += partial[t * 2 * d + d + i];
            }
            if (dw) dw[i] = (float)sw;
            if (db) db[i] = (float)sb;
        }
        free(partial);
        free(sums);
    }
    return 0;
}
