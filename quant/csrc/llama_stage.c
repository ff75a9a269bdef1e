/* edgeweave: a whole Llama-family decoder stage in one C call (workers/llama_stage.py, native path).
 *
 * Why: at decode time (one row per session) a layer's four integer GEMVs take about 0.3 ms, while
 * running the same layer as PyTorch ops costs about 2,300 small ATen calls per token (RMSNorm,
 * RoPE, cache slicing, attention), each 1-20 us. Here the layer runs as plain loops between the
 * integer kernels of int8_gemm.c, with no allocation per op and no Python in between.
 *
 * Rows: R rows of hidden states [R, D], each belonging to one session. Row r sits at position
 * pos[r] of its session; its keys and values go to that session's cache, whose layer l block is
 * kc[r] + l * KV * maxlen[r] * hd, laid out [KV, maxlen[r], hd] (workers.llama_stage.KVCache).
 * Several rows of one session (a prompt) have consecutive positions: every row's K/V is written
 * before any row attends, and row r attends to positions [0, pos[r]], which is the causal mask.
 * Each row's result depends only on its own session (int32 products are exact, scales are per
 * row or static, attention reads only its own cache): batching sessions never changes a token.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef _OPENMP
#include <omp.h>
#endif
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#define EW_X86 1
#endif

/* from int8_gemm.c */
void ew_linear_w8a8(int64_t M, int64_t N, int64_t K, const float* X, float static_scale,
                    const int8_t* W, const float* sw, const float* bias, int8_t* Q, int32_t* C,
                    float* sx, float* Y);
void ew_linear_w4a8(int64_t M, int64_t N, int64_t K, const float* X, float static_scale,
                    const uint8_t* P, const uint8_t* zero, const float* sw, int64_t group,
                    const float* bias, int8_t* Q, float* sx, float* Y);

/* One quantized linear (a FusedLinear): mirrored by quant.native.EwLinear. */
typedef struct {
  int64_t bits;        /* 8: w int8 [N, K]; 4: w uint8 packed [N, (K + 1) / 2] */
  int64_t n, k;
  const void* w;
  const float* sw;     /* bits 8: [N]; bits 4: [N, G] */
  const uint8_t* zero; /* bits 4 with zero points: uint8 [N, G]; else NULL */
  int64_t group;       /* bits 4: columns per weight scale (K: one per row) */
  const float* bias;   /* [N] or NULL */
  float static_scale;  /* > 0: static per-tensor activation scale; 0: per token */
  float offset;        /* subtracted from the input before quantizing, when has_offset */
  int64_t has_offset;
  int64_t rotate;      /* > 0: rotate each input row by a block Hadamard of this block (quant/hadamard.py) */
} ew_linear;

typedef struct {
  const float* ln1; /* [D] */
  const float* ln2; /* [D] */
  ew_linear qkv;    /* D -> (H + 2 KV) hd */
  ew_linear o;      /* H hd -> D */
  ew_linear gate_up; /* D -> 2 I */
  ew_linear down;   /* I -> D */
} ew_llama_layer;

typedef struct {
  int64_t hidden, heads, kv_heads, head_dim, inter;
  float eps;
} ew_llama_dims;

typedef struct {
  float* xo;   /* [R, Kmax] input minus the static offset */
  int8_t* q;   /* [R, Kmax] */
  int32_t* c;  /* [R, Nmax] */
  float* sx;   /* [R] */
} lin_scratch;

/* x[M, K] -> x H in place: per row, K / block Walsh-Hadamard blocks, then 1 / sqrt(block); the same
 * butterflies in the same order as quant.hadamard.hadamard, so the two agree bit for bit. */
static void hadamard_rows(float* x, int64_t M, int64_t K, int64_t block) {
  const float norm = (float)(1.0 / sqrt((double)block));
  for (int64_t r = 0; r < M; ++r) {
    for (int64_t b0 = 0; b0 < K; b0 += block) {
      float* v = x + r * K + b0;
      for (int64_t h = 1; h < block; h *= 2)
        for (int64_t i = 0; i < block; i += 2 * h)
          for (int64_t j = i; j < i + h; ++j) {
            const float a = v[j], b = v[j + h];
            v[j] = a + b;
            v[j + h] = a - b;
          }
      for (int64_t j = 0; j < block; ++j) v[j] *= norm;
    }
  }
}

