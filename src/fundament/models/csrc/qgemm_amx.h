// qgemm.h's bf16, int8 and int4 weights through AMX's tiles (TDPBF16PS), where the CPU has them: a tile
// instruction multiplies 16 rows by 32 inputs by 16 columns at once, where AVX512-BF16 does 1 x 2
// x 16, so rows that share a step stop waiting on the vector units.
//
// Batch invariance: AMX sums a tile's products in its own order and rounding (measured on a
// Xeon with AMX: 89% of outputs differ in their last bits from the same sums by vdpbf16ps, in
// either order of a pair, or exact), so the two units cannot be mixed by number of rows. Where
// the tiles are on, every row of every call takes them, one row as 64: an output element is always
// the same tile instructions (its row's inputs against its panel's weights, groups of 32 inputs
// ascending, into a float32 accumulator starting at zero), whichever tile, row or thread it falls in.
// A row's result never depends on the tile's other rows. The panel's 16 vectors of 32 bf16 in
// qgemm.h's layout are a B tile as they are (16 rows of input pairs, 64 bytes each). int4 weights
// enter the tiles as their bf16 values, level * scale + offset rounded once (the values a dense bf16
// copy holds), not as levels scaled group by group: that per-group float32 work cost int4 half
// again the time of int8 at 64 rows.

#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#if defined(__AMX_TILE__) && defined(__AMX_BF16__) && defined(__AVX512BF16__)
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#define FUNDAMENT_AMX 1
#else
#define FUNDAMENT_AMX 0
#endif

namespace qgemm_amx {

// Built with the tiles, and Linux lets this process use them (it must ask for the tile state once:
// arch_prctl ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA).
inline bool available() {
#if FUNDAMENT_AMX
  static const bool ok = syscall(SYS_arch_prctl, 0x1023, 18) == 0;
  return ok;
#else
  return false;
#endif
}

// Whether calls take the tiles: available and FUNDAMENT_AMX is not "0" when first asked. Changed
// only by set_enabled (tests compare both units); a server never changes it while serving, as a
// row's bits depend on it.
inline bool& enabled_flag() {
  static bool on = [] {
    const char* env = std::getenv("FUNDAMENT_AMX");
    return available() && !(env && std::strcmp(env, "0") == 0);
  }();
  return on;
}
inline bool enabled() { return enabled_flag(); }
inline bool set_enabled(bool on) { return enabled_flag() = on && available(); }

#if FUNDAMENT_AMX

constexpr int64_t kRows = 16, kTileBytes = 1024;

// C tiles 0..3 (a panel each) and A tile 4 (32 inputs) `rows` rows of 64 bytes; B tiles 5 and 6
// (a panel's 32 inputs as 16 pairs, alternating so a load need not wait for the last product).
// Loaded on every call: torch's own AMX kernels (oneDNN) configure the tiles their way on the
// same threads. A row's products are the same in a tile of 1 row as of 16. rows: min(M, 16), as
// chunk() expects.
inline void configure(int64_t rows) {
  alignas(64) uint8_t cfg[64] = {};
  cfg[0] = 1;  // palette 1
  for (int t = 0; t < 7; ++t) {
    cfg[16 + 2 * t] = 64;  // bytes a row
    cfg[48 + t] = static_cast<uint8_t>(t < 5 ? rows : kRows);
  }
  _tile_loadconfig(cfg);
}

// Panel p's product with the A tile (tile indices are immediates).
inline void product(int64_t p, const uint8_t* w) {
  switch (p) {
    case 0: _tile_loadd(5, w, 64); _tile_dpbf16ps(0, 4, 5); break;
    case 1: _tile_loadd(6, w, 64); _tile_dpbf16ps(1, 4, 6); break;
    case 2: _tile_loadd(5, w, 64); _tile_dpbf16ps(2, 4, 5); break;
    default: _tile_loadd(6, w, 64); _tile_dpbf16ps(3, 4, 6); break;
  }
}

inline void zero(int64_t P) {
  _tile_zero(0);
  if (P > 1) _tile_zero(1);
  if (P > 2) _tile_zero(2);
  if (P > 3) _tile_zero(3);
}

inline void save(int64_t P, float (&c)[4][kRows * 16]) {
  _tile_stored(0, c[0], 64);
  if (P > 1) _tile_stored(1, c[1], 64);
  if (P > 2) _tile_stored(2, c[2], 64);
  if (P > 3) _tile_stored(3, c[3], 64);
}

// acc = x[0, M) (K apart) times P panels' weights, handed to store(r0, mr) in acc's rows
// [0, mr <= 6) (qgemm.h's epilogue: scale, bias, the output's type). tile_of(g, p, dst) is where
// panel p's B tile for inputs [32 g, 32 g + 32) is: its packed unit (bf16), or dst (1 KB) after
// making its bf16 values there (int8's levels, int4's levels scaled and offset). Up to 16 rows:
// one tile of M rows, each group's weights made as they are used (read once); more: the chunk's
// weights made first, then read by every tile of 16 rows. Either way each output's sum runs over
// the groups in order in one C tile. The caller has configure()d the tiles for these M.
template <typename TileOf, typename Store>
inline void chunk(int64_t M, int64_t K, int64_t P, const at::BFloat16* x, const TileOf& tile_of, __m512 (&acc)[6][4],
                  const Store& store) {
  const int64_t G = K / 32, rows = std::min(M, kRows);
  const bool few = M <= kRows;
  thread_local std::vector<__m512bh> wbuf;  // made tiles (16 vectors each, aligned)
  thread_local std::vector<const uint8_t*> where;
  thread_local std::vector<at::BFloat16> pad;  // a last, partial tile's rows (its tiles load 16)
  alignas(64) float c[4][kRows * 16];
  const int64_t tiles = few ? P : P * G;
  if (wbuf.size() < static_cast<size_t>(tiles * 16)) wbuf.resize(tiles * 16);
  uint8_t* buf = reinterpret_cast<uint8_t*>(wbuf.data());
  if (!few) {
    where.resize(tiles);
    for (int64_t g = 0; g < G; ++g)
      for (int64_t p = 0; p < P; ++p) where[g * P + p] = tile_of(g, p, buf + (g * P + p) * kTileBytes);
  }
  for (int64_t r0 = 0; r0 < M; r0 += kRows) {
    const int64_t mr = std::min(kRows, M - r0);
    const at::BFloat16* xa = x + r0 * K;
    if (mr < rows) {
      if (pad.size() < static_cast<size_t>(kRows * K)) pad.assign(kRows * K, at::BFloat16(0.f));
      std::memcpy(static_cast<void*>(pad.data()), xa, mr * K * sizeof(at::BFloat16));
      xa = pad.data();
    }
    zero(P);
    for (int64_t g = 0; g < G; ++g) {
      _tile_loadd(4, xa + g * 32, K * sizeof(at::BFloat16));
      for (int64_t p = 0; p < P; ++p)
        product(p, few ? tile_of(g, p, buf + p * kTileBytes) : where[g * P + p]);
    }
    save(P, c);
    for (int64_t rr = 0; rr < mr; rr += 6) {
      const int64_t n = std::min<int64_t>(6, mr - rr);
      for (int64_t r = 0; r < n; ++r)
        for (int64_t p = 0; p < P; ++p) acc[r][p] = _mm512_load_ps(c[p] + (rr + r) * 16);
      store(r0 + rr, n);
    }
  }
}

#endif  // FUNDAMENT_AMX

}  // namespace qgemm_amx
