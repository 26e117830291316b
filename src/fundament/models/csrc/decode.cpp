// Every layer of a Llama-family decoder (Gemma's too) for a batch of decode rows (one new token per
// sequence), in one call from Python. The matmuls stay ATen's (int4, int8 or dense kernels, the same ones
// the Python path calls); what this file owns is the small work between them (norms, rotary
// embedding, KV cache writes, attention over each row's own cache, SiLU, residuals), which in
// Python costs ~40 tensor calls per layer per step. Built on first use by models/native.py.
//
// Each row is computed on its own: nothing a row computes depends on which other rows share its
// batch (the ATen matmul kernels used here compute each row independently too).
//
// With bf16 rows and every weight packed for qgemm.h (the default on AVX512-BF16 CPUs), the
// layers run as one team program (team.h): a loop ends when its items are done, so a thread the OS
// takes off its core for a while does not stop the other at each of the step's ~300 loops.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#include "attend.h"
#include "qgemm.h"
#include "qgemm_f32.h"
#include "team.h"

namespace {

// model.py NATIVE_DENSE, NATIVE_INT8, NATIVE_INT4 (ATen's kernels), NATIVE_PACKED + qgemm's kind
constexpr int64_t kDense = 0, kInt8 = 1, kInt4 = 2, kPacked = 3;
constexpr int64_t kInt4Group = 32;

using attention::attend_rows;
using attention::f32;
using attention::fast_exp;

// y = x W^T (+ b), then each LoRA group's rows get x A^T B^T added (B carries the scale).
at::Tensor linear(const at::Tensor& x, int64_t kind, const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias,
                  const at::Tensor* lora, int64_t n_lora) {
  at::Tensor y;
  if (kind >= kPacked && x.scalar_type() == at::kFloat) {
    y = qgemm32::gemm(x, kind - kPacked, a, b, bias, a.size(0) * qgemm32::kPanel);
  } else if (kind >= kPacked) {
    y = qgemm::gemm(x, kind - kPacked, a, b, bias, a.size(0) * qgemm::kPanel, false);
  } else if (kind == kInt4) {
    y = at::_weight_int4pack_mm_for_cpu(x, a, kInt4Group, b);
  } else if (kind == kInt8) {
    y = at::_weight_int8pack_mm(x, a, b);
  } else {
    y = at::linear(x, a);
  }
  if (kind < kPacked && bias.defined() && bias.numel() > 0) y.add_(bias);
  for (int64_t g = 0; g < n_lora; ++g) {
    const at::Tensor& rows = lora[3 * g];
    y.index_add_(0, rows, at::linear(at::linear(x.index_select(0, rows), lora[3 * g + 1]), lora[3 * g + 2]));
  }
  return y;
}

// out = w * round(x * rsqrt(mean(x^2) + eps)): the statistics in float32, the rounding to the
// model's dtype before the weight, in the order of HF's LlamaRMSNorm.
template <typename T>
void rms_norm(const T* x, const T* w, T* out, int64_t C, float eps) {
  float ss = 0.f;
  for (int64_t i = 0; i < C; ++i) ss += f32(x[i]) * f32(x[i]);
  const float r = 1.f / std::sqrt(ss / C + eps);
  for (int64_t i = 0; i < C; ++i) out[i] = static_cast<T>(f32(w[i]) * f32(static_cast<T>(f32(x[i]) * r)));
}

// Rotary embedding of one head's first `rot` values (HF's rotate_half convention), rounded once to
// O (the cache's type, or T in place); the rest of the head (a partial rotary embedding:
// Phi-4-mini) passes through. `out` may be `x`: each step reads x[i] and x[i + half] before it
// writes them.
template <typename T, typename O>
void rope(const T* x, const T* cos, const T* sin, O* out, int64_t rot, int64_t hd) {
  if (static_cast<const void*>(out) != static_cast<const void*>(x))
    for (int64_t i = rot; i < hd; ++i) out[i] = static_cast<O>(f32(x[i]));
  const int64_t half = rot / 2;
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = f32(x[i]), x2 = f32(x[i + half]);
    out[i] = static_cast<O>(x1 * f32(cos[i]) - x2 * f32(sin[i]));
    out[i + half] = static_cast<O>(x2 * f32(cos[i + half]) + x1 * f32(sin[i + half]));
  }
}