/* Y[M, N] = linear(X[M, K]) */
static void lin_apply(const ew_linear* L, int64_t M, const float* X, float* Y, lin_scratch* s) {
  if (L->has_offset || L->rotate) {
    for (int64_t i = 0; i < M * L->k; ++i) s->xo[i] = L->has_offset ? X[i] - L->offset : X[i];
    if (L->rotate) hadamard_rows(s->xo, M, L->k, L->rotate);
    X = s->xo;
  }
  if (L->bits == 8)
    ew_linear_w8a8(M, L->n, L->k, X, L->static_scale, (const int8_t*)L->w, L->sw, L->bias, s->q, s->c,
                   s->sx, Y);
  else
    ew_linear_w4a8(M, L->n, L->k, X, L->static_scale, (const uint8_t*)L->w, L->zero, L->sw, L->group,
                   L->bias, s->q, s->sx, Y);
}

/* y[R, D] = w * x / sqrt(mean(x^2) + eps), the mean accumulated in double */
static void rms_norm(int64_t R, int64_t D, const float* x, const float* w, float eps, float* y) {
  for (int64_t r = 0; r < R; ++r) {
    const float* xr = x + r * D;
    double ss = 0.0;
    for (int64_t i = 0; i < D; ++i) ss += (double)xr[i] * xr[i];
    float inv = 1.0f / sqrtf((float)(ss / D) + eps);
    for (int64_t i = 0; i < D; ++i) y[r * D + i] = w[i] * (xr[i] * inv);
  }
}

/* RoPE on one head vector v[hd] in place (rotate-half convention, cos/sin rows [hd]). */
static void rope(float* v, int64_t hd, const float* cs, const float* sn) {
  const int64_t half = hd / 2;
  for (int64_t j = 0; j < half; ++j) {
    float a = v[j], b = v[j + half];
    v[j] = a * cs[j] - b * sn[j];
    v[j + half] = b * cs[j + half] + a * sn[j + half];
  }
}

/* Portable attention for one query row: out[hd] = softmax(q . K[0..S) * scale) . V[0..S);
 * K, V rows of hd floats; p: scratch [S]. */
static void attend_scalar(const float* q, const float* K, const float* V, int64_t S, int64_t hd, float scale,
                          float* p, float* out) {
  float mx = -INFINITY;
  for (int64_t s = 0; s < S; ++s) {
    float acc = 0.0f;
    for (int64_t j = 0; j < hd; ++j) acc += q[j] * K[s * hd + j];
    p[s] = acc * scale;
    mx = p[s] > mx ? p[s] : mx;
  }
  double sum = 0.0;
  for (int64_t s = 0; s < S; ++s) {
    p[s] = expf(p[s] - mx);
    sum += p[s];
  }
  const float inv = (float)(1.0 / sum);
  for (int64_t j = 0; j < hd; ++j) out[j] = 0.0f;
  for (int64_t s = 0; s < S; ++s) {
    const float w = p[s] * inv;
    for (int64_t j = 0; j < hd; ++j) out[j] += w * V[s * hd + j];
  }
}

#ifdef EW_X86
/* exp(x) for x <= 0 on 8 lanes: 2^n * e^r with |r| <= ln2 / 2, degree-6 polynomial (Cephes
 * coefficients), relative error about 2e-7; below -87 it returns 0. */
__attribute__((target("avx2,fma"))) static inline __m256 exp_neg_avx2(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.0f);
  __m256 under = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_max_ps(x, lo);
  __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                             _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, r, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
  __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(under, _mm256_mul_ps(y, _mm256_castsi256_ps(e)));
}

/* 8 dot products q . k_i (i < 8, rows hd apart from k), hd % 8 == 0: 8 independent FMA chains,
 * then one transposing horizontal add. */
__attribute__((target("avx2,fma"))) static inline __m256 dot8_avx2(const float* q, const float* k, int64_t hd) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0, a4 = a0, a5 = a0, a6 = a0, a7 = a0;
  for (int64_t c = 0; c < hd; c += 8) {
    const __m256 qc = _mm256_loadu_ps(q + c);
    a0 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k + c), a0);
    a1 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k + hd + c), a1);
    a2 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k + 2 * hd + c), a2);
    a3 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k + 3 * hd + c), a3);
    a4 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k + 4 * hd + c), a4);
    a5 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k + 5 * hd + c), a5);
    a6 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k + 6 * hd + c), a6);
    a7 = _mm256_fmadd_ps(qc, _mm256_loadu_ps(k + 7 * hd + c), a7);
  }
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a0, a1), _mm256_hadd_ps(a2, a3));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a4, a5), _mm256_hadd_ps(a6, a7));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

