/* Tandem's CPU kernels (float32 and bfloat16), loaded by engine/model/cpu_kernels.py.
 *
 * Written once over GCC vector extensions of VL float lanes, the width of the CPU's vector registers:
 * 16 with AVX-512, 8 with AVX2 + FMA. (Vectors wider than the registers are emulated by GCC about 10x
 * slower than torch, so the width follows the ISA the library is built for, -march=native.)
 *
 * The linear: y[M, N] = x[M, K] . W[N, K]^T (+ bias[N]) (+ residual[M, N]).
 *
 * The weight is packed once at load time into column blocks of NB = 4 * VL outputs (64 with AVX-512,
 * 32 with AVX2; tandem_cpu_kernels_block() tells the loader):
 *
 *     packed[b][k][j] = W[b * NB + j][k]      (b < ceil(N / NB), rows past N are zero)
 *
 * so one block is a single sequential stream of K * NB values. Each step of k broadcasts x[m][k]
 * against NB consecutive weights (four vectors) and accumulates into registers; up to MB = 6 rows of x
 * share every weight load (group_pass: how they fit the registers of each ISA). For decode (M = 1..16) this streams the weights at the core's read bandwidth, where the
 * BLAS GEMV paths reach 45-65% of it (docs/BENCHMARKS.md, issue 17). Blocks are split over OpenMP
 * threads (the caller passes torch's thread count; the library links the same libgomp that torch
 * loaded, so one thread pool).
 *
 * Each output is summed in k order (k = 0, 1, ..., K-1) in float32 with fused multiply-adds: a plain
 * dot product, deterministic, independent of M, of the thread count and of the other rows in the batch.
 *
 * The residual, when given, is added after the dot product and the bias, as `h + linear(x)` would.
 */
#include <stddef.h>
#include <stdlib.h>

#define MB 6 /* rows of x sharing the weight loads of a block */
#if defined(__AVX512F__)
#define VL 16
#define FULL_ROWS 6 /* see group_pass */
#elif defined(__AVX2__) && defined(__FMA__)
#define VL 8
#define FULL_ROWS 2
#else
#error "Tandem's CPU kernels need AVX-512 or AVX2 with FMA (cpu_kernels.py checks before building)"
#endif
#define NB (4 * VL) /* outputs per packed block */

typedef float vf __attribute__((vector_size(4 * VL)));
/* Unaligned access types, as the compilers' own intrinsics headers define them: a dereference is one vmovups.
 * (A __builtin_memcpy into a vector is not: GCC tuned for Zen 3 copies it through the stack in 16-byte pieces,
 * which made the AVX2 build of these kernels 3-7x slower than torch.) */
typedef float vf_u __attribute__((vector_size(4 * VL), aligned(1), may_alias));

static inline vf loadv(const float *p) { return *(const vf_u *)p; }
static inline void storev(float *p, vf v) { *(vf_u *)p = v; }

/* The sum of a vector's lanes. */
static inline float hsum(vf v)
{
    float s = 0.f;
    for (int r = 0; r < VL; r++) s += v[r];
    return s;
}

/* ---------------------------------------------------------------------------------------------------------------
 * The same linear for bfloat16 weights and activations, for decode-sized batches: weights packed the same way
 * ([ceil(N/NB)][K][NB] of bf16), widened to float32 in registers (a bf16 is the top half of a float32), products
 * summed in float32 in k order, the bias added in float32, the result rounded once to bf16 (round to nearest
 * even) as oneDNN's bf16 linear does; a residual is added to that rounded result in float32 and rounded again,
 * as torch's `h + linear(x)` in bf16 does. Half the bytes of float32, so decode streams twice the weights per
 * second; at prefill sizes oneDNN's bf16 dot-product kernels are faster and the layer uses them instead.
 * ------------------------------------------------------------------------------------------------------------- */
typedef unsigned short bf16_t;
typedef unsigned int vu __attribute__((vector_size(4 * VL)));
typedef unsigned short vh __attribute__((vector_size(2 * VL)));
typedef unsigned short vh_u __attribute__((vector_size(2 * VL), aligned(1), may_alias));

static inline vf loadv_bf16(const bf16_t *p)
{
    const vh h = *(const vh_u *)p;
    return (vf)(__builtin_convertvector(h, vu) << 16);
}

static inline float bf16_to_f32(bf16_t v)
{
    const unsigned u = (unsigned)v << 16;
    float f;
    __builtin_memcpy(&f, &u, sizeof f);
    return f;
}

static inline bf16_t f32_to_bf16(float f)
{
    unsigned u;
    __builtin_memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (bf16_t)((u >> 16) | 0x40); /* NaN stays a (quiet) NaN */
    u += 0x7fffu + ((u >> 16) & 1u);
    return (bf16_t)(u >> 16);
}

/* Widen VL weights (float32 or bf16) to float32 lanes; is_bf16 is a constant at every inlined call site. */
static inline __attribute__((always_inline)) vf load_wv(const void *p, long i, const int is_bf16)
{
    return is_bf16 ? loadv_bf16((const bf16_t *)p + i) : loadv((const float *)p + i);
}

static inline __attribute__((always_inline)) float load_1(const void *p, long i, const int is_bf16)
{
    return is_bf16 ? bf16_to_f32(((const bf16_t *)p)[i]) : ((const float *)p)[i];
}

/* One pass over K rows of a packed block for R rows of x, over CV of its 4 vectors of outputs from vector c.
 * x element (m, k) is at xb[m * ldm + k * ldk]: the caller's rows (ldm = K, ldk = 1, dtype of the weights) or a
 * float32 copy interleaved by k (ldm = 1, ldk = MB; x_f32), whose one pointer leaves the registers to the
 * accumulators. R and CV are constants at every call site, so the accumulators stay in registers (a loop with a
 * runtime count spilled them). */
