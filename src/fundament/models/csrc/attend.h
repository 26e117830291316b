// The two sums of a bf16 decode row's attention over its cache, for the query heads that share one
// cached head (grouped-query attention), in AVX512 vectors: the scores q . k_t (AVX512-BF16's pair
// dot product, 16 keys at a time) and the weighted sums of values sum_t p_t v_t (float32 FMAs, the
// values widened to float32 by shifting bits), each key and value read once for all those heads.
// decode.cpp owns the softmax between them and the choice of this path; a compiler left to
// vectorize scalar loops spends a horizontal sum on every key and reloads the output each time.
//
// Each head's sums are one fixed sequence of instructions for a given cache length: nothing in them
// depends on other rows or heads, on threads, or on how many heads run together.

// Below them the same two sums for float32 rows (a float32 model) in AVX2 vectors, over keys and
// values cached in float32 or bfloat16 (a bf16 value is its float32's high half: widened by a
// shift), 8 keys at a time.
//
#pragma once

#include <algorithm>

#include "qgemm.h"  // FUNDAMENT_QGEMM: this build has AVX512-BF16

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#endif

namespace attention {

#if FUNDAMENT_QGEMM

// Lane j of the result: the sum of a[j]'s 16 lanes (an in-register transpose, 45 instructions for
// 16 sums instead of 16 horizontal reductions).
inline __m512 sum16(const __m512 (&a)[16]) {
  __m512 p[8], q[4], r[2];
  for (int i = 0; i < 8; ++i)  // per 128-bit chunk: a[2i]'s and a[2i+1]'s lanes 0+2 and 1+3
    p[i] = _mm512_add_ps(_mm512_unpacklo_ps(a[2 * i], a[2 * i + 1]), _mm512_unpackhi_ps(a[2 * i], a[2 * i + 1]));
  for (int i = 0; i < 4; ++i)  // per chunk: the chunk's sum for each of a[4i .. 4i + 4)
    q[i] = _mm512_add_ps(_mm512_shuffle_ps(p[2 * i], p[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(p[2 * i], p[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  for (int i = 0; i < 2; ++i)  // chunks 0+1 and 2+3, for a[8i .. 8i + 8)
    r[i] = _mm512_add_ps(_mm512_shuffle_f32x4(q[2 * i], q[2 * i + 1], _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(q[2 * i], q[2 * i + 1], _MM_SHUFFLE(3, 1, 3, 1)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(r[0], r[1], _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(r[0], r[1], _MM_SHUFFLE(3, 1, 3, 1)));
}

// s[h * ld + t] = scale * (q_h . k_t) for the G query heads h (q_h at q + h * HD) and keys t < n
// (HD bf16 apart, HD a multiple of 32). Keys 16 at a time, every head over a block before the
// next, so a block is read from memory once and from L1 for the other heads.
template <int HD>
inline void scores(const at::BFloat16* __restrict q, int64_t G, const at::BFloat16* __restrict k, int64_t n, float scale,
                   float* __restrict s, int64_t ld) {
  constexpr int C = HD / 32;
  const __m512 sc = _mm512_set1_ps(scale);
  for (int64_t t0 = 0; t0 < n; t0 += 16) {
    const int64_t m = std::min<int64_t>(16, n - t0);
    for (int64_t h = 0; h < G; ++h) {
      __m512bh qv[C];
      for (int c = 0; c < C; ++c) qv[c] = (__m512bh)_mm512_loadu_si512(q + h * HD + 32 * c);
      __m512 acc[16];
      for (int j = 0; j < 16; ++j) {
        acc[j] = _mm512_setzero_ps();
        if (j < m)
          for (int c = 0; c < C; ++c)
            acc[j] = _mm512_dpbf16_ps(acc[j], qv[c], (__m512bh)_mm512_loadu_si512(k + (t0 + j) * HD + 32 * c));
      }
      _mm512_mask_storeu_ps(s + h * ld + t0, static_cast<__mmask16>((1u << m) - 1), _mm512_mul_ps(sum16(acc), sc));
    }
  }
}

// o[h * HD + d] = sum over t < n of p[h * ld + t] * v_t[d] for G heads (G * 2 * HD / 32 float32
// accumulators, at most 24), values HD bf16 apart. A vector of 32 bf16 read as 16 float32 lanes
// holds an even element in each lane's low half and an odd one in its high half: shifting left
// and masking give the two as float32, so each head sums even and odd elements apart, put back
// in order at the end. Each value vector is read and widened once for all G heads.
template <int HD, int G>
inline void weighted_sums(const float* __restrict p, int64_t ld, const at::BFloat16* __restrict v, int64_t n,
                          float* __restrict o) {
  constexpr int C = HD / 32;
  static_assert(G * 2 * C <= 24, "weighted_sums: more accumulators than registers");
  __m512 even[G][C], odd[G][C];
  for (int h = 0; h < G; ++h)
    for (int c = 0; c < C; ++c) even[h][c] = odd[h][c] = _mm512_setzero_ps();
  const __m512i high = _mm512_set1_epi32(static_cast<int32_t>(0xFFFF0000u));
  for (int64_t t = 0; t < n; ++t) {
    __m512 lo[C], hi[C];
    for (int c = 0; c < C; ++c) {
      const __m512i w = _mm512_loadu_si512(v + t * HD + 32 * c);
      lo[c] = _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
      hi[c] = _mm512_castsi512_ps(_mm512_and_si512(w, high));
    }
    for (int h = 0; h < G; ++h) {
      const __m512 pt = _mm512_set1_ps(p[h * ld + t]);
      for (int c = 0; c < C; ++c) {
        even[h][c] = _mm512_fmadd_ps(pt, lo[c], even[h][c]);
        odd[h][c] = _mm512_fmadd_ps(pt, hi[c], odd[h][c]);
      }
    }
  }
  for (int h = 0; h < G; ++h)
    for (int c = 0; c < C; ++c) {
      alignas(64) float e[16], d[16];
      _mm512_store_ps(e, even[h][c]);
      _mm512_store_ps(d, odd[h][c]);
      for (int i = 0; i < 16; ++i) {
        o[h * HD + 32 * c + 2 * i] = e[i];
        o[h * HD + 32 * c + 2 * i + 1] = d[i];
      }
    }
}

// weighted_sums for any number of heads: as many at once as the registers hold.
template <int HD>
inline void weighted_sums(const float* p, int64_t ld, int64_t G, const at::BFloat16* v, int64_t n, float* o) {
  constexpr int most = std::min(4, 24 / (2 * HD / 32));
  for (int64_t h = 0; h < G; h += most) {
    const int64_t g = std::min<int64_t>(most, G - h);
    const float* ph = p + h * ld;
    float* oh = o + h * HD;
    if (g == 1) weighted_sums<HD, 1>(ph, ld, v, n, oh);
    if constexpr (most >= 2) if (g == 2) weighted_sums<HD, 2>(ph, ld, v, n, oh);
    if constexpr (most >= 3) if (g == 3) weighted_sums<HD, 3>(ph, ld, v, n, oh);
    if constexpr (most >= 4) if (g == 4) weighted_sums<HD, 4>(ph, ld, v, n, oh);
  }
}

#endif  // FUNDAMENT_QGEMM

#if defined(__AVX2__) && defined(__FMA__)

// 8 cached elements as float32: loaded, or widened from bfloat16.
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
inline __m256 load8(const at::BFloat16* p) {
  const __m128i w = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(w), 16));
}

// Lane j of the result: the sum of a[j]'s 8 lanes.
inline __m256 sum8(const __m256 (&a)[8]) {
  const __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));  // a0..a3, per half
  const __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));  // a4..a7, per half
  return _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20), _mm256_permute2f128_ps(s0, s1, 0x31));
}

// s[h * ld + t] = scale * (q_h . k_t) for the G float32 query heads h (q + h * HD) and keys t < n
// (HD apart, HD a multiple of 8): 8 keys at a time, 8 independent sums, one block of keys read
// from memory once for all G heads.
template <int HD, typename KT>
inline void scores(const float* __restrict q, int64_t G, const KT* __restrict k, int64_t n, float scale,
                   float* __restrict s, int64_t ld) {
  constexpr int C = HD / 8;
  const __m256 sc = _mm256_set1_ps(scale);
  for (int64_t t0 = 0; t0 < n; t0 += 8) {
    const int64_t m = std::min<int64_t>(8, n - t0);
    for (int64_t h = 0; h < G; ++h) {
      const float* qh = q + h * HD;
      __m256 acc[8];
      for (int j = 0; j < 8; ++j) {
        acc[j] = _mm256_setzero_ps();
        if (j < m)
          for (int c = 0; c < C; ++c)
            acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(qh + 8 * c), load8(k + (t0 + j) * HD + 8 * c), acc[j]);
      }
      alignas(32) float r[8];
      _mm256_store_ps(r, _mm256_mul_ps(sum8(acc), sc));
      std::copy(r, r + m, s + h * ld + t0);
    }
  }
}

// o[d] = sum over t < n of p[t] * v_t[d] for one head (values HD apart): 64 columns at a time in 8
// float32 accumulators, each column one sum in the order of t.
template <int HD, typename KT>
inline void weighted_sums(const float* __restrict p, const KT* __restrict v, int64_t n, float* __restrict o) {
  static_assert(HD % 64 == 0, "weighted_sums: heads of whole 64-column blocks");
  for (int d0 = 0; d0 < HD; d0 += 64) {
    __m256 acc[8];
    for (int c = 0; c < 8; ++c) acc[c] = _mm256_setzero_ps();
    for (int64_t t = 0; t < n; ++t) {
      const __m256 pt = _mm256_set1_ps(p[t]);
      for (int c = 0; c < 8; ++c) acc[c] = _mm256_fmadd_ps(pt, load8(v + t * HD + d0 + 8 * c), acc[c]);
    }
    for (int c = 0; c < 8; ++c) _mm256_storeu_ps(o + d0 + 8 * c, acc[c]);
  }
}

#endif  // __AVX2__ && __FMA__

}  // namespace attention
