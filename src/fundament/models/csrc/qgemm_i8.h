// Int8 activations for qgemm_f32.h's int4 and int8g weights (engine.int8_activations, generated
// tokens' rows): the row tiles and the one-row path, with the kinds and the tile height both
// headers share. gemm() in qgemm_f32.h quantizes the rows and drives these.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "qgemm.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define FUNDAMENT_QGEMM32 1
#else
#define FUNDAMENT_QGEMM32 0
#endif

namespace qgemm32 {

using qgemm::kBF16, qgemm::kI8, qgemm::kI4, qgemm::kPanel, qgemm::kGroup, qgemm::kPairs, qgemm::kBlock;
constexpr int64_t kI8G = 3;  // int8 weights with a float16 scale per column and group (linear.py PACK_INT8G)
constexpr int64_t kInt8X = 4;  // added to kI4 or kI8G: int8 activations (linear.py PACK_INT8X)
constexpr int64_t kTileRows = 6;  // rows a tile takes at most
constexpr int64_t kAhead = 8;  // groups a row's weights are prefetched ahead (4 to 16: the same)

#if FUNDAMENT_QGEMM32

// Each row's inputs as int8 with a scale per group of 32 (llama.cpp's Q8_0: d = max |x| / 127,
// q = round(x / d)), so a group's products are integer dot products: int4 levels (0..15) times
// int8 by vpmaddubsw, summed in int16 for 8 pairs of inputs (at most 8 * 2 * 15 * 127 = 30480)
// and then in int32; int8g levels widened to int16 and multiplied by vpmaddwd into int32. Per
// column and group: sum += (scale * d) * float(isum) (+ offset * d * sum(q) for int4), groups
// ascending. The integer sums are exact and the float steps are the same for a row whatever the
// rows beside it, so a row's result does not depend on its batch here either.

// q (K int8), d and s (G: the scale, and the scale times the sum of the group's q) of one row.
inline void quantize_row(const float* __restrict x, int64_t K, int8_t* __restrict q, float* __restrict d,
                         float* __restrict s) {
  const __m256 sign = _mm256_set1_ps(-0.f);
  const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
  for (int64_t g = 0; g < K / kGroup; ++g) {
    __m256 v[4], m = _mm256_setzero_ps();
    for (int j = 0; j < 4; ++j) {
      v[j] = _mm256_loadu_ps(x + g * kGroup + 8 * j);
      m = _mm256_max_ps(m, _mm256_andnot_ps(sign, v[j]));
    }
    alignas(32) float lanes[8];
    _mm256_store_ps(lanes, m);
    const float amax = *std::max_element(lanes, lanes + 8);
    const __m256 inv = _mm256_set1_ps(amax > 0.f ? 127.f / amax : 0.f);
    __m256i qi[4];
    for (int j = 0; j < 4; ++j)
      qi[j] = _mm256_cvtps_epi32(_mm256_round_ps(_mm256_mul_ps(v[j], inv), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    const __m256i total = _mm256_add_epi32(_mm256_add_epi32(qi[0], qi[1]), _mm256_add_epi32(qi[2], qi[3]));
    alignas(32) int32_t t[8];
    _mm256_store_si256(reinterpret_cast<__m256i*>(t), total);
    const __m256i bytes = _mm256_packs_epi16(_mm256_packs_epi32(qi[0], qi[1]), _mm256_packs_epi32(qi[2], qi[3]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + g * kGroup), _mm256_permutevar8x32_epi32(bytes, order));
    d[g] = amax / 127.f;
    s[g] = d[g] * static_cast<float>(t[0] + t[1] + t[2] + t[3] + t[4] + t[5] + t[6] + t[7]);
  }
}

// acc[r][16 p + c] += group g's sums for MR rows (q: K apart, d and s: G apart) and P panels of
// int4 (units U apart at `unit`), 2 MR P int16 sums in registers.
template <int MR, int P>
inline void itile_i4(const int8_t* q, int64_t K, const float* d, const float* s, int64_t G, const uint8_t* unit,
                     int64_t U, float* acc, int64_t lda) {
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  alignas(32) int32_t isum[MR][P][kPanel];
  for (int h = 0; h < 2; ++h) {  // pairs 0..7, then 8..15
    __m256i s16[MR][P];
    for (int r = 0; r < MR; ++r)
      for (int p = 0; p < P; ++p) s16[r][p] = _mm256_setzero_si256();
    for (int64_t i = 8 * h; i < 8 * h + 8; ++i) {
      __m256i w[P];  // lane e: column e / 2, input 2 i + e % 2 (the pair's 32 levels in order)
      for (int p = 0; p < P; ++p) {
        const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(unit + p * U + 64 + i * 16));
        w[p] = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), low4);
      }
      for (int r = 0; r < MR; ++r) {
        int16_t pair;
        std::memcpy(&pair, q + r * K + 2 * i, 2);
        const __m256i xv = _mm256_set1_epi16(pair);
        for (int p = 0; p < P; ++p) s16[r][p] = _mm256_add_epi16(s16[r][p], _mm256_maddubs_epi16(w[p], xv));
      }
    }
    for (int r = 0; r < MR; ++r)
      for (int p = 0; p < P; ++p) {
        __m256i lo = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(s16[r][p]));
        __m256i hi = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(s16[r][p], 1));
        if (h) {
          lo = _mm256_add_epi32(lo, _mm256_load_si256(reinterpret_cast<const __m256i*>(isum[r][p])));
          hi = _mm256_add_epi32(hi, _mm256_load_si256(reinterpret_cast<const __m256i*>(isum[r][p] + 8)));
        }
        _mm256_store_si256(reinterpret_cast<__m256i*>(isum[r][p]), lo);
        _mm256_store_si256(reinterpret_cast<__m256i*>(isum[r][p] + 8), hi);
      }
  }
  for (int p = 0; p < P; ++p)
    for (int c = 0; c < 2; ++c) {
      const __m256 sc = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(unit + p * U + 16 * c)));
      const __m256 off = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(unit + p * U + 32 + 16 * c)));
      for (int r = 0; r < MR; ++r) {
        float* a = acc + r * lda + p * kPanel + 8 * c;
        __m256 v = _mm256_loadu_ps(a);
        const __m256 x = _mm256_cvtepi32_ps(_mm256_load_si256(reinterpret_cast<const __m256i*>(isum[r][p] + 8 * c)));
        v = _mm256_fmadd_ps(_mm256_mul_ps(sc, _mm256_set1_ps(d[r * G])), x, v);
        v = _mm256_fmadd_ps(off, _mm256_set1_ps(s[r * G]), v);
        _mm256_storeu_ps(a, v);
      }
    }
}