static inline __attribute__((always_inline)) void block_pass(const void *xb, long ldm, long ldk, const void *wb,
                                                             long K, vf acc[MB][4], const int R, const int CV,
                                                             const int c, const int x_f32, const int is_bf16)
{
    for (long k = 0; k < K; k++) {
        const long wk = k * NB + c * VL;
        vf w[4];
        for (int q = 0; q < CV; q++) w[q] = load_wv(wb, wk + q * VL, is_bf16);
        for (int m = 0; m < R; m++) {
            const float xv = load_1(xb, m * ldm + k * ldk, is_bf16 && !x_f32);
            for (int q = 0; q < CV; q++) acc[m][c + q] += w[q] * xv;
        }
    }
}

/* Up to FULL_ROWS rows: the caller's x, all 4 vectors of the block per pass (AVX-512: 24 accumulators + 4
 * weight vectors of 32 registers; AVX2: 8 + 4 of 16). More rows: the interleaved float32 copy of x, two passes
 * of 2 vectors each on AVX2 (12 accumulators, 2 weight vectors and a broadcast: the 16 registers; 6 rows x 4
 * vectors would spill, 3 x 4 reloads every weight per row). */
#define ROWS_SWITCH(XB, LDM, LDK, CV, c, XF)                                                                       \
    switch (rows) {                                                                                                \
    case 1: block_pass(XB, LDM, LDK, wb, K, acc, 1, CV, c, XF, is_bf16); break;                                    \
    case 2: block_pass(XB, LDM, LDK, wb, K, acc, 2, CV, c, XF, is_bf16); break;                                    \
    case 3: block_pass(XB, LDM, LDK, wb, K, acc, 3, CV, c, XF, is_bf16); break;                                    \
    case 4: block_pass(XB, LDM, LDK, wb, K, acc, 4, CV, c, XF, is_bf16); break;                                    \
    case 5: block_pass(XB, LDM, LDK, wb, K, acc, 5, CV, c, XF, is_bf16); break;                                    \
    default: block_pass(XB, LDM, LDK, wb, K, acc, 6, CV, c, XF, is_bf16); break;                                   \
    }

static inline __attribute__((always_inline)) void group_pass(const void *xb, long ldx, const float *xi,
                                                             const void *wb, long K, vf acc[MB][4], long rows,
                                                             const int is_bf16)
{
    if (!xi) {
        ROWS_SWITCH(xb, ldx, 1, 4, 0, 0)
    } else if (FULL_ROWS >= MB) {
        ROWS_SWITCH(xi, 1, MB, 4, 0, 1)
    } else {
        ROWS_SWITCH(xi, 1, MB, 2, 0, 1)
        ROWS_SWITCH(xi, 1, MB, 2, 2, 1)
    }
}

int tandem_cpu_kernels_abi(void) { return 7; }

/* Outputs per packed weight block (the loader packs with it). */
int tandem_cpu_kernels_block(void) { return NB; }

/* Prefill-sized batches: SG row groups take turns over one K chunk of a block (KC rows of k, 16 KiB of
 * float32 weights) while it sits in L1, instead of each streaming the whole block from L2. Partial sums wait
 * in float32 between chunks, so every output is still one chain of fused multiply-adds in k order: the same
 * bits as one pass. */
#define SG 16
#define KC (16384 / (NB * 4))

/* The linear for both dtypes (see the top of this file); is_bf16 is a constant in each exported wrapper. */
static inline __attribute__((always_inline)) void linear_packed(const void *x, const void *packed, const void *bias,
                                                                const void *residual, void *y, long M, long K,
                                                                long N, int nthreads, const int is_bf16)
{
    const long nblk = (N + NB - 1) / NB, ngroups = (M + MB - 1) / MB;
    /* super groups of at most SG row groups, equal in size (to the group), so that threads get equal work */
    const long nsuper = (ngroups + SG - 1) / SG, sg = (ngroups + nsuper - 1) / nsuper;
    const long esize = is_bf16 ? 2 : 4;
    /* More rows than one pass holds: x copied once as float32, interleaved by k within each group of MB rows
     * (xi[g][k][m], rows past M zero). Without memory for it, x is read in place (the same sums, slower). */
    float *xi = M > FULL_ROWS ? malloc(sizeof(float) * ngroups * K * MB) : NULL;
    if (xi) {
#pragma omp parallel for num_threads(nthreads) schedule(static)
        for (long g = 0; g < ngroups; g++) {
            float *dst = xi + g * K * MB;
            for (long m = 0; m < MB; m++) { /* row by row: one sequential read, stores 6 floats apart (in L1) */
                const long row = g * MB + m;
                if (row < M)
                    for (long k = 0; k < K; k++) dst[k * MB + m] = load_1(x, row * K + k, is_bf16);
                else
                    for (long k = 0; k < K; k++) dst[k * MB + m] = 0.f;
            }
        }
    }
    /* (row super-group, block) pairs, super-group-major: a thread's share is a contiguous run, so the super
     * group's rows of x (at most SG * MB * K floats) stay in its L2 while the weight blocks stream past; and
     * small-N layers still split evenly at prefill sizes */
#pragma omp parallel for collapse(2) num_threads(nthreads) schedule(static)
    for (long s = 0; s < nsuper; s++) {
        for (long b = 0; b < nblk; b++) {
            const char *wb = (const char *)packed + b * K * NB * esize;
            const long n0 = b * NB;
            const long cols = N - n0 < NB ? N - n0 : NB;
            const long g0 = s * sg, g1 = ngroups < g0 + sg ? ngroups : g0 + sg;
            const long kc = g1 - g0 > 1 ? KC : K; /* one group reuses nothing: it streams the block once */
            float part[SG * MB][NB];
            for (long k0 = 0; k0 < K; k0 += kc) {
                const long kn = K - k0 < kc ? K - k0 : kc;
                for (long g = g0; g < g1; g++) {
                    const long m0 = g * MB;
                    const long rows = M - m0 < MB ? M - m0 : MB;
                    float(*pg)[NB] = part + (g - g0) * MB;
                    vf acc[MB][4];
                    for (long m = 0; m < MB; m++)
                        for (int q = 0; q < 4; q++) acc[m][q] = k0 && m < rows ? loadv(pg[m] + VL * q) : (vf){0};
                    group_pass((const char *)x + (m0 * K + k0) * esize, K, xi ? xi + (g * K + k0) * MB : NULL,
                               wb + k0 * NB * esize, kn, acc, rows, is_bf16);
                    for (long m = 0; m < rows; m++)
                        for (int q = 0; q < 4; q++) storev(pg[m] + VL * q, acc[m][q]);
                }
            }
            const long nrows = M - g0 * MB < (g1 - g0) * MB ? M - g0 * MB : (g1 - g0) * MB;
            for (long m = 0; m < nrows; m++) {
                const float *out = part[m];
                const long row = (g0 * MB + m) * N + n0;
                for (long j = 0; j < cols; j++) {
                    float o = bias ? out[j] + load_1(bias, n0 + j, is_bf16) : out[j];
                    if (is_bf16) {
                        bf16_t r = f32_to_bf16(o);
                        if (residual) r = f32_to_bf16(load_1(residual, row + j, 1) + bf16_to_f32(r));
                        ((bf16_t *)y)[row + j] = r;
                    } else {
                        ((float *)y)[row + j] = residual ? load_1(residual, row + j, 0) + o : o;
                    }
                }
            }
        }
    }
    free(xi);
}

