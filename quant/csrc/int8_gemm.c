/* edgeweave integer kernels: int8 x int8 -> int32, one float rescale.
 *
 * Why our own kernel: on AVX2 machines without VNNI, torch._int_mm on CPU is a reference loop,
 * and the u8*s8 vpmaddubsw path of oneDNN/fbgemm saturates its int16 pair sums for full-range
 * int8 inputs (wrong answers, not just slow ones). Here both operands are sign-extended to int16
 * and multiplied with vpmaddwd, whose int32 pair sums cannot overflow (2 * 127 * 127 < 2^31), so
 * the int32 accumulator equals the exact integer dot product for K < 2^31 / 16129 (~133k).
 *
 * Layouts (row-major, contiguous along K):
 *   A  [M, K] int8   activations
 *   B  [N, K] int8   weights, one row per output channel (nn.Linear layout)
 *   C  [M, N] int32  or Y [M, N] float32 after rescale
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define EW_X86 1
#endif

#define NB 16 /* weight rows per parallel task */
#define FEW_ROWS 16 /* below this many activation rows, the int16-activation tiles (decode) */
/* ... and only up to this many columns. With longer rows, 4 interleaved weight rows stream faster
 * than one (M = 1, K = 4096: 1.15x the time on the int16 tiles) and 8 int16 activation rows
 * leave L1 (M = 8, K = 8192, 2 threads: 2.8x); at K <= 3072 the int16 tiles took 0.72-0.96x. */
#define FEW_ROWS_MAX_K 3072

/* Portable reference micro-kernel: one activation row against rows [n0, n1) of B. */
static void dot_rows_scalar(const int8_t* a, const int8_t* B, int64_t ldb, int64_t K,
                            int64_t n0, int64_t n1, int32_t* c) {
  for (int64_t n = n0; n < n1; ++n) {
    const int8_t* b = B + n * ldb;
    int32_t acc = 0;
    for (int64_t k = 0; k < K; ++k) acc += (int32_t)a[k] * (int32_t)b[k];
    c[n] = acc;
  }
}

#ifdef EW_X86
__attribute__((target("avx2"))) static inline int32_t hsum_epi32(__m256i v) {
  __m128i s = _mm_add_epi32(_mm256_castsi256_si128(v), _mm256_extracti128_si256(v, 1));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
  s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
  return _mm_cvtsi128_si32(s);
}

__attribute__((target("avx2"))) static inline float hsum_ps(__m256 f) {
  __m128 v = _mm_add_ps(_mm256_castps256_ps128(f), _mm256_extractf128_ps(f, 1));
  v = _mm_add_ps(v, _mm_movehl_ps(v, v));
  v = _mm_add_ss(v, _mm_shuffle_ps(v, v, 1));
  return _mm_cvtss_f32(v);
}

__attribute__((target("avx2"))) static inline __m256i load16_s8_as_s16(const int8_t* p) {
  return _mm256_cvtepi8_epi16(_mm_loadu_si128((const __m128i*)p));
}

/* The K % 16 columns the vector loop leaves: a . b[0..K) from k0 on. */
static inline int32_t dot_tail(const int8_t* a, const int8_t* b, int64_t k0, int64_t K) {
  int32_t acc = 0;
  for (int64_t k = k0; k < K; ++k) acc += (int32_t)a[k] * (int32_t)b[k];
  return acc;
}

/* 2 activation rows x 4 weight rows: 8 int32x8 accumulators (then a scalar tail for K % 16). */
__attribute__((target("avx2"))) static void tile_2x4(const int8_t* a0, const int8_t* a1,
                                                     const int8_t* b, int64_t ldb, int64_t K,
                                                     int32_t* c0, int32_t* c1) {
  __m256i s00 = _mm256_setzero_si256(), s01 = s00, s02 = s00, s03 = s00;
  __m256i s10 = s00, s11 = s00, s12 = s00, s13 = s00;
  const int64_t K16 = K / 16 * 16;
  for (int64_t k = 0; k < K16; k += 16) {
    __m256i x0 = load16_s8_as_s16(a0 + k), x1 = load16_s8_as_s16(a1 + k);
    __m256i w0 = load16_s8_as_s16(b + k), w1 = load16_s8_as_s16(b + ldb + k);
    __m256i w2 = load16_s8_as_s16(b + 2 * ldb + k), w3 = load16_s8_as_s16(b + 3 * ldb + k);
    s00 = _mm256_add_epi32(s00, _mm256_madd_epi16(x0, w0));
    s01 = _mm256_add_epi32(s01, _mm256_madd_epi16(x0, w1));
    s02 = _mm256_add_epi32(s02, _mm256_madd_epi16(x0, w2));
    s03 = _mm256_add_epi32(s03, _mm256_madd_epi16(x0, w3));
    s10 = _mm256_add_epi32(s10, _mm256_madd_epi16(x1, w0));
    s11 = _mm256_add_epi32(s11, _mm256_madd_epi16(x1, w1));
    s12 = _mm256_add_epi32(s12, _mm256_madd_epi16(x1, w2));
    s13 = _mm256_add_epi32(s13, _mm256_madd_epi16(x1, w3));
  }
  c0[0] = hsum_epi32(s00); c0[1] = hsum_epi32(s01); c0[2] = hsum_epi32(s02); c0[3] = hsum_epi32(s03);
  c1[0] = hsum_epi32(s10); c1[1] = hsum_epi32(s11); c1[2] = hsum_epi32(s12); c1[3] = hsum_epi32(s13);
  if (K16 < K) {
    for (int j = 0; j < 4; ++j) {
      c0[j] += dot_tail(a0, b + j * ldb, K16, K);
      c1[j] += dot_tail(a1, b + j * ldb, K16, K);
    }
  }
}

