/* Tandem's CPU linear kernel: y[M, N] = x[M, K] . W[N, K]^T (+ bias[N]), float32.
 *
 * The weight is packed once at load time into column blocks of 64 outputs:
 *
 *     packed[b][k][j] = W[b * 64 + j][k]      (b < ceil(N / 64), rows past N are zero)
 *
 * so one block is a single sequential stream of K * 64 floats. Each step of k
 * broadcasts x[m][k] against 64 consecutive weights (four 16-lane vectors) and
 * accumulates into registers; up to 4 rows of x share every weight load. For
 * decode (M = 1..16) this streams the weights at the core's read bandwidth,
 * where the BLAS GEMV paths reach 45-65% of it (docs/BENCHMARKS.md, issue 17).
 * Blocks are split over OpenMP threads (the caller passes torch's thread count;
 * the library links the same libgomp that torch loaded, so one thread pool).
 *
 * Each output is summed in k order (k = 0, 1, ..., K-1) in float32: a plain
 * dot product, deterministic, independent of M, of the thread count and of the
 * other rows in the batch.
 *
 * Built by engine/model/cpu_kernels.py with the host compiler and -march=native;
 * GCC vector extensions become AVX-512, AVX2 or SSE code as the CPU allows.
 */
#include <stddef.h>

#define NB 64 /* outputs per packed block */
#define MB 4  /* rows of x sharing one pass over a block */

typedef float v16 __attribute__((vector_size(64), aligned(4)));

static inline v16 load16(const float *p) { v16 v; __builtin_memcpy(&v, p, sizeof v); return v; }
static inline void store16(float *p, v16 v) { __builtin_memcpy(p, &v, sizeof v); }

int tandem_cpu_linear_abi(void) { return 1; }

void tandem_linear_packed_f32(const float *restrict x, const float *restrict packed, const float *restrict bias,
                              float *restrict y, long M, long K, long N, int nthreads)
{
    const long nblk = (N + NB - 1) / NB;
#pragma omp parallel for num_threads(nthreads) schedule(static)
    for (long b = 0; b < nblk; b++) {
        const float *wb = packed + b * K * NB;
        const long n0 = b * NB;
        const long cols = N - n0 < NB ? N - n0 : NB;
        for (long m0 = 0; m0 < M; m0 += MB) {
            const long rows = M - m0 < MB ? M - m0 : MB;
            const float *xb = x + m0 * K;
            v16 acc[MB][4];
            for (long m = 0; m < MB; m++)
                for (int q = 0; q < 4; q++) acc[m][q] = (v16){0};
            for (long k = 0; k < K; k++) {
                const float *wk = wb + k * NB;
                const v16 w0 = load16(wk), w1 = load16(wk + 16), w2 = load16(wk + 32), w3 = load16(wk + 48);
                for (long m = 0; m < rows; m++) {
                    const float xv = xb[m * K + k];
                    acc[m][0] += w0 * xv;
                    acc[m][1] += w1 * xv;
                    acc[m][2] += w2 * xv;
                    acc[m][3] += w3 * xv;
                }
            }
            for (long m = 0; m < rows; m++) {
                float out[NB];
                for (int q = 0; q < 4; q++) store16(out + 16 * q, acc[m][q]);
                float *ym = y + (m0 + m) * N + n0;
                if (bias)
                    for (long j = 0; j < cols; j++) ym[j] = out[j] + bias[n0 + j];
                else
                    for (long j = 0; j < cols; j++) ym[j] = out[j];
            }
        }
    }
}
