/* y = x @ W^T (+ bias) for a few rows of x, with W in bf16 or fp32 (AVX2 + FMA).

   Entry point `smallm_linear`: x (M, K) with row stride ldx, W (N, K) row-major, bias (N,) of
   W's type or NULL, y (M, N) contiguous. x, W and y are each bf16 (uint16 bit patterns) or fp32.
   Products accumulate in fp32; a bf16 y is the fp32 result rounded once, to nearest even.

   Built for small M (2..16), where the product is bound by reading W: each W row is read from
   memory once, however many x rows there are.
   - Register tile: 2 rows of W against up to MR = 4 rows of x (8 ymm accumulators). Groups of
     fewer x rows are unrolled along K so at least 8 FMA chains hide the FMA latency.
   - Row blocks of RB tiles (2 * RB rows of W) go to threads (OpenMP, static schedule). With
     more than MR x rows, a block walks K in chunks of KCHUNK: every x-row group works on the
     same chunk of W rows while it sits in L1 (and the x chunk, at most 16 x KCHUNK floats,
     too), and for bf16 W the next chunk is prefetched meanwhile, so memory keeps streaming
     while the later groups compute. Lane-wise partial sums wait in a small array between
     chunks.
   - K % 8 is a scalar tail; an odd N pairs the last row with itself and keeps one result. */

#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define MR 4        /* x rows per register tile */
#define MMAX 16     /* x rows per pass; more rows are done in passes of MMAX */
#define RB 1        /* tiles (pairs of W rows) per row block; 2 measured no better */
#define KCHUNK 256  /* K elements per chunk (a multiple of 32) */

static inline float hsum8(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

/* bf16 -> fp32 is a 16-bit left shift of the bit pattern. */
static inline __m256 load8_bf16(const uint16_t *p) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
}

