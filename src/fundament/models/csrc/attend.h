// The two sums of a bf16 decode row's attention over its cache, for the query heads that share one
// cached head (grouped-query attention), in AVX512 vectors: the scores q . k_t (AVX512-BF16's pair
// dot product, 16 keys at a time) and the weighted sums of values sum_t p_t v_t (float32 FMAs, the
// values widened to float32 by shifting bits), each key and value read once for all those heads.
// attend_rows (at the end) puts the softmax between them and chooses this path; a compiler left
// to vectorize scalar loops spends a horizontal sum on every key and reloads the output each time.
//
// Each head's sums are one fixed sequence of instructions for a given cache length: nothing in them
// depends on other rows or heads, on threads, or on how many heads run together.

// Below them the same two sums for float32 rows (a float32 model) in AVX2 vectors, over keys and
// values cached in float32 or bfloat16 (a bf16 value is its float32's high half: widened by a
// shift), 8 keys at a time.
//
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

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

// Below: a decode row's attention as decode.cpp runs it, whole (the scalar path for any head size,
// the vector paths above for heads of 64 and 128), and the loop over a batch's rows and heads.

template <typename T>
inline float f32(T v) { return static_cast<float>(v); }

// exp(x) for float in loops the compiler vectorizes (std::exp does not): x = k ln2 + r, |r| <=
// ln2 / 2, exp(r) by its Taylor polynomial to degree 7 (relative error < 2e-7), 2^k put in the
// exponent bits. Inputs below -87 give ~0 (never a NaN or denormal).
inline float fast_exp(float x) {
  x = std::min(std::max(x, -87.f), 88.f);
  const float k = std::nearbyint(x * 1.44269504f);
  const float r = x - k * 0.693145752f - k * 1.42860677e-6f;
  float p = 1.f / 5040;
  p = p * r + 1.f / 720;
  p = p * r + 1.f / 120;
  p = p * r + 1.f / 24;
  p = p * r + 1.f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.f;
  p = p * r + 1.f;
  int32_t bits;
  std::memcpy(&bits, &p, 4);
  bits += static_cast<int32_t>(k) << 23;
  std::memcpy(&p, &bits, 4);
  return p;
}

// One query head over T_len cached keys and values (hd each, of type KT): softmax(q k^T * scale) v, in
// float32; `softcap` > 0 caps each score as tanh(s / cap) * cap first (Gemma 2). HD > 0 fixes the
// head size at compile time (64 and 128 cover most models), so the per-key loops are a few whole
// vectors with no loop overhead; HD = 0 takes it from hd.
template <typename T, typename KT, int HD>
void attend(const T* __restrict qrow, const KT* __restrict kc, const KT* __restrict vc, int64_t T_len, float scale,
            float softcap, float* __restrict q, float* __restrict s, float* __restrict o, T* __restrict out,
            int64_t hd_runtime) {
  const int64_t hd = HD > 0 ? HD : hd_runtime;
  for (int64_t d = 0; d < hd; ++d) q[d] = f32(qrow[d]) * scale;
  float mx = -INFINITY;
  for (int64_t t = 0; t < T_len; ++t) {
    const KT* __restrict kt = kc + t * hd;
    float acc = 0.f;
    for (int64_t d = 0; d < hd; ++d) acc += q[d] * f32(kt[d]);
    s[t] = acc;
    mx = std::max(mx, acc);
  }
  if (softcap > 0.f) {
    mx = -INFINITY;
    for (int64_t t = 0; t < T_len; ++t) {
      s[t] = std::tanh(s[t] / softcap) * softcap;
      mx = std::max(mx, s[t]);
    }
  }
  float sum = 0.f;
  for (int64_t t = 0; t < T_len; ++t) {
    s[t] = fast_exp(s[t] - mx);
    sum += s[t];
  }
  for (int64_t d = 0; d < hd; ++d) o[d] = 0.f;
  for (int64_t t = 0; t < T_len; ++t) {
    const KT* __restrict vt = vc + t * hd;
    const float p = s[t];
    for (int64_t d = 0; d < hd; ++d) o[d] += p * f32(vt[d]);
  }
  const float inv = 1.f / sum;
  for (int64_t d = 0; d < hd; ++d) out[d] = static_cast<T>(o[d] * inv);
}

constexpr int64_t kMaxGroup = 64;  // query heads per cached head that attend_group takes

// One head's n scores in place: capped as tanh(s / cap) * cap where `softcap` > 0, then exp(s -
// max); returns 1 / their sum (the weighted sum of values is scaled by it after).
inline float softmax(float* s, int64_t n, float softcap) {
  if (softcap > 0.f)
    for (int64_t t = 0; t < n; ++t) s[t] = std::tanh(s[t] / softcap) * softcap;
  float mx = -INFINITY;
  for (int64_t t = 0; t < n; ++t) mx = std::max(mx, s[t]);
  float sum = 0.f;
  for (int64_t t = 0; t < n; ++t) {
    s[t] = fast_exp(s[t] - mx);
    sum += s[t];
  }
  return 1.f / sum;
}

#if FUNDAMENT_QGEMM
// attend for the G query heads (q, HD apart) that share one cached head, bf16: attend.h's vector
// sums read each cached key and value once for all G. `s`: G rows of `ld` floats, `o`: G * HD.
template <int HD>
void attend_group(const at::BFloat16* q, int64_t G, const at::BFloat16* kc, const at::BFloat16* vc, int64_t T_len,
                  float scale, float softcap, float* s, int64_t ld, float* o, at::BFloat16* out) {
  attention::scores<HD>(q, G, kc, T_len, scale, s, ld);
  float inv[kMaxGroup];
  for (int64_t h = 0; h < G; ++h) inv[h] = softmax(s + h * ld, T_len, softcap);
  attention::weighted_sums<HD>(s, ld, G, vc, T_len, o);
  for (int64_t h = 0; h < G; ++h)
    for (int64_t d = 0; d < HD; ++d) out[h * HD + d] = static_cast<at::BFloat16>(o[h * HD + d] * inv[h]);
}
#endif