// fn(r) for every row, rows split across threads once a batch has enough of them (`cost`: about
// how many elements a row touches); each row's work is the same whoever runs it.
template <typename Par, typename F>
void by_rows(const Par& par, int64_t n, int64_t cost, const F& fn) {
  par.items(n, std::max<int64_t>(1, 16384 / std::max<int64_t>(1, cost)), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) fn(r);
  });
}

// Each group of 32 inputs' sum for one row (bf16 rows: what qgemm's int4 offsets multiply).
template <typename T>
void row_group_sums(const T* x, int64_t K, float* out) {
  if constexpr (std::is_same_v<T, at::BFloat16>) qgemm::group_sums(x, K, out);
}

// Whether the layers can run as one team program (team.h): bf16 rows, every weight packed for
// qgemm (bf16, int8 or int4) with each layer's projections of one shape, no adapter rows.
inline bool team_ready(at::IntArrayRef kinds, at::IntArrayRef lora_counts, at::TensorList lin, int64_t n, int64_t C,
                       int64_t q_dim, int64_t width) {
  if (n == 0 || !qgemm::available()) return false;
  for (int64_t c : lora_counts)
    if (c != 0) return false;
  const int64_t L = static_cast<int64_t>(kinds.size()) / 4;
  for (int64_t k = 0; k < L * 4; ++k) {
    if (kinds[k] < kPacked || kinds[k] > kPacked + qgemm::kI4) return false;
    if (lin[3 * k].size(0) != lin[3 * (k % 4)].size(0)) return false;
  }
  const int64_t N[4] = {lin[0].size(0) * qgemm::kPanel, lin[3].size(0) * qgemm::kPanel, lin[6].size(0) * qgemm::kPanel,
                        lin[9].size(0) * qgemm::kPanel};
  return L > 0 && N[0] == width && N[1] == C && N[2] % (2 * qgemm::kGroup) == 0 && N[3] == C && C % qgemm::kGroup == 0 &&
         q_dim % qgemm::kGroup == 0;
}