void tandem_linear_packed_f32(const float *x, const float *packed, const float *bias, const float *residual,
                              float *y, long M, long K, long N, int nthreads)
{
    linear_packed(x, packed, bias, residual, y, M, K, N, nthreads, 0);
}

void tandem_linear_packed_bf16(const bf16_t *x, const bf16_t *packed, const bf16_t *bias, const bf16_t *residual,
                               bf16_t *y, long M, long K, long N, int nthreads)
{
    linear_packed(x, packed, bias, residual, y, M, K, N, nthreads, 1);
}

/* ---------------------------------------------------------------------------------------------------------------
 * Small fused ops of a decoder layer. Each replaces several torch ops whose dispatch, not arithmetic, dominated a
 * decode step (benchmarks/profile_step.py: about 180 aten calls per layer before). One body per op serves both
 * dtypes: float32 arithmetic inside; for bf16, rounded where torch's bf16 path rounds (RMSNorm: the normalised
 * value, then its product with the weight; SiLU * up: the SiLU, then the product), and rope once, at the end
 * (torch rounds after every op there: the two differ by bf16 rounding, the tolerance the bf16 tests allow).
 * ------------------------------------------------------------------------------------------------------------- */
#include <math.h>

static inline vf roundv_bf16(vf v)
{
    vu u = (vu)v;
    u += 0x7fffu + ((u >> 16) & 1u); /* round to nearest even (finite values; NaN inputs are not expected) */
    return (vf)(u & 0xffff0000u);
}

/* Round to bf16 where the dtype is bf16 (a no-op for float32). */
static inline __attribute__((always_inline)) vf round_as(vf v, const int is_bf16)
{
    return is_bf16 ? roundv_bf16(v) : v;
}

static inline __attribute__((always_inline)) float round1_as(float v, const int is_bf16)
{
    return is_bf16 ? bf16_to_f32(f32_to_bf16(v)) : v;
}

static inline __attribute__((always_inline)) void store_as(void *p, long i, vf v, const int is_bf16)
{
    if (is_bf16) {
        const vh h = __builtin_convertvector((vu)roundv_bf16(v) >> 16, vh);
        *(vh_u *)((bf16_t *)p + i) = h;
    } else {
        storev((float *)p + i, v);
    }
}

static inline __attribute__((always_inline)) void store1_as(void *p, long i, float v, const int is_bf16)
{
    if (is_bf16)
        ((bf16_t *)p)[i] = f32_to_bf16(v);
    else
        ((float *)p)[i] = v;
}

/* out[t] = w * (x[t] / sqrt(mean(x[t]^2) + eps))   (HF LlamaRMSNorm). */
static inline __attribute__((always_inline)) void rms_norm(const void *x, const void *w, void *out, long T, long H,
                                                           float eps, int nthreads, const int is_bf16)
{
#pragma omp parallel for num_threads(nthreads) schedule(static) if (T > 8)
    for (long t = 0; t < T; t++) {
        const long row = t * H;
        vf acc = (vf){0};
        long i = 0;
        for (; i + VL <= H; i += VL) {
            const vf v = load_wv(x, row + i, is_bf16);
            acc += v * v;
        }
        float ss = hsum(acc);
        for (; i < H; i++) ss += load_1(x, row + i, is_bf16) * load_1(x, row + i, is_bf16);
        const float r = 1.f / sqrtf(ss / (float)H + eps);
        for (i = 0; i + VL <= H; i += VL)
            store_as(out, row + i, load_wv(w, i, is_bf16) * round_as(load_wv(x, row + i, is_bf16) * r, is_bf16),
                     is_bf16);
        for (; i < H; i++)
            store1_as(out, row + i, load_1(w, i, is_bf16) * round1_as(load_1(x, row + i, is_bf16) * r, is_bf16),
                      is_bf16);
    }
}

