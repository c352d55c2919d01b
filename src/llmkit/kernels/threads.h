/* Splitting work over the OpenMP team by hand, where a kernel needs to know its thread's range
 * (partial sums per thread, a range spanning several tensors). */
#ifndef LLMKIT_THREADS_H
#define LLMKIT_THREADS_H
#ifdef _OPENMP
#include <omp.h>
#endif

/* this thread's share [lo, hi) of `total` items, in thread order */
static inline void thread_share(long total, long *lo, long *hi) {
#ifdef _OPENMP
    long t = omp_get_thread_num(), nt = omp_get_num_threads();
#else
    long t = 0, nt = 1;
#endif
    *lo = total * t / nt;
    *hi = total * (t + 1) / nt;
}
#endif