// The same for one panel of int8g: levels widened to int16, vpmaddwd into 2 MR int32 sums. q16:
// the rows' q as int16 (K apart), so a pair of inputs is one 32-bit broadcast.
template <int MR>
inline void itile_i8g(const int16_t* q16, int64_t K, const float* d, int64_t G, const uint8_t* unit, float* acc) {
  __m256i isum[MR][2];
  for (int r = 0; r < MR; ++r) isum[r][0] = isum[r][1] = _mm256_setzero_si256();
  for (int64_t i = 0; i < kPairs; ++i) {
    const __m256i lo = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(unit + 32 + i * 32)));
    const __m256i hi = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(unit + 32 + i * 32 + 16)));
    for (int r = 0; r < MR; ++r) {
      int32_t pair;
      std::memcpy(&pair, q16 + r * K + 2 * i, 4);
      const __m256i xv = _mm256_set1_epi32(pair);
      isum[r][0] = _mm256_add_epi32(isum[r][0], _mm256_madd_epi16(lo, xv));
      isum[r][1] = _mm256_add_epi32(isum[r][1], _mm256_madd_epi16(hi, xv));
    }
  }
  for (int c = 0; c < 2; ++c) {
    const __m256 sc = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(unit + 16 * c)));
    for (int r = 0; r < MR; ++r) {
      float* a = acc + r * kBlock * kPanel + 8 * c;
      _mm256_storeu_ps(a, _mm256_fmadd_ps(_mm256_mul_ps(sc, _mm256_set1_ps(d[r * G])), _mm256_cvtepi32_ps(isum[r][c]),
                                          _mm256_loadu_ps(a)));
    }
  }
}

