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
#include "qgemm_i8.h"  // int8 activations; FUNDAMENT_QGEMM32, kI8G, kInt8X, kTileRows
#include "qgemm_i8_amx.h"  // the same int8 rows on AMX's integer tiles

namespace qgemm32 {

// The layout is qgemm.h's: its kinds, panels, groups and blocks, and one kind more.
// (kI8G, kInt8X and kTileRows: qgemm_i8.h)
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
  // int8 rows times int4 on AMX's integer tiles from 2 rows (qgemm_i8_amx.h: the same bits)
  const bool tiles = int8x && kind == kI4 && M > 1 && qgemm_i8_amx::enabled();
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) {
    thread_local std::vector<float> w, acc;  // kept across calls: allocating costs more than a row
    if (w.size() < static_cast<size_t>(kBlock * kUnitFloats)) w.resize(kBlock * kUnitFloats);
    if (acc.size() < static_cast<size_t>(M * kBlock * kPanel)) acc.resize(M * kBlock * kPanel);
    const int64_t lda = kBlock * kPanel;
#if FUNDAMENT_AMX_I8
    if (tiles) qgemm_i8_amx::configure(std::min(M, qgemm_i8_amx::kRows));
#endif
    for (int64_t first = begin; first < end;) {
      const int64_t blk = first / kBlock, skip = first % kBlock;  // the layout's block, panels of it before ours
      const int64_t width = std::min(kBlock, panels - blk * kBlock), P = std::min(width - skip, end - first);
      const uint8_t* base = ap + blk * kBlock * G * U;
      if (tiles) {
#if FUNDAMENT_AMX_I8
        qgemm_i8_amx::block(M, K, xq.data(), xd.data(), xs.data(), base + skip * U, width, U, P, acc.data(), lda);
#endif
      } else if (int8x && M == 1) {  // one row: its sums in registers over every group
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
