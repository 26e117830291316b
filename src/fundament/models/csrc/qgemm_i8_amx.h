// qgemm_i8.h's int8 rows times int4 weights on AMX's integer tiles (TDPBSUD: signed int8 rows times
// unsigned int8 weights, summed exactly in int32), where the CPU has them: 16 rows by 32 inputs by
// 16 columns an instruction, where the vector units take one row at a time.
//
// The same bits as the vector path, so the kernel may take either by number of rows without a
// row's result depending on its batch: a group's integer sums are exact either way, and each
// group's float32 steps are the vector path's, in its order, per row and column:
//   acc = fma(scale * d, float(isum), acc);  acc = fma(offset, d * sum(q), acc)   groups ascending.
// The rows' Q8_0 quantization (quantize_row) is the same call whoever multiplies them.
//
// Layout: A tile = up to 16 rows' q for one group (32 bytes each, K apart); B tile = one panel's
// group of int4 levels as bytes in the tiles' "VNNI" order (8 rows of 64 bytes: row j, column c:
// inputs 4j..4j+3), made from the packed unit (qgemm.h: pair i's 32 lanes, lane e = column e / 2,
// input 2i + e % 2, byte j = lane j | lane j + 16 << 4) by two word permutes a pair of rows;
// C tile = the group's 16 x 16 int32 sums, stored and scaled into float32 by the vector units.
//
// Cost: that scaling runs per row, column and group, where the bf16 tiles (qgemm_amx.h) turn int4
// into values once per weight and let the C tile add up the groups; so from ~16 rows the bf16
// tiles stay faster, and this serves the float32 path's int8 rows (docs/engine.md, "AMX tiles").

#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "qgemm_amx.h"

#if FUNDAMENT_AMX && defined(__AMX_INT8__) && defined(__AVX512BW__) && defined(__F16C__)
#define FUNDAMENT_AMX_I8 1
#else
#define FUNDAMENT_AMX_I8 0
#endif

namespace qgemm_i8_amx {

#if FUNDAMENT_AMX_I8

constexpr int64_t kRows = 16, kB = 512;  // rows a tile; bytes of a made B tile (8 x 64)

// C tiles 0..3 (groups in turn, `rows` rows of 16 int32), A tile 4 (`rows` rows of 32 int8), B
// tiles 5 and 6 (8 rows of 64 bytes).
inline void configure(int64_t rows) {
  alignas(64) uint8_t cfg[64] = {};
  cfg[0] = 1;
  for (int t = 0; t < 7; ++t) {
    cfg[16 + 2 * t] = t == 4 ? 32 : 64;
    cfg[48 + t] = static_cast<uint8_t>(t < 5 ? rows : 8);  // C 0..3, A 4: rows; B 5, 6: 8
  }
  _tile_loadconfig(cfg);
}

// An int4 unit's levels (at unit + 64) as a B tile at out (512 bytes, 64-aligned).
inline void make_b(const uint8_t* unit, uint8_t* out) {
  // Output word 2c: column c's inputs 4j, 4j + 1 (pair 2j), word 2c + 1: inputs 4j + 2, 4j + 3
  // (pair 2j + 1). In lo (bytes & 15: lanes 0..15 of pairs 2j, 2j + 1, ...), pair 2j's column c < 8
  // is word c and pair 2j + 1's word 8 + c; columns 8..15 are hi's (bytes >> 4: lanes 16..31),
  // words 32 + ... of the two-source permute.
  alignas(64) static const int16_t index[32] = {0,  8,  1,  9,  2,  10, 3,  11, 4,  12, 5,  13, 6,  14, 7,  15,
                                                32, 40, 33, 41, 34, 42, 35, 43, 36, 44, 37, 45, 38, 46, 39, 47};
  const __m512i first = _mm512_load_si512(index), second = _mm512_add_epi16(first, _mm512_set1_epi16(16));
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  for (int j = 0; j < 8; j += 2) {  // B rows j, j + 1: pairs 2j .. 2j + 3, 64 bytes
    const __m512i b = _mm512_loadu_si512(unit + 64 + j * 32);
    const __m512i lo = _mm512_and_si512(b, low4), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), low4);
    _mm512_store_si512(out + j * 64, _mm512_permutex2var_epi16(lo, first, hi));
    _mm512_store_si512(out + (j + 1) * 64, _mm512_permutex2var_epi16(lo, second, hi));
  }
}

// Group product into C tile t (0..3: tile indices are immediates) and from there to c.
inline void product(int t, const int8_t* a, int64_t lda, const uint8_t* b, int32_t* c) {
  _tile_loadd(4, a, lda);
  switch (t) {
    case 0: _tile_zero(0); _tile_loadd(5, b, 64); _tile_dpbsud(0, 4, 5); _tile_stored(0, c, 64); break;
    case 1: _tile_zero(1); _tile_loadd(6, b, 64); _tile_dpbsud(1, 4, 6); _tile_stored(1, c, 64); break;
    case 2: _tile_zero(2); _tile_loadd(5, b, 64); _tile_dpbsud(2, 4, 5); _tile_stored(2, c, 64); break;
    default: _tile_zero(3); _tile_loadd(6, b, 64); _tile_dpbsud(3, 4, 6); _tile_stored(3, c, 64); break;
  }
}

