/* The one shared library llmkit builds (build.py): every kernel in one translation unit, so a single
 * thread pool (gemv.c) serves the matrix-vector products, the decoding step and the elementwise
 * kernels alike, and no two pools ever spin against each other for the same cores. The training
 * attention (attention.c) and GELU (gelu.c) run between PyTorch's own operations, so they use its
 * OpenMP threads. */
#include "gemv.c"
#include "rowops.c"
#include "decode.c"
#include "attention.c"
#include "gelu.c"
#include "optimizer.c"
#include "norm.c"
#include "swiglu.c"