static float dot_scalar(const float* a, const float* b, int64_t n) {
  float acc = 0.0f;
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

/* attend_scalar with AVX2 + FMA, for hd % 8 == 0. */
__attribute__((target("avx2,fma"))) static void attend_avx2(const float* q, const float* K, const float* V,
                                                           int64_t S, int64_t hd, float scale, float* p,
                                                           float* out) {
  const __m256 vs = _mm256_set1_ps(scale);
  __m256 vmax = _mm256_set1_ps(-INFINITY);
  int64_t s = 0;
  for (; s + 8 <= S; s += 8) {
    const __m256 d = _mm256_mul_ps(dot8_avx2(q, K + s * hd, hd), vs);
    _mm256_storeu_ps(p + s, d);
    vmax = _mm256_max_ps(vmax, d);
  }
  float mx = -INFINITY, lanes[8];
  _mm256_storeu_ps(lanes, vmax);
  for (int j = 0; j < 8; ++j) mx = lanes[j] > mx ? lanes[j] : mx;
  for (; s < S; ++s) {
    p[s] = dot_scalar(q, K + s * hd, hd) * scale;
    mx = p[s] > mx ? p[s] : mx;
  }
  const __m256 vm = _mm256_set1_ps(mx);
  __m256 vsum = _mm256_setzero_ps();
  s = 0;
  for (; s + 8 <= S; s += 8) {
    const __m256 e = exp_neg_avx2(_mm256_sub_ps(_mm256_loadu_ps(p + s), vm));
    _mm256_storeu_ps(p + s, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  _mm256_storeu_ps(lanes, vsum);
  double sum = 0.0;
  for (int j = 0; j < 8; ++j) sum += lanes[j];
  for (; s < S; ++s) {
    p[s] = expf(p[s] - mx);
    sum += p[s];
  }
  const float inv = (float)(1.0 / sum);
  for (int64_t c0 = 0; c0 < hd; c0 += 64) { /* 64 output floats (8 registers) per pass over V */
    const int64_t nc = hd - c0 < 64 ? (hd - c0) / 8 : 8;
    __m256 acc[8];
    for (int64_t c = 0; c < nc; ++c) acc[c] = _mm256_setzero_ps();
    for (int64_t t = 0; t < S; ++t) {
      const __m256 w = _mm256_set1_ps(p[t]);
      const float* v = V + t * hd + c0;
      for (int64_t c = 0; c < nc; ++c) acc[c] = _mm256_fmadd_ps(w, _mm256_loadu_ps(v + 8 * c), acc[c]);
    }
    for (int64_t c = 0; c < nc; ++c) _mm256_storeu_ps(out + c0 + 8 * c, _mm256_mul_ps(acc[c], _mm256_set1_ps(inv)));
  }
}
#endif

/* Whether attention may take the AVX2 + FMA path: the CPU check runs once. */
static int simd_attention(void) {
  static int ok = -1;
  if (ok < 0) {
#ifdef EW_X86
    ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
#else
    ok = 0;
#endif
  }
  return ok;
}

static void attend(const float* q, const float* K, const float* V, int64_t S, int64_t hd, float scale, float* p,
                   float* out) {
#ifdef EW_X86
  if (simd_attention() && hd % 8 == 0) {
    attend_avx2(q, K, V, S, hd, scale, p, out);
    return;
  }
#endif
  attend_scalar(q, K, V, S, hd, scale, p, out);
}

/* One attention row, for tests: simd 0 forces the portable path. Returns -1 if out of memory. */
int ew_attend(const float* q, const float* K, const float* V, int64_t S, int64_t hd, float scale, int64_t simd,
              float* out) {
  float* p = malloc(sizeof(float) * (S > 0 ? S : 1));
  if (!p) return -1;
  if (simd)
    attend(q, K, V, S, hd, scale, p, out);
  else
    attend_scalar(q, K, V, S, hd, scale, p, out);
  free(p);
  return 0;
}

static int64_t max_i64(int64_t a, int64_t b) { return a > b ? a : b; }

/* Runs layers [0, L) on h [R, D] in place. Returns 0, or -1 when scratch memory is not available. */
int ew_llama_stage_forward(const ew_llama_dims* d, int64_t L, const ew_llama_layer* layers, int64_t R,
                           float* h, float* const* kc, float* const* vc, const int64_t* maxlen,
                           const int64_t* pos, const float* cos_t, const float* sin_t) {
  const int64_t D = d->hidden, H = d->heads, KV = d->kv_heads, hd = d->head_dim, I = d->inter;
  const int64_t NQ = H * hd, NKV = KV * hd, NQKV = NQ + 2 * NKV, rep = H / KV;
  const int64_t kmax = max_i64(max_i64(D, NQ), I), nmax = max_i64(max_i64(NQKV, D), 2 * I);
  int64_t smax = 1;
  for (int64_t r = 0; r < R; ++r) smax = max_i64(smax, pos[r] + 1);
  int threads = 1;
#ifdef _OPENMP
  threads = omp_get_max_threads();
#endif
  float* xn = malloc(sizeof(float) * R * D);
  float* qkv = malloc(sizeof(float) * R * NQKV);
  float* att = malloc(sizeof(float) * R * NQ);
  float* tmp = malloc(sizeof(float) * R * D);
  float* gu = malloc(sizeof(float) * R * 2 * I);
  float* act = malloc(sizeof(float) * R * I);
  float* probs = malloc(sizeof(float) * threads * smax);
  lin_scratch s = {malloc(sizeof(float) * R * kmax), malloc((size_t)R * kmax), malloc(sizeof(int32_t) * R * nmax),
                   malloc(sizeof(float) * R)};
  int rc = 0;
  if (!xn || !qkv || !att || !tmp || !gu || !act || !probs || !s.xo || !s.q || !s.c || !s.sx) {
    rc = -1;
    goto done;
  }
  const float scale = 1.0f / sqrtf((float)hd);
  for (int64_t l = 0; l < L; ++l) {
    const ew_llama_layer* ly = layers + l;
    rms_norm(R, D, h, ly->ln1, d->eps, xn);
    lin_apply(&ly->qkv, R, xn, qkv, &s); /* [R, NQKV]: q | k | v */
    for (int64_t r = 0; r < R; ++r) {     /* rotate q and k, append k and v to the cache */
      float* row = qkv + r * NQKV;
      const float* cs = cos_t + pos[r] * hd;
      const float* sn = sin_t + pos[r] * hd;
      for (int64_t hh = 0; hh < H; ++hh) rope(row + hh * hd, hd, cs, sn);
      for (int64_t g = 0; g < KV; ++g) {
        float* kv = row + NQ + g * hd;
        rope(kv, hd, cs, sn);
        const int64_t at = ((l * KV + g) * maxlen[r] + pos[r]) * hd;
        memcpy(kc[r] + at, kv, sizeof(float) * hd);
        memcpy(vc[r] + at, row + NQ + NKV + g * hd, sizeof(float) * hd);
      }
    }
#pragma omp parallel for schedule(dynamic, 1) if (R * H > 1 && smax * R > 256)
    for (int64_t t = 0; t < R * H; ++t) {
      const int64_t r = t / H, hh = t % H, g = hh / rep;
      int tid = 0;
#ifdef _OPENMP
      tid = omp_get_thread_num();
#endif
      const int64_t base = (l * KV + g) * maxlen[r] * hd;
      attend(qkv + r * NQKV + hh * hd, kc[r] + base, vc[r] + base, pos[r] + 1, hd, scale, probs + tid * smax,
             att + r * NQ + hh * hd);
    }
    lin_apply(&ly->o, R, att, tmp, &s);
    for (int64_t i = 0; i < R * D; ++i) h[i] += tmp[i];
    rms_norm(R, D, h, ly->ln2, d->eps, xn);
    lin_apply(&ly->gate_up, R, xn, gu, &s); /* [R, 2I]: gate | up */
    for (int64_t r = 0; r < R; ++r) {
      const float* g = gu + r * 2 * I;
      for (int64_t i = 0; i < I; ++i) act[r * I + i] = g[i] / (1.0f + expf(-g[i])) * g[I + i];
    }
    lin_apply(&ly->down, R, act, tmp, &s);
    for (int64_t i = 0; i < R * D; ++i) h[i] += tmp[i];
  }
done:
  free(xn); free(qkv); free(att); free(tmp); free(gu); free(act); free(probs);
  free(s.xo); free(s.q); free(s.c); free(s.sx);
  return rc;
}
