// y = x W^T for float32 models: qgemm.h's packed weights (the same bytes, the same kinds, plus
// int8 with a scale per group) turned back into float32, multiplied with float32 rows by AVX2's
// FMAs. For CPUs without AVX512-BF16 (AVX2-only EPYCs), where a model runs in float32 and one
// decode row would otherwise read 4 bytes a weight: int4 reads 0.625 and int8 1.06.
//
// Lossless: it only ever holds weights that are exact in its form (models/llama/linear.py checks):
// int4 levels with a float16 scale and offset per group of 32 (a Q4_0/Q4_1 GGUF's), int8 with a
// float16 scale per group (Q8_0's), and q * scale (+ offset) is exact or rounded once in float32,
// as the float32 weight it replaces was.
//
// Batch invariance by construction: an output element is one float32 accumulator that takes its
// row's inputs k ascending, one FMA each against the same dequantized weight, whatever the number
// of rows, the row tile it falls in, or the thread that runs it. Threads split output columns.
//
// Per (block of up to 4 panels, group of 32 inputs) the units are dequantized once into a buffer
// in L1, as [panel][input][16 columns], and every row tile runs over it; the running sums stay in
// a per-thread buffer between groups.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "qgemm.h"

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include <immintrin.h>
#define FUNDAMENT_QGEMM32 1
#else
#define FUNDAMENT_QGEMM32 0
#endif

namespace qgemm32 {

// The layout is qgemm.h's: its kinds, panels, groups and blocks, and one kind more.
using qgemm::kBF16, qgemm::kI8, qgemm::kI4, qgemm::kPanel, qgemm::kGroup, qgemm::kPairs, qgemm::kBlock;
constexpr int64_t kI8G = 3;  // linear.py PACK_INT8G
constexpr int64_t kInt8X = 4;  // added to kI4 or kI8G: int8 activations (linear.py PACK_INT8X)
constexpr int64_t kTileRows = 6;
constexpr int64_t kUnitFloats = kGroup * kPanel;  // one unit dequantized: [input][column]

inline int64_t unit_bytes(int64_t kind) { return kind == kI8G ? 544 : qgemm::unit_bytes(kind); }

inline bool available() { return FUNDAMENT_QGEMM32; }

#if FUNDAMENT_QGEMM32

// A pair's 16 lanes of one half (8 columns, the two inputs interleaved: lane e is column e / 2,
// input e % 2) as bytes, reordered to the 8 columns of the even input, then of the odd one.
inline __m128i split_pairs(__m128i b) {
  return _mm_shuffle_epi8(b, _mm_setr_epi8(0, 2, 4, 6, 8, 10, 12, 14, 1, 3, 5, 7, 9, 11, 13, 15));
}

// Unit (panel, group) into w[k * 16 + c]: the weight of column c for input k of the group.
inline void dequantize(int64_t kind, const uint8_t* unit, float* w) {
  if (kind == kI4) {
    const __m256 s0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(unit)));
    const __m256 s1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(unit + 16)));
    const __m256 o0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(unit + 32)));
    const __m256 o1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(unit + 48)));
    const __m128i low4 = _mm_set1_epi8(0x0F);
    const uint8_t* q = unit + 64;
    for (int64_t i = 0; i < kPairs; ++i) {  // byte j: lane j in its low half, lane j + 16 in its high half
      const __m128i b = _mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i * 16));
      const __m128i lo = split_pairs(_mm_and_si128(b, low4));                     // columns 0..7
      const __m128i hi = split_pairs(_mm_and_si128(_mm_srli_epi16(b, 4), low4));  // columns 8..15
      float* even = w + (2 * i) * kPanel;
      float* odd = even + kPanel;
      auto level = [](__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); };
      _mm256_storeu_ps(even, _mm256_fmadd_ps(level(lo), s0, o0));
      _mm256_storeu_ps(even + 8, _mm256_fmadd_ps(level(hi), s1, o1));
      _mm256_storeu_ps(odd, _mm256_fmadd_ps(level(_mm_srli_si128(lo, 8)), s0, o0));
      _mm256_storeu_ps(odd + 8, _mm256_fmadd_ps(level(_mm_srli_si128(hi, 8)), s1, o1));
    }
    return;
  }
  if (kind == kI8 || kind == kI8G) {
    // int8: the levels (the column's scale multiplies the sum); int8g: levels times the group's scale.
    __m256 s0 = _mm256_set1_ps(1.f), s1 = s0;
    const uint8_t* q = unit;
    if (kind == kI8G) {
      s0 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(unit)));
      s1 = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(unit + 16)));
      q = unit + 32;
    }
    for (int64_t i = 0; i < kPairs; ++i) {
      const __m128i lo = split_pairs(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i * 32)));
      const __m128i hi = split_pairs(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i * 32 + 16)));
      float* even = w + (2 * i) * kPanel;
      float* odd = even + kPanel;
      auto level = [](__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); };
      _mm256_storeu_ps(even, _mm256_mul_ps(level(lo), s0));
      _mm256_storeu_ps(even + 8, _mm256_mul_ps(level(hi), s1));
      _mm256_storeu_ps(odd, _mm256_mul_ps(level(_mm_srli_si128(lo, 8)), s0));
      _mm256_storeu_ps(odd + 8, _mm256_mul_ps(level(_mm_srli_si128(hi, 8)), s1));
    }
    return;
  }
  // bf16: a pair is 32 bf16 lanes; each 16 bytes hold 4 columns, the two inputs interleaved.
  const __m128i order = _mm_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
  for (int64_t i = 0; i < kPairs; ++i) {
    float* even = w + (2 * i) * kPanel;
    float* odd = even + kPanel;
    for (int64_t j = 0; j < 4; ++j) {
      const __m128i b = _mm_shuffle_epi8(_mm_loadu_si128(reinterpret_cast<const __m128i*>(unit + i * 64 + j * 16)), order);
      _mm_storeu_ps(even + 4 * j, _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(b), 16)));
      _mm_storeu_ps(odd + 4 * j, _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(_mm_srli_si128(b, 8)), 16)));
    }
  }
}

