// y = x W^T for the engine's decode rows (and any other rows), with W stored low-bit and
// dequantized to bf16 on the fly, products summed in float32 by AVX512-BF16's dot product
// (vdpbf16ps). One kernel for every number of rows: at one row it reads the int4/int8 weight once
// (decode is bound by bytes read); at many rows each block of dequantized weights is reused by
// every row, so the dot products run at the bf16 units' rate instead of float FMAs'.
//
// Batch invariance by construction: an output element is always the same sequence of
// instructions (its row's bf16 pairs against the same dequantized weights, k ascending, into one
// float32 accumulator), whatever the number of rows, the row tile it falls in, or the thread that
// runs it. Threads split output columns, never the sum over k.
//
// Packed layout (linear.py's pack_*). Output columns in panels of 16, panels in blocks of 4 (the
// last block may be narrower), inputs in groups of 32. A panel's weights for one pair of inputs kp
// are one vector of 32 lanes in "VNNI" order: lane e holds column e / 2, input 2 kp + e % 2. The
// bytes are units, one per (block, group, panel in block), block by block, then group by group, so
// a thread reads its columns as one stream:
//   bf16: 16 vectors of 32 bf16 (1024 bytes).
//   int8: 16 vectors of 32 int8 (512 bytes); a float32 scale per column, applied to the sum.
//   int4: 16 float16 scales and 16 offsets (one per column), then 16 vectors of 16 bytes,
//         byte j = lane j | lane j + 16 << 4 (320 bytes), w = q * scale + offset (4.5 bits a
//         weight). The levels q (0..15) are exact in bf16, so a group's sum is taken over x q and
//         scaled after: sum_g(scale * sum(x q) + offset * sum(x)), group by group. Turning a level
//         into bf16 is one table lookup, which keeps one row (bound by this work) fast.

#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>
#include <vector>

#include "qgemm_amx.h"

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define FUNDAMENT_QGEMM 1
#else
#define FUNDAMENT_QGEMM 0
#endif

namespace qgemm {

constexpr int64_t kBF16 = 0, kI8 = 1, kI4 = 2;  // linear.py PACK_BF16, PACK_INT8, PACK_INT4
constexpr int64_t kPanel = 16, kGroup = 32, kPairs = kGroup / 2, kBlock = 4, kMaxRows = 6;

inline int64_t unit_bytes(int64_t kind) { return kind == kBF16 ? 1024 : kind == kI8 ? 512 : 320; }

// Whether int4 products need each row's group sums (group_sums) for their offsets: on the vector
// units, which multiply levels; not on the tiles, which take int4's values with the offsets in.
inline bool i4_needs_group_sums() { return !qgemm_amx::enabled(); }

#if FUNDAMENT_QGEMM

// One unit's 16 weight vectors (a panel, a group) into out[0 .. 16): the weights in bf16 (bf16,
// int8: exact), or for int4 the levels, with the unit's 16 scales then 16 offsets in float32 into
// so[0 .. 32). Every row gets its weights from here, so a weight has one value whatever the
// number of rows.
inline void dequantize(int64_t kind, const uint8_t* unit, __m512bh* out, float* so) {
  if (kind == kBF16) {
    std::memcpy(static_cast<void*>(out), unit, 1024);
    return;
  }
  if (kind == kI8) {
    for (int64_t i = 0; i < kPairs; ++i) {
      const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(unit + i * 32));
      const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_castsi256_si128(b)));
      const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm256_extracti128_si256(b, 1)));
      out[i] = _mm512_cvtne2ps_pbh(hi, lo);  // lanes 0..15 from lo, 16..31 from hi
    }
    return;
  }
  _mm512_storeu_ps(so, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(unit))));
  _mm512_storeu_ps(so + 16, _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(unit + 32))));
  // bf16 bit patterns of 0..15, indexed by a lane's low 5 bits.
  const __m512i levels = _mm512_set_epi16(0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x4170, 0x4160, 0x4150,
                                          0x4140, 0x4130, 0x4120, 0x4110, 0x4100, 0x40E0, 0x40C0, 0x40A0, 0x4080,
                                          0x4040, 0x4000, 0x3F80, 0x0000);
  const __m256i low4 = _mm256_set1_epi16(0x0F);
  const uint8_t* q = unit + 64;
  for (int64_t i = 0; i < kPairs; ++i) {  // byte j: lane j in its low half, lane j + 16 in its high half
    const __m256i b = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i * 16)));
    const __m512i lanes =
        _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_and_si256(b, low4)), _mm256_srli_epi16(b, 4), 1);
    out[i] = (__m512bh)_mm512_permutexvar_epi16(lanes, levels);
  }
}