// acc[r] (16 rows' sums for one panel, in registers) += a group's C (16 rows of 16 int32): the
// vector path's float steps, per row.
template <int MR>
inline void scale_into(__m512 (&acc)[kRows], const int32_t* c, const uint8_t* unit, const float* d, const float* s,
                       int64_t G) {
  const __m512 sc = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(unit)));
  const __m512 off = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(unit + 32)));
  for (int r = 0; r < MR; ++r) {
    const __m512 x = _mm512_cvtepi32_ps(_mm512_load_si512(c + r * 16));
    acc[r] = _mm512_fmadd_ps(_mm512_mul_ps(sc, _mm512_set1_ps(d[r * G])), x, acc[r]);
    acc[r] = _mm512_fmadd_ps(off, _mm512_set1_ps(s[r * G]), acc[r]);
  }
}

// One panel for a tile of MR rows over every group: each group's product goes to the tiles while
// the previous group's sums are scaled (two C tiles and buffers in turn).
template <int MR>
inline void panel(int64_t K, const int8_t* qa, const float* d, const float* s, int64_t G, const uint8_t* b,
                  const uint8_t* unit0, int64_t step, float* out, int64_t ldo) {
  constexpr int64_t kAheadG = 3;  // groups in the tiles while one is scaled
  alignas(64) int32_t c[4][kRows * 16];
  __m512 acc[kRows];
  for (int r = 0; r < MR; ++r) acc[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < std::min(kAheadG, G); ++g) product(static_cast<int>(g & 3), qa + g * 32, K, b + g * kB, c[g & 3]);
  for (int64_t g = 0; g < G; ++g) {
    const int64_t n = g + kAheadG;
    if (n < G) product(static_cast<int>(n & 3), qa + n * 32, K, b + n * kB, c[n & 3]);
    scale_into<MR>(acc, c[g & 3], unit0 + g * step, d + g, s + g, G);
  }
  for (int r = 0; r < MR; ++r) _mm512_storeu_ps(out + r * ldo, acc[r]);
}

// out[r][16 p + c] (ldo apart) = the M rows (q: K apart; d, s: G apart) times P panels of int4
// (units U apart, a group's `width` units apart, from `base`), every group. The caller has
// configure()d the tiles for min(M, 16) rows.
inline void block(int64_t M, int64_t K, const int8_t* q, const float* d, const float* s, const uint8_t* base,
                  int64_t width, int64_t U, int64_t P, float* out, int64_t ldo) {
  const int64_t G = K / 32, rows = std::min(M, kRows);
  thread_local std::vector<__m512i> wbuf;  // made B tiles, [panel][group]
  thread_local std::vector<int8_t> pad;  // a last, partial tile's rows
  if (wbuf.size() < static_cast<size_t>(P * G * kB / 64)) wbuf.resize(P * G * kB / 64);
  uint8_t* buf = reinterpret_cast<uint8_t*>(wbuf.data());
  for (int64_t p = 0; p < P; ++p)
    for (int64_t g = 0; g < G; ++g) make_b(base + (g * width + p) * U, buf + (p * G + g) * kB);
  for (int64_t r0 = 0; r0 < M; r0 += kRows) {
    const int64_t mr = std::min(kRows, M - r0);
    const int8_t* qa = q + r0 * K;
    if (mr < rows) {
      if (pad.size() < static_cast<size_t>(kRows * K)) pad.assign(kRows * K, 0);
      std::memcpy(pad.data(), qa, mr * K);
      qa = pad.data();
    }
    for (int64_t p = 0; p < P; ++p) {
      const uint8_t* b = buf + p * G * kB;  // the panel's made B tiles, a group kB apart
      const uint8_t* unit0 = base + p * U;
      float* o = out + r0 * ldo + p * 16;
      const float *dr = d + r0 * G, *sr = s + r0 * G;
      switch (mr) {
#define FUNDAMENT_I8_PANEL(R) \
  case R: panel<R>(K, qa, dr, sr, G, b, unit0, width * U, o, ldo); break;
        FUNDAMENT_I8_PANEL(1) FUNDAMENT_I8_PANEL(2) FUNDAMENT_I8_PANEL(3) FUNDAMENT_I8_PANEL(4)
        FUNDAMENT_I8_PANEL(5) FUNDAMENT_I8_PANEL(6) FUNDAMENT_I8_PANEL(7) FUNDAMENT_I8_PANEL(8)
        FUNDAMENT_I8_PANEL(9) FUNDAMENT_I8_PANEL(10) FUNDAMENT_I8_PANEL(11) FUNDAMENT_I8_PANEL(12)
        FUNDAMENT_I8_PANEL(13) FUNDAMENT_I8_PANEL(14) FUNDAMENT_I8_PANEL(15)
        default: panel<16>(K, qa, dr, sr, G, b, unit0, width * U, o, ldo); break;
#undef FUNDAMENT_I8_PANEL
      }
    }
  }
}

#endif  // FUNDAMENT_AMX_I8

// Whether this build and process can take int8 rows on the tiles (AMX on, with AMX-INT8).
inline bool enabled() {
#if FUNDAMENT_AMX_I8
  return qgemm_amx::enabled();
#else
  return false;
#endif
}

}  // namespace qgemm_i8_amx