/* 1 activation row x 4 weight rows (the decode case, M = 1). */
__attribute__((target("avx2"))) static void tile_1x4(const int8_t* a0, const int8_t* b,
                                                     int64_t ldb, int64_t K, int32_t* c0) {
  __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
  const int64_t K16 = K / 16 * 16;
  for (int64_t k = 0; k < K16; k += 16) {
    __m256i x0 = load16_s8_as_s16(a0 + k);
    s0 = _mm256_add_epi32(s0, _mm256_madd_epi16(x0, load16_s8_as_s16(b + k)));
    s1 = _mm256_add_epi32(s1, _mm256_madd_epi16(x0, load16_s8_as_s16(b + ldb + k)));
    s2 = _mm256_add_epi32(s2, _mm256_madd_epi16(x0, load16_s8_as_s16(b + 2 * ldb + k)));
    s3 = _mm256_add_epi32(s3, _mm256_madd_epi16(x0, load16_s8_as_s16(b + 3 * ldb + k)));
  }
  c0[0] = hsum_epi32(s0); c0[1] = hsum_epi32(s1); c0[2] = hsum_epi32(s2); c0[3] = hsum_epi32(s3);
  for (int j = 0; j < 4 && K16 < K; ++j) c0[j] += dot_tail(a0, b + j * ldb, K16, K);
}

/* 1 activation row x 4 weight rows with vpmaddubsw (u8 x s8 -> int16 pair sums), 32 columns a step:
 * |w| (as u8: -128 -> 128) times sign(x, w) (x negated where w < 0, zeroed where w = 0) is x * w, and
 * a pair sum is at most 2 * 128 * 127 = 32512 < 2^15, so nothing saturates PROVIDED no x is -128
 * (sign would have to give +128). ew_gemm_s8s8s32_ld checks the activations before it takes this
 * path; quantized activations are clamped to [-127, 127] and always qualify. Against tile_1x4 this
 * reads 32 weights per load instead of widening 16 (5 vector ops per 32 weights instead of 6 per
 * 16): at M = 1, K = 4096 and 11008 it streams the weights at 1.2-1.3x the rate (bench/kernels.py). */
#define EW_UB(s, p) { const __m256i w_ = _mm256_loadu_si256((const __m256i*)(p)); \
    s = _mm256_add_epi32(s, _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_abs_epi8(w_), _mm256_sign_epi8(x, w_)), ones)); }
__attribute__((target("avx2"))) static void tile_1x4_ub(const int8_t* a0, const int8_t* b,
                                                        int64_t ldb, int64_t K, int32_t* c0) {
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0;
  const int64_t K32 = K / 32 * 32;
  for (int64_t k = 0; k < K32; k += 32) {
    const __m256i x = _mm256_loadu_si256((const __m256i*)(a0 + k));
    EW_UB(s0, b + k) EW_UB(s1, b + ldb + k) EW_UB(s2, b + 2 * ldb + k) EW_UB(s3, b + 3 * ldb + k)
  }
  c0[0] = hsum_epi32(s0); c0[1] = hsum_epi32(s1); c0[2] = hsum_epi32(s2); c0[3] = hsum_epi32(s3);
  for (int j = 0; j < 4 && K32 < K; ++j) c0[j] += dot_tail(a0, b + j * ldb, K32, K);
}
#undef EW_UB

/* Rows [m0, m1) of A against weight rows [n0, n1) of B with tile_1x4_ub, one activation row at a time
 * (the block's 16 weight rows stay in L1/L2 for the next row). No activation may be -128. */
__attribute__((target("avx2"))) static void block_ub_avx2(const int8_t* A, int64_t lda, const int8_t* B,
                                                          int64_t ldb, int32_t* C, int64_t ldc, int64_t K,
                                                          int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const int64_t n4 = n0 + ((n1 - n0) / 4) * 4;
  for (int64_t m = m0; m < m1; ++m) {
    for (int64_t n = n0; n < n4; n += 4) tile_1x4_ub(A + m * lda, B + n * ldb, ldb, K, C + m * ldc + n);
    dot_rows_scalar(A + m * lda, B, ldb, K, n4, n1, C + m * ldc);
  }
}

/* Rows [m0, m1) of A against weight rows [n0, n1) of B, for M >= FEW_ROWS (prefill): 2 x 4 tiles
 * that widen both operands as they go; with many rows they beat the int16-activation tiles below,
 * whose activation block no longer fits in L1 (8% at M = 64-200). */
