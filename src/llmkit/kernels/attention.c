/* Causal self-attention for training on CPU: forward and backward for short sequences.
 *
 * At training shapes like nanoGPT's CPU "baby GPT" (batch 12, 4 heads, 64 tokens, head dim 32)
 * each (sequence, head) is a 64 x 64 problem that fits in L1. PyTorch's CPU flash attention cuts it
 * into blocks and calls a BLAS routine per block, so calls and the online-softmax bookkeeping
 * dominate (~1.2 ms forward + backward per layer here, against ~0.4 ms of arithmetic). This kernel
 * does one (sequence, head) per task with register-tiled products on the whole T x T matrix:
 *   forward  S = scale q k^T (lower triangle only), P = softmax(S) kept for the backward, y = P v;
 *   backward dP = dy v^T, dS = P * (dP - rowsum(P * dP)), dq = scale dS k, dk = scale dS^T q,
 *            dv = P^T dy; query heads of one key/value head run in one task, summing dk and dv.
 * Keeping P costs T^2 floats per (sequence, head), which is why the Python side takes this path
 * only for short sequences and PyTorch's flash attention (which keeps log-sum-exp only) otherwise.
 *
 * Threads: OpenMP, built against the runtime torch has already loaded (build.py imports torch
 * first, and a library's name resolves to the loaded copy), so these loops run on the very threads
 * PyTorch's own kernels use, with no second pool contending for the cores between operations.
 *
 * Layout: q [B, T, H, d], k and v [B, T, KV, d] with any batch/time/head strides (d contiguous),
 * so q, k, v can be views into the fused QKV projection's output; y and the gradients likewise.
 */
#include <stdlib.h>
#include <string.h>
#include <math.h>

typedef struct {
    const float *q, *k, *v;
    long q_s[3], k_s[3], v_s[3]; /* batch, time, head strides in floats */
    float *y;
    long y_s[3];
    float *P; /* [B, H, T, Tp] softmax probabilities, zero above the diagonal */
    const float *dy;
    long dy_s[3];
    float *dq, *dk, *dv;
    long dq_s[3], dk_s[3], dv_s[3];
    long B, T, H, KV, d, Tp; /* Tp: T rounded up to a multiple of 16 (P's row stride) */
    float scale;
} llmkit_attn;

#define ROW(base, s, b, t, h) ((base) + (b) * (s)[0] + (t) * (s)[1] + (h) * (s)[2])

/* one growing scratch buffer per thread: no allocation per task once warm */
static float *attn_scratch(long floats) {
    static __thread float *buf = NULL;
    static __thread long cap = 0;
    if (floats > cap) {
        free(buf);
        buf = aligned_alloc(64, (size_t)((floats + 15) & ~15L) * sizeof(float));
        cap = buf ? floats : 0;
    }
    return buf;
}

/* out[c * Tp + t] = rows[t][c] for t < T, zero for T <= t < Tp: keys or values, transposed so
 * the score products below read 16 consecutive keys as two vectors */
static void transpose_rows(const float *base, long stride, long T, long Tp, long d, float *out) {
    long t = 0;
#if defined(__AVX2__) && defined(__FMA__)
    for (; t + 8 <= T; t += 8) /* 8 x 8 blocks through registers: column-wise stores would each miss */
        for (long c = 0; c < d; c += 8) {
            __m256 r[8], u[8];
            for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_ps(base + (t + i) * stride + c);
            for (int i = 0; i < 8; i += 2) {
                u[i] = _mm256_unpacklo_ps(r[i], r[i + 1]);
                u[i + 1] = _mm256_unpackhi_ps(r[i], r[i + 1]);
            }
            for (int i = 0; i < 8; i += 4) {
                r[i] = _mm256_shuffle_ps(u[i], u[i + 2], 0x44);
                r[i + 1] = _mm256_shuffle_ps(u[i], u[i + 2], 0xEE);
                r[i + 2] = _mm256_shuffle_ps(u[i + 1], u[i + 3], 0x44);
                r[i + 3] = _mm256_shuffle_ps(u[i + 1], u[i + 3], 0xEE);
            }
            for (int i = 0; i < 4; i++) {
                _mm256_storeu_ps(out + (c + i) * Tp + t, _mm256_permute2f128_ps(r[i], r[i + 4], 0x20));
                _mm256_storeu_ps(out + (c + i + 4) * Tp + t, _mm256_permute2f128_ps(r[i], r[i + 4], 0x31));
            }
        }
#endif
    for (; t < T; t++)
        for (long c = 0; c < d; c++) out[c * Tp + t] = base[t * stride + c];
    for (long c = 0; c < d; c++)
        for (t = T; t < Tp; t++) out[c * Tp + t] = 0.0f;
}

