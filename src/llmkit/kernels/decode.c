/* One batch-1 decoding step through every layer of a pre-norm decoder, in one call.
 *
 * Per token a decoder layer is ~15 small operations (norms, projections, rotary, cache write,
 * attention, activation, residual adds). Dispatched one by one from Python each costs 5-20
 * microseconds on a single row, and the Python between them runs from L3 because every projection
 * streams megabytes of weights through L2: together a third of SmolLM-135M's time per token on two
 * cores (benchmarks/decode_speed.py). Here the whole stack of layers runs in C, so a token costs the
 * weight reads (the parallel matrix-vector kernel of gemv.c) plus microseconds.
 *
 * What it covers is what `llmkit.config.ModelConfig` describes: LayerNorm (with or without bias)
 * or RMSNorm; fused QKV with optional biases; grouped-query attention over the static KV cache with
 * an optional sliding window; rotate-half RoPE with cos/sin given for the position; GELU (exact or
 * tanh) or SwiGLU MLP. The Python side (llmkit.accel.decode_step) builds the table of pointers and
 * declines anything else, which then runs through PyTorch.
 */
#include <math.h>
#include <string.h>

/* built as part of native.c, after gemv.c (parallel_for, llmkit_gemv) and rowops.c */

enum { NORM_LAYER = 0, NORM_RMS = 1 };
enum { MLP_GELU = 0, MLP_GELU_TANH = 1, MLP_SWIGLU = 2 };

typedef struct {
    const float *norm1_w, *norm1_b, *qkv_w, *qkv_b, *proj_w, *proj_b;
    const float *norm2_w, *norm2_b, *up_w, *up_b, *gate_w, *gate_b, *down_w, *down_b;
    float *k_cache, *v_cache; /* this layer's batch row: [n_kv_heads, max_len, head_dim] */
} llmkit_layer;

typedef struct {
    long n_layers, d_model, n_heads, n_kv_heads, head_dim, d_ff, max_len, window; /* window 0: none */
    long norm, mlp, vocab;
    float eps;
    const llmkit_layer *layers;
    const float *tok_emb, *norm_w, *norm_b, *head_w, *head_b; /* [vocab, D]; final norm; LM head [vocab, D] */
    float *scratch; /* llmkit_decode_scratch(...) floats */
} llmkit_decoder;

/* scratch layout, in floats: h [D], qkv, att [H * d], scores [H * max_len], f1 [F], f2 [F], y [D], x [D] */
long llmkit_decode_scratch(const llmkit_decoder *m) {
    long qkv = (m->n_heads + 2 * m->n_kv_heads) * m->head_dim;
    return 3 * m->d_model + qkv + m->n_heads * m->head_dim + m->n_heads * m->max_len + 2 * m->d_ff;
}

static void layer_norm(const float *x, const float *w, const float *b, float *y, long d, float eps) {
    float mean = 0.0f, var = 0.0f;
    for (long i = 0; i < d; i++) mean += x[i];
    mean /= (float)d;
    for (long i = 0; i < d; i++) var += (x[i] - mean) * (x[i] - mean);
    float inv = 1.0f / sqrtf(var / (float)d + eps);
    for (long i = 0; i < d; i++) y[i] = (x[i] - mean) * inv * w[i] + (b ? b[i] : 0.0f);
}

static void norm(const llmkit_decoder *m, const float *x, const float *w, const float *b, float *y) {
    if (m->norm == NORM_RMS) llmkit_rms_norm(x, w, y, 1, m->d_model, m->eps);
    else layer_norm(x, w, b, y, m->d_model, m->eps);
}

static void linear(const float *W, const float *b, const float *x, float *y, long N, long K, int threads) {
    llmkit_gemv(W, x, b, y, 1, N, K, threads);
}

/* The small steps between matrix-vector products run on the pool too: single-threaded, attention
 * over the cache and the MLP activation (tanhf / erff / expf per element) took ~10% of a GPT-2 step,
 * with the other core idle and the memory bus unused. */
typedef struct {
    const llmkit_decoder *m;
    const float *q, *k, *v;
    float *out, *scores, *h;
    const float *up;
    long S, group;
    float scale;
} step_t;

static void attend_heads(const job_t *job, long h0, long h1) {
    const step_t *t = job->ctx;
    const long d = t->m->head_dim, stride = t->m->max_len * d;
    for (long h = h0; h < h1; h++) {
        const long g = h / t->group;
        attend_head(t->q + h * d, t->k + g * stride, t->v + g * stride, t->out + h * d, t->scores + h * t->m->max_len,
                    t->S, d, t->scale);
    }
}

#if defined(__AVX2__) && defined(__FMA__)
/* exp(x) for 8 floats: x = n ln2 + r with |r| <= ln2/2 (Cody-Waite), exp(r) by Cephes' expf
 * polynomial, 2^n through the exponent bits; x clamped so that n stays in [-126, 127]. */