// One row over all G groups of P panels (a block's, units U apart from `base`, a group's units
// `width` apart): itile_i4's and itile_i8g's arithmetic exactly (the same integer sums, the same
// float steps per group in the same order), with every sum in registers from the first group to
// the last. One row is bound by this work; out: 16 P sums.
template <int64_t kind, int P>
inline void irow(const int8_t* q, const int16_t* q16, const float* d, const float* s, const uint8_t* base, int64_t width,
                 int64_t G, int64_t U, float* out) {
  __m256 acc[P][2];
  for (int p = 0; p < P; ++p) acc[p][0] = acc[p][1] = _mm256_setzero_ps();
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* unit = base + g * width * U;
    // Weights kAhead groups on (past the block: the next block's, where the thread goes next) on
    // their way from memory while this group is summed: without it one row waits for each line.
    // Non-temporal: each is read once a token (cold, all layers in turn: 15% faster than T0).
    const char* ahead = reinterpret_cast<const char*>(unit + kAhead * width * U);
    for (int64_t off = 0; off < P * U; off += 64) _mm_prefetch(ahead + off, _MM_HINT_NTA);
    __m256i isum[P][2];
    if constexpr (kind == kI4) {
      for (int h = 0; h < 2; ++h) {
        __m256i s16[P];
        for (int p = 0; p < P; ++p) s16[p] = _mm256_setzero_si256();
        for (int64_t i = 8 * h; i < 8 * h + 8; ++i) {
          int16_t pair;
          std::memcpy(&pair, q + g * kGroup + 2 * i, 2);
          const __m256i xv = _mm256_set1_epi16(pair);
          for (int p = 0; p < P; ++p) {
            const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(unit + p * U + 64 + i * 16));
            const __m256i w = _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(b, 4), b), low4);
            s16[p] = _mm256_add_epi16(s16[p], _mm256_maddubs_epi16(w, xv));
          }
        }
        for (int p = 0; p < P; ++p) {
          const __m256i lo = _mm256_cvtepi16_epi32(_mm256_castsi256_si128(s16[p]));
          const __m256i hi = _mm256_cvtepi16_epi32(_mm256_extracti128_si256(s16[p], 1));
          isum[p][0] = h ? _mm256_add_epi32(isum[p][0], lo) : lo;
          isum[p][1] = h ? _mm256_add_epi32(isum[p][1], hi) : hi;
        }
      }
    } else {
      for (int p = 0; p < P; ++p) isum[p][0] = isum[p][1] = _mm256_setzero_si256();
      for (int64_t i = 0; i < kPairs; ++i) {
        int32_t pair;
        std::memcpy(&pair, q16 + g * kGroup + 2 * i, 4);
        const __m256i xv = _mm256_set1_epi32(pair);
        for (int p = 0; p < P; ++p) {
          const uint8_t* up = unit + p * U + 32 + i * 32;
          const __m256i lo = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(up)));
          const __m256i hi = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(up + 16)));
          isum[p][0] = _mm256_add_epi32(isum[p][0], _mm256_madd_epi16(lo, xv));
          isum[p][1] = _mm256_add_epi32(isum[p][1], _mm256_madd_epi16(hi, xv));
        }
      }
    }
    const __m256 dg = _mm256_set1_ps(d[g]);
    for (int p = 0; p < P; ++p)
      for (int c = 0; c < 2; ++c) {
        const __m256 sc = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(unit + p * U + 16 * c)));
        acc[p][c] = _mm256_fmadd_ps(_mm256_mul_ps(sc, dg), _mm256_cvtepi32_ps(isum[p][c]), acc[p][c]);
        if constexpr (kind == kI4) {
          const __m256 off = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(unit + p * U + 32 + 16 * c)));
          acc[p][c] = _mm256_fmadd_ps(off, _mm256_set1_ps(s[g]), acc[p][c]);
        }
      }
  }
  for (int p = 0; p < P; ++p) {
    _mm256_storeu_ps(out + p * kPanel, acc[p][0]);
    _mm256_storeu_ps(out + p * kPanel + 8, acc[p][1]);
  }
}

template <int64_t kind>
inline void irow_panels(int64_t P, const int8_t* q, const int16_t* q16, const float* d, const float* s,
                        const uint8_t* base, int64_t width, int64_t G, int64_t U, float* out) {
  switch (P) {
    case 1: return irow<kind, 1>(q, q16, d, s, base, width, G, U, out);
    case 2: return irow<kind, 2>(q, q16, d, s, base, width, G, U, out);
    case 3: return irow<kind, 3>(q, q16, d, s, base, width, G, U, out);
    default: return irow<kind, 4>(q, q16, d, s, base, width, G, U, out);
  }
}

// Group g of P panels (units U apart from `unit`) for `mr` rows (at most kTileRows).
inline void irows(int64_t kind, int64_t mr, const int8_t* q, const int16_t* q16, int64_t K, const float* d, const float* s,
                  int64_t G, const uint8_t* unit, int64_t U, int64_t P, float* acc) {
  constexpr int64_t lda = kBlock * kPanel;
  for (int64_t p = 0; p < P;) {
    float* ap = acc + p * kPanel;
    const uint8_t* up = unit + p * U;
    if (kind == kI8G) {
      switch (mr) {
        case 1: itile_i8g<1>(q16, K, d, G, up, ap); break;
        case 2: itile_i8g<2>(q16, K, d, G, up, ap); break;
        case 3: itile_i8g<3>(q16, K, d, G, up, ap); break;
        case 4: itile_i8g<4>(q16, K, d, G, up, ap); break;
        case 5: itile_i8g<5>(q16, K, d, G, up, ap); break;
        default: itile_i8g<6>(q16, K, d, G, up, ap); break;
      }
      p += 1;
      continue;
    }
    const bool two = p + 1 < P;
#define FUNDAMENT_ITILE(R)                                 \
  if (two)                                                 \
    itile_i4<R, 2>(q, K, d, s, G, up, U, ap, lda);         \
  else                                                     \
    itile_i4<R, 1>(q, K, d, s, G, up, U, ap, lda);         \
  break;
    switch (mr) {
      case 1: FUNDAMENT_ITILE(1)
      case 2: FUNDAMENT_ITILE(2)
      case 3: FUNDAMENT_ITILE(3)
      case 4: FUNDAMENT_ITILE(4)
      case 5: FUNDAMENT_ITILE(5)
      default: FUNDAMENT_ITILE(6)
    }
#undef FUNDAMENT_ITILE
    p += two ? 2 : 1;
  }
}

#endif  // FUNDAMENT_QGEMM32

}  // namespace qgemm32