/* C[r][j] = scale * sum_c A_r[c] * Bt[c][j] for 4 rows r (pointers; tail rows repeat the last real
 * one and are not stored) and columns j in [0, jend), jend a multiple of 16. */
static void rows_times_bt(const float *const A[4], int rows, const float *Bt, long Tp, long d, long jend,
                          float scale, float *C, long ldc) {
#if defined(__AVX2__) && defined(__FMA__)
    const __m256 s = _mm256_set1_ps(scale);
    for (long j = 0; j < jend; j += 16) {
        __m256 a00 = _mm256_setzero_ps(), a01 = a00, a10 = a00, a11 = a00, a20 = a00, a21 = a00, a30 = a00, a31 = a00;
        for (long c = 0; c < d; c++) {
            __m256 b0 = _mm256_loadu_ps(Bt + c * Tp + j), b1 = _mm256_loadu_ps(Bt + c * Tp + j + 8);
            __m256 x = _mm256_broadcast_ss(A[0] + c);
            a00 = _mm256_fmadd_ps(x, b0, a00); a01 = _mm256_fmadd_ps(x, b1, a01);
            x = _mm256_broadcast_ss(A[1] + c);
            a10 = _mm256_fmadd_ps(x, b0, a10); a11 = _mm256_fmadd_ps(x, b1, a11);
            x = _mm256_broadcast_ss(A[2] + c);
            a20 = _mm256_fmadd_ps(x, b0, a20); a21 = _mm256_fmadd_ps(x, b1, a21);
            x = _mm256_broadcast_ss(A[3] + c);
            a30 = _mm256_fmadd_ps(x, b0, a30); a31 = _mm256_fmadd_ps(x, b1, a31);
        }
        __m256 acc[8] = {a00, a01, a10, a11, a20, a21, a30, a31};
        for (int r = 0; r < rows; r++) {
            _mm256_storeu_ps(C + r * ldc + j, _mm256_mul_ps(acc[2 * r], s));
            _mm256_storeu_ps(C + r * ldc + j + 8, _mm256_mul_ps(acc[2 * r + 1], s));
        }
    }
#else
    for (int r = 0; r < rows; r++)
        for (long j = 0; j < jend; j++) {
            float acc = 0.0f;
            for (long c = 0; c < d; c++) acc += A[r][c] * Bt[c * Tp + j];
            C[r * ldc + j] = acc * scale;
        }
#endif
}

/* C_r[c] (+)= scale * sum_{k in [k0, k1)} A[r * ar + k * ak] * B[k * ldb + c] for 4 output rows
 * (pointers; rows >= `rows` are computed from valid memory and not stored), c in [0, d), d a
 * multiple of 8. ar/ak let A be read as P or as its transpose without copying it. */
