/* Matrix-vector products for batch-1 decoding on CPU.
 *
 * At batch 1 a linear layer reads its whole weight to produce one output row, so its speed is the
 * memory bandwidth the kernel reaches. MKL's sgemv streams at about one core's bandwidth on the
 * machines we measured; splitting the rows over every core and reading each row once with
 * independent accumulators reaches the bandwidth of all cores (benchmarks/decode_speed.py).
 *
 * y[m, n] = sum_k x[m, k] * W[n, k] (+ b[n]) with W row-major [N, K] (nn.Linear's layout) and a few
 * rows m (one per sequence in a batch, or a handful of draft tokens): each weight row is read once
 * and applied to every x row while it is in cache.
 *
 * Threads: a small pthread pool rather than OpenMP. Rows are cut into chunks of about 64 KB of
 * weights that threads claim from a shared counter; the calling thread claims too and waits only
 * for chunks another thread has claimed. A worker that is not running (its core busy with another
 * process) claims nothing and costs nothing, where an OpenMP barrier would stall the call for a
 * scheduler time slice (measured: 1 token/s instead of 25 with one core busy elsewhere).
 */
#include <pthread.h>
#include <stdatomic.h>
#include <stddef.h>
#include <time.h>
#include <unistd.h>

#include "dot.h"
#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

#define MAX_ROWS 8

#if defined(__AVX2__) && defined(__FMA__)
static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* dot products of 4 weight rows with one x row */
static inline void dot4(const float *w, long K, const float *x, float *out) {
    const float *w0 = w, *w1 = w + K, *w2 = w + 2 * K, *w3 = w + 3 * K;
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, b0 = a0, b1 = a0, b2 = a0, b3 = a0;
    long k = 0;
    for (; k + 16 <= K; k += 16) {
        __m256 xv = _mm256_loadu_ps(x + k), xu = _mm256_loadu_ps(x + k + 8);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + k), xv, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + k), xv, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + k), xv, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + k), xv, a3);
        b0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + k + 8), xu, b0);
        b1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + k + 8), xu, b1);
        b2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + k + 8), xu, b2);
        b3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + k + 8), xu, b3);
    }
    for (; k + 8 <= K; k += 8) {
        __m256 xv = _mm256_loadu_ps(x + k);
        a0 = _mm256_fmadd_ps(_mm256_loadu_ps(w0 + k), xv, a0);
        a1 = _mm256_fmadd_ps(_mm256_loadu_ps(w1 + k), xv, a1);
        a2 = _mm256_fmadd_ps(_mm256_loadu_ps(w2 + k), xv, a2);
        a3 = _mm256_fmadd_ps(_mm256_loadu_ps(w3 + k), xv, a3);
    }
    float s0 = hsum8(_mm256_add_ps(a0, b0)), s1 = hsum8(_mm256_add_ps(a1, b1));
    float s2 = hsum8(_mm256_add_ps(a2, b2)), s3 = hsum8(_mm256_add_ps(a3, b3));
    for (; k < K; k++) {
        s0 += w0[k] * x[k]; s1 += w1[k] * x[k]; s2 += w2[k] * x[k]; s3 += w3[k] * x[k];
    }
    out[0] = s0; out[1] = s1; out[2] = s2; out[3] = s3;
}

static inline float dot1(const float *w, long K, const float *x) {
    __m256 a = _mm256_setzero_ps();
    long k = 0;
    for (; k + 8 <= K; k += 8) a = _mm256_fmadd_ps(_mm256_loadu_ps(w + k), _mm256_loadu_ps(x + k), a);
    float s = hsum8(a);
    for (; k < K; k++) s += w[k] * x[k];
    return s;
}
#else
static inline float dot1(const float *w, long K, const float *x) { return llmkit_dot(w, x, K); }

static inline void dot4(const float *w, long K, const float *x, float *out) {
    for (int r = 0; r < 4; r++) out[r] = dot1(w + r * K, K, x);
}
#endif