/* exp(x) on VL lanes: Cody-Waite range reduction x = n ln2 + r, |r| <= ln2 / 2, and Cephes' degree-7
 * polynomial for e^r (about 1 ulp, as libm's expf); inputs clamped to the float range. */
typedef int vi __attribute__((vector_size(4 * VL)));
static inline vf selectv(vi mask, vf a, vf b) { return (vf)(((vi)a & mask) | ((vi)b & ~mask)); }

static inline vf expv(vf x)
{
    const vf hi = (vf){0} + 88.3762626647949f, lo = (vf){0} - 87.3365447504019f;
    x = selectv(x < hi, x, hi);
    x = selectv(x > lo, x, lo);
    const vf magic = (vf){0} + 12582912.f; /* 1.5 * 2^23: adding it rounds to the nearest integer */
    vf n = x * 1.44269504088896341f + magic;
    const vi ni = (vi)n - (vi)magic;
    n -= magic;
    vf r = x - n * 0.693359375f;
    r = r - n * -2.12194440e-4f;
    vf y = r * 1.9875691500E-4f + 1.3981999507E-3f;
    y = y * r + 8.3334519073E-3f;
    y = y * r + 4.1665795894E-2f;
    y = y * r + 1.6666665459E-1f;
    y = y * r + 5.0000001201E-1f;
    y = y * r * r + r + 1.f;
    return (vf)((vi)y + (ni << 23)); /* y * 2^n */
}

/* out[t, i] = silu(gu[t, i]) * gu[t, I + i]   (gate | up fused in one row of 2I). */
static inline __attribute__((always_inline)) void silu_mul(const void *gu, void *out, long T, long I, int nthreads,
                                                           const int is_bf16)
{
#pragma omp parallel for num_threads(nthreads) schedule(static) if (T > 8)
    for (long t = 0; t < T; t++) {
        const long g = t * 2 * I, u = g + I, o = t * I;
        long i = 0;
        for (; i + VL <= I; i += VL) {
            const vf gv = load_wv(gu, g + i, is_bf16);
            store_as(out, o + i, round_as(gv / (1.f + expv(-gv)), is_bf16) * load_wv(gu, u + i, is_bf16), is_bf16);
        }
        for (; i < I; i++) {
            const float gv = load_1(gu, g + i, is_bf16);
            store1_as(out, o + i, round1_as(gv / (1.f + expf(-gv)), is_bf16) * load_1(gu, u + i, is_bf16), is_bf16);
        }
    }
}

/* Rotary embedding in place, "rotate half" pairing (i, i + D/2), on `heads` heads of D starting at x[t * row]:
 * (x1, x2) <- (x1 cos - x2 sin, x2 cos + x1 sin); cos/sin rows [T, D/2] already gathered for the positions. */
static inline __attribute__((always_inline)) void rope(void *x, long row, const void *cos_t, const void *sin_t, long T,
                                                       long heads, long D, int nthreads, const int is_bf16)
{
    const long half = D / 2;
#pragma omp parallel for num_threads(nthreads) schedule(static) if (T > 8)
    for (long t = 0; t < T; t++) {
        for (long h = 0; h < heads; h++) {
            const long x1 = t * row + h * D, x2 = x1 + half, cs = t * half;
            long i = 0;
            for (; i + VL <= half; i += VL) {
                const vf a = load_wv(x, x1 + i, is_bf16), b = load_wv(x, x2 + i, is_bf16);
                const vf c = load_wv(cos_t, cs + i, is_bf16), sn = load_wv(sin_t, cs + i, is_bf16);
                store_as(x, x1 + i, a * c - b * sn, is_bf16);
                store_as(x, x2 + i, b * c + a * sn, is_bf16);
            }
            for (; i < half; i++) {
                const float a = load_1(x, x1 + i, is_bf16), b = load_1(x, x2 + i, is_bf16);
                const float c = load_1(cos_t, t * half + i, is_bf16), sn = load_1(sin_t, t * half + i, is_bf16);
                store1_as(x, x1 + i, a * c - b * sn, is_bf16);
                store1_as(x, x2 + i, b * c + a * sn, is_bf16);
            }
        }
    }
}

void tandem_rms_norm_f32(const float *x, const float *w, float *out, long T, long H, float eps, int nthreads)
{
    rms_norm(x, w, out, T, H, eps, nthreads, 0);
}

void tandem_rms_norm_bf16(const bf16_t *x, const bf16_t *w, bf16_t *out, long T, long H, float eps, int nthreads)
{
    rms_norm(x, w, out, T, H, eps, nthreads, 1);
}

void tandem_silu_mul_f32(const float *gu, float *out, long T, long I, int nthreads)
{
    silu_mul(gu, out, T, I, nthreads, 0);
}

void tandem_silu_mul_bf16(const bf16_t *gu, bf16_t *out, long T, long I, int nthreads)
{
    silu_mul(gu, out, T, I, nthreads, 1);
}

void tandem_rope_f32(float *x, long row, const float *cos_t, const float *sin_t, long T, long heads, long D,
                     int nthreads)
{
    rope(x, row, cos_t, sin_t, T, heads, D, nthreads, 0);
}

void tandem_rope_bf16(bf16_t *x, long row, const bf16_t *cos_t, const bf16_t *sin_t, long T, long heads, long D,
                      int nthreads)
{
    rope(x, row, cos_t, sin_t, T, heads, D, nthreads, 1);
}