static void mix_rows(const float *A, long ar, long ak, int rows, const float *B, long ldb, long k0, long k1,
                     long d, float scale, float *const C[4], int accumulate) {
#if defined(__AVX2__) && defined(__FMA__)
    const __m256 s = _mm256_set1_ps(scale);
    const float *a0 = A, *a1 = A + (rows > 1 ? ar : 0), *a2 = A + (rows > 2 ? 2 * ar : 0), *a3 = A + (rows > 3 ? 3 * ar : 0);
    long c = 0;
    for (; c + 16 <= d; c += 16) {
        __m256 c00 = _mm256_setzero_ps(), c01 = c00, c10 = c00, c11 = c00, c20 = c00, c21 = c00, c30 = c00, c31 = c00;
        for (long k = k0; k < k1; k++) {
            __m256 b0 = _mm256_loadu_ps(B + k * ldb + c), b1 = _mm256_loadu_ps(B + k * ldb + c + 8);
            __m256 x = _mm256_broadcast_ss(a0 + k * ak);
            c00 = _mm256_fmadd_ps(x, b0, c00); c01 = _mm256_fmadd_ps(x, b1, c01);
            x = _mm256_broadcast_ss(a1 + k * ak);
            c10 = _mm256_fmadd_ps(x, b0, c10); c11 = _mm256_fmadd_ps(x, b1, c11);
            x = _mm256_broadcast_ss(a2 + k * ak);
            c20 = _mm256_fmadd_ps(x, b0, c20); c21 = _mm256_fmadd_ps(x, b1, c21);
            x = _mm256_broadcast_ss(a3 + k * ak);
            c30 = _mm256_fmadd_ps(x, b0, c30); c31 = _mm256_fmadd_ps(x, b1, c31);
        }
        __m256 acc[8] = {c00, c01, c10, c11, c20, c21, c30, c31};
        for (int r = 0; r < rows; r++) {
            __m256 lo = _mm256_mul_ps(acc[2 * r], s), hi = _mm256_mul_ps(acc[2 * r + 1], s);
            if (accumulate) {
                lo = _mm256_add_ps(lo, _mm256_loadu_ps(C[r] + c));
                hi = _mm256_add_ps(hi, _mm256_loadu_ps(C[r] + c + 8));
            }
            _mm256_storeu_ps(C[r] + c, lo);
            _mm256_storeu_ps(C[r] + c + 8, hi);
        }
    }
    for (; c < d; c += 8) {
        __m256 c0 = _mm256_setzero_ps(), c1 = c0, c2 = c0, c3 = c0;
        for (long k = k0; k < k1; k++) {
            __m256 b0 = _mm256_loadu_ps(B + k * ldb + c);
            c0 = _mm256_fmadd_ps(_mm256_broadcast_ss(a0 + k * ak), b0, c0);
            c1 = _mm256_fmadd_ps(_mm256_broadcast_ss(a1 + k * ak), b0, c1);
            c2 = _mm256_fmadd_ps(_mm256_broadcast_ss(a2 + k * ak), b0, c2);
            c3 = _mm256_fmadd_ps(_mm256_broadcast_ss(a3 + k * ak), b0, c3);
        }
        __m256 acc[4] = {c0, c1, c2, c3};
        for (int r = 0; r < rows; r++) {
            __m256 v = _mm256_mul_ps(acc[r], s);
            if (accumulate) v = _mm256_add_ps(v, _mm256_loadu_ps(C[r] + c));
            _mm256_storeu_ps(C[r] + c, v);
        }
    }
#else
    for (int r = 0; r < rows; r++)
        for (long c = 0; c < d; c++) {
            float acc = 0.0f;
            for (long k = k0; k < k1; k++) acc += A[r * ar + k * ak] * B[k * ldb + c];
            C[r][c] = acc * scale + (accumulate ? C[r][c] : 0.0f);
        }
#endif
}

#if defined(__AVX2__) && defined(__FMA__)
static inline float hmax8(__m256 v) {
    __m128 m = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    m = _mm_max_ps(m, _mm_movehl_ps(m, m));
    m = _mm_max_ss(m, _mm_shuffle_ps(m, m, 1));
    return _mm_cvtss_f32(m);
}

static inline float hadd8(__m256 v) {
    float lanes[8];
    _mm256_storeu_ps(lanes, v);
    return ((lanes[0] + lanes[1]) + (lanes[2] + lanes[3])) + ((lanes[4] + lanes[5]) + (lanes[6] + lanes[7]));
}
#endif

/* Row i of S -> softmax over columns [0, i] in place, zero in (i, Tp). Columns up to i rounded up
 * to 8 hold finite scores (the products ran to a multiple of 16), so whole vectors are read and
 * the lanes past i masked: no scalar tail per row. */
