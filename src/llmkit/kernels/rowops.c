/* Per-row operations of a decoding step on CPU: RMSNorm, rotary embeddings, and attention of one
 * query position over the KV cache.
 *
 * At batch 1 these act on a single row of a few hundred floats; PyTorch's composite rms_norm
 * (pow, mean, rsqrt, two muls, dtype round trips) and rotate-half RoPE (slices, neg, cat, muls)
 * spend ~30 and ~15 microseconds on dispatch for under a microsecond of arithmetic, per call, on
 * every layer, and scaled_dot_product_attention ~40 for one query. One C call each removes that.
 * Single-threaded: the rows are tiny.
 */
#include <math.h>
#include <stddef.h>

#include "dot.h"

/* y[r] = x[r] / sqrt(mean(x[r]^2) + eps) * w, rows of `dim` floats (fp32 math, like the reference) */
void llmkit_rms_norm(const float *x, const float *w, float *y, long rows, long dim, float eps) {
    for (long r = 0; r < rows; r++) {
        const float *xr = x + r * dim;
        float *yr = y + r * dim;
        float inv = 1.0f / sqrtf(llmkit_dot(xr, xr, dim) / (float)dim + eps);
        for (long k = 0; k < dim; k++) yr[k] = (xr[k] * inv) * w[k];
    }
}

/* Rotate-half RoPE: for each of `heads` rows of `dim` floats (pairs i, i + dim/2),
 * y = x * cos + rotate_half(x) * sin with rotate_half(x) = (-x2, x1); cos, sin hold `dim` floats. */
void llmkit_rope(const float *x, const float *cos_, const float *sin_, float *y, long heads, long dim) {
    long half = dim / 2;
    for (long h = 0; h < heads; h++) {
        const float *xh = x + h * dim;
        float *yh = y + h * dim;
        for (long i = 0; i < half; i++) {
            float a = xh[i], b = xh[i + half];
            yh[i] = a * cos_[i] - b * sin_[i];
            yh[i + half] = b * cos_[i + half] + a * sin_[i + half];
        }
    }
}

/* One query head over S cached positions: qh [d]; key/value of position s at kh/vh + s * d; oh [d];
 * `scores` is scratch of S floats. */
static void attend_head(const float *qh, const float *kh, const float *vh, float *oh, float *scores, long S, long d,
                        float scale) {
    float mx = -INFINITY;
    for (long s = 0; s < S; s++) {
        scores[s] = llmkit_dot(qh, kh + s * d, d) * scale;
        if (scores[s] > mx) mx = scores[s];
    }
    float total = 0.0f;
    for (long s = 0; s < S; s++) {
        scores[s] = expf(scores[s] - mx);
        total += scores[s];
    }
    for (long i = 0; i < d; i++) oh[i] = 0.0f;
    for (long s = 0; s < S; s++) {
        const float p = scores[s] / total, *vs = vh + s * d;
        for (long i = 0; i < d; i++) oh[i] += p * vs[i];
    }
}

/* Attention of one query position per head over S cached positions (grouped-query: query head h
 * reads key/value head h / (H / KV)). q [H, d] contiguous; k, v: head kv, position s at
 * k + kv * head_stride + s * d; out [H, d]. `scores` is caller-provided scratch of S floats. */
void llmkit_decode_attention(const float *q, const float *k, const float *v, float *out, float *scores,
                             long H, long KV, long S, long d, long head_stride, float scale) {
    long group = H / KV;
    for (long h = 0; h < H; h++)
        attend_head(q + h * d, k + (h / group) * head_stride, v + (h / group) * head_stride, out + h * d, scores, S,
                    d, scale);
}