/* Decode attention over the paged cache, read in place (no gather, no padding, no mask tensor).
 *
 * Both dtypes: float32 arithmetic; bf16 output rounded once.
 *
 * q:      rows [B], each heads * D values at q + b * q_row (query heads grouped G = heads / kv_heads per KV head)
 * cache:  k and v, element (block, slot, head, d) at block * sb + slot * ss + head * sh + d
 * table:  [B, max_blocks] block ids; lens: [B] context lengths (tokens visible, the current one included)
 * out:    [B, heads * D]
 *
 * Per (row, KV head), its G query heads in tiles of up to GT: each K row is loaded once for the tile's dot
 * products, scores go to a stack chunk, softmax runs in float32 with the running maximum subtracted (exp over
 * whole vectors of scores), and each V row is loaded once for the tile's weighted sums, which stay in registers
 * over the chunk (GT heads x 4 vectors of D: 12 accumulators of AVX2's 16 registers, 24 of AVX-512's 32). */
#define ATT_CHUNK 256
#define MAX_HEAD_DIM 512 /* a head's query and output live in stack buffers */
#define GT (VL == 16 ? 6 : 3)

/* o[g][i0 .. i0 + NV * VL) += sum_j p[g][j] * v_j[i0 ...] for the GN heads of a tile, over n tokens. */
static inline __attribute__((always_inline)) void att_pv(float (*o)[MAX_HEAD_DIM], float (*p)[ATT_CHUNK],
                                                         const void *cache_v, const long *restrict blocks, long c0,
                                                         long n, long block_size, long sb, long ss, long hoff,
                                                         long i0, const int NV, const int GN, const int is_bf16)
{
    vf acc[GT][4];
    for (int g = 0; g < GN; g++)
        for (int v = 0; v < NV; v++) acc[g][v] = loadv(o[g] + i0 + v * VL);
    for (long j = 0; j < n; j++) {
        const long t = c0 + j;
        const long vv = blocks[t / block_size] * sb + (t % block_size) * ss + hoff + i0;
        for (int v = 0; v < NV; v++) {
            const vf row = load_wv(cache_v, vv + v * VL, is_bf16);
            for (int g = 0; g < GN; g++) acc[g][v] += row * p[g][j];
        }
    }
    for (int g = 0; g < GN; g++)
        for (int v = 0; v < NV; v++) storev(o[g] + i0 + v * VL, acc[g][v]);
}

/* One tile of GN query heads (hq0 .. hq0 + GN) of KV head kh, row b. */
static inline __attribute__((always_inline)) void att_tile(const void *q, long q_row, const void *cache_k,
                                                           const void *cache_v, long sb, long ss, long hoff,
                                                           const long *restrict blocks, long L, long block_size,
                                                           void *out, long b, long heads, long hq0, long D,
                                                           float scale, const int GN, const int is_bf16)
{
    float qv[GT][MAX_HEAD_DIM], o[GT][MAX_HEAD_DIM], p[GT][ATT_CHUNK], m[GT], l[GT];
    for (int g = 0; g < GN; g++) {
        for (long i = 0; i < D; i++) {
            qv[g][i] = load_1(q, b * q_row + (hq0 + g) * D + i, is_bf16);
            o[g][i] = 0.f;
        }
        m[g] = -INFINITY;
        l[g] = 0.f;
    }
    for (long c0 = 0; c0 < L; c0 += ATT_CHUNK) {
        const long n = L - c0 < ATT_CHUNK ? L - c0 : ATT_CHUNK;
        for (long j = 0; j < n; j++) { /* scores: one load of each K vector for the whole tile */
            const long t = c0 + j;
            const long kv = blocks[t / block_size] * sb + (t % block_size) * ss + hoff;
            vf part[GT];
            for (int g = 0; g < GN; g++) part[g] = (vf){0};
            long i = 0;
            for (; i + VL <= D; i += VL) {
                const vf kr = load_wv(cache_k, kv + i, is_bf16);
                for (int g = 0; g < GN; g++) part[g] += loadv(qv[g] + i) * kr;
            }
            for (int g = 0; g < GN; g++) {
                float dot = hsum(part[g]);
                for (long r = i; r < D; r++) dot += qv[g][r] * load_1(cache_k, kv + r, is_bf16);
                p[g][j] = dot * scale;
            }
        }
        for (int g = 0; g < GN; g++) { /* online softmax: rescale what came before, exponentiate this chunk */
            float cm = -INFINITY;
            for (long j = 0; j < n; j++) cm = p[g][j] > cm ? p[g][j] : cm;
            const float nm = cm > m[g] ? cm : m[g];
            const float corr = expf(m[g] - nm); /* 0 on the first chunk (m = -inf) */
            for (long i = 0; i < D; i++) o[g][i] *= corr;
            long j = 0;
            for (; j + VL <= n; j += VL) storev(p[g] + j, expv(loadv(p[g] + j) - nm));
            for (; j < n; j++) p[g][j] = expf(p[g][j] - nm);
            float sum = 0.f;
            for (j = 0; j < n; j++) sum += p[g][j];
            l[g] = l[g] * corr + sum;
            m[g] = nm;
        }
        long i0 = 0; /* weighted sum of V: one load of each V vector for the whole tile */
        for (; i0 + 4 * VL <= D; i0 += 4 * VL)
            att_pv(o, p, cache_v, blocks, c0, n, block_size, sb, ss, hoff, i0, 4, GN, is_bf16);
        for (; i0 + VL <= D; i0 += VL)
            att_pv(o, p, cache_v, blocks, c0, n, block_size, sb, ss, hoff, i0, 1, GN, is_bf16);
        for (; i0 < D; i0++)
            for (long j = 0; j < n; j++) {
                const long t = c0 + j;
                const float v = load_1(cache_v, blocks[t / block_size] * sb + (t % block_size) * ss + hoff + i0,
                                       is_bf16);
                for (int g = 0; g < GN; g++) o[g][i0] += p[g][j] * v;
            }
    }
    for (int g = 0; g < GN; g++) {
        const float inv = 1.f / l[g];
        const long od = b * heads * D + (hq0 + g) * D;
        for (long i = 0; i < D; i++) {
            if (is_bf16)
                ((bf16_t *)out)[od + i] = f32_to_bf16(o[g][i] * inv);
            else
                ((float *)out)[od + i] = o[g][i] * inv;
        }
    }
}