// acc[r][p] (16 columns of panel p for row r, in memory) += rows [0, MR) of x (ldx apart) times
// the group's 32 inputs of P panels (w: P dequantized units). 2 * MR * P accumulators in registers.
template <int MR, int P>
inline void tile(const float* __restrict x, int64_t ldx, const float* __restrict w, float* __restrict acc, int64_t lda) {
  __m256 a[MR][P][2];
  for (int r = 0; r < MR; ++r)
    for (int p = 0; p < P; ++p) {
      a[r][p][0] = _mm256_loadu_ps(acc + r * lda + p * kPanel);
      a[r][p][1] = _mm256_loadu_ps(acc + r * lda + p * kPanel + 8);
    }
  for (int64_t k = 0; k < kGroup; ++k) {
    for (int r = 0; r < MR; ++r) {
      const __m256 xv = _mm256_broadcast_ss(x + r * ldx + k);
      for (int p = 0; p < P; ++p) {
        const float* wk = w + p * kUnitFloats + k * kPanel;
        a[r][p][0] = _mm256_fmadd_ps(_mm256_loadu_ps(wk), xv, a[r][p][0]);
        a[r][p][1] = _mm256_fmadd_ps(_mm256_loadu_ps(wk + 8), xv, a[r][p][1]);
      }
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int p = 0; p < P; ++p) {
      _mm256_storeu_ps(acc + r * lda + p * kPanel, a[r][p][0]);
      _mm256_storeu_ps(acc + r * lda + p * kPanel + 8, a[r][p][1]);
    }
}

// The rows' sums over P panels in chunks the registers hold (2 * MR * panels <= 12, 8 for one row).
template <int MR>
inline void row_tile(const float* x, int64_t ldx, const float* w, float* acc, int64_t lda, int64_t P) {
  constexpr int step = MR == 1 ? 4 : MR == 2 ? 3 : MR == 3 ? 2 : 1;
  int64_t p = 0;
  for (; p + step <= P; p += step) tile<MR, step>(x, ldx, w + p * kUnitFloats, acc + p * kPanel, lda);
  for (; p < P; ++p) tile<MR, 1>(x, ldx, w + p * kUnitFloats, acc + p * kPanel, lda);
}

inline void rows(int64_t mr, const float* x, int64_t ldx, const float* w, float* acc, int64_t lda, int64_t P) {
  switch (mr) {
    case 1: return row_tile<1>(x, ldx, w, acc, lda, P);
    case 2: return row_tile<2>(x, ldx, w, acc, lda, P);
    case 3: return row_tile<3>(x, ldx, w, acc, lda, P);
    case 4: return row_tile<4>(x, ldx, w, acc, lda, P);
    case 5: return row_tile<5>(x, ldx, w, acc, lda, P);
    case 6: return row_tile<6>(x, ldx, w, acc, lda, P);
  }
  TORCH_CHECK(false, "qgemm_f32: no tile for ", mr, " rows");
}

// ---- int8 activations (`int8x`) ----
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

// y (M, N) float32 = x (M, K) W^T (+ bias). `a`: the packed units (uint8), `scales`: int8's
// float32 column scales (empty otherwise). x in bfloat16 is taken as float32. A kind with kInt8X
// added: int4 or int8g weights times int8 activations (above).
inline at::Tensor gemm(const at::Tensor& x_in, int64_t kind, const at::Tensor& a, const at::Tensor& scales,
                       const at::Tensor& bias, int64_t N) {
  TORCH_CHECK(available(), "qgemm_f32: this build has no AVX2 with FMA and F16C");
#if FUNDAMENT_QGEMM32
  TORCH_CHECK(x_in.dim() == 2, "qgemm_f32: x must be (M, K)");
  const bool int8x = kind >= kInt8X;
  if (int8x) kind -= kInt8X;
  TORCH_CHECK(kind >= kBF16 && kind <= kI8G && (!int8x || kind == kI4 || kind == kI8G), "qgemm_f32: unknown kind ",
              kind + (int8x ? kInt8X : 0));
  const at::Tensor x = x_in.to(at::kFloat).contiguous();
  const int64_t M = x.size(0), K = x.size(1), panels = N / kPanel, G = K / kGroup, U = unit_bytes(kind);
  TORCH_CHECK(N % kPanel == 0 && K % kGroup == 0, "qgemm_f32: N must be a multiple of 16 and K of 32");
  TORCH_CHECK(a.scalar_type() == at::kByte && a.numel() == panels * G * U, "qgemm_f32: packed weights do not match (N, K)");
  TORCH_CHECK(kind != kI8 || (scales.scalar_type() == at::kFloat && scales.numel() == N), "qgemm_f32: int8 needs N float32 scales");
  auto y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  const float* xp = x.data_ptr<float>();
  const uint8_t* ap = a.data_ptr<uint8_t>();
  const float* sp = kind == kI8 ? scales.data_ptr<float>() : nullptr;
  const float* biasp = nullptr;
  at::Tensor bias_f;
  if (bias.defined() && bias.numel()) {
    bias_f = bias.to(at::kFloat).contiguous();
    biasp = bias_f.data_ptr<float>();
  }
  float* yp = y.data_ptr<float>();
  std::vector<int8_t> xq(int8x ? M * K : 0);
  std::vector<int16_t> xq16(int8x && kind == kI8G ? M * K : 0);
  std::vector<float> xd(int8x ? M * G : 0), xs(int8x ? M * G : 0);
  if (int8x)
    at::parallel_for(0, M, 16, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        quantize_row(xp + r * K, K, xq.data() + r * K, xd.data() + r * G, xs.data() + r * G);
        if (!xq16.empty()) std::copy(xq.data() + r * K, xq.data() + (r + 1) * K, xq16.data() + r * K);
      }
    });
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> w, acc;  // kept across calls: allocating costs more than a row
    if (w.size() < static_cast<size_t>(kBlock * kUnitFloats)) w.resize(kBlock * kUnitFloats);
    if (acc.size() < static_cast<size_t>(M * kBlock * kPanel)) acc.resize(M * kBlock * kPanel);
    const int64_t lda = kBlock * kPanel;
    for (int64_t first = begin; first < end;) {
      const int64_t blk = first / kBlock, skip = first % kBlock;  // the layout's block, panels of it before ours
      const int64_t width = std::min(kBlock, panels - blk * kBlock), P = std::min(width - skip, end - first);
      const uint8_t* base = ap + blk * kBlock * G * U;
      if (int8x && M == 1) {  // one row: its sums in registers over every group
        const int8_t* q = xq.data();
        const int16_t* q16 = xq16.empty() ? nullptr : xq16.data();
        const uint8_t* ours = base + skip * U;
        if (kind == kI4)
          irow_panels<kI4>(P, q, q16, xd.data(), xs.data(), ours, width, G, U, acc.data());
        else
          irow_panels<kI8G>(P, q, q16, xd.data(), xs.data(), ours, width, G, U, acc.data());
      } else {
        std::fill(acc.begin(), acc.begin() + M * lda, 0.f);
        for (int64_t g = 0; g < G; ++g) {
          if (g + 1 < G)  // the next group's bytes on their way while these are used
            for (int64_t p = 0; p < P; ++p)
              for (int64_t off = 0; off < U; off += 64)
                _mm_prefetch(reinterpret_cast<const char*>(base + ((g + 1) * width + skip + p) * U + off), _MM_HINT_T0);
          if (int8x) {
            for (int64_t r0 = 0; r0 < M; r0 += kTileRows)
              irows(kind, std::min(kTileRows, M - r0), xq.data() + r0 * K + g * kGroup,
                    xq16.empty() ? nullptr : xq16.data() + r0 * K + g * kGroup, K, xd.data() + r0 * G + g,
                    xs.data() + r0 * G + g, G, base + (g * width + skip) * U, U, P, acc.data() + r0 * lda);
            continue;
          }
          for (int64_t p = 0; p < P; ++p) dequantize(kind, base + (g * width + skip + p) * U, w.data() + p * kUnitFloats);
          for (int64_t r0 = 0; r0 < M; r0 += kTileRows)
            rows(std::min(kTileRows, M - r0), xp + r0 * K + g * kGroup, K, w.data(), acc.data() + r0 * lda, lda, P);
        }
      }
      for (int64_t r = 0; r < M; ++r)
        for (int64_t p = 0; p < P; ++p)
          for (int64_t h = 0; h < 2; ++h) {
            const int64_t col = (first + p) * kPanel + h * 8;
            __m256 v = _mm256_loadu_ps(acc.data() + r * lda + p * kPanel + h * 8);
            if (sp) v = _mm256_mul_ps(v, _mm256_loadu_ps(sp + col));
            if (biasp) v = _mm256_add_ps(v, _mm256_loadu_ps(biasp + col));
            _mm256_storeu_ps(yp + r * N + col, v);
          }
      first += P;
    }
  });
  return y;
#else
  return at::Tensor();  // unreachable: the check above has thrown
#endif
}

}  // namespace qgemm32
