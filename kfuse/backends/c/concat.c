/* Concatenation as a copy of rows: viewed at the concatenated axis, every input is ROWS rows of rb[i]
   bytes (the axis and the dims after it), ss[i] bytes apart (rb[i] where it is contiguous; more for a
   slice of a wider tensor: a channel slice of an NHWC map), and the output ROWS rows of their sum, input
   i's rows landing at byte offset off[i] of each output row. Any dtype: bytes are copied. Sizes come at
   the call: one library serves every concatenation.

   Work: rows split among the threads where there are at least as many rows as threads (a channel concat
   of NHWC maps: one row per pixel), else each row piece split into one byte range per thread (a concat
   along the first axis: one row). dims: ROWS K OUT_ROW_BYTES, then rb[K], off[K], ss[K]. */
#include <omp.h>
#include <stdint.h>
#include <string.h>

void kf_concat(const char *const *src, char *restrict out, const int64_t *dims, int nthreads) {
    const int64_t rows = dims[0], k = dims[1], ob = dims[2];
    const int64_t *rb = dims + 3, *off = dims + 3 + k, *ss = dims + 3 + 2 * k;
    if (rows >= nthreads) {
        #pragma omp parallel num_threads(nthreads)
        {
            /* a range of rows per thread, input by input: each input's rows read in order (row by row
               through all K inputs, DenseNet's 24-input channel concat took 1.5x as long) */
            const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
            const int64_t r0 = rows * t / nt, r1 = rows * (t + 1) / nt;
            for (int64_t i = 0; i < k; i++) {
                const char *s = src[i];
                const int64_t n = rb[i], st = ss[i];
                for (int64_t r = r0; r < r1; r++)
                    memcpy(out + r * ob + off[i], s + r * st, (size_t)n);
            }
        }
        return;
    }
    #pragma omp parallel num_threads(nthreads)
    {
        const int64_t t = omp_get_thread_num(), nt = omp_get_num_threads();
        for (int64_t r = 0; r < rows; r++)
            for (int64_t i = 0; i < k; i++) {
                const int64_t a = rb[i] * t / nt, b = rb[i] * (t + 1) / nt;
                memcpy(out + r * ob + off[i] + a, src[i] + r * ss[i] + a, (size_t)(b - a));
            }
    }
}