__attribute__((target("avx2"))) static void block_avx2(const int8_t* A, int64_t lda,
                                                       const int8_t* B, int64_t ldb, int32_t* C,
                                                       int64_t ldc, int64_t K, int64_t m0,
                                                       int64_t m1, int64_t n0, int64_t n1) {
  int64_t n4 = n0 + ((n1 - n0) / 4) * 4;
  int64_t m = m0;
  for (; m + 1 < m1; m += 2) {
    for (int64_t n = n0; n < n4; n += 4)
      tile_2x4(A + m * lda, A + (m + 1) * lda, B + n * ldb, ldb, K, C + m * ldc + n,
               C + (m + 1) * ldc + n);
    dot_rows_scalar(A + m * lda, B, ldb, K, n4, n1, C + m * ldc);
    dot_rows_scalar(A + (m + 1) * lda, B, ldb, K, n4, n1, C + (m + 1) * ldc);
  }
  for (; m < m1; ++m) {
    for (int64_t n = n0; n < n4; n += 4) tile_1x4(A + m * lda, B + n * ldb, ldb, K, C + m * ldc + n);
    dot_rows_scalar(A + m * lda, B, ldb, K, n4, n1, C + m * ldc);
  }
}

/* Up to 8 activation rows x 1 weight row: c[r * ldc] = a16[r] . b over K16 columns.
 * The activations were widened to int16 once per call (a16, row stride lda16), so the inner loop
 * widens only the 16 weights it reads, then feeds them to R vpmaddwd with the activations taken
 * straight from L1. One weight row at a time is read front to back: at M = 1 this single sequential
 * stream takes 0.66x the time of interleaving 4 rows, and at M = 8, where each weight is widened
 * once for 8 rows instead of once per pair of rows, 0.73x (bench/kernels.py --decode-gemm). */
#define EW_MADD(r) \
  if (R > r) s##r = _mm256_add_epi32(s##r, _mm256_madd_epi16(_mm256_loadu_si256((const __m256i*)(a16 + r * lda16 + k)), w))
#define EW_HSUM(r) \
  if (R > r) c[r * ldc] = hsum_epi32(s##r)
/* R is a constant wherever this is inlined (tile_rows), so the ifs vanish; the accumulators are
 * named variables, not an array: with an array gcc kept fewer of them in registers (15% slower at
 * R = 8). */
__attribute__((target("avx2"), always_inline)) static inline void tile_rx1(const int16_t* a16, int64_t lda16,
                                                                         const int8_t* b, int64_t K16, const int R,
                                                                         int32_t* c, int64_t ldc) {
  __m256i s0 = _mm256_setzero_si256(), s1 = s0, s2 = s0, s3 = s0, s4 = s0, s5 = s0, s6 = s0, s7 = s0;
  for (int64_t k = 0; k < K16; k += 16) {
    const __m256i w = load16_s8_as_s16(b + k);
    EW_MADD(0); EW_MADD(1); EW_MADD(2); EW_MADD(3); EW_MADD(4); EW_MADD(5); EW_MADD(6); EW_MADD(7);
  }
  EW_HSUM(0); EW_HSUM(1); EW_HSUM(2); EW_HSUM(3); EW_HSUM(4); EW_HSUM(5); EW_HSUM(6); EW_HSUM(7);
}
#undef EW_MADD
#undef EW_HSUM

/* tile_rx1 with R a constant in each case, so the compiler keeps the R accumulators in registers. */
__attribute__((target("avx2"))) static void tile_rows(const int16_t* a16, int64_t lda16, const int8_t* b,
                                                      int64_t K16, int R, int32_t* c, int64_t ldc) {
  switch (R) {
    case 1: tile_rx1(a16, lda16, b, K16, 1, c, ldc); break;
    case 2: tile_rx1(a16, lda16, b, K16, 2, c, ldc); break;
    case 3: tile_rx1(a16, lda16, b, K16, 3, c, ldc); break;
    case 4: tile_rx1(a16, lda16, b, K16, 4, c, ldc); break;
    case 5: tile_rx1(a16, lda16, b, K16, 5, c, ldc); break;
    case 6: tile_rx1(a16, lda16, b, K16, 6, c, ldc); break;
    case 7: tile_rx1(a16, lda16, b, K16, 7, c, ldc); break;
    default: tile_rx1(a16, lda16, b, K16, 8, c, ldc); break;
  }
}

/* Rows [m0, m1) of A against weight rows [n0, n1) of B, for M < FEW_ROWS (decode, batched decode);
 * A16 = A's first K16 columns as int16 (row stride K16). Each weight row comes from memory once and
 * serves all (up to 8) activation rows while it is in L1. */
__attribute__((target("avx2"))) static void block_few_avx2(const int8_t* A, int64_t lda, const int16_t* A16,
                                                       const int8_t* B, int64_t ldb, int32_t* C, int64_t ldc,
                                                       int64_t K, int64_t m0, int64_t m1, int64_t n0, int64_t n1) {
  const int64_t K16 = K / 16 * 16;
  for (int64_t m = m0; m < m1; m += 8) {
    const int R = (int)(m1 - m < 8 ? m1 - m : 8);
    for (int64_t n = n0; n < n1; ++n) {
      tile_rows(A16 + m * K16, K16, B + n * ldb, K16, R, C + m * ldc + n, ldc);
      for (int r = 0; K16 < K && r < R; ++r) C[(m + r) * ldc + n] += dot_tail(A + (m + r) * lda, B + n * ldb, K16, K);
    }
  }
}
#endif

/* Whether some activation in A[M, :K] is -128 (then the vpmaddubsw tiles cannot take it). */
static int has_min_s8(const int8_t* A, int64_t lda, int64_t M, int64_t K) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t k = 0; k < K; ++k)
      if (A[m * lda + k] == INT8_MIN) return 1;
  return 0;
}