static inline __attribute__((always_inline)) void paged_decode_attention(
    const void *q, long q_row, const void *cache_k, const void *cache_v, long sb, long ss, long sh,
    const long *restrict table, long max_blocks, const long *restrict lens, long block_size, void *out, long B,
    long heads, long kv_heads, long D, float scale, int nthreads, const int is_bf16)
{
    const long G = heads / kv_heads;
#pragma omp parallel for collapse(2) num_threads(nthreads) schedule(static)
    for (long b = 0; b < B; b++) {
        for (long kh = 0; kh < kv_heads; kh++) {
            const long *blocks = table + b * max_blocks;
            for (long g0 = 0; g0 < G; g0 += GT) {
                const long gn = G - g0 < GT ? G - g0 : GT;
#define ATT_TILE(GN)                                                                                               \
    att_tile(q, q_row, cache_k, cache_v, sb, ss, kh * sh, blocks, lens[b], block_size, out, b, heads, kh * G + g0, D, \
             scale, GN, is_bf16)
                switch (gn) {
                case 1: ATT_TILE(1); break;
                case 2: ATT_TILE(2); break;
#if GT > 3
                case 3: ATT_TILE(3); break;
                case 4: ATT_TILE(4); break;
                case 5: ATT_TILE(5); break;
#endif
                default: ATT_TILE(GT); break;
                }
#undef ATT_TILE
            }
        }
    }
}

void tandem_paged_decode_attention_f32(const float *q, long q_row, const float *cache_k, const float *cache_v,
                                       long sb, long ss, long sh, const long *table, long max_blocks,
                                       const long *lens, long block_size, float *out, long B, long heads,
                                       long kv_heads, long D, float scale, int nthreads)
{
    paged_decode_attention(q, q_row, cache_k, cache_v, sb, ss, sh, table, max_blocks, lens, block_size, out, B,
                           heads, kv_heads, D, scale, nthreads, 0);
}

void tandem_paged_decode_attention_bf16(const bf16_t *q, long q_row, const bf16_t *cache_k, const bf16_t *cache_v,
                                        long sb, long ss, long sh, const long *table, long max_blocks,
                                        const long *lens, long block_size, bf16_t *out, long B, long heads,
                                        long kv_heads, long D, float scale, int nthreads)
{
    paged_decode_attention(q, q_row, cache_k, cache_v, sb, ss, sh, table, max_blocks, lens, block_size, out, B,
                           heads, kv_heads, D, scale, nthreads, 1);
}

/* ---------------------------------------------------------------------------------------------------------------
 * Prefill attention, causal, over keys read in place: one prompt chunk of T queries after a context of L - T
 * tokens (a cached prefix or earlier chunks; 0 for a fresh prompt), so query t sits at position L - T + t and
 * sees keys 0 .. L - T + t.
 *
 * q:      T rows, each heads * D values at q + t * q_row
 * k, v:   element (block, slot, head, d) at block * sb + slot * ss + head * sh + d, blocks[t / block_size] holding
 *         token t (a fresh prompt's own K/V rows pass as one block: sb = 0, block_size >= T)
 * out:    [T, heads * D]
 *
 * The work is two small matrix products per chunk of PK keys, both vectorised over query rows: a tile is PR
 * = 2 vectors of rows, a row being one (position, query head) pair of one KV head (rows in position-major
 * order, so the G heads of a position share K and V loads and G need not divide the tile). The tile's queries
 * are transposed once into qt[d][row] (scaled), so S^T[key][row] = sum_d k[key][d] * qt[d][row] broadcasts
 * one cache value against two vectors of rows (JG keys x 2 vectors of accumulators), reading each K row of
 * the cache in place. Softmax is online and vectorised over rows (running maximum and sum per row); the
 * outputs stay transposed, ot[d][row] += sum_key v[key][d] * p[key][row], DG dims x 2 vectors at a time, each
 * V value read in place and broadcast. Keys past a row's position are masked only in the chunks that reach
 * past the tile's first position. Tiles over (KV head, rows) run on OpenMP threads, the longest first. */
#define PR (2 * VL)            /* query rows per tile */
#define PK 64                  /* keys per chunk */
#define JG (VL == 16 ? 12 : 6) /* keys per pass of the score product: JG x 2 accumulators */
#define DG (VL == 16 ? 12 : 6) /* head dims per pass of the value product */