#if defined(__AVX2__) && defined(__FMA__)
// attend for the G float32 query heads that share one cached head (keys and values float32 or
// bf16): attend.h's AVX2 sums, each block of 8 keys read once for all G.
template <int HD, typename KT>
void attend_group(const float* q, int64_t G, const KT* kc, const KT* vc, int64_t T_len, float scale, float softcap,
                  float* s, int64_t ld, float* o, float* out) {
  attention::scores<HD, KT>(q, G, kc, T_len, scale, s, ld);
  for (int64_t h = 0; h < G; ++h) {
    float* sh = s + h * ld;
    const float inv = softmax(sh, T_len, softcap);
    attention::weighted_sums<HD, KT>(sh, vc, T_len, o);
    for (int64_t d = 0; d < HD; ++d) out[h * HD + d] = o[d] * inv;
  }
}
#endif

// Per-thread scratch of at least `size` floats, kept across calls.
inline float* scratch(std::vector<float>& v, int64_t size) {
  if (v.size() < static_cast<size_t>(size)) v.resize(size);
  return v.data();
}

// Attention of layer li for every row: each (row, query head) over its own row's cache (the last
// `window` positions where > 0), split across threads by work. With heads of 64 or 128, in bf16
// with AVX512-BF16 or in float32 with AVX2, each (row, cached head) with the query heads that
// share it (attend_group). q: rows `width` apart, heads hd apart; out: rows q_dim apart; the
// caches hold KT.
template <typename T, typename KT, typename Par>
void attend_rows(const Par& par, const T* qp, int64_t width, T* ap, int64_t q_dim, at::TensorList k_caches, at::TensorList v_caches,
                 at::IntArrayRef positions, int64_t li, int64_t H, int64_t KVH, int64_t hd, int64_t window, int64_t longest,
                 float scale, float softcap) {
  const int64_t n = static_cast<int64_t>(positions.size()), G = H / KVH;
  auto cached = [&](int64_t r, int64_t g) {  // (length, keys, values) row r attends over in cached head g
    const int64_t first = window > 0 ? std::max<int64_t>(0, positions[r] + 1 - window) : 0;
    const int64_t cap = k_caches[r].size(2), at = ((li * KVH + g) * cap + first) * hd;
    return std::make_tuple(positions[r] + 1 - first, k_caches[r].data_ptr<KT>() + at, v_caches[r].data_ptr<KT>() + at);
  };
  // Each (row, cached head) with the query heads that share it, split across threads by work:
  // group(hd64, q, kc, vc, len, s, o, out) runs one through attend_group<64 or 128>.
  auto by_group = [&](const auto& group) {
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, longest * hd * G));
    par.items(n * KVH, grain, [&](int64_t begin, int64_t end) {
      thread_local std::vector<float> s_buf, o_buf;
      float* s = scratch(s_buf, G * longest);
      float* o = scratch(o_buf, G * hd);
      for (int64_t item = begin; item < end; ++item) {
        const int64_t r = item / KVH, g = item % KVH;
        const auto [len, kc, vc] = cached(r, g);
        group(hd == 64, qp + r * width + g * G * hd, kc, vc, len, s, o, ap + r * q_dim + g * G * hd);
      }
    });
  };
#if FUNDAMENT_QGEMM
  if constexpr (std::is_same_v<T, at::BFloat16> && std::is_same_v<KT, at::BFloat16>) {
    if ((hd == 64 || hd == 128) && G <= kMaxGroup) {
      by_group([&](bool hd64, const T* q, const KT* kc, const KT* vc, int64_t len, float* s, float* o, T* out) {
        if (hd64)
          attend_group<64>(q, G, kc, vc, len, scale, softcap, s, longest, o, out);
        else
          attend_group<128>(q, G, kc, vc, len, scale, softcap, s, longest, o, out);
      });
      return;
    }
  }
#endif
#if defined(__AVX2__) && defined(__FMA__)
  if constexpr (std::is_same_v<T, float>) {
    if (hd == 64 || hd == 128) {
      by_group([&](bool hd64, const T* q, const KT* kc, const KT* vc, int64_t len, float* s, float* o, T* out) {
        if (hd64)
          attend_group<64, KT>(q, G, kc, vc, len, scale, softcap, s, longest, o, out);
        else
          attend_group<128, KT>(q, G, kc, vc, len, scale, softcap, s, longest, o, out);
      });
      return;
    }
  }
#endif
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, longest * hd));
  par.items(n * H, grain, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> q_buf, s_buf, o_buf;
    float* q = scratch(q_buf, hd);
    float* s = scratch(s_buf, longest);
    float* o = scratch(o_buf, hd);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t r = item / H, hh = item % H;
      const auto [len, kc, vc] = cached(r, hh / G);
      const T* qrow = qp + r * width + hh * hd;
      T* out = ap + r * q_dim + hh * hd;
      if (hd == 64)
        attend<T, KT, 64>(qrow, kc, vc, len, scale, softcap, q, s, o, out, hd);
      else if (hd == 128)
        attend<T, KT, 128>(qrow, kc, vc, len, scale, softcap, q, s, o, out, hd);
      else
        attend<T, KT, 0>(qrow, kc, vc, len, scale, softcap, q, s, o, out, hd);
    }
  });
}

}  // namespace attention