static int use_avx2(int64_t K) {
#ifdef EW_X86
  return K >= 16 && __builtin_cpu_supports("avx2");
#else
  (void)K;
  return 0;
#endif
}

/* C[M, N] (row stride ldc) = A[M, K] (row stride lda) . B[N, K]^T (row stride ldb), exact int32:
 * the strides let a caller multiply column slices of larger matrices without copying them
 * (Tender's channel groups). Parallel over blocks of NB weight rows, and over row blocks of A when
 * M is large, so both cores stream disjoint weights at M = 1. */
void ew_gemm_s8s8s32_ld(int64_t M, int64_t N, int64_t K, const int8_t* A, int64_t lda,
                        const int8_t* B, int64_t ldb, int32_t* C, int64_t ldc) {
  const int64_t MB = 64; /* activation rows per task: keeps a weight block hot in L1/L2 */
  int64_t nblocks = (N + NB - 1) / NB, mblocks = (M + MB - 1) / MB;
  /* Few rows: the activations widened to int16 once (M x K16, small next to the weights); if that
   * scratch cannot be had, the 2 x 4 tiles give the same exact answer. */
  const int avx2 = use_avx2(K);
  int16_t* A16 = NULL;
  const int64_t K16 = K / 16 * 16;
  if (avx2 && M < FEW_ROWS && K <= FEW_ROWS_MAX_K) {
    A16 = (int16_t*)malloc((size_t)(M * K16) * sizeof(int16_t));
    for (int64_t m = 0; A16 && m < M; ++m)
      for (int64_t k = 0; k < K16; ++k) A16[m * K16 + k] = A[m * lda + k];
  }
  /* Few rows, long rows (decode at 7B widths): the vpmaddubsw tiles, unless an activation is -128. */
  const int ub = avx2 && !A16 && M < FEW_ROWS && K >= 32 && !has_min_s8(A, lda, M, K);
#pragma omp parallel for schedule(static) collapse(2) if (M * N * K > 65536)
  for (int64_t mb = 0; mb < mblocks; ++mb) {
    for (int64_t nb = 0; nb < nblocks; ++nb) {
      int64_t m0 = mb * MB, m1 = m0 + MB < M ? m0 + MB : M;
      int64_t n0 = nb * NB, n1 = n0 + NB < N ? n0 + NB : N;
#ifdef EW_X86
      if (A16) {
        block_few_avx2(A, lda, A16, B, ldb, C, ldc, K, m0, m1, n0, n1);
        continue;
      }
      if (ub) {
        block_ub_avx2(A, lda, B, ldb, C, ldc, K, m0, m1, n0, n1);
        continue;
      }
      if (avx2) {
        block_avx2(A, lda, B, ldb, C, ldc, K, m0, m1, n0, n1);
        continue;
      }
#endif
      for (int64_t m = m0; m < m1; ++m) dot_rows_scalar(A + m * lda, B, ldb, K, n0, n1, C + m * ldc);
    }
  }
  free(A16);
}

/* C[M, N] = A[M, K] . B[N, K]^T, exact int32, all contiguous. */
void ew_gemm_s8s8s32(int64_t M, int64_t N, int64_t K, const int8_t* A, const int8_t* B,
                     int32_t* C) {
  ew_gemm_s8s8s32_ld(M, N, K, A, K, B, K, C, N);
}

#ifdef EW_X86
/* max |x[k]| over a row, 8 at a time; fmaxf's rule kept: a NaN never becomes the max (max_ps
 * returns its second operand, the running max, when either is NaN). */
__attribute__((target("avx2"))) static float absmax_avx2(const float* x, int64_t K) {
  const __m256 sign = _mm256_set1_ps(-0.0f);
  __m256 acc = _mm256_setzero_ps();
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) acc = _mm256_max_ps(_mm256_andnot_ps(sign, _mm256_loadu_ps(x + k)), acc);
  float lanes[8], amax = 0.0f;
  _mm256_storeu_ps(lanes, acc);
  for (int i = 0; i < 8; ++i) amax = fmaxf(amax, lanes[i]);
  for (; k < K; ++k) amax = fmaxf(amax, fabsf(x[k]));
  return amax;
}

/* q[k] = clamp(round_half_even(x[k] / s), -127, 127) for the first K / 32 * 32 columns, 32 at a
 * time with the scalar loop's float ops (an IEEE division, then rounding to nearest even);
 * returns how many columns it did. A NaN becomes -127 here (the scalar cast leaves it undefined). */