static inline __attribute__((always_inline)) void prefill_tile(const void *q, long q_row, const void *cache_k,
                                                               const void *cache_v, long sb, long ss, long hoff,
                                                               const long *restrict blocks, long block_size,
                                                               long L, long T, void *out, long heads, long kh,
                                                               long G, long D, float scale, long r0,
                                                               const int is_bf16)
{
    const long rows = T * G - r0 < PR ? T * G - r0 : PR;
    const long first = L - T + r0 / G;              /* position of the tile's first row */
    const long last = L - T + (r0 + rows - 1) / G;  /* ... and of its last */
    float qt[D][PR], ot[D][PR], s[PK][PR], pos[PR];
    for (long i = 0; i < PR; i++) {
        const long r = r0 + (i < rows ? i : rows - 1); /* padding rows repeat the last one; never stored */
        const long t = r / G, hq = kh * G + r % G;
        pos[i] = (float)(L - T + t);
        for (long d = 0; d < D; d++) {
            qt[d][i] = load_1(q, t * q_row + hq * D + d, is_bf16) * scale;
            ot[d][i] = 0.f;
        }
    }
    const vf pos0 = loadv(pos), pos1 = loadv(pos + VL);
    const vf zero = (vf){0}, ninf = zero - INFINITY;
    vf m0 = ninf, m1 = m0, l0 = zero, l1 = l0;
    long off[PK]; /* each key's K (and V) row in the cache */
    for (long c0 = 0; c0 <= last; c0 += PK) {
        const long n = last + 1 - c0 < PK ? last + 1 - c0 : PK;
        for (long j = 0; j < n; j++) {
            const long t = c0 + j;
            off[j] = blocks[t / block_size] * sb + (t % block_size) * ss + hoff;
        }
        long j = 0; /* scores: S^T[key][row] */
        for (; j + JG <= n; j += JG) {
            vf a[JG][2];
            for (int u = 0; u < JG; u++) a[u][0] = a[u][1] = (vf){0};
            for (long d = 0; d < D; d++) {
                const vf qa = loadv(qt[d]), qb = loadv(qt[d] + VL);
                for (int u = 0; u < JG; u++) {
                    const float kd = load_1(cache_k, off[j + u] + d, is_bf16);
                    a[u][0] += qa * kd;
                    a[u][1] += qb * kd;
                }
            }
            for (int u = 0; u < JG; u++) {
                storev(s[j + u], a[u][0]);
                storev(s[j + u] + VL, a[u][1]);
            }
        }
        for (; j < n; j++) {
            vf a0 = (vf){0}, a1 = (vf){0};
            for (long d = 0; d < D; d++) {
                const float kd = load_1(cache_k, off[j] + d, is_bf16);
                a0 += loadv(qt[d]) * kd;
                a1 += loadv(qt[d] + VL) * kd;
            }
            storev(s[j], a0);
            storev(s[j] + VL, a1);
        }
        if (c0 + n - 1 > first) /* the causal mask: keys past a row's position */
            for (j = 0; j < n; j++) {
                const vf t = zero + (float)(c0 + j);
                storev(s[j], selectv(t > pos0, ninf, loadv(s[j])));
                storev(s[j] + VL, selectv(t > pos1, ninf, loadv(s[j] + VL)));
            }
        vf c_0 = m0, c_1 = m1; /* online softmax per row */
        for (j = 0; j < n; j++) {
            const vf x0 = loadv(s[j]), x1 = loadv(s[j] + VL);
            c_0 = selectv(x0 > c_0, x0, c_0);
            c_1 = selectv(x1 > c_1, x1, c_1);
        }
        /* every row sees key 0, so after the first chunk each running maximum is finite; on the first, nothing
         * came before to rescale (0, not expv's clamped tiny value); masked keys weigh exactly 0 */
        const vf corr0 = selectv(m0 > ninf, expv(m0 - c_0), zero), corr1 = selectv(m1 > ninf, expv(m1 - c_1), zero);
        m0 = c_0;
        m1 = c_1;
        vf sum0 = (vf){0}, sum1 = (vf){0};
        for (j = 0; j < n; j++) {
            const vf x0 = loadv(s[j]), x1 = loadv(s[j] + VL);
            const vf p0 = selectv(x0 > ninf, expv(x0 - m0), zero), p1 = selectv(x1 > ninf, expv(x1 - m1), zero);
            storev(s[j], p0);
            storev(s[j] + VL, p1);
            sum0 += p0;
            sum1 += p1;
        }
        l0 = l0 * corr0 + sum0;
        l1 = l1 * corr1 + sum1;
        long d0 = 0; /* outputs: ot[d][row] = ot * corr + sum_key v[key][d] * p[key][row] */
        for (; d0 + DG <= D; d0 += DG) {
            vf a[DG][2];
            for (int u = 0; u < DG; u++) {
                a[u][0] = loadv(ot[d0 + u]) * corr0;
                a[u][1] = loadv(ot[d0 + u] + VL) * corr1;
            }
            for (j = 0; j < n; j++) {
                const vf pa = loadv(s[j]), pb = loadv(s[j] + VL);
                for (int u = 0; u < DG; u++) {
                    const float vd = load_1(cache_v, off[j] + d0 + u, is_bf16);
                    a[u][0] += pa * vd;
                    a[u][1] += pb * vd;
                }
            }
            for (int u = 0; u < DG; u++) {
                storev(ot[d0 + u], a[u][0]);
                storev(ot[d0 + u] + VL, a[u][1]);
            }
        }
        for (; d0 < D; d0++) {
            vf a0 = loadv(ot[d0]) * corr0, a1 = loadv(ot[d0] + VL) * corr1;
            for (j = 0; j < n; j++) {
                const float vd = load_1(cache_v, off[j] + d0, is_bf16);
                a0 += loadv(s[j]) * vd;
                a1 += loadv(s[j] + VL) * vd;
            }
            storev(ot[d0], a0);
            storev(ot[d0] + VL, a1);
        }
    }
    float inv[PR];
    storev(inv, 1.f / l0);
    storev(inv + VL, 1.f / l1);
    for (long i = 0; i < rows; i++) {
        const long r = r0 + i, t = r / G, hq = kh * G + r % G;
        for (long d = 0; d < D; d++) store1_as(out, t * heads * D + hq * D + d, ot[d][i] * inv[i], is_bf16);
    }
}

/* The tiles over OpenMP threads, the last ones (which see the most keys) first. A macro, so that each dtype's entry
 * point has its own outlined parallel region with is_bf16 a constant (GCC outlines a region before inlining: one
 * region shared by both dtypes tested the dtype in every inner loop). */