static inline float bf16_to_f32(uint16_t v) {
    uint32_t u = (uint32_t)v << 16;
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

/* Round to nearest even, as torch does (NaN -> 0x7FC0). */
static inline uint16_t f32_to_bf16(float f) {
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    if ((u & 0x7fffffffu) > 0x7f800000u) return 0x7FC0;
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

static inline void store_y(void *y, int64_t idx, float v, int y_bf16) {
    if (y_bf16)
        ((uint16_t *)y)[idx] = f32_to_bf16(v);
    else
        ((float *)y)[idx] = v;
}

static inline __m256 load8_f32(const float *p) { return _mm256_loadu_ps(p); }
static inline float f32_to_f32(float v) { return v; }

/* p0[i] += w0[k0:k1] * x_i[k0:k1] lane-wise (likewise p1 with w1) for i < mr; k1 - k0 is a
   multiple of 8. mr and the K unroll u are constants once inlined, so the accumulators stay in
   registers. The empty asm keeps each x vector in a register: without it the compiler folds
   the load into both FMAs and loads x twice. */
#define DEFINE_TILE(NAME, WT, LOAD8)                                                            \
    static inline __attribute__((always_inline)) void NAME(                                    \
        const WT *w0, const WT *w1, const float *x, int64_t ldx, int64_t k0, int64_t k1,        \
        const int mr, const int u, __m256 *p0, __m256 *p1) {                                    \
        __m256 a0[4][MR], a1[4][MR];                                                            \
        for (int i = 0; i < mr; i++) {                                                          \
            a0[0][i] = p0[i];                                                                   \
            a1[0][i] = p1[i];                                                                   \
        }                                                                                       \
        for (int j = 1; j < u; j++)                                                             \
            for (int i = 0; i < mr; i++) a0[j][i] = a1[j][i] = _mm256_setzero_ps();             \
        int64_t k = k0;                                                                         \
        for (; k + 8 * u <= k1; k += 8 * u) {                                                   \
            for (int j = 0; j < u; j++) {                                                       \
                const __m256 v0 = LOAD8(w0 + k + 8 * j), v1 = LOAD8(w1 + k + 8 * j);            \
                for (int i = 0; i < mr; i++) {                                                  \
                    __m256 xv = _mm256_loadu_ps(x + i * ldx + k + 8 * j);                       \
                    __asm__("" : "+x"(xv));                                                     \
                    a0[j][i] = _mm256_fmadd_ps(v0, xv, a0[j][i]);                               \
                    a1[j][i] = _mm256_fmadd_ps(v1, xv, a1[j][i]);                               \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
        for (; k < k1; k += 8) {                                                                \
            const __m256 v0 = LOAD8(w0 + k), v1 = LOAD8(w1 + k);                                \
            for (int i = 0; i < mr; i++) {                                                      \
                __m256 xv = _mm256_loadu_ps(x + i * ldx + k);                                   \
                __asm__("" : "+x"(xv));                                                         \
                a0[0][i] = _mm256_fmadd_ps(v0, xv, a0[0][i]);                                   \
                a1[0][i] = _mm256_fmadd_ps(v1, xv, a1[0][i]);                                   \
            }                                                                                   \
        }                                                                                       \
        for (int j = 1; j < u; j++)                                                             \
            for (int i = 0; i < mr; i++) {                                                      \
                a0[0][i] = _mm256_add_ps(a0[0][i], a0[j][i]);                                   \
                a1[0][i] = _mm256_add_ps(a1[0][i], a1[j][i]);                                   \
            }                                                                                   \
        for (int i = 0; i < mr; i++) {                                                          \
            p0[i] = a0[0][i];                                                                   \
            p1[i] = a1[0][i];                                                                   \
        }                                                                                       \
    }

DEFINE_TILE(tile_bf16, uint16_t, load8_bf16)
DEFINE_TILE(tile_f32, float, load8_f32)

/* One row block for M <= MMAX x rows: tiles t0 .. t0 + nt - 1, i.e. W rows 2 * t0 onwards. */
#define DEFINE_BLOCK(NAME, TILE, WT, TO_F32, PREFETCH)                                          \
    static void NAME(const float *x, int64_t ldx, const WT *w, const WT *bias, void *y,         \
                     int y_bf16, int64_t M, int64_t N, int64_t K, int64_t t0, int64_t nt) {     \
        __m256 p[RB][2][MMAX];                                                                  \
        const int64_t K8 = K & ~(int64_t)7, chunk = (M <= MR) ? K8 : KCHUNK;                    \
        for (int64_t t = 0; t < nt; t++)                                                        \
            for (int64_t i = 0; i < M; i++) p[t][0][i] = p[t][1][i] = _mm256_setzero_ps();      \
        for (int64_t k0 = 0; k0 < K8; k0 += chunk) {                                            \
            const int64_t k1 = (k0 + chunk < K8) ? k0 + chunk : K8;                             \
            for (int64_t t = 0; t < nt; t++) {                                                  \
                const int64_t n0 = 2 * (t0 + t), n1 = (n0 + 1 < N) ? n0 + 1 : n0;               \
                const WT *w0 = w + n0 * K, *w1 = w + n1 * K;                                    \
                if (PREFETCH && M > MR) { /* the next chunk, while the x-row groups compute */  \
                    const int64_t p1 = (k1 + chunk < K) ? k1 + chunk : K;                       \
                    for (int64_t kk = k1; kk < p1; kk += 64 / (int64_t)sizeof(WT)) {            \
                        _mm_prefetch((const char *)(w0 + kk), _MM_HINT_T0);                     \
                        _mm_prefetch((const char *)(w1 + kk), _MM_HINT_T0);                     \
                    }                                                                           \
                }                                                                               \
                for (int64_t m = 0; m < M; m += MR) {                                           \
                    const float *xm = x + m * ldx;                                              \
                    __m256 *q0 = p[t][0] + m, *q1 = p[t][1] + m;                                \
                    switch ((M - m < MR) ? M - m : MR) {                                        \
                        case 4: TILE(w0, w1, xm, ldx, k0, k1, 4, 1, q0, q1); break;             \
                        case 3: TILE(w0, w1, xm, ldx, k0, k1, 3, 2, q0, q1); break;             \
                        case 2: TILE(w0, w1, xm, ldx, k0, k1, 2, 2, q0, q1); break;             \
                        default: TILE(w0, w1, xm, ldx, k0, k1, 1, 4, q0, q1); break;            \
                    }                                                                           \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
        for (int64_t t = 0; t < nt; t++) {                                                      \
            const int64_t n0 = 2 * (t0 + t), n1 = (n0 + 1 < N) ? n0 + 1 : n0;                   \
            const WT *w0 = w + n0 * K, *w1 = w + n1 * K;                                        \
            for (int64_t i = 0; i < M; i++) {                                                   \
                float s0 = hsum8(p[t][0][i]), s1 = hsum8(p[t][1][i]);                           \
                for (int64_t k = K8; k < K; k++) { /* scalar tail, K % 8 */                     \
                    s0 += TO_F32(w0[k]) * x[i * ldx + k];                                       \
                    s1 += TO_F32(w1[k]) * x[i * ldx + k];                                       \
                }                                                                               \
                const float b0 = bias ? TO_F32(bias[n0]) : 0.0f, b1 = bias ? TO_F32(bias[n1]) : 0.0f; \
                store_y(y, i * N + n0, s0 + b0, y_bf16);                                        \
                if (n1 != n0) store_y(y, i * N + n1, s1 + b1, y_bf16);                          \
            }                                                                                   \
        }                                                                                       \
    }

DEFINE_BLOCK(block_bf16, tile_bf16, uint16_t, bf16_to_f32, 1)
DEFINE_BLOCK(block_f32, tile_f32, float, f32_to_f32, 0)  /* prefetch: no gain measured */

/* All row blocks for M <= MMAX rows, split over threads. */
#define DEFINE_GEMM(NAME, BLOCK, WT)                                                            \
    static void NAME(const float *x, int64_t ldx, const WT *w, const WT *bias, void *y,         \
                     int y_bf16, int64_t M, int64_t N, int64_t K, int nthreads) {               \
        const int64_t tiles = (N + 1) / 2, blocks = (tiles + RB - 1) / RB;                      \
        _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                      \
        for (int64_t b = 0; b < blocks; b++) {                                                  \
            const int64_t t0 = b * RB, nt = (tiles - t0 < RB) ? tiles - t0 : RB;                 \
            BLOCK(x, ldx, w, bias, y, y_bf16, M, N, K, t0, nt);                                 \
        }                                                                                       \
    }

DEFINE_GEMM(gemm_bf16, block_bf16, uint16_t)
DEFINE_GEMM(gemm_f32, block_f32, float)

/* bf16 x rows widened to fp32, per calling thread; grows as needed and is kept for reuse. */
static __thread float *x_scratch;
static __thread int64_t x_scratch_len;

static const float *x_as_f32(const uint16_t *x, int64_t ldx, int64_t M, int64_t K) {
    if (x_scratch_len < M * K) {
        float *grown = (float *)realloc(x_scratch, (size_t)(M * K) * sizeof(float));
        if (!grown) return NULL;
        x_scratch = grown;
        x_scratch_len = M * K;
    }
    for (int64_t i = 0; i < M; i++)
        for (int64_t k = 0; k < K; k++) x_scratch[i * K + k] = bf16_to_f32(x[i * ldx + k]);
    return x_scratch;
}

/* The exported entry point. Returns 0, or -1 when the scratch for a bf16 x cannot be allocated.
   nthreads <= 1, or a tiny product, runs on the calling thread. */
int smallm_linear(const void *x, int64_t ldx, int x_bf16, const void *w, const void *bias,
                  int w_bf16, void *y, int y_bf16, int64_t M, int64_t N, int64_t K, int nthreads) {
    if (N * K < 65536 || nthreads < 1) nthreads = 1;
    for (int64_t m0 = 0; m0 < M; m0 += MMAX) {
        const int64_t mm = (M - m0 < MMAX) ? M - m0 : MMAX;
        const float *xf = (const float *)x + m0 * ldx;
        int64_t ldxf = ldx;
        if (x_bf16) {
            xf = x_as_f32((const uint16_t *)x + m0 * ldx, ldx, mm, K);
            ldxf = K;
            if (!xf) return -1;
        }
        void *ym = y_bf16 ? (void *)((uint16_t *)y + m0 * N) : (void *)((float *)y + m0 * N);
        if (w_bf16)
            gemm_bf16(xf, ldxf, (const uint16_t *)w, (const uint16_t *)bias, ym, y_bf16, mm, N, K,
                      nthreads);
        else
            gemm_f32(xf, ldxf, (const float *)w, (const float *)bias, ym, y_bf16, mm, N, K,
                     nthreads);
    }
    return 0;
}