__attribute__((target("avx2"))) static int64_t quantize_row_avx2(const float* x, int64_t K, float s, int8_t* q) {
  const __m256 vs = _mm256_set1_ps(s), hi = _mm256_set1_ps(127.0f), lo = _mm256_set1_ps(-127.0f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  int64_t k = 0;
  for (; k + 32 <= K; k += 32) {
    __m256i v[4];
    for (int j = 0; j < 4; ++j) {
      __m256 f = _mm256_div_ps(_mm256_loadu_ps(x + k + 8 * j), vs);
      f = _mm256_round_ps(f, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
      v[j] = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(f, lo), hi));
    }
    /* packs work within 128-bit lanes: the bytes come out as 4-byte runs of v0..v3's low halves,
     * then of their high halves; the permutation puts each vector's 8 bytes back together. */
    const __m256i b = _mm256_packs_epi16(_mm256_packs_epi32(v[0], v[1]), _mm256_packs_epi32(v[2], v[3]));
    _mm256_storeu_si256((__m256i*)(q + k), _mm256_permutevar8x32_epi32(b, order));
  }
  return k;
}
#endif

/* Symmetric int8 quantization of activations, row by row.
 * static_scale > 0: one per-tensor scale (integer-only pipeline); otherwise a per-token scale
 * absmax / 127 per row (written to scales[m]). q = clamp(round_half_even(x / s), -127, 127):
 * the same float ops, in the same order, as quant.kernels.quantize_activations_reference.
 * AVX2 does 8 columns per instruction (at 8 decode rows the scalar loop, with its fmaxf and
 * nearbyintf calls, was 10% of a batched step). */
void ew_quantize_rows(int64_t M, int64_t K, const float* X, float static_scale, int8_t* Q,
                      float* scales) {
#ifdef EW_X86
  const int avx2 = __builtin_cpu_supports("avx2");
#endif
#pragma omp parallel for schedule(static) if (M * K > 65536)
  for (int64_t m = 0; m < M; ++m) {
    const float* x = X + m * K;
    float s = static_scale;
    if (!(s > 0.0f)) {
      float amax = 0.0f;
#ifdef EW_X86
      if (avx2) amax = absmax_avx2(x, K);
      else
#endif
        for (int64_t k = 0; k < K; ++k) amax = fmaxf(amax, fabsf(x[k]));
      s = amax > 0.0f ? amax / 127.0f : 1.0f;
    }
    scales[m] = s;
    int8_t* q = Q + m * K;
    int64_t k0 = 0;
#ifdef EW_X86
    if (avx2) k0 = quantize_row_avx2(x, K, s, q);
#endif
    for (int64_t k = k0; k < K; ++k) {
      float v = nearbyintf(x[k] / s);
      v = v > 127.0f ? 127.0f : (v < -127.0f ? -127.0f : v);
      q[k] = (int8_t)v;
    }
  }
}

/* Y[M, N] = float(C[M, N]) * (sx[m] * sw[n]) (+ bias[n]): the single float rescale. */
void ew_rescale(int64_t M, int64_t N, const int32_t* C, const float* sx, const float* sw,
                const float* bias, float* Y) {
#pragma omp parallel for schedule(static) if (M * N > 65536)
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t n = 0; n < N; ++n) {
      float y = (float)C[m * N + n] * (sx[m] * sw[n]);
      Y[m * N + n] = bias ? y + bias[n] : y;
    }
  }
}

/* The whole quantized linear in one call (fewer Python round trips on the decode path):
 * quantize X, integer GEMM, rescale. Scratch: Q [M, K] int8, C [M, N] int32, sx [M] float. */
void ew_linear_w8a8(int64_t M, int64_t N, int64_t K, const float* X, float static_scale,
                    const int8_t* W, const float* sw, const float* bias, int8_t* Q, int32_t* C,
                    float* sx, float* Y) {
  ew_quantize_rows(M, K, X, static_scale, Q, sx);
  ew_gemm_s8s8s32(M, N, K, Q, W, C);
  ew_rescale(M, N, C, sx, sw, bias, Y);
}

/* ------------------------------------------------------------------ W4A8 on packed weights
 * P [N, ldp = ceil(K / 2)] uint8: column 2j in the low nibble of byte j, 2j+1 in the high one.
 * zero NULL: signed nibbles (two's complement, w = v); else uint8 [N, G]: w = u - zero[n, g].
 * sw [N, G] float32 weight scales, G = ceil(K / group) (group = K: one scale per row).
 * The nibbles are unpacked in registers; the weights never exist as int8 in memory, so a decode
 * step (M = 1) reads half the bytes of W8. group must be even (groups start on a byte). */

/* int32 dot of activation row a[k0, k1) with weight row p's nibbles over the same columns. */
static int32_t dot4_scalar(const int8_t* a, const uint8_t* p, int64_t k0, int64_t k1, int zero,
                           int is_signed) {
  int32_t acc = 0;
  for (int64_t k = k0; k < k1; ++k) {
    int v = (p[k >> 1] >> ((k & 1) * 4)) & 0xF;
    v = is_signed ? ((v ^ 8) - 8) : v - zero;
    acc += (int32_t)a[k] * v;
  }
  return acc;
}