// Gemma 2/3 (`gemma`): attention's and the MLP's outputs are RMS-normed before their residual
// adds (norms per layer: input, attention out, pre-MLP, MLP out, then q and k where the model has
// them), GELU (tanh) instead of SiLU, `query_scale` instead of hd ** -0.5, scores soft-capped at
// `softcap` (> 0), each layer attending over its last `windows[li]` positions (> 0) and rotating by
// its own table of `cos`/`sin` (types, n, rot), `layer_rope[li]`. Otherwise: 2 norms a layer, or
// 4 with Qwen3's per-head q and k norms, and cos/sin (n, rot). Keys and values are cached as KT
// (T, or bf16 under a float32 model).
template <typename T, typename KT>
at::Tensor decode_impl(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin, at::TensorList norms, at::TensorList lin,
                       at::IntArrayRef kinds, at::TensorList lora, at::IntArrayRef lora_counts, at::TensorList k_caches,
                       at::TensorList v_caches, at::IntArrayRef positions, int64_t H, int64_t KVH, double eps_d, bool gemma,
                       double query_scale, double softcap_d, at::IntArrayRef windows, at::IntArrayRef layer_rope) {
  const int64_t n = x.size(0), C = x.size(1), L = static_cast<int64_t>(kinds.size()) / 4;
  const int64_t per_layer = static_cast<int64_t>(norms.size()) / L;
  const bool qk_norm = per_layer == (gemma ? 6 : 4);
  const int64_t rot = cos.size(-1), hd = n > 0 ? k_caches[0].size(3) : rot, G = H / KVH, q_dim = H * hd, kv_dim = KVH * hd;
  const int64_t width = q_dim + 2 * kv_dim;  // a row of the q, k, v projection
  const int64_t table = cos.dim() == 3 ? n * rot : 0;  // one rotary table's size, where there are several
  const float eps = static_cast<float>(eps_d), softcap = static_cast<float>(softcap_d);
  const float scale = query_scale > 0 ? static_cast<float>(query_scale) : 1.f / std::sqrt(static_cast<float>(hd));
  x = x.contiguous().clone();
  auto h = at::empty_like(x);
  auto attn = at::empty({n, q_dim}, x.options());
  T* xp = x.data_ptr<T>();
  T* hp = h.data_ptr<T>();
  T* ap = attn.data_ptr<T>();
  const T* cp = cos.data_ptr<T>();
  const T* sp = sin.data_ptr<T>();
  std::vector<int64_t> lora_start(lora_counts.size() + 1, 0);
  for (size_t i = 0; i < lora_counts.size(); ++i) lora_start[i + 1] = lora_start[i] + 3 * lora_counts[i];
  int64_t longest = 0;
  for (int64_t r = 0; r < n; ++r) longest = std::max(longest, positions[r] + 1);

  // Every layer, its loops through `par` (team.h's OmpLoops or TeamLoops). project(li, j, in) is projection j of
  // layer li on the rows at `in` (h or attn: `in_t`); it returns where its output rows are.
  // sums(li, j) is where the loop that writes projection j's input also puts each row's group sums
  // (Team, int4 weights), else null. act_rows(I) is the MLP's activations' tensor, (n, I).
  auto layers = [&](const auto& par, const auto& project, const auto& sums, const auto& act_rows) {
    for (int64_t li = 0; li < L; ++li) {
      const int64_t at_qk = gemma ? 4 : 2;  // where this layer's q and k norms are, if any
      const T* in_norm = norms[per_layer * li].data_ptr<T>();
      const T* attn_out_norm = gemma ? norms[per_layer * li + 1].data_ptr<T>() : nullptr;
      const T* post_norm = norms[per_layer * li + (gemma ? 2 : 1)].data_ptr<T>();
      const T* mlp_out_norm = gemma ? norms[per_layer * li + 3].data_ptr<T>() : nullptr;
      const T* q_norm = qk_norm ? norms[per_layer * li + at_qk].data_ptr<T>() : nullptr;
      const T* k_norm = qk_norm ? norms[per_layer * li + at_qk + 1].data_ptr<T>() : nullptr;
      const int64_t rope_at = (layer_rope.empty() ? 0 : layer_rope[li]) * table;  // this layer's rotary table
      const T* cl = cp + rope_at;
      const T* sl = sp + rope_at;
      const int64_t window = windows.empty() ? 0 : windows[li];
      float* sums_qkv = sums(li, 0);
      by_rows(par, n, C, [&](int64_t r) {
        rms_norm(xp + r * C, in_norm, hp + r * C, C, eps);
        if (sums_qkv) row_group_sums(hp + r * C, C, sums_qkv + r * (C / qgemm::kGroup));
      });
      T* qp = project(li, 0, h).first;  // (n, width)
      // Rotary embedding of q (in place) and k (into the cache); v into the cache.
      by_rows(par, n, width, [&](int64_t r) {
        T* row = qp + r * width;
        const int64_t pos = positions[r], cap = k_caches[r].size(2);
        KT* kc = k_caches[r].data_ptr<KT>() + li * KVH * cap * hd;
        KT* vc = v_caches[r].data_ptr<KT>() + li * KVH * cap * hd;
        if (q_norm != nullptr) {
          for (int64_t hh = 0; hh < H; ++hh) rms_norm(row + hh * hd, q_norm, row + hh * hd, hd, eps);
          for (int64_t g = 0; g < KVH; ++g) rms_norm(row + q_dim + g * hd, k_norm, row + q_dim + g * hd, hd, eps);
        }
        for (int64_t hh = 0; hh < H; ++hh) rope(row + hh * hd, cl + r * rot, sl + r * rot, row + hh * hd, rot, hd);
        for (int64_t g = 0; g < KVH; ++g) {
          rope(row + q_dim + g * hd, cl + r * rot, sl + r * rot, kc + (g * cap + pos) * hd, rot, hd);
          const T* v = row + q_dim + kv_dim + g * hd;
          for (int64_t d = 0; d < hd; ++d) vc[(g * cap + pos) * hd + d] = static_cast<KT>(f32(v[d]));
        }
      });
      attend_rows<T, KT>(par, qp, width, ap, q_dim, k_caches, v_caches, positions, li, H, KVH, hd, window, longest, scale,
                         softcap);
      if (float* sums_o = sums(li, 1))
        by_rows(par, n, q_dim, [&](int64_t r) { row_group_sums(ap + r * q_dim, q_dim, sums_o + r * (q_dim / qgemm::kGroup)); });
      T* op = project(li, 1, attn).first;  // (n, C)
      float* sums_gu = sums(li, 2);
      by_rows(par, n, C, [&](int64_t r) {
        if (gemma) rms_norm(op + r * C, attn_out_norm, op + r * C, C, eps);
        for (int64_t i = r * C; i < (r + 1) * C; ++i) xp[i] = static_cast<T>(f32(xp[i]) + f32(op[i]));
        rms_norm(xp + r * C, post_norm, hp + r * C, C, eps);
        if (sums_gu) row_group_sums(hp + r * C, C, sums_gu + r * (C / qgemm::kGroup));
      });
      const auto gu = project(li, 2, h);  // (n, 2 I): gate then up
      const T* gp = gu.first;
      const int64_t I = gu.second / 2;
      const at::Tensor act = act_rows(I);  // (n, I)
      T* actp = act.data_ptr<T>();
      float* sums_down = sums(li, 3);
      // gate's activation times up, rounded as F.silu's (F.gelu's) output is; one loop per activation,
      // so each vectorizes (a choice inside the loop would compute both)
      by_rows(par, n, I * 4, [&](int64_t r) {
        const T* gate = gp + r * 2 * I;
        const T* up = gate + I;
        T* out = actp + r * I;
        if (gemma) {
          for (int64_t i = 0; i < I; ++i) {  // GELU (tanh), with tanh(u) = 1 - 2 / (exp(2u) + 1)
            const float g = f32(gate[i]), u = 0.7978845608f * (g + 0.044715f * g * g * g);
            out[i] = static_cast<T>(f32(static_cast<T>(g - g / (fast_exp(2.f * u) + 1.f))) * f32(up[i]));
          }
        } else {
          for (int64_t i = 0; i < I; ++i) {
            const float g = f32(gate[i]);
            out[i] = static_cast<T>(f32(static_cast<T>(g / (1.f + fast_exp(-g)))) * f32(up[i]));
          }
        }
        if (sums_down) row_group_sums(out, I, sums_down + r * (I / qgemm::kGroup));
      });
      T* dp = project(li, 3, act).first;  // (n, C)
      by_rows(par, n, C, [&](int64_t r) {
        if (gemma) rms_norm(dp + r * C, mlp_out_norm, dp + r * C, C, eps);
        for (int64_t i = r * C; i < (r + 1) * C; ++i) xp[i] = static_cast<T>(f32(xp[i]) + f32(dp[i]));
      });
    }
  };

#if FUNDAMENT_QGEMM
  if constexpr (std::is_same_v<T, at::BFloat16>) {
    if (team_ready(kinds, lora_counts, lin, n, C, q_dim, width)) {
      // Every buffer before the region (its threads only read and write them).
      auto cols = [&](int64_t j) { return lin[3 * j].size(0) * qgemm::kPanel; };  // layer 0's; team_ready: all alike
      const int64_t I = cols(2) / 2;
      const int64_t in_cols[4] = {C, q_dim, C, I};
      at::Tensor out[4] = {at::empty({n, width}, x.options()), at::empty({n, C}, x.options()),
                           at::empty({n, 2 * I}, x.options()), at::empty({n, C}, x.options())};
      const at::Tensor act = at::empty({n, I}, x.options());
      at::Tensor xs = at::empty({n * std::max({C, q_dim, I}) / qgemm::kGroup}, x.options().dtype(at::kFloat));
      std::vector<at::Tensor> bias(kinds.size());  // float32, where a projection has one
      for (size_t k = 0; k < kinds.size(); ++k)
        if (lin[3 * k + 2].defined() && lin[3 * k + 2].numel()) bias[k] = lin[3 * k + 2].to(at::kFloat).contiguous();
      float* xsp = xs.data_ptr<float>();
      const bool i4_sums = qgemm::i4_needs_group_sums();
      team::run([&](team::Member& member) {
        auto project = [&](int64_t li, int64_t j, const at::Tensor& in) {
          const int64_t k = li * 4 + j, kind = kinds[k] - kPacked, N = out[j].size(1);
          const qgemm::Gemm g{kind,
                              n,
                              in_cols[j],
                              N,
                              in.data_ptr<at::BFloat16>(),
                              lin[3 * k].data_ptr<uint8_t>(),
                              kind == qgemm::kI8 ? lin[3 * k + 1].data_ptr<float>() : nullptr,
                              bias[k].defined() ? bias[k].data_ptr<float>() : nullptr,
                              kind == qgemm::kI4 && i4_sums ? xsp : nullptr,
                              nullptr,
                              out[j].data_ptr<at::BFloat16>()};
          member.loop(N / qgemm::kPanel, qgemm::kBlock, qgemm::kBlock,
                      [&](int64_t begin, int64_t end, int64_t hint) { g.run(begin, end, hint); });
          return std::make_pair(out[j].data_ptr<T>(), N);
        };
        auto sums = [&](int64_t li, int64_t j) {
          return i4_sums && kinds[li * 4 + j] - kPacked == qgemm::kI4 ? xsp : nullptr;
        };
        layers(team::TeamLoops{member}, project, sums, [&](int64_t) { return act; });
      });
      return x;
    }
  }
#endif
  // Any other layers: each loop its own at::parallel_for, projections through linear().
  at::Tensor held[4];  // the projections' outputs, kept until the next layer's
  auto project = [&](int64_t li, int64_t j, const at::Tensor& in) {
    const int64_t k = li * 4 + j;
    held[j] = linear(in, kinds[k], lin[3 * k], lin[3 * k + 1], lin[3 * k + 2], lora.data() + lora_start[k], lora_counts[k])
                  .contiguous();
    return std::make_pair(held[j].data_ptr<T>(), held[j].size(1));
  };
  auto no_sums = [](int64_t, int64_t) -> float* { return nullptr; };
  layers(team::OmpLoops{}, project, no_sums, [&](int64_t I) { return at::empty({n, I}, x.options()); });
  return x;
}