/* --- parallel jobs: `run(job, i0, i1)` does items [i0, i1) of job->n ---------------------- */
typedef struct job {
    void (*run)(const struct job *, long, long);
    const void *ctx;
    long n, per_chunk;
} job_t;

typedef struct {
    const float *W, *x, *b;
    float *y;
    long M, N, K;
} gemv_t;

/* rows [r0, r1) of y for every x row */
static void run_rows(const job_t *job, long r0, long r1) {
    const gemv_t *j = job->ctx;
    long K = j->K, N = j->N;
    long n = r0;
    for (; n + 4 <= r1; n += 4) {
        float out[4];
        for (long m = 0; m < j->M; m++) {
            dot4(j->W + n * K, K, j->x + m * K, out);
            for (int r = 0; r < 4; r++) j->y[m * N + n + r] = out[r] + (j->b ? j->b[n + r] : 0.0f);
        }
    }
    for (; n < r1; n++)
        for (long m = 0; m < j->M; m++)
            j->y[m * N + n] = dot1(j->W + n * K, K, j->x + m * K) + (j->b ? j->b[n] : 0.0f);
}

/* --- the pool ---------------------------------------------------------------------------------
 * state packs (generation << 40) | (chunk count << 20) | next unclaimed chunk, so one CAS both
 * checks that the job is still the one a thread saw and claims a chunk of it. A claimed chunk
 * keeps its job alive (the caller waits for every claimed chunk), so reading the job after a
 * successful claim is safe even for a thread that woke up late. */
#define MAX_THREADS 64
#define SPIN_NS 300000L /* workers spin this long for the next call before sleeping */

static job_t jobs[2];
static _Atomic long state = 0;
static _Atomic long done = 0;
static _Atomic long published = 0;  /* generation of the newest job */
static _Atomic int wanted = 1;      /* threads (caller included) the newest job may use */
static _Atomic int sleepers = 0;
static int n_workers = 0;
static pthread_mutex_t mu = PTHREAD_MUTEX_INITIALIZER;
static pthread_cond_t cv = PTHREAD_COND_INITIALIZER;
static long generation = 0;
/* Contention: when the caller waits long for a chunk another thread claimed, that thread was
 * preempted (its core is busy elsewhere). If that happens on more than 1 in 16 calls of a window
 * of 128, run the next calls on the caller alone, for twice as many calls after each bad window in
 * a row; a quiet machine sees such waits far more rarely (timer interrupts, page faults). */
#define WAIT_LIMIT_NS 50000L
#define WINDOW 128
static long solo_calls = 0, solo_len = 256, window_calls = 0, window_slow = 0;