static inline __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.3f)), _mm256_set1_ps(88.3f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                               _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500e-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073e-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894e-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459e-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201e-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

/* tanh-form GELU and SiLU-times-up of 8 floats; tanh u = 1 - 2 / (exp(2u) + 1) keeps both limits exact */
static inline __m256 gelu_tanh8(__m256 x) {
    const __m256 one = _mm256_set1_ps(1.0f);
    __m256 u = _mm256_mul_ps(_mm256_set1_ps(0.79788456080286536f),
                             _mm256_fmadd_ps(_mm256_mul_ps(_mm256_set1_ps(0.044715f), _mm256_mul_ps(x, x)), x, x));
    __m256 th = _mm256_sub_ps(one, _mm256_div_ps(_mm256_set1_ps(2.0f), _mm256_add_ps(exp8(_mm256_add_ps(u, u)), one)));
    return _mm256_mul_ps(_mm256_mul_ps(_mm256_set1_ps(0.5f), x), _mm256_add_ps(one, th));
}

static inline __m256 silu_mul8(__m256 g, __m256 up) {
    __m256 e = exp8(_mm256_sub_ps(_mm256_setzero_ps(), g));
    __m256 s = _mm256_div_ps(_mm256_set1_ps(1.0f), _mm256_add_ps(_mm256_set1_ps(1.0f), e));
    s = _mm256_and_ps(s, _mm256_cmp_ps(g, _mm256_set1_ps(-87.3f), _CMP_NLT_UQ)); /* exp8 clamps: sigmoid 0 below */
    return _mm256_mul_ps(_mm256_mul_ps(g, s), up);
}
#endif

static void activate(const job_t *job, long i0, long i1) {
    const step_t *t = job->ctx;
    float *h = t->h;
    long i = i0;
    switch (t->m->mlp) {
    case MLP_GELU: /* libm's erff: the exact form, as PyTorch's default */
        for (; i < i1; i++) h[i] = 0.5f * h[i] * (1.0f + erff(h[i] * 0.70710678118654752f));
        break;
    case MLP_GELU_TANH:
#if defined(__AVX2__) && defined(__FMA__)
        for (; i + 8 <= i1; i += 8) _mm256_storeu_ps(h + i, gelu_tanh8(_mm256_loadu_ps(h + i)));
#endif
        for (; i < i1; i++) {
            float x = h[i];
            h[i] = 0.5f * x * (1.0f + tanhf(0.79788456080286536f * (x + 0.044715f * x * x * x)));
        }
        break;
    default: /* SwiGLU: silu(gate) * up */
#if defined(__AVX2__) && defined(__FMA__)
        for (; i + 8 <= i1; i += 8)
            _mm256_storeu_ps(h + i, silu_mul8(_mm256_loadu_ps(h + i), _mm256_loadu_ps(t->up + i)));
#endif
        for (; i < i1; i++) h[i] = h[i] / (1.0f + expf(-h[i])) * t->up[i];
    }
}

/* x [d_model] through every layer, for position `pos`: writes each layer's key and value at `pos`
 * and attends over positions 0..pos (the last `window` of them when windowed). cos, sin [head_dim]
 * rotate q and k when given (RoPE). */
static void layers(const llmkit_decoder *m, float *x, const float *cos_, const float *sin_, long pos, int threads) {
    const long D = m->d_model, H = m->n_heads, KV = m->n_kv_heads, d = m->head_dim, F = m->d_ff;
    float *h = m->scratch, *qkv = h + D, *att = qkv + (H + 2 * KV) * d, *scores = att + H * d;
    float *f1 = scores + H * m->max_len, *f2 = f1 + F, *y = f2 + F;
    const long S = pos + 1, first = (m->window > 0 && S > m->window) ? S - m->window : 0;
    const long head_stride = m->max_len * d;
    const float scale = 1.0f / sqrtf((float)d);
    for (long l = 0; l < m->n_layers; l++) {
        const llmkit_layer *L = &m->layers[l];
        norm(m, x, L->norm1_w, L->norm1_b, h);
        linear(L->qkv_w, L->qkv_b, h, qkv, (H + 2 * KV) * d, D, threads);
        float *q = qkv, *k = qkv + H * d, *v = k + KV * d;
        if (cos_) {
            llmkit_rope(q, cos_, sin_, q, H, d);
            llmkit_rope(k, cos_, sin_, k, KV, d);
        }
        for (long g = 0; g < KV; g++) {
            memcpy(L->k_cache + g * head_stride + pos * d, k + g * d, d * sizeof(float));
            memcpy(L->v_cache + g * head_stride + pos * d, v + g * d, d * sizeof(float));
        }
        step_t t = {m, q, L->k_cache + first * d, L->v_cache + first * d, att, scores, f1, f2, S - first, H / KV, scale};
        parallel_for(attend_heads, &t, H, 1, threads);
        linear(L->proj_w, L->proj_b, att, y, D, H * d, threads);
        for (long i = 0; i < D; i++) x[i] += y[i];
        norm(m, x, L->norm2_w, L->norm2_b, h);
        if (m->mlp == MLP_SWIGLU) {
            linear(L->gate_w, L->gate_b, h, f1, F, D, threads);
            linear(L->up_w, L->up_b, h, f2, F, D, threads);
        } else {
            linear(L->up_w, L->up_b, h, f1, F, D, threads);
        }
        parallel_for(activate, &t, F, 512, threads);
        linear(L->down_w, L->down_b, f1, y, D, F, threads);
        for (long i = 0; i < D; i++) x[i] += y[i];
    }
}

/* The whole model for one token of one sequence: embedding row of `token` (+ `pos_row`, an additive
 * position embedding, when given), every layer (see `layers`), final norm, LM head into logits
 * [vocab]. Returns 0; 1 for a position outside the cache, 2 for a token outside the vocabulary. */
int llmkit_decode_token(const llmkit_decoder *m, long token, long pos, const float *pos_row, const float *cos_,
                        const float *sin_, float *logits, int threads) {
    const long D = m->d_model;
    if (pos < 0 || pos >= m->max_len) return 1;
    if (token < 0 || token >= m->vocab) return 2;
    float *x = m->scratch + llmkit_decode_scratch(m) - D, *h = m->scratch;
    memcpy(x, m->tok_emb + token * D, D * sizeof(float));
    if (pos_row)
        for (long i = 0; i < D; i++) x[i] += pos_row[i];
    layers(m, x, cos_, sin_, pos, threads);
    norm(m, x, m->norm_w, m->norm_b, h);
    linear(m->head_w, m->head_b, h, logits, m->vocab, D, threads);
    return 0;
}