#define W4_ROWS 8 /* activation rows sharing one unpacked weight vector */

#ifdef EW_X86
/* 16 weights from 8 packed bytes at p, as int16: (v ^ flip) - off, i.e. signed nibbles
 * (flip = off = 8: (v ^ 8) - 8) or u - zero (flip = 0, off = zero). */
__attribute__((target("avx2"))) static inline __m256i unpack16_avx2(const uint8_t* p, __m256i flip, __m256i off) {
  const __m128i b = _mm_cvtepu8_epi16(_mm_loadl_epi64((const __m128i*)p));
  const __m128i lo = _mm_and_si128(b, _mm_set1_epi16(0xF)), hi = _mm_srli_epi16(b, 4);
  const __m256i w = _mm256_set_m128i(_mm_unpackhi_epi16(lo, hi), _mm_unpacklo_epi16(lo, hi));
  return _mm256_sub_epi16(_mm256_xor_si256(w, flip), off);
}
#endif

#ifdef EW_X86
/* out[m] = int32 dot of activation rows A[m, k0:k1) (m < M <= W4_ROWS, row stride K) with one
 * weight row's nibbles: each 16 weights are unpacked once, in registers, for all M rows. */
__attribute__((target("avx2"))) static void dot4_rows_avx2(const int8_t* A, int64_t M, int64_t K,
                                                          const uint8_t* p, int64_t k0, int64_t k1,
                                                          int zero, int is_signed, int32_t* out) {
  const __m256i off = _mm256_set1_epi16(is_signed ? 8 : (int16_t)zero);
  const __m256i flip = _mm256_set1_epi16(is_signed ? 8 : 0);
  __m256i s[W4_ROWS];
  for (int64_t m = 0; m < M; ++m) s[m] = _mm256_setzero_si256();
  int64_t k = k0;
  for (; k + 16 <= k1; k += 16) {
    const __m256i w = unpack16_avx2(p + (k >> 1), flip, off);
    for (int64_t m = 0; m < M; ++m)
      s[m] = _mm256_add_epi32(s[m], _mm256_madd_epi16(load16_s8_as_s16(A + m * K + k), w));
  }
  for (int64_t m = 0; m < M; ++m) out[m] = hsum_epi32(s[m]) + dot4_scalar(A + m * K, p, k, k1, zero, is_signed);
}
#endif

#ifdef EW_X86
/* The common case, every group a multiple of 16 columns (K % 16 == 0, group % 16 == 0): y[m] = sum_g
 * sw[g] * int32 group sum, with the int32 sums scaled in vector registers and added into float
 * accumulators, so there is one horizontal sum per row instead of one per group. */
__attribute__((target("avx2,fma"))) static void row4_avx2(const int8_t* A, int64_t M, int64_t K,
                                                         const uint8_t* p, const uint8_t* zero,
                                                         const float* sw, int64_t group, float* y) {
  const int64_t G = (K + group - 1) / group; /* the last group may be shorter, still a multiple of 16 */
  __m256 f[W4_ROWS];
  for (int64_t m = 0; m < M; ++m) f[m] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const __m256i off = _mm256_set1_epi16(zero ? (int16_t)zero[g] : 8);
    const __m256i flip = _mm256_set1_epi16(zero ? 0 : 8);
    __m256i s[W4_ROWS];
    for (int64_t m = 0; m < M; ++m) s[m] = _mm256_setzero_si256();
    const int64_t k1 = (g + 1) * group < K ? (g + 1) * group : K;
    for (int64_t k = g * group; k < k1; k += 16) {
      const __m256i w = unpack16_avx2(p + (k >> 1), flip, off);
      for (int64_t m = 0; m < M; ++m)
        s[m] = _mm256_add_epi32(s[m], _mm256_madd_epi16(load16_s8_as_s16(A + m * K + k), w));
    }
    const __m256 scale = _mm256_set1_ps(sw[g]);
    for (int64_t m = 0; m < M; ++m) f[m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[m]), scale, f[m]);
  }
  for (int64_t m = 0; m < M; ++m) y[m] = hsum_ps(f[m]);
}
#endif

#ifdef EW_X86
/* The nibbles as unsigned bytes against int8 activations with vpmaddubsw: a nibble u is at most 15,
 * so a pair sum u0 a0 + u1 a1 is at most 2 * 15 * 127 = 3810 and the int16 result never saturates
 * (it does for full-range int8 weights, which is why W8 widens to int16 instead). One 32-byte load
 * holds 64 weights; the low nibbles (even columns) meet the even activations AE and the high
 * nibbles (odd columns) the odd ones AO, both laid out [rows, K / 2]. The products are of u, so
 * each group subtracts z times its activations' sum, lane by lane (SV [rows, G, 8]: lane i sums
 * the columns k + 8i .. k + 8i + 7 of each 64-column block k, the columns that lane i of the
 * products holds), which keeps every lane an exact int32 (u - z) . a before the group's scale.
 * Signed nibbles are u - 8 after flipping each nibble's top bit. Needs K and group multiples of
 * 64. y[r] = sum_g sw[g] * (u - z) . a over the group, for rows r < R <= W4_ROWS. */