static inline void cpu_relax(void) {
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

static long now_ns(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000000L + t.tv_nsec;
}

static void work_on(long gen) {
    for (;;) {
        long s = atomic_load(&state);
        if ((s >> 40) != (gen & 0xFFFFFF)) return;
        long total = (s >> 20) & 0xFFFFF, next = s & 0xFFFFF;
        if (next >= total) return;
        if (!atomic_compare_exchange_weak(&state, &s, s + 1)) continue;
        const job_t *j = &jobs[gen & 1];
        long r0 = next * j->per_chunk, r1 = r0 + j->per_chunk;
        j->run(j, r0, r1 < j->n ? r1 : j->n);
        atomic_fetch_add(&done, 1);
    }
}

static void *worker(void *arg) {
    int index = (int)(long)arg; /* 1-based: the caller is thread 0 */
    long seen = atomic_load(&published);
    for (;;) {
        long start = now_ns(), spins = 0;
        while (atomic_load(&published) == seen) {
            cpu_relax();
            if ((++spins & 255) == 0 && now_ns() - start > SPIN_NS) {
                pthread_mutex_lock(&mu);
                atomic_fetch_add(&sleepers, 1);
                while (atomic_load(&published) == seen) pthread_cond_wait(&cv, &mu);
                atomic_fetch_sub(&sleepers, 1);
                pthread_mutex_unlock(&mu);
            }
        }
        seen = atomic_load(&published);
        if (index < atomic_load(&wanted)) work_on(seen);
    }
    return NULL;
}

static void reset_after_fork(void) { /* the child has no workers: start a fresh pool on demand */
    n_workers = 0;
    atomic_store(&sleepers, 0);
    pthread_mutex_init(&mu, NULL);
    pthread_cond_init(&cv, NULL);
}

static void ensure_workers(int n) {
    static int atfork = 0;
    if (!atfork) { pthread_atfork(NULL, NULL, reset_after_fork); atfork = 1; }
    while (n_workers < n && n_workers < MAX_THREADS - 1) {
        pthread_t t;
        pthread_attr_t attr;
        pthread_attr_init(&attr);
        pthread_attr_setdetachstate(&attr, PTHREAD_CREATE_DETACHED);
        if (pthread_create(&t, &attr, worker, (void *)(long)(n_workers + 1)) != 0) { pthread_attr_destroy(&attr); break; }
        pthread_attr_destroy(&attr);
        n_workers++;
    }
}

/* Run job items [0, n) in chunks of per_chunk over up to nthreads threads (the caller included);
 * returns when every chunk is done. Not reentrant: one call at a time per process (the Python side
 * holds a lock; the native decode step calls it from the thread holding that lock). */
static void parallel_for(void (*run)(const job_t *, long, long), const void *ctx, long n, long per_chunk,
                         int nthreads) {
    long chunks = (n + per_chunk - 1) / per_chunk;
    while (chunks > 0xFFFFF) { per_chunk *= 2; chunks = (n + per_chunk - 1) / per_chunk; }
    job_t j = {run, ctx, n, per_chunk};
    if (nthreads <= 1 || chunks == 1 || solo_calls > 0) {
        if (solo_calls > 0) solo_calls--;
        run(&j, 0, n);
        return;
    }
    ensure_workers(nthreads - 1);
    long gen = ++generation;
    jobs[gen & 1] = j;
    atomic_store(&done, 0);
    atomic_store(&wanted, nthreads);
    atomic_store(&state, ((gen & 0xFFFFFF) << 40) | (chunks << 20));
    atomic_store(&published, gen);
    if (atomic_load(&sleepers) > 0) {
        pthread_mutex_lock(&mu);
        pthread_cond_broadcast(&cv);
        pthread_mutex_unlock(&mu);
    }
    work_on(gen);
    long waited_from = now_ns(), spins = 0;
    int slow = 0;
    while (atomic_load(&done) < chunks) {
        cpu_relax();
        if (!slow && (++spins & 255) == 0 && now_ns() - waited_from > WAIT_LIMIT_NS) slow = 1;
    }
    window_slow += slow;
    if (++window_calls == WINDOW) {
        if (window_slow * 16 > WINDOW) {
            solo_calls = solo_len;
            solo_len = solo_len < 16384 ? 2 * solo_len : 16384;
        } else {
            solo_len = 256;
        }
        window_calls = window_slow = 0;
    }
}

/* x [M, K] row-major, W [N, K] row-major, b [N] or NULL, y [M, N]; M <= MAX_ROWS. */
int llmkit_gemv(const float *W, const float *x, const float *b, float *y, long M, long N, long K,
                int nthreads) {
    if (M < 1 || M > MAX_ROWS || N < 1 || K < 1) return 1;
    long rows = (16384 / K) & ~3L; /* chunks of about 64 KB of weights */
    gemv_t g = {W, x, b, y, M, N, K};
    parallel_for(run_rows, &g, N, rows < 4 ? 4 : rows, nthreads);
    return 0;
}

int llmkit_max_rows(void) { return MAX_ROWS; }