// An int4 unit's 16 weight vectors as bf16 values, level * scale + offset rounded once: what AMX's
// tiles multiply (qgemm_amx.h), so a tile's sums need no per-group scaling and its C tile adds up
// every group as for bf16 and int8 weights. Lanes as dequantize's: lane l of a vector is column l / 2.
inline void dequantize_i4_values(const uint8_t* unit, __m512bh* out) {
  const __m512 sc = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(unit)));
  const __m512 off = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(unit + 32)));
  const __m512i lo_cols = _mm512_set_epi32(7, 7, 6, 6, 5, 5, 4, 4, 3, 3, 2, 2, 1, 1, 0, 0);
  const __m512i hi_cols = _mm512_set_epi32(15, 15, 14, 14, 13, 13, 12, 12, 11, 11, 10, 10, 9, 9, 8, 8);
  const __m512 sc_lo = _mm512_permutexvar_ps(lo_cols, sc), sc_hi = _mm512_permutexvar_ps(hi_cols, sc);
  const __m512 off_lo = _mm512_permutexvar_ps(lo_cols, off), off_hi = _mm512_permutexvar_ps(hi_cols, off);
  // A level as float32 by table lookup: vpermps reads only an index's low 4 bits, so a byte's low
  // nibble needs no mask, and the lookup runs on the shuffle port where a mask and a convert took
  // the port the FMAs and converts share. Same values; one row on the tiles is bound by this loop
  // (1,536 x 576 at one row, one thread: ~14% faster).
  const __m512 levels = _mm512_setr_ps(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const uint8_t* q = unit + 64;
  for (int64_t i = 0; i < kPairs; ++i) {  // byte j: lane j's level in its low half, lane j + 16's in its high
    const __m512i b = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(q + i * 16)));
    const __m512 lo = _mm512_fmadd_ps(_mm512_permutexvar_ps(b, levels), sc_lo, off_lo);
    const __m512 hi = _mm512_fmadd_ps(_mm512_permutexvar_ps(_mm512_srli_epi32(b, 4), levels), sc_hi, off_hi);
    out[i] = _mm512_cvtne2ps_pbh(hi, lo);
  }
}