__attribute__((target("avx2,fma"), always_inline)) static inline void row_nibbles_rx(
    const int8_t* AE, const int8_t* AO, int64_t ld2, const int R, int64_t K, const uint8_t* p,
    const uint8_t* zero, const float* sw, int64_t group, const int32_t* SV, int64_t G, float* y) {
  const __m256i mask = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  const __m256i flip = _mm256_set1_epi8(zero ? 0 : (char)0x88);
  __m256 f[W4_ROWS];
  for (int r = 0; r < R; ++r) f[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    __m256i s[W4_ROWS];
    for (int r = 0; r < R; ++r) s[r] = _mm256_setzero_si256();
    const int64_t k1 = (g + 1) * group < K ? (g + 1) * group : K;
    for (int64_t k = g * group; k < k1; k += 64) {
      const __m256i b = _mm256_xor_si256(_mm256_loadu_si256((const __m256i*)(p + k / 2)), flip);
      const __m256i lo = _mm256_and_si256(b, mask), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), mask);
      for (int r = 0; r < R; ++r) {
        const __m256i e = _mm256_loadu_si256((const __m256i*)(AE + r * ld2 + k / 2));
        const __m256i o = _mm256_loadu_si256((const __m256i*)(AO + r * ld2 + k / 2));
        const __m256i t = _mm256_add_epi16(_mm256_maddubs_epi16(lo, e), _mm256_maddubs_epi16(hi, o));
        s[r] = _mm256_add_epi32(s[r], _mm256_madd_epi16(t, ones));
      }
    }
    const __m256i z = _mm256_set1_epi32(zero ? zero[g] : 8);
    const __m256 scale = _mm256_set1_ps(sw[g]);
    for (int r = 0; r < R; ++r) {
      const __m256i zs = _mm256_mullo_epi32(z, _mm256_loadu_si256((const __m256i*)(SV + (r * G + g) * 8)));
      f[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(s[r], zs)), scale, f[r]);
    }
  }
  for (int r = 0; r < R; ++r) y[r] = hsum_ps(f[r]);
}

/* row_nibbles_rx with R a constant in each case (the accumulators stay in registers for small R). */
__attribute__((target("avx2,fma"))) static void row_nibbles_avx2(const int8_t* AE, const int8_t* AO, int64_t ld2,
                                                                 int64_t R, int64_t K, const uint8_t* p,
                                                                 const uint8_t* zero, const float* sw, int64_t group,
                                                                 const int32_t* SV, int64_t G, float* y) {
  switch (R) {
    case 1: row_nibbles_rx(AE, AO, ld2, 1, K, p, zero, sw, group, SV, G, y); break;
    case 2: row_nibbles_rx(AE, AO, ld2, 2, K, p, zero, sw, group, SV, G, y); break;
    case 3: row_nibbles_rx(AE, AO, ld2, 3, K, p, zero, sw, group, SV, G, y); break;
    case 4: row_nibbles_rx(AE, AO, ld2, 4, K, p, zero, sw, group, SV, G, y); break;
    case 5: row_nibbles_rx(AE, AO, ld2, 5, K, p, zero, sw, group, SV, G, y); break;
    case 6: row_nibbles_rx(AE, AO, ld2, 6, K, p, zero, sw, group, SV, G, y); break;
    case 7: row_nibbles_rx(AE, AO, ld2, 7, K, p, zero, sw, group, SV, G, y); break;
    default: row_nibbles_rx(AE, AO, ld2, 8, K, p, zero, sw, group, SV, G, y); break;
  }
}

/* The layout row_nibbles_avx2 reads: Q [M, K] int8 -> AE, AO [M, K / 2] (even and odd columns) and
 * SV [M, G, 8] (per group and lane, the activation sums the zero point multiplies). One allocation
 * (*buf, for free()); NULL if it failed. K and group are multiples of 64. */
static int8_t* split_activations(const int8_t* Q, int64_t M, int64_t K, int64_t group, int64_t G,
                                 int8_t** AO, int32_t** SV, void** buf) {
  const size_t half = (size_t)(M * (K / 2)), sums = (size_t)(M * G * 8) * sizeof(int32_t);
  char* b = (char*)malloc(2 * half + sums + 64);
  *buf = b;
  if (!b) return NULL;
  int8_t* AE = (int8_t*)b;
  *AO = AE + half;
  *SV = (int32_t*)(((uintptr_t)(*AO + half) + 63) & ~(uintptr_t)63);
  memset(*SV, 0, sums);
  for (int64_t m = 0; m < M; ++m) {
    const int8_t* q = Q + m * K;
    for (int64_t j = 0; j < K / 2; ++j) {
      AE[m * (K / 2) + j] = q[2 * j];
      (*AO)[m * (K / 2) + j] = q[2 * j + 1];
    }
    for (int64_t k = 0; k < K; ++k) (*SV)[(m * G + k / group) * 8 + (k % 64) / 8] += q[k];
  }
  return AE;
}
#endif


