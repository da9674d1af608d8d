/* y = x @ W^T (+ bias) for a few rows of x, with W in bf16 or fp32 (AVX2 + FMA).

   x: (M, K) fp32, row stride ldx; W: (N, K) row-major, bf16 bit patterns (uint16) or fp32;
   bias: (N,) of W's type, or NULL; y: (M, N) fp32, contiguous. Accumulation is fp32.

   The kernel is built for small M (2..16): it is memory-bound on W, so every W row is read from
   memory once. A tile of NR = 2 rows of W is multiplied against the x rows in groups of up to
   MR = 4 (2 x 4 = 8 ymm accumulators, plus 2 for W and 1 for x); later groups re-read the tile
   from cache. Output rows (tiles of W) are split over threads with OpenMP. */

#include <immintrin.h>
#include <stdint.h>
#include <string.h>

#define MR 4

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

static inline __m256 load8_f32(const float *p) { return _mm256_loadu_ps(p); }
static inline float f32_to_f32(float v) { return v; }

/* One tile: rows w0, w1 of W against mr (compile-time after inlining) rows of x.
   s0[i] = <w0, x_i>, s1[i] = <w1, x_i>. */
#define DEFINE_TILE(NAME, WT, LOAD8, TO_F32)                                                    \
    static inline __attribute__((always_inline)) void NAME(                                    \
        const WT *w0, const WT *w1, const float *x, int64_t ldx, int64_t K, const int mr,       \
        float *s0, float *s1) {                                                                 \
        __m256 a0[MR], a1[MR];                                                                  \
        for (int i = 0; i < mr; i++) a0[i] = a1[i] = _mm256_setzero_ps();                       \
        int64_t k = 0;                                                                          \
        for (; k + 8 <= K; k += 8) {                                                            \
            const __m256 v0 = LOAD8(w0 + k), v1 = LOAD8(w1 + k);                                \
            for (int i = 0; i < mr; i++) {                                                      \
                const __m256 xv = _mm256_loadu_ps(x + i * ldx + k);                             \
                a0[i] = _mm256_fmadd_ps(v0, xv, a0[i]);                                         \
                a1[i] = _mm256_fmadd_ps(v1, xv, a1[i]);                                         \
            }                                                                                   \
        }                                                                                       \
        for (int i = 0; i < mr; i++) {                                                          \
            s0[i] = hsum8(a0[i]);                                                               \
            s1[i] = hsum8(a1[i]);                                                               \
        }                                                                                       \
        for (; k < K; k++) { /* scalar tail, K % 8 */                                           \
            const float f0 = TO_F32(w0[k]), f1 = TO_F32(w1[k]);                                 \
            for (int i = 0; i < mr; i++) {                                                      \
                s0[i] += f0 * x[i * ldx + k];                                                   \
                s1[i] += f1 * x[i * ldx + k];                                                   \
            }                                                                                   \
        }                                                                                       \
    }

DEFINE_TILE(tile_bf16, uint16_t, load8_bf16, bf16_to_f32)
DEFINE_TILE(tile_f32, float, load8_f32, f32_to_f32)

/* The whole product; the switch hands each tile a constant mr so its accumulators stay in
   registers. Odd N: the last tile pairs the last row with itself and keeps one result. */
#define DEFINE_GEMM(NAME, TILE, WT, TO_F32)                                                     \
    void NAME(const float *x, int64_t ldx, const WT *w, const WT *bias, float *y, int64_t M,    \
              int64_t N, int64_t K, int nthreads) {                                             \
        const int64_t tiles = (N + 1) / 2;                                                      \
        if (N * K < 65536 || nthreads < 1) nthreads = 1;                                        \
        _Pragma("omp parallel for num_threads(nthreads) schedule(static)")                      \
        for (int64_t t = 0; t < tiles; t++) {                                                   \
            const int64_t n0 = 2 * t, n1 = (n0 + 1 < N) ? n0 + 1 : n0;                          \
            const WT *w0 = w + n0 * K, *w1 = w + n1 * K;                                        \
            const float b0 = bias ? TO_F32(bias[n0]) : 0.0f, b1 = bias ? TO_F32(bias[n1]) : 0.0f; \
            for (int64_t m = 0; m < M; m += MR) {                                               \
                float s0[MR], s1[MR];                                                           \
                const float *xm = x + m * ldx;                                                  \
                const int64_t mr = (M - m < MR) ? M - m : MR;                                   \
                switch (mr) {                                                                   \
                    case 4: TILE(w0, w1, xm, ldx, K, 4, s0, s1); break;                         \
                    case 3: TILE(w0, w1, xm, ldx, K, 3, s0, s1); break;                         \
                    case 2: TILE(w0, w1, xm, ldx, K, 2, s0, s1); break;                         \
                    default: TILE(w0, w1, xm, ldx, K, 1, s0, s1); break;                        \
                }                                                                               \
                for (int64_t i = 0; i < mr; i++) {                                              \
                    y[(m + i) * N + n0] = s0[i] + b0;                                           \
                    if (n1 != n0) y[(m + i) * N + n1] = s1[i] + b1;                             \
                }                                                                               \
            }                                                                                   \
        }                                                                                       \
    }

DEFINE_GEMM(smallm_gemm_bf16, tile_bf16, uint16_t, bf16_to_f32)
DEFINE_GEMM(smallm_gemm_f32, tile_f32, float, f32_to_f32)