// io[r][p] += rows [0, MR) of x (ld elements apart), pairs kp0 .. kp1, against P panels whose
// weight vector for pair kp is w[p][kp]. Each accumulator adds its pairs in ascending order,
// one dependent chain; the MR x P chains side by side keep the dot-product units busy.
template <int MR, int P>
inline void tile(const at::BFloat16* __restrict x, int64_t ldx, int64_t kp0, int64_t kp1, const __m512bh* const* w,
                 __m512 (&io)[kMaxRows][kBlock]) {
  __m512 acc[MR][P];
  const __m512bh* wp[P];
  for (int p = 0; p < P; ++p) wp[p] = w[p];
  for (int r = 0; r < MR; ++r)
    for (int p = 0; p < P; ++p) acc[r][p] = io[r][p];
  const int32_t* xr = reinterpret_cast<const int32_t*>(x);
  const int64_t ld = ldx / 2;
  for (int64_t kp = kp0; kp < kp1; ++kp) {
    __m512bh wv[P];
    for (int p = 0; p < P; ++p) wv[p] = wp[p][kp];
    for (int r = 0; r < MR; ++r) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(xr[r * ld + kp]);
      for (int p = 0; p < P; ++p) acc[r][p] = _mm512_dpbf16_ps(acc[r][p], xv, wv[p]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int p = 0; p < P; ++p) io[r][p] = acc[r][p];
}

// tile<mr, P> for mr in 1..6 rows and P in 1..4 panels (at most 24 accumulators, all in registers).
inline void tiles(int64_t mr, int64_t P, const at::BFloat16* x, int64_t ldx, int64_t kp0, int64_t kp1, const __m512bh* const* w,
                  __m512 (&io)[kMaxRows][kBlock]) {
#define FUNDAMENT_TILE(m, p) \
  if (mr == m && P == p) return tile<m, p>(x, ldx, kp0, kp1, w, io);
#define FUNDAMENT_ROWS(m) FUNDAMENT_TILE(m, 1) FUNDAMENT_TILE(m, 2) FUNDAMENT_TILE(m, 3) FUNDAMENT_TILE(m, 4)
  FUNDAMENT_ROWS(1) FUNDAMENT_ROWS(2) FUNDAMENT_ROWS(3) FUNDAMENT_ROWS(4) FUNDAMENT_ROWS(5) FUNDAMENT_ROWS(6)
#undef FUNDAMENT_ROWS
#undef FUNDAMENT_TILE
  TORCH_CHECK(false, "qgemm: no tile for ", mr, " rows x ", P, " panels");
}

// int4: out[r][p] = sum over groups g of scale * (x . levels) + offset * sum(x), for rows [0, MR)
// and P panels; group(g) readies group g's weights and returns where they are: level vectors
// w[p][kp] (kp absolute) and the float32 scales (then offsets) of panel p at so + p * stride.
// Both sums stay in registers across groups (MR x P <= 12).
struct Group {
  const __m512bh* const* w;
  const float* so;
  int64_t stride;
};

template <int MR, int P, typename Ready>
inline void tile_i4(const at::BFloat16* __restrict x, int64_t ldx, int64_t G, const float* __restrict xsum, const Ready& ready,
                    __m512 (&out)[kMaxRows][kBlock]) {
  __m512 tot[MR][P];
  for (int r = 0; r < MR; ++r)
    for (int p = 0; p < P; ++p) tot[r][p] = _mm512_setzero_ps();
  const int32_t* xr = reinterpret_cast<const int32_t*>(x);
  const int64_t ld = ldx / 2;
  for (int64_t g = 0; g < G; ++g) {
    const Group grp = ready(g);
    const __m512bh* wp[P];
    for (int p = 0; p < P; ++p) wp[p] = grp.w[p];
    __m512 part[MR][P];
    for (int r = 0; r < MR; ++r)
      for (int p = 0; p < P; ++p) part[r][p] = _mm512_setzero_ps();
    for (int64_t kp = g * kPairs; kp < (g + 1) * kPairs; ++kp) {
      __m512bh wv[P];
      for (int p = 0; p < P; ++p) wv[p] = wp[p][kp];
      for (int r = 0; r < MR; ++r) {
        const __m512bh xv = (__m512bh)_mm512_set1_epi32(xr[r * ld + kp]);
        for (int p = 0; p < P; ++p) part[r][p] = _mm512_dpbf16_ps(part[r][p], xv, wv[p]);
      }
    }
    for (int p = 0; p < P; ++p) {
      const __m512 sc = _mm512_loadu_ps(grp.so + p * grp.stride), off = _mm512_loadu_ps(grp.so + p * grp.stride + 16);
      for (int r = 0; r < MR; ++r)
        tot[r][p] = _mm512_fmadd_ps(_mm512_set1_ps(xsum[r * G + g]), off, _mm512_fmadd_ps(part[r][p], sc, tot[r][p]));
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int p = 0; p < P; ++p) out[r][p] = tot[r][p];
}

template <typename Ready>
inline void tiles_i4(int64_t mr, int64_t P, const at::BFloat16* x, int64_t ldx, int64_t G, const float* xsum, const Ready& ready,
                     __m512 (&out)[kMaxRows][kBlock]) {
#define FUNDAMENT_TILE(m, p) \
  if (mr == m && P == p) return tile_i4<m, p>(x, ldx, G, xsum, ready, out);
#define FUNDAMENT_ROWS(m) FUNDAMENT_TILE(m, 1) FUNDAMENT_TILE(m, 2) FUNDAMENT_TILE(m, 3) FUNDAMENT_TILE(m, 4)
  FUNDAMENT_ROWS(1) FUNDAMENT_ROWS(2) FUNDAMENT_ROWS(3)
#undef FUNDAMENT_ROWS
#undef FUNDAMENT_TILE
  TORCH_CHECK(false, "qgemm: no int4 tile for ", mr, " rows x ", P, " panels");
}

#endif  // FUNDAMENT_QGEMM

inline bool available() { return FUNDAMENT_QGEMM; }

// Each group of 32 inputs' sum, for one row of K: what int4 weights' offsets multiply.
inline void group_sums(const at::BFloat16* x, int64_t K, float* out) {
  for (int64_t g = 0; g < K / kGroup; ++g) {
    float t = 0.f;
    for (int64_t k = g * kGroup; k < (g + 1) * kGroup; ++k) t += static_cast<float>(x[k]);
    out[g] = t;
  }
}

// One product y (M, N) = x (M, K) W^T (+ bias): its operands, checked by gemm() or its caller, and
// the work of a range of output panels. Any thread may run any range, in any order.
struct Gemm {
  int64_t kind, M, K, N;
  const at::BFloat16* x;  // (M, K)
  const uint8_t* a;       // the packed units
  const float* scales;    // int8's column scales, else null
  const float* bias;      // float32 (N), or null
  const float* xsum;      // int4 on the vector units: group_sums of each row (M, K / 32), else null
  float* yf;              // the output, float32 (M, N), or
  at::BFloat16* yb;       // bf16

  // Panels [begin, end); the panels from end to `hint` are likely this thread's next, and their
  // weights are fetched ahead.
  void run(int64_t begin, int64_t end, int64_t hint) const {
#if FUNDAMENT_QGEMM
    const int64_t panels = N / kPanel, G = K / kGroup, U = unit_bytes(kind);
    const at::BFloat16* xp = x;
    const uint8_t* ap = a;
    const float* sp = scales;
    const float* biasp = bias;
    // Few rows (one tile): a group's weights dequantized into a buffer in L1 and used at once. More
    // rows: a block's weights dequantized whole, once, then read by every row tile. Same weight
    // values, same order of each output's sums, either way. int4 tiles are 3 rows (two sums each).
    const int64_t tile_rows = kind == kI4 ? 3 : kMaxRows;
    const bool amx = qgemm_amx::enabled();
#if FUNDAMENT_AMX
    if (amx) qgemm_amx::configure(std::min(M, qgemm_amx::kRows));
#endif
    const bool few = M <= tile_rows;
    // Kept per thread across calls: allocating it every call costs more than one row's arithmetic.
    thread_local std::vector<__m512bh> buf;
    thread_local std::vector<float> so;
    const int64_t span = few ? kPairs : K / 2, groups = few ? 1 : G;  // what the buffers hold per panel
    if (buf.size() < static_cast<size_t>(kBlock * span)) buf.resize(kBlock * span);
    if (so.size() < static_cast<size_t>(kBlock * groups * 32)) so.resize(kBlock * groups * 32);
    // Panels a block's worth or less at a time (a range may start or end inside a block).
    for (int64_t first = begin; first < end;) {
      const int64_t blk = first / kBlock, skip = first % kBlock;  // the layout's block, panels of it before ours
      const int64_t width = std::min(kBlock, panels - blk * kBlock), P = std::min(width - skip, end - first);
      const uint8_t* base = ap + blk * kBlock * G * U;
      auto unit = [&](int64_t g, int64_t p) { return base + (g * width + skip + p) * U; };
      const __m512bh* w[kBlock];
      __m512 acc[kMaxRows][kBlock];
      for (auto& row : acc)
        for (auto& v : row) v = _mm512_setzero_ps();
      auto store = [&](int64_t r0, int64_t mr) {
        for (int64_t r = 0; r < mr; ++r)
          for (int64_t p = 0; p < P; ++p) {
            const int64_t col = (first + p) * kPanel;
            __m512 v = acc[r][p];
            if (sp) v = _mm512_mul_ps(v, _mm512_loadu_ps(sp + col));
            if (biasp) v = _mm512_add_ps(v, _mm512_loadu_ps(biasp + col));
            if (yf)
              _mm512_storeu_ps(yf + (r0 + r) * N + col, v);
            else
              _mm256_storeu_si256(reinterpret_cast<__m256i*>(yb + (r0 + r) * N + col), (__m256i)_mm512_cvtneps_pbh(v));
          }
      };
#if FUNDAMENT_AMX
      if (amx) {  // qgemm_amx.h: every row through the tiles
        auto tile_of = [&](int64_t g, int64_t p, uint8_t* dst) -> const uint8_t* {
          if (kind == kBF16) return unit(g, p);
          if (kind == kI4)
            dequantize_i4_values(unit(g, p), reinterpret_cast<__m512bh*>(dst));
          else
            dequantize(kind, unit(g, p), reinterpret_cast<__m512bh*>(dst), nullptr);
          return dst;
        };
        qgemm_amx::chunk(M, K, P, xp, tile_of, acc, store);
        first += P;
        continue;
      }
#endif
      // Group g's weights into the buffer's first slots (few rows); w[p] then reads them at
      // absolute pairs (pointer offset back by the group's first pair).
      auto ready_one = [&](int64_t g) {
        for (int64_t p = 0; p < P; ++p) {
          if (kind == kBF16) {
            w[p] = reinterpret_cast<const __m512bh*>(unit(g, p)) - g * kPairs;
          } else {
            dequantize(kind, unit(g, p), buf.data() + p * kPairs, so.data() + p * 32);
            w[p] = buf.data() + p * kPairs - g * kPairs;
          }
        }
        return Group{w, so.data(), 32};
      };
      if (few) {
        if (kind == kI4) {
          tiles_i4(M, P, xp, K, G, xsum, ready_one, acc);
        } else {
          for (int64_t g = 0; g < G; ++g) {
            ready_one(g);
            tiles(M, P, xp, K, g * kPairs, (g + 1) * kPairs, w, acc);
          }
        }
        store(0, M);
        first += P;
        continue;
      }
      for (int64_t g = 0; g < G; ++g)
        for (int64_t p = 0; p < P; ++p)
          dequantize(kind, unit(g, p), buf.data() + p * (K / 2) + g * kPairs, so.data() + (p * G + g) * 32);
      for (int64_t p = 0; p < P; ++p) w[p] = buf.data() + p * (K / 2);
      auto ready_all = [&](int64_t g) { return Group{w, so.data() + g * 32, G * 32}; };
      // While the row tiles compute on these weights (from cache), the next panels' packed bytes
      // are fetched from memory a share per tile, so the next dequantization does not wait on it.
      const int64_t next = first + P, nblk = next / kBlock, nskip = next % kBlock;
      const int64_t nwidth = next < hint ? std::min(kBlock, panels - nblk * kBlock) : 0;
      const int64_t nP = next < hint ? std::min(nwidth - nskip, hint - next) : 0;
      const int64_t run = nP * U / 64, lines = G * run, tiles_n = (M + tile_rows - 1) / tile_rows;
      const uint8_t* nbase = ap + nblk * kBlock * G * U + nskip * U;
      for (int64_t r0 = 0; r0 < M; r0 += tile_rows) {
        const int64_t mr = std::min(tile_rows, M - r0), t = r0 / tile_rows;
        for (int64_t i = lines * t / tiles_n; i < lines * (t + 1) / tiles_n; ++i)
          _mm_prefetch(reinterpret_cast<const char*>(nbase + (i / run) * nwidth * U + (i % run) * 64), _MM_HINT_T1);
        if (kind == kI4) {
          tiles_i4(mr, P, xp + r0 * K, K, G, xsum + r0 * G, ready_all, acc);
        } else {
          for (auto& row : acc)
            for (auto& v : row) v = _mm512_setzero_ps();
          tiles(mr, P, xp + r0 * K, K, 0, K / 2, w, acc);
        }
        store(r0, mr);
      }
      first += P;
    }
#else
    (void)begin, (void)end, (void)hint;
#endif
  }
};

// y (M, N) = x (M, K) W^T (+ bias), float32 or bf16 out. `a`: the packed units (uint8), `scales`:
// int8's float32 column scales (empty otherwise).
inline at::Tensor gemm(const at::Tensor& x_in, int64_t kind, const at::Tensor& a, const at::Tensor& scales,
                       const at::Tensor& bias, int64_t N, bool out_float) {
  TORCH_CHECK(available(), "qgemm: this build has no AVX512-BF16");
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kBFloat16, "qgemm: x must be (M, K) bfloat16");
  TORCH_CHECK(kind >= kBF16 && kind <= kI4, "qgemm: bf16, int8 or int4 weights only (int8 per group: qgemm_f32.h)");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), K = x.size(1), panels = N / kPanel, G = K / kGroup;
  TORCH_CHECK(N % kPanel == 0 && K % kGroup == 0, "qgemm: N must be a multiple of 16 and K of 32");
  TORCH_CHECK(a.scalar_type() == at::kByte && a.numel() == panels * G * unit_bytes(kind),
              "qgemm: packed weights do not match (N, K)");
  TORCH_CHECK(kind != kI8 || (scales.scalar_type() == at::kFloat && scales.numel() == N), "qgemm: int8 needs N float32 scales");
  auto y = at::empty({M, N}, x.options().dtype(out_float ? at::kFloat : at::kBFloat16));
  if (M == 0) return y;
  at::Tensor bias_f;
  if (bias.defined() && bias.numel()) bias_f = bias.to(at::kFloat).contiguous();
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  const bool sums = kind == kI4 && i4_needs_group_sums();  // each row's sum of x over each group
  std::vector<float> xsum(sums ? M * G : 0);
  if (sums)
    for (int64_t r = 0; r < M; ++r) group_sums(xp + r * K, K, xsum.data() + r * G);
  const Gemm g{kind,
               M,
               K,
               N,
               xp,
               a.data_ptr<uint8_t>(),
               kind == kI8 ? scales.data_ptr<float>() : nullptr,
               bias_f.defined() ? bias_f.data_ptr<float>() : nullptr,
               sums ? xsum.data() : nullptr,
               out_float ? y.data_ptr<float>() : nullptr,
               out_float ? nullptr : y.data_ptr<at::BFloat16>()};
  // Threads split the panels evenly (a block of 4 may be shared: 36 panels are 18 and 18, where
  // whole blocks were 20 and 16).
  at::parallel_for(0, panels, 1, [&](int64_t begin, int64_t end) { g.run(begin, end, end); });
  return y;
}

}  // namespace qgemm