static void softmax_causal_row(float *row, long i, long Tp) {
    long n = i + 1, j;
#if defined(__AVX2__) && defined(__FMA__)
    long full = n & ~7L;
    __m256 tail = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32((int)(n - full)),
                                                         _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)));
    const __m256 ninf = _mm256_set1_ps(-INFINITY);
    __m256 vm = ninf;
    for (j = 0; j < full; j += 8) vm = _mm256_max_ps(vm, _mm256_loadu_ps(row + j));
    if (full < n) vm = _mm256_max_ps(vm, _mm256_blendv_ps(ninf, _mm256_loadu_ps(row + full), tail));
    vm = _mm256_set1_ps(hmax8(vm));
    __m256 vs = _mm256_setzero_ps();
    for (j = 0; j < n; j += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + j), vm));
        if (j == full) e = _mm256_and_ps(e, tail);
        _mm256_storeu_ps(row + j, e);
        vs = _mm256_add_ps(vs, e);
    }
    __m256 vi = _mm256_set1_ps(1.0f / hadd8(vs));
    for (j = 0; j < n; j += 8) _mm256_storeu_ps(row + j, _mm256_mul_ps(_mm256_loadu_ps(row + j), vi));
    for (; j < Tp; j += 8) _mm256_storeu_ps(row + j, _mm256_setzero_ps());
#else
    float m = row[0], sum = 0.0f;
    for (j = 1; j < n; j++) m = row[j] > m ? row[j] : m;
    for (j = 0; j < n; j++) { row[j] = expf(row[j] - m); sum += row[j]; }
    for (j = 0; j < n; j++) row[j] /= sum;
    for (; j < Tp; j++) row[j] = 0.0f;
#endif
}

/* dS = P * (dP - sum_j P dP) in place over dP for row i; P is zero past i, so whole vectors to i
 * rounded up to 8 give exact zeros there, and the rest of the row is cleared */
static void softmax_grad_row(float *s, const float *p, long i, long Tp) {
    long n = i + 1, j;
#if defined(__AVX2__) && defined(__FMA__)
    __m256 acc = _mm256_setzero_ps();
    for (j = 0; j < n; j += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(p + j), _mm256_loadu_ps(s + j), acc);
    __m256 vd = _mm256_set1_ps(hadd8(acc));
    for (j = 0; j < n; j += 8)
        _mm256_storeu_ps(s + j, _mm256_mul_ps(_mm256_loadu_ps(p + j), _mm256_sub_ps(_mm256_loadu_ps(s + j), vd)));
    for (; j < Tp; j += 8) _mm256_storeu_ps(s + j, _mm256_setzero_ps());
#else
    float D = 0.0f;
    for (j = 0; j < n; j++) D += p[j] * s[j];
    for (j = 0; j < n; j++) s[j] = p[j] * (s[j] - D);
    for (; j < Tp; j++) s[j] = 0.0f;
#endif
}

/* pointers to rows i0..i0+3 of a [T, ...] view; rows past T repeat row T-1 (computed, never stored) */
static void four_rows(const float *base, long stride, long i0, long T, const float *out[4]) {
    for (int r = 0; r < 4; r++) out[r] = base + (i0 + r < T ? i0 + r : T - 1) * stride;
}

static void attn_forward_task(const llmkit_attn *a, long b, long h, float *scratch) {
    long T = a->T, Tp = a->Tp, d = a->d, g = h / (a->H / a->KV);
    float *Kt = scratch, *P = a->P + (b * a->H + h) * T * Tp;
    const float *q = ROW(a->q, a->q_s, b, 0, h), *k = ROW(a->k, a->k_s, b, 0, g), *v = ROW(a->v, a->v_s, b, 0, g);
    transpose_rows(k, a->k_s[1], T, Tp, d, Kt);
    for (long i0 = 0; i0 < T; i0 += 4) {
        int rows = T - i0 < 4 ? (int)(T - i0) : 4;
        const float *qr[4];
        four_rows(q, a->q_s[1], i0, T, qr);
        long jend = (i0 + rows + 15) & ~15L;
        rows_times_bt(qr, rows, Kt, Tp, d, jend, a->scale, P + i0 * Tp, Tp);
        for (int r = 0; r < rows; r++) softmax_causal_row(P + (i0 + r) * Tp, i0 + r, Tp);
        float *yr[4];
        for (int r = 0; r < 4; r++) yr[r] = ROW(a->y, a->y_s, b, i0 + (r < rows ? r : 0), h);
        mix_rows(P + i0 * Tp, Tp, 1, rows, v, a->v_s[1], 0, i0 + rows, d, 1.0f, yr, 0);
    }
}