at::Tensor decode_layers(const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, at::TensorList norms, at::TensorList lin,
                         at::IntArrayRef kinds, at::TensorList lora, at::IntArrayRef lora_counts, at::TensorList k_caches,
                         at::TensorList v_caches, at::IntArrayRef positions, int64_t n_heads, int64_t n_kv_heads, double eps,
                         bool gemma, double query_scale, double softcap, at::IntArrayRef windows, at::IntArrayRef layer_rope) {
  TORCH_CHECK(x.dim() == 2 && (cos.dim() == 2 || cos.dim() == 3) && cos.size(-2) == x.size(0) && cos.sizes() == sin.sizes() &&
                  cos.is_contiguous() && sin.is_contiguous(),
              "decode_layers: x (n, C), cos and sin (n, rotary dims) or (tables, n, rotary dims), contiguous");
  const int64_t L = static_cast<int64_t>(kinds.size()) / 4;
  TORCH_CHECK(windows.empty() || static_cast<int64_t>(windows.size()) == L, "decode_layers: one window per layer");
  TORCH_CHECK(layer_rope.empty() || static_cast<int64_t>(layer_rope.size()) == L, "decode_layers: one rotary table per layer");
  for (int64_t t : layer_rope) TORCH_CHECK(t >= 0 && t < (cos.dim() == 3 ? cos.size(0) : 1), "decode_layers: no such rotary table");
  TORCH_CHECK(static_cast<int64_t>(k_caches.size()) == x.size(0) && static_cast<int64_t>(positions.size()) == x.size(0),
              "decode_layers: one cache and one position per row");
  TORCH_CHECK(x.size(0) == 0 || (k_caches[0].dim() == 4 && cos.size(-1) <= k_caches[0].size(3) && cos.size(-1) % 2 == 0),
              "decode_layers: caches (layers, kv heads, capacity, head dim), rotary dims even and within the head");
  const int64_t per_layer = L > 0 ? static_cast<int64_t>(norms.size()) / L : 0;
  TORCH_CHECK(kinds.size() % 4 == 0 && per_layer * L == static_cast<int64_t>(norms.size()) &&
                  (gemma ? (per_layer == 4 || per_layer == 6) : (per_layer == 2 || per_layer == 4)) &&
                  lin.size() == kinds.size() * 3 && lora_counts.size() == kinds.size(),
              "decode_layers: 2 norms a layer (4 with q and k norms; Gemma's 4 or 6), 4 linears (3 tensors each) and 4 LoRA "
              "counts per layer");
  // the caches' type: the model's, or bf16 under a float32 model
  const auto kv = x.size(0) > 0 ? k_caches[0].scalar_type() : x.scalar_type();
  for (int64_t r = 0; r < x.size(0); ++r)
    TORCH_CHECK(k_caches[r].scalar_type() == kv && v_caches[r].scalar_type() == kv && k_caches[r].is_contiguous() &&
                    v_caches[r].is_contiguous(),
                "decode_layers: every cache contiguous and of one type");
  if (x.scalar_type() == at::kBFloat16) {
    TORCH_CHECK(kv == at::kBFloat16, "decode_layers: a bfloat16 model caches bfloat16");
    return decode_impl<at::BFloat16, at::BFloat16>(x, cos, sin, norms, lin, kinds, lora, lora_counts, k_caches, v_caches,
                                                   positions, n_heads, n_kv_heads, eps, gemma, query_scale, softcap, windows,
                                                   layer_rope);
  }
  TORCH_CHECK(x.scalar_type() == at::kFloat && (kv == at::kFloat || kv == at::kBFloat16),
              "decode_layers: bfloat16 or float32 only (a float32 model's cache: float32 or bfloat16)");
  if (kv == at::kBFloat16)
    return decode_impl<float, at::BFloat16>(x, cos, sin, norms, lin, kinds, lora, lora_counts, k_caches, v_caches, positions,
                                            n_heads, n_kv_heads, eps, gemma, query_scale, softcap, windows, layer_rope);
  return decode_impl<float, float>(x, cos, sin, norms, lin, kinds, lora, lora_counts, k_caches, v_caches, positions, n_heads,
                                   n_kv_heads, eps, gemma, query_scale, softcap, windows, layer_rope);
}