#define PAGED_PREFILL_ATTENTION(IS_BF16)                                                                            \
    const long G = heads / kv_heads, tiles = (T * G + PR - 1) / PR;                                                 \
    _Pragma("omp parallel for collapse(2) num_threads(nthreads) schedule(dynamic, 1)")                            \
    for (long i = 0; i < tiles; i++)                                                                               \
        for (long kh = 0; kh < kv_heads; kh++)                                                                     \
            prefill_tile(q, q_row, cache_k, cache_v, sb, ss, kh * sh, blocks, block_size, L, T, out, heads, kh, G, D, \
                         scale, (tiles - 1 - i) * PR, IS_BF16);

void tandem_paged_prefill_attention_f32(const float *q, long q_row, const float *cache_k, const float *cache_v,
                                        long sb, long ss, long sh, const long *blocks, long block_size, long L,
                                        long T, float *out, long heads, long kv_heads, long D, float scale,
                                        int nthreads)
{
    PAGED_PREFILL_ATTENTION(0)
}

void tandem_paged_prefill_attention_bf16(const bf16_t *q, long q_row, const bf16_t *cache_k, const bf16_t *cache_v,
                                         long sb, long ss, long sh, const long *blocks, long block_size, long L,
                                         long T, bf16_t *out, long heads, long kv_heads, long D, float scale,
                                         int nthreads)
{
    PAGED_PREFILL_ATTENTION(1)
}

/* ---------------------------------------------------------------------------------------------------------------
 * A decode-only step through consecutive decoder layers in one call: the same kernels, in the same order, as the
 * per-layer Python path of engine/model/llama.py (so the same bits), without the Python between them (about 5 ms
 * of a 28 ms SmolLM2 step on two threads). Used where every row is a decode row, tensor parallelism is 1 and every
 * linear of the step runs the packed kernel.
 *
 * ptrs:   per layer DL_PTRS addresses: input norm weight, qkv packed, qkv bias, o packed, o bias, post-attention
 *         norm weight, gate|up packed, gate|up bias, down packed, down bias, cache k, cache v (a bias may be 0)
 * h:      [B, H] hidden states, updated in place (the residual adds ride on o and down, as in the Python path)
 * cos/sin [B, D/2]; slot_block / slot_off [B]: each row's KV slot; table [B, max_blocks], lens [B]: its context
 * scratch normed [B, H], qkv [B, (nq + 2 nkv) D], attn [B, nq D], gu [B, 2 I], act [B, I]
 * ------------------------------------------------------------------------------------------------------------- */
#define DL_PTRS 12

static inline __attribute__((always_inline)) void decode_layers(
    const long *ptrs, long n_layers, void *h, long B, long H, long nq, long nkv, long D, long I, float eps,
    const void *cos_t, const void *sin_t, const long *slot_block, const long *slot_off, long sb, long ss, long sh,
    const long *table, long max_blocks, const long *lens, long block_size, void *normed, void *qkv, void *attn,
    void *gu, void *act, float scale, int nthreads, const int is_bf16)
{
    const long row = (nq + 2 * nkv) * D, esize = is_bf16 ? 2 : 4;
    for (long l = 0; l < n_layers; l++) {
        const long *p = ptrs + l * DL_PTRS;
        char *ck = (char *)p[10], *cv = (char *)p[11];
        rms_norm(h, (const void *)p[0], normed, B, H, eps, nthreads, is_bf16);
        linear_packed(normed, (const void *)p[1], (const void *)p[2], NULL, qkv, B, H, row, nthreads, is_bf16);
        rope(qkv, row, cos_t, sin_t, B, nq + nkv, D, nthreads, is_bf16);
        for (long b = 0; b < B; b++) /* this step's K and V into their slots */
            for (long kh = 0; kh < nkv; kh++) {
                const long dst = (slot_block[b] * sb + slot_off[b] * ss + kh * sh) * esize;
                const char *src = (const char *)qkv + (b * row + (nq + kh) * D) * esize;
                __builtin_memcpy(ck + dst, src, D * esize);
                __builtin_memcpy(cv + dst, src + nkv * D * esize, D * esize);
            }
        paged_decode_attention(qkv, row, ck, cv, sb, ss, sh, table, max_blocks, lens, block_size, attn, B, nq, nkv, D,
                               scale, nthreads, is_bf16);
        linear_packed(attn, (const void *)p[3], (const void *)p[4], h, h, B, nq * D, H, nthreads, is_bf16);
        rms_norm(h, (const void *)p[5], normed, B, H, eps, nthreads, is_bf16);
        linear_packed(normed, (const void *)p[6], (const void *)p[7], NULL, gu, B, H, 2 * I, nthreads, is_bf16);
        silu_mul(gu, act, B, I, nthreads, is_bf16);
        linear_packed(act, (const void *)p[8], (const void *)p[9], h, h, B, I, H, nthreads, is_bf16);
    }
}

#define DECODE_LAYERS_ARGS                                                                                         \
    const long *ptrs, long n_layers, void *h, long B, long H, long nq, long nkv, long D, long I, float eps,         \
        const void *cos_t, const void *sin_t, const long *slot_block, const long *slot_off, long sb, long ss,       \
        long sh, const long *table, long max_blocks, const long *lens, long block_size, void *normed, void *qkv,    \
        void *attn, void *gu, void *act, float scale, int nthreads
#define DECODE_LAYERS_CALL(IS_BF16)                                                                                \
    decode_layers(ptrs, n_layers, h, B, H, nq, nkv, D, I, eps, cos_t, sin_t, slot_block, slot_off, sb, ss, sh, table, \
                  max_blocks, lens, block_size, normed, qkv, attn, gu, act, scale, nthreads, IS_BF16)

void tandem_decode_layers_f32(DECODE_LAYERS_ARGS) { DECODE_LAYERS_CALL(0); }
void tandem_decode_layers_bf16(DECODE_LAYERS_ARGS) { DECODE_LAYERS_CALL(1); }
