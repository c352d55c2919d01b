/* The portable dot product shared by the kernels: eight independent partial sums, which compilers
 * vectorize without reassociating (so no -ffast-math), then a fixed-order reduction. */
#ifndef LLMKIT_DOT_H
#define LLMKIT_DOT_H

static inline float llmkit_dot(const float *a, const float *b, long n) {
    float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
    long k = 0;
    for (; k + 8 <= n; k += 8)
        for (int j = 0; j < 8; j++) acc[j] += a[k + j] * b[k + j];
    float s = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
    for (; k < n; k++) s += a[k] * b[k];
    return s;
}

#endif