at::Tensor qgemm_op(const at::Tensor& x, int64_t kind, const at::Tensor& a, const at::Tensor& b, const at::Tensor& bias,
                    bool out_float) {
  if (x.scalar_type() == at::kFloat) {  // a float32 model's rows: qgemm_f32.h, float32 out
    auto y = qgemm32::gemm(x, kind, a, b, bias, a.size(0) * qgemm32::kPanel);
    return out_float ? y : y.to(at::kBFloat16);
  }
  return qgemm::gemm(x, kind, a, b, bias, a.size(0) * qgemm::kPanel, out_float);
}

bool qgemm_available() { return qgemm::available(); }
bool qgemm_f32_available() { return qgemm32::available(); }
// Whether bf16 and int8 weights go through AMX's tiles (qgemm_amx.h); set 0 or 1 to change it
// (tests only: a row's bits depend on it), -1 to ask.
bool use_amx(int64_t set) { return set < 0 ? qgemm_amx::enabled() : qgemm_amx::set_enabled(set != 0); }

}  // namespace

TORCH_LIBRARY(fundament, m) {
  m.def("qgemm(Tensor x, int kind, Tensor a, Tensor b, Tensor bias, bool out_float) -> Tensor");
  m.def("qgemm_available() -> bool", &qgemm_available);
  m.def("qgemm_f32_available() -> bool", &qgemm_f32_available);
  m.def("qgemm_amx(int set=-1) -> bool", &use_amx);
  m.def("decode_layers(Tensor x, Tensor cos, Tensor sin, Tensor[] norms, Tensor[] lin, int[] kinds, Tensor[] lora, int[] lora_counts, "
        "Tensor(a!)[] k_caches, Tensor(b!)[] v_caches, int[] positions, int n_heads, int n_kv_heads, float eps, bool gemma=False, "
        "float query_scale=0., float softcap=0., int[] windows=[], int[] layer_rope=[]) -> Tensor");
}

TORCH_LIBRARY_IMPL(fundament, CPU, m) {
  m.impl("decode_layers", &decode_layers);
  m.impl("qgemm", &qgemm_op);
}