/* Whether ew_linear_w4a8 multiplies the nibbles as bytes (row_nibbles_avx2) for this shape on this
 * CPU: AVX2 + FMA, K and group (K for one scale per row) multiples of 64. quant.kernels.int4_linear
 * routes by this too. */
int ew_w4_nibble_path(int64_t K, int64_t group) {
#ifdef EW_X86
  return use_avx2(K) && __builtin_cpu_supports("fma") && K % 64 == 0 && group % 64 == 0;
#else
  (void)K;
  (void)group;
  return 0;
#endif
}

/* Y[m, n] = y[m] * sx[m] (+ bias[n]) for rows m < rows: a weight row's results, rescaled. */
static inline void store_rows(const float* y, int64_t rows, const float* sx, const float* bias, int64_t n,
                              int64_t N, float* Y) {
  for (int64_t m = 0; m < rows; ++m) {
    const float v = y[m] * sx[m];
    Y[m * N + n] = bias ? v + bias[n] : v;
  }
}

void ew_linear_w4a8(int64_t M, int64_t N, int64_t K, const float* X, float static_scale,
                    const uint8_t* P, const uint8_t* zero, const float* sw, int64_t group,
                    const float* bias, int8_t* Q, float* sx, float* Y) {
  const int64_t ldp = (K + 1) / 2, G = (K + group - 1) / group;
  ew_quantize_rows(M, K, X, static_scale, Q, sx);
  int avx2 = use_avx2(K);
#ifdef EW_X86
  int fma = avx2 && __builtin_cpu_supports("fma");
  if (ew_w4_nibble_path(K, group)) {
    int8_t* AO = NULL;
    int32_t* SV = NULL;
    void* buf = NULL;
    const int8_t* AE = split_activations(Q, M, K, group, G, &AO, &SV, &buf);
    if (AE) {
#pragma omp parallel for schedule(static) if (M * N * K > 65536)
      for (int64_t n = 0; n < N; ++n) {
        for (int64_t m0 = 0; m0 < M; m0 += W4_ROWS) {
          const int64_t rows = M - m0 < W4_ROWS ? M - m0 : W4_ROWS;
          float y[W4_ROWS];
          row_nibbles_avx2(AE + m0 * (K / 2), AO + m0 * (K / 2), K / 2, rows, K, P + n * ldp,
                           zero ? zero + n * G : NULL, sw + n * G, group, SV + m0 * G * 8, G, y);
          store_rows(y, rows, sx + m0, bias, n, N, Y + m0 * N);
        }
      }
      free(buf);
      return;
    }  /* no scratch: the path below gives the same sums */
  }
#endif
#pragma omp parallel for schedule(static) if (M * N * K > 65536)
  for (int64_t n = 0; n < N; ++n) {
    const uint8_t* p = P + n * ldp;
    for (int64_t m0 = 0; m0 < M; m0 += W4_ROWS) {
      const int64_t rows = M - m0 < W4_ROWS ? M - m0 : W4_ROWS;
      const int8_t* a = Q + m0 * K;
      float y[W4_ROWS] = {0};
      int32_t acc[W4_ROWS];
#ifdef EW_X86
      if (fma && K % 16 == 0 && group % 16 == 0) {
        row4_avx2(a, rows, K, p, zero ? zero + n * G : NULL, sw + n * G, group, y);
      } else
#endif
      for (int64_t g = 0; g < G; ++g) {
        int64_t k0 = g * group, k1 = k0 + group < K ? k0 + group : K;
        int z = zero ? zero[n * G + g] : 0;
#ifdef EW_X86
        if (avx2) dot4_rows_avx2(a, rows, K, p, k0, k1, z, zero == NULL, acc);
        else
#endif
          for (int64_t m = 0; m < rows; ++m) acc[m] = dot4_scalar(a + m * K, p, k0, k1, z, zero == NULL);
        for (int64_t m = 0; m < rows; ++m) y[m] += (float)acc[m] * sw[n * G + g];
      }
      store_rows(y, rows, sx + m0, bias, n, N, Y + m0 * N);
    }
  }
  (void)avx2;
}

/* Packed int4 [N, ceil(K / 2)] -> int8 [N, K]: signed nibbles (zero NULL), or u - zero[n, k / group]. */
void ew_unpack_int4(int64_t N, int64_t K, const uint8_t* P, const uint8_t* zero, int64_t group,
                    int8_t* out) {
  const int64_t ldp = (K + 1) / 2, G = (K + group - 1) / group;
#pragma omp parallel for schedule(static) if (N * K > 65536)
  for (int64_t n = 0; n < N; ++n) {
    const uint8_t* p = P + n * ldp;
    int8_t* o = out + n * K;
    for (int64_t g = 0; g < G; ++g) {
      const int64_t k0 = g * group, k1 = k0 + group < K ? k0 + group : K;
      const int z = zero ? zero[n * G + g] : 0;
      for (int64_t k = k0; k < k1; ++k) {
        int v = (p[k >> 1] >> ((k & 1) * 4)) & 0xF;
        o[k] = (int8_t)(zero ? v - z : ((v ^ 8) - 8));
      }
    }
  }
}