static void attn_backward_task(const llmkit_attn *a, long b, long g, float *scratch) {
    long T = a->T, Tp = a->Tp, d = a->d, group = a->H / a->KV;
    float *Vt = scratch, *dS = Vt + d * Tp, *dK = dS + T * Tp, *dV = dK + T * d;
    const float *k = ROW(a->k, a->k_s, b, 0, g), *v = ROW(a->v, a->v_s, b, 0, g);
    transpose_rows(v, a->v_s[1], T, Tp, d, Vt);
    for (long h = g * group; h < (g + 1) * group; h++) {
        const float *P = a->P + (b * a->H + h) * T * Tp;
        const float *q = ROW(a->q, a->q_s, b, 0, h), *dy = ROW(a->dy, a->dy_s, b, 0, h);
        int acc = h > g * group;
        for (long i0 = 0; i0 < T; i0 += 4) {
            int rows = T - i0 < 4 ? (int)(T - i0) : 4;
            const float *dyr[4];
            four_rows(dy, a->dy_s[1], i0, T, dyr);
            long jend = (i0 + rows + 15) & ~15L;
            rows_times_bt(dyr, rows, Vt, Tp, d, jend, 1.0f, dS + i0 * Tp, Tp);
            for (int r = 0; r < rows; r++) softmax_grad_row(dS + (i0 + r) * Tp, P + (i0 + r) * Tp, i0 + r, Tp);
            float *dqr[4];
            for (int r = 0; r < 4; r++) dqr[r] = ROW(a->dq, a->dq_s, b, i0 + (r < rows ? r : 0), h);
            mix_rows(dS + i0 * Tp, Tp, 1, rows, k, a->k_s[1], 0, i0 + rows, d, a->scale, dqr, 0);
        }
        for (long j0 = 0; j0 < T; j0 += 4) { /* key rows j0..j0+3 gather every query i >= j0 */
            int rows = T - j0 < 4 ? (int)(T - j0) : 4;
            float *dkr[4], *dvr[4];
            for (int r = 0; r < 4; r++) { dkr[r] = dK + (j0 + r) * d; dvr[r] = dV + (j0 + r) * d; }
            mix_rows(dS + j0, 1, Tp, rows, q, a->q_s[1], j0, T, d, a->scale, dkr, acc);
            mix_rows(P + j0, 1, Tp, rows, dy, a->dy_s[1], j0, T, d, 1.0f, dvr, acc);
        }
    }
    for (long j = 0; j < T; j++) {
        memcpy(ROW(a->dk, a->dk_s, b, j, g), dK + j * d, d * sizeof(float));
        memcpy(ROW(a->dv, a->dv_s, b, j, g), dV + j * d, d * sizeof(float));
    }
}

long llmkit_attn_train_fwd(const llmkit_attn *a) {
    long tasks = a->B * a->H;
#pragma omp parallel for schedule(static)
    for (long t = 0; t < tasks; t++)
        attn_forward_task(a, t / a->H, t % a->H, attn_scratch(a->d * a->Tp));
    return 0;
}

long llmkit_attn_train_bwd(const llmkit_attn *a) {
    long tasks = a->B * a->KV;
#pragma omp parallel for schedule(static)
    for (long t = 0; t < tasks; t++)
        attn_backward_task(a, t / a->KV, t % a->KV, attn_scratch(a->d * a->Tp + a->T * a->Tp + 2 * a->T * a->d));
    return 0;
}

/* 1 when the loops above run on several threads (built with OpenMP), else 0 */
int llmkit_attn_parallel(void) {
#ifdef _OPENMP
    return 1;
#else
    return 0;
#endif
}
