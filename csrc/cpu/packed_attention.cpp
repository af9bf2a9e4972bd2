// packed_attention on the CPU: FlashAttention-style tiled forward and backward for sequences packed
// end to end.
//
// Work is split into items of (sequence, head, query tile) for the forward and (sequence, head, range of
// key tiles) for the backward. Items are sorted longest first and handed out dynamically, so one long CT
// sequence and many short X-ray sequences keep every core busy. Scores never exist beyond one
// kBlock x kBlock tile per thread: the forward keeps a running row maximum and sum (online softmax) and
// returns the log-sum-exp, which the backward uses to recompute probabilities tile by tile.
// Accumulation is float32 throughout; float64 inputs (for gradient checks) take a plain double path.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "../checks.h"
#include "attention_tiles.h"
#include "simd.h"
#include "workspace.h"

namespace mmv {
namespace {

using namespace attention;
using simd::VecF;

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int64_t kQueryTiles = 4;  // query tiles per forward item
constexpr int64_t kKeyTiles = 8;    // key tiles per softmax step of the forward
constexpr int64_t kKeyGroup = 4;    // key tiles per product of the backward

// The packed batch cut into tiles of kBlock tokens; tiles never straddle two sequences.
struct Tiles {
  std::vector<int64_t> seq_start;   // (B + 1,) = cu_seqlens
  std::vector<int64_t> first_tile;  // (B + 1,) prefix sum of tiles per sequence
  std::vector<int64_t> tile_seq;    // sequence of each tile

  explicit Tiles(const int32_t* cu, int64_t batch) : seq_start(cu, cu + batch + 1), first_tile(batch + 1, 0) {
    for (int64_t b = 0; b < batch; ++b) {
      const int64_t tiles = (seq_start[b + 1] - seq_start[b] + kBlock - 1) / kBlock;
      first_tile[b + 1] = first_tile[b] + tiles;
      tile_seq.insert(tile_seq.end(), tiles, b);
    }
  }
  int64_t batch() const { return static_cast<int64_t>(seq_start.size()) - 1; }
  int64_t count() const { return first_tile.back(); }
  int64_t seq_length(int64_t b) const { return seq_start[b + 1] - seq_start[b]; }
  int64_t begin(int64_t g) const {
    const int64_t b = tile_seq[g];
    return seq_start[b] + (g - first_tile[b]) * kBlock;
  }
  int64_t rows(int64_t g) const { return std::min(kBlock, seq_start[tile_seq[g] + 1] - begin(g)); }
  // Rows rounded up for use as a reduction depth or a B-panel width.
  int64_t span(int64_t g) const { return round_up(rows(g), kColumnAlign); }
};

// A (T, H, D) tensor seen through its strides (the last dimension is contiguous).
template <typename scalar_t>
struct TokenView {
  const scalar_t* data;
  int64_t stride_token;
  int64_t stride_head;
  const scalar_t* row(int64_t t, int64_t h) const { return data + t * stride_token + h * stride_head; }
};

template <typename scalar_t>
TokenView<scalar_t> view_of(const at::Tensor& t) {
  return {t.data_ptr<scalar_t>(), t.stride(0), t.stride(1)};
}

// Calls fn(state, item) for item in [0, num_items) on all threads, each thread taking the next
// unclaimed item: items are sorted longest first, so the dynamic hand-out balances uneven costs.
// Each thread makes its scratch state once with make_state(); brgemm's AMX state is released at the end.
template <typename compute_t, typename MakeState, typename ItemFn>
void for_each_item_dynamic(int64_t num_items, MakeState&& make_state, ItemFn&& fn) {
  if (num_items == 0) return;
  std::atomic<int64_t> next{0};
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), num_items));
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    auto state = make_state();
    for (int64_t i = next.fetch_add(1); i < num_items; i = next.fetch_add(1)) fn(state, i);
    if (uses_vnni<compute_t>()) at::native::cpublas::brgemm_release();
  });
}

// ---------------------------------------------------------------------------------------------------
// Panels: every operand a tile product needs as B, copied once per (head, tile) in brgemm's layout.

template <typename compute_t>
struct Panels {
  int64_t head_dim;
  int64_t num_tiles;
  compute_t* storage;  // uninitialised: every panel is written in full before it is read

  static size_t bytes(int64_t heads, int64_t tiles, int64_t head_dim) {
    return Workspace::bytes_for<compute_t>(heads * tiles * panel_elems(head_dim));
  }
  Panels(Workspace::Scope& scope, int64_t heads, int64_t tiles, int64_t head_dim_)
      : head_dim(head_dim_), num_tiles(tiles), storage(scope.take<compute_t>(heads * tiles * panel_elems(head_dim_))) {}
  compute_t* at(int64_t h, int64_t g) { return storage + (h * num_tiles + g) * panel_elems(head_dim); }
  const compute_t* at(int64_t h, int64_t g) const { return storage + (h * num_tiles + g) * panel_elems(head_dim); }
};

// The rows of tile g of head h as a zero-padded kBlock x Dp block of compute type.
template <typename scalar_t, typename compute_t>
void load_tile_rows(const TokenView<scalar_t>& x, const Tiles& tiles, int64_t h, int64_t g, int64_t head_dim,
                    int64_t padded_dim, compute_t* out) {
  const int64_t begin = tiles.begin(g), rows = tiles.rows(g);
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* src = x.row(begin + r, h);
    compute_t* dst = out + r * padded_dim;
    if constexpr (std::is_same_v<scalar_t, compute_t>) {
      std::copy(src, src + head_dim, dst);
    } else {
      for (int64_t d = 0; d < head_dim; ++d) dst[d] = static_cast<compute_t>(static_cast<float>(src[d]));
    }
    std::fill(dst + head_dim, dst + padded_dim, compute_t(0.f));
  }
  std::fill(out + rows * padded_dim, out + kBlock * padded_dim, compute_t(0.f));
}

// Fills the requested panels of x for every (head, tile), in parallel: `rows` (A operand), `rows_packed`
// (B operand), `cols` (the transposed tile, Dp x kBlock, as an A operand) and `cols_packed` (the
// transposed tile as a B operand). Null pointers are skipped.
template <typename scalar_t, typename compute_t>
void build_panels(const TokenView<scalar_t>& x, const Tiles& tiles, int64_t heads, int64_t head_dim,
                  Panels<compute_t>* rows, Panels<compute_t>* rows_packed, Panels<compute_t>* cols,
                  Panels<compute_t>* cols_packed) {
  const int64_t padded_dim = padded_head_dim(head_dim);
  const int64_t total = heads * tiles.count();
  at::parallel_for(0, total, 1, [&](int64_t begin, int64_t end) {
    std::vector<compute_t> block(kBlock * padded_dim), transposed(padded_dim * kBlock);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t h = i / tiles.count(), g = i % tiles.count();
      compute_t* plain = rows ? rows->at(h, g) : block.data();
      load_tile_rows(x, tiles, h, g, head_dim, padded_dim, plain);
      const int64_t span = tiles.span(g);
      if (rows_packed) pack_panel(plain, padded_dim, span, padded_dim, rows_packed->at(h, g));
      if (cols || cols_packed) {
        compute_t* t = cols ? cols->at(h, g) : transposed.data();
        for (int64_t d = 0; d < padded_dim; ++d)
          for (int64_t r = 0; r < kBlock; ++r) t[d * kBlock + r] = plain[r * padded_dim + d];
        if (cols_packed) pack_panel(t, kBlock, padded_dim, span, cols_packed->at(h, g));
      }
    }
    if (uses_vnni<compute_t>()) at::native::cpublas::brgemm_release();
  });
}

// ---------------------------------------------------------------------------------------------------
// Vector pieces of the tile loops, compiled for each instruction set.

// Online-softmax step for `rows` rows of a score tile S (leading dimension ld, also that of the
// probabilities) over its first `valid` columns (of `width`, a multiple of 16), in base 2: scale_log2 = scale * log2(e), and row_max is kept in that
// domain. Updates the running max and sum, writes probabilities (zero past `valid`) and returns in
// alpha the factor by which each row's output accumulator must be rescaled.
template <typename compute_t>
MMV_INLINE void softmax_step(const float* scores, int64_t rows, int64_t valid, int64_t width, int64_t ld,
                             float scale_log2, float* row_max, float* row_sum, float* alpha, compute_t* probs) {
  constexpr int64_t L = simd::kLanes;
  constexpr int kExpDegree = std::is_same_v<compute_t, float> ? 6 : 5;
  const VecF neg_inf = simd::broadcast(kNegInf);
  const int64_t full = valid / L * L;
  const VecF tail_valid = simd::kLaneIndex + static_cast<float>(full) < static_cast<float>(valid) ? VecF{} + 1.f : VecF{};
  for (int64_t r = 0; r < rows; ++r) {
    const float* s = scores + r * ld;
    compute_t* p_row = probs + r * ld;
    VecF vmax = neg_inf;
    for (int64_t c = 0; c < full; c += L) vmax = simd::vmax(vmax, simd::load(s + c) * scale_log2);
    VecF tail = neg_inf;
    if (full < valid) {
      tail = tail_valid != 0.f ? simd::load(s + full) * scale_log2 : neg_inf;
      vmax = simd::vmax(vmax, tail);
    }
    const float m_new = std::max(row_max[r], simd::hmax(vmax));
    // The maximum may drop a NaN score, but 2^(NaN - base) is NaN, so the row's sum and output become
    // NaN as in the reference. While every score seen is -inf, base 0 keeps -inf - base at -inf (not NaN).
    const float base = m_new == kNegInf ? 0.f : m_new;
    VecF vsum = VecF{};
    for (int64_t c = 0; c < full; c += L) {
      const VecF p = simd::exp2<kExpDegree>(simd::load(s + c) * scale_log2 - base);
      vsum += p;
      simd::store_computed(p_row + c, p);
    }
    for (int64_t c = full; c < width; c += L) {
      const VecF p = c == full ? simd::exp2<kExpDegree>(tail - base) : VecF{};
      vsum += p;
      simd::store_computed(p_row + c, p);
    }
    alpha[r] = row_max[r] == kNegInf ? 0.f : std::exp2(row_max[r] - m_new);
    row_sum[r] = row_sum[r] * alpha[r] + simd::hsum(vsum);
    row_max[r] = m_new;
  }
}

// acc[r] *= alpha[r] for the rows whose running maximum moved.
MMV_INLINE void scale_rows(float* acc, int64_t rows, int64_t padded_dim, const float* alpha) {
  for (int64_t r = 0; r < rows; ++r) {
    if (alpha[r] == 1.f) continue;
    const VecF a = simd::broadcast(alpha[r]);
    float* row = acc + r * padded_dim;
    for (int64_t d = 0; d < padded_dim; d += simd::kLanes) simd::store(row + d, simd::load(row + d) * a);
  }
}

// Backward tile step, in the transposed orientation (rows = keys, columns = queries), base 2:
//   P^T = 2^(scale_log2 * S^T - lse_log2[q]),  dS^T = P^T * (dP^T - delta[q])
// over `keys` rows and `width` columns (width = `queries` rounded up to 16). Columns past the tile's
// queries are set to zero: their scores are a key times a zero-padded query, which is NaN for a key
// holding inf or NaN, and must not reach that key's dK and dV. Writes P^T and dS^T in compute type (A
// operands of the dV and dK products, and B operand of the dQ product).
template <typename compute_t>
MMV_INLINE void backward_step(const float* scores_t, const float* dprobs_t, int64_t keys, int64_t queries,
                              int64_t width, float scale_log2, const float* lse_log2, const float* delta,
                              compute_t* probs_t, compute_t* dscores_t) {
  constexpr int kExpDegree = std::is_same_v<compute_t, float> ? 6 : 5;
  const int64_t full = queries / simd::kLanes * simd::kLanes;
  const simd::VecI tail_valid = simd::kLaneIndex + static_cast<float>(full) < static_cast<float>(queries);
  for (int64_t r = 0; r < keys; ++r) {
    for (int64_t c = 0; c < width; c += simd::kLanes) {
      VecF p = simd::exp2<kExpDegree>(simd::load(scores_t + r * kBlock + c) * scale_log2 - simd::load(lse_log2 + c));
      VecF ds = p * (simd::load(dprobs_t + r * kBlock + c) - simd::load(delta + c));
      if (c == full) {
        p = tail_valid ? p : VecF{};
        ds = tail_valid ? ds : VecF{};
      }
      simd::store_computed(probs_t + r * kBlock + c, p);
      simd::store_computed(dscores_t + r * kBlock + c, ds);
    }
  }
}

#define MMV_CLONED_STEPS(compute_t, suffix)                                                                 \
  MMV_CPU_CLONES void softmax_step_##suffix(const float* scores, int64_t rows, int64_t valid, int64_t width, \
                                            int64_t ld, float scale_log2, float* row_max, float* row_sum,    \
                                            float* alpha, compute_t* probs) {                                \
    softmax_step(scores, rows, valid, width, ld, scale_log2, row_max, row_sum, alpha, probs);                \
  }                                                                                                          \
  MMV_CPU_CLONES void backward_step_##suffix(const float* scores_t, const float* dprobs_t, int64_t keys,     \
                                             int64_t queries, int64_t width, float scale_log2,               \
                                             const float* lse_log2, const float* delta, compute_t* probs_t,  \
                                             compute_t* dscores_t) {                                         \
    backward_step(scores_t, dprobs_t, keys, queries, width, scale_log2, lse_log2, delta, probs_t, dscores_t); \
  }
MMV_CLONED_STEPS(float, f32)
MMV_CLONED_STEPS(c10::BFloat16, bf16)
#undef MMV_CLONED_STEPS

MMV_CPU_CLONES void scale_rows_cloned(float* acc, int64_t rows, int64_t padded_dim, const float* alpha) {
  scale_rows(acc, rows, padded_dim, alpha);
}

void softmax_step_any(const float* s, int64_t rows, int64_t valid, int64_t width, int64_t ld, float k, float* m,
                      float* l, float* alpha, float* p) {
  softmax_step_f32(s, rows, valid, width, ld, k, m, l, alpha, p);
}
void softmax_step_any(const float* s, int64_t rows, int64_t valid, int64_t width, int64_t ld, float k, float* m,
                      float* l, float* alpha, c10::BFloat16* p) {
  softmax_step_bf16(s, rows, valid, width, ld, k, m, l, alpha, p);
}
void backward_step_any(const float* st, const float* dpt, int64_t keys, int64_t queries, int64_t width, float k,
                       const float* lse, const float* delta, float* pt, float* dst) {
  backward_step_f32(st, dpt, keys, queries, width, k, lse, delta, pt, dst);
}
void backward_step_any(const float* st, const float* dpt, int64_t keys, int64_t queries, int64_t width, float k,
                       const float* lse, const float* delta, c10::BFloat16* pt, c10::BFloat16* dst) {
  backward_step_bf16(st, dpt, keys, queries, width, k, lse, delta, pt, dst);
}

constexpr float kLog2e = 1.44269504088896341f;
constexpr float kLn2 = 0.693147180559945309f;

// ---------------------------------------------------------------------------------------------------
// Forward.

template <typename scalar_t, typename compute_t>
void forward_tiled(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Tiles& tiles, float scale,
                   at::Tensor& out, at::Tensor& lse) {
  const int64_t heads = q.size(1), head_dim = q.size(2), padded_dim = padded_head_dim(head_dim);
  const int64_t count = tiles.count();
  Workspace::Scope scope(3 * Panels<compute_t>::bytes(heads, count, head_dim));
  Panels<compute_t> q_rows(scope, heads, count, head_dim);
  Panels<compute_t> k_cols(scope, heads, count, head_dim);
  Panels<compute_t> v_rows_packed(scope, heads, count, head_dim);
  build_panels<scalar_t, compute_t>(view_of<scalar_t>(q), tiles, heads, head_dim, &q_rows, nullptr, nullptr, nullptr);
  build_panels<scalar_t, compute_t>(view_of<scalar_t>(k), tiles, heads, head_dim, nullptr, nullptr, nullptr, &k_cols);
  build_panels<scalar_t, compute_t>(view_of<scalar_t>(v), tiles, heads, head_dim, nullptr, &v_rows_packed, nullptr,
                                    nullptr);

  // Items (head, group of up to kQueryTiles consecutive query tiles of one sequence), longest sequence
  // first. A group multiplies as one tall tile: fewer, larger products.
  struct ForwardItem {
    int64_t head, first_tile, num_tiles;
  };
  std::vector<ForwardItem> items;
  for (int64_t b = 0; b < tiles.batch(); ++b)
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t g = tiles.first_tile[b]; g < tiles.first_tile[b + 1]; g += kQueryTiles)
        items.push_back({h, g, std::min(kQueryTiles, tiles.first_tile[b + 1] - g)});
  std::stable_sort(items.begin(), items.end(), [&](const ForwardItem& a, const ForwardItem& b) {
    return tiles.seq_length(tiles.tile_seq[a.first_tile]) * a.num_tiles >
           tiles.seq_length(tiles.tile_seq[b.first_tile]) * b.num_tiles;
  });

  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  float* lse_ptr = lse.data_ptr<float>();
  const int64_t num_tokens = q.size(0);
  constexpr int64_t kMaxRows = kQueryTiles * kBlock;
  constexpr int64_t kMaxKeys = kKeyTiles * kBlock;
  struct Scratch {
    std::vector<float> scores, acc, row_max, row_sum, alpha;
    std::vector<compute_t> probs;
  };
  for_each_item_dynamic<compute_t>(
      static_cast<int64_t>(items.size()),
      [&] {
        return Scratch{std::vector<float>(kMaxRows * kMaxKeys), std::vector<float>(kMaxRows * padded_dim),
                       std::vector<float>(kMaxRows),            std::vector<float>(kMaxRows),
                       std::vector<float>(kMaxRows),            std::vector<compute_t>(kMaxRows * kMaxKeys)};
      },
      [&](Scratch& s, int64_t i) {
        const ForwardItem& item = items[i];
        const int64_t h = item.head, g0 = item.first_tile, b = tiles.tile_seq[g0];
        const int64_t last = g0 + item.num_tiles - 1;
        // Tiles before the last of a sequence are full, so the panels of consecutive tiles continue one
        // another: a group of query tiles is one tall A operand and a group of key tiles one wide B.
        const int64_t rows = (item.num_tiles - 1) * kBlock + tiles.rows(last), q_begin = tiles.begin(g0);
        std::fill_n(s.row_max.begin(), rows, kNegInf);
        std::fill_n(s.row_sum.begin(), rows, 0.f);
        std::fill_n(s.acc.begin(), rows * padded_dim, 0.f);
        const int64_t seq_end_tile = tiles.first_tile[b + 1];
        for (int64_t gk = tiles.first_tile[b]; gk < seq_end_tile; gk += kKeyTiles) {
          const int64_t group = std::min(kKeyTiles, seq_end_tile - gk), group_last = gk + group - 1;
          const int64_t keys = (group - 1) * kBlock + tiles.rows(group_last);
          const int64_t width = (group - 1) * kBlock + tiles.span(group_last);
          gemm_panel<compute_t>(rows, width, padded_dim, q_rows.at(h, g0), padded_dim, k_cols.at(h, gk),
                                s.scores.data(), kMaxKeys, false);
          softmax_step_any(s.scores.data(), rows, keys, width, kMaxKeys, scale * kLog2e, s.row_max.data(),
                           s.row_sum.data(), s.alpha.data(), s.probs.data());
          scale_rows_cloned(s.acc.data(), rows, padded_dim, s.alpha.data());
          for (int64_t t = 0; t < group; ++t) {
            gemm_panel<compute_t>(rows, padded_dim, tiles.span(gk + t), s.probs.data() + t * kBlock, kMaxKeys,
                                  v_rows_packed.at(h, gk + t), s.acc.data(), padded_dim, true);
          }
        }
        for (int64_t r = 0; r < rows; ++r) {
          const float inv = 1.f / s.row_sum[r];
          scalar_t* dst = out_ptr + ((q_begin + r) * heads + h) * head_dim;
          for (int64_t d = 0; d < head_dim; ++d) dst[d] = static_cast<scalar_t>(s.acc[r * padded_dim + d] * inv);
          // A +inf score makes the sum, and so out and lse, NaN (torch.logsumexp would say +inf).
          lse_ptr[h * num_tokens + q_begin + r] = (s.row_max[r] + std::log2(s.row_sum[r])) * kLn2;
        }
      });
}

// ---------------------------------------------------------------------------------------------------
// Backward, FlashAttention-2 style: an item owns a range of key tiles of one (sequence, head), keeps
// their dK and dV in float32 tiles and sweeps every query tile of the sequence, adding its share of dQ
// to a float32 accumulator. A sequence long enough to dominate the work is split into several key
// ranges, each adding into its own accumulator slice; the slices are summed in a fixed order at the
// end, so the result is the same on every run and for any order of sequences in the pack.

constexpr int64_t kMaxSplits = 8;

struct BackwardItem {
  int64_t seq, head, split, first_tile, end_tile, cost;
};

template <typename scalar_t, typename compute_t>
void backward_tiled(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                    const at::Tensor& out, const at::Tensor& lse, const Tiles& tiles, float scale, at::Tensor& dq,
                    at::Tensor& dk, at::Tensor& dv) {
  const int64_t num_tokens = q.size(0), heads = q.size(1), head_dim = q.size(2);
  const int64_t padded_dim = padded_head_dim(head_dim);

  // delta[h, t] = <dout[t, h], out[t, h]>, the row term of the softmax gradient.
  std::vector<float> delta(heads * num_tokens);
  {
    const auto dout_v = view_of<scalar_t>(dout), out_v = view_of<scalar_t>(out);
    at::parallel_for(0, num_tokens, 256, [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        for (int64_t h = 0; h < heads; ++h) {
          const scalar_t* a = dout_v.row(t, h);
          const scalar_t* b = out_v.row(t, h);
          float sum = 0.f;
          for (int64_t d = 0; d < head_dim; ++d) sum += static_cast<float>(a[d]) * static_cast<float>(b[d]);
          delta[h * num_tokens + t] = sum;
        }
    });
  }

  // Split each sequence's key tiles so that no item costs much more than 1 / (4 * threads) of the work.
  double total_cost = 0;
  for (int64_t b = 0; b < tiles.batch(); ++b) total_cost += heads * double(tiles.seq_length(b)) * tiles.seq_length(b);
  const double target = std::max(1.0, total_cost / (4.0 * at::get_num_threads()));
  std::vector<int64_t> splits(tiles.batch(), 1);
  std::vector<BackwardItem> items;
  for (int64_t b = 0; b < tiles.batch(); ++b) {
    const int64_t length = tiles.seq_length(b), num_seq_tiles = tiles.first_tile[b + 1] - tiles.first_tile[b];
    if (length == 0) continue;
    const double cost = double(length) * length;
    splits[b] = std::clamp<int64_t>(static_cast<int64_t>(std::ceil(cost / target)), 1,
                                    std::min(num_seq_tiles, kMaxSplits));
    for (int64_t h = 0; h < heads; ++h)
      for (int64_t sp = 0; sp < splits[b]; ++sp) {
        const int64_t first = tiles.first_tile[b] + num_seq_tiles * sp / splits[b];
        const int64_t end = tiles.first_tile[b] + num_seq_tiles * (sp + 1) / splits[b];
        items.push_back({b, h, sp, first, end, (end - first) * length});
      }
  }
  std::stable_sort(items.begin(), items.end(), [](const BackwardItem& a, const BackwardItem& b) { return a.cost > b.cost; });

  const int64_t count = tiles.count();
  const int64_t max_splits = *std::max_element(splits.begin(), splits.end());
  const int64_t dq_tile = padded_dim * kBlock;
  const size_t dq_acc_elems = static_cast<size_t>(max_splits * heads * count * dq_tile);
  Workspace::Scope scope(7 * Panels<compute_t>::bytes(heads, count, head_dim) + Workspace::bytes_for<float>(dq_acc_elems));
  Panels<compute_t> q_rows_packed(scope, heads, count, head_dim), q_cols_packed(scope, heads, count, head_dim);
  Panels<compute_t> k_rows(scope, heads, count, head_dim), k_cols(scope, heads, count, head_dim);
  Panels<compute_t> v_rows(scope, heads, count, head_dim);
  Panels<compute_t> do_rows_packed(scope, heads, count, head_dim), do_cols_packed(scope, heads, count, head_dim);
  build_panels<scalar_t, compute_t>(view_of<scalar_t>(q), tiles, heads, head_dim, nullptr, &q_rows_packed, nullptr,
                                    &q_cols_packed);
  build_panels<scalar_t, compute_t>(view_of<scalar_t>(k), tiles, heads, head_dim, &k_rows, nullptr, &k_cols, nullptr);
  build_panels<scalar_t, compute_t>(view_of<scalar_t>(v), tiles, heads, head_dim, &v_rows, nullptr, nullptr, nullptr);
  build_panels<scalar_t, compute_t>(view_of<scalar_t>(dout), tiles, heads, head_dim, nullptr, &do_rows_packed,
                                    nullptr, &do_cols_packed);


  // dQ is accumulated transposed, one Dp x kBlock float tile per (split, head, query tile): the product
  // dQ^T += K^T dS^T then needs no transpose of dS.
  float* dq_acc_ptr = scope.take<float>(dq_acc_elems);
  at::parallel_for(0, static_cast<int64_t>(dq_acc_elems), 1 << 16, [&](int64_t begin, int64_t end) {
    std::fill(dq_acc_ptr + begin, dq_acc_ptr + end, 0.f);
  });
  auto dq_tile_at = [&](int64_t split, int64_t h, int64_t g) { return dq_acc_ptr + ((split * heads + h) * count + g) * dq_tile; };
  const float* lse_ptr = lse.data_ptr<float>();
  scalar_t* dk_ptr = dk.data_ptr<scalar_t>();
  scalar_t* dv_ptr = dv.data_ptr<scalar_t>();
  const float scale_log2 = scale * kLog2e;

  // Key tiles are processed in groups of up to kKeyGroup: one tall A operand per product.
  constexpr int64_t kMaxKeys = kKeyGroup * kBlock;
  struct Scratch {
    std::vector<float> scores_t, dprobs_t, dk_acc, dv_acc, lse_tile, delta_tile;
    std::vector<compute_t> probs_t, dscores_t, dscores_t_packed;
  };
  for_each_item_dynamic<compute_t>(
      static_cast<int64_t>(items.size()),
      [&] {
        const size_t tile = kMaxKeys * kBlock, acc = kMaxKeys * padded_dim;
        return Scratch{std::vector<float>(tile),     std::vector<float>(tile),     std::vector<float>(acc),
                       std::vector<float>(acc),      std::vector<float>(kBlock),   std::vector<float>(kBlock),
                       std::vector<compute_t>(tile), std::vector<compute_t>(tile), std::vector<compute_t>(kBlock * kBlock)};
      },
      [&](Scratch& s, int64_t i) {
        const BackwardItem& item = items[i];
        const int64_t h = item.head;
        for (int64_t gk = item.first_tile; gk < item.end_tile; gk += kKeyGroup) {
          const int64_t group = std::min(kKeyGroup, item.end_tile - gk), group_last = gk + group - 1;
          const int64_t keys = (group - 1) * kBlock + tiles.rows(group_last), k_begin = tiles.begin(gk);
          const int64_t key_rows_span = (group - 1) * kBlock + tiles.span(group_last);
          std::fill_n(s.dk_acc.begin(), keys * padded_dim, 0.f);
          std::fill_n(s.dv_acc.begin(), keys * padded_dim, 0.f);
          // dS^T rows past the group's keys meet zero columns of K^T in the dQ product; keep them zero.
          std::fill(s.dscores_t.begin() + keys * kBlock, s.dscores_t.begin() + key_rows_span * kBlock, compute_t(0.f));
          for (int64_t gq = tiles.first_tile[item.seq]; gq < tiles.first_tile[item.seq + 1]; ++gq) {
            const int64_t queries = tiles.rows(gq), query_span = tiles.span(gq), q_begin = tiles.begin(gq);
            for (int64_t c = 0; c < kBlock; ++c) {
              const bool valid = c < queries;
              s.lse_tile[c] = valid ? lse_ptr[h * num_tokens + q_begin + c] * kLog2e : std::numeric_limits<float>::infinity();
              s.delta_tile[c] = valid ? delta[h * num_tokens + q_begin + c] : 0.f;
            }
            gemm_panel<compute_t>(keys, query_span, padded_dim, k_rows.at(h, gk), padded_dim,
                                  q_cols_packed.at(h, gq), s.scores_t.data(), kBlock, false);
            gemm_panel<compute_t>(keys, query_span, padded_dim, v_rows.at(h, gk), padded_dim,
                                  do_cols_packed.at(h, gq), s.dprobs_t.data(), kBlock, false);
            backward_step_any(s.scores_t.data(), s.dprobs_t.data(), keys, queries, query_span, scale_log2,
                              s.lse_tile.data(), s.delta_tile.data(), s.probs_t.data(), s.dscores_t.data());
            gemm_panel<compute_t>(keys, padded_dim, query_span, s.probs_t.data(), kBlock, do_rows_packed.at(h, gq),
                                  s.dv_acc.data(), padded_dim, true);
            gemm_panel<compute_t>(keys, padded_dim, query_span, s.dscores_t.data(), kBlock,
                                  q_rows_packed.at(h, gq), s.dk_acc.data(), padded_dim, true);
            // dQ^T (Dp x queries) += K^T (Dp x keys) * dS^T (keys x queries), one key tile at a time.
            float* dq_t = dq_tile_at(item.split, h, gq);
            for (int64_t t = 0; t < group; ++t) {
              const int64_t key_span = tiles.span(gk + t);
              const compute_t* ds_t = s.dscores_t.data() + t * kBlock * kBlock;
              if constexpr (uses_vnni<compute_t>()) {
                pack_panel(ds_t, kBlock, key_span, query_span, s.dscores_t_packed.data());
                gemm_panel<compute_t>(padded_dim, query_span, key_span, k_cols.at(h, gk + t), kBlock,
                                      s.dscores_t_packed.data(), dq_t, kBlock, true);
              } else {
                at::native::cpublas::brgemm(padded_dim, query_span, key_span, kBlock, kBlock, kBlock, true,
                                            k_cols.at(h, gk + t), ds_t, dq_t, false);
              }
            }
          }
          for (int64_t r = 0; r < keys; ++r) {
            scalar_t* dk_row = dk_ptr + ((k_begin + r) * heads + h) * head_dim;
            scalar_t* dv_row = dv_ptr + ((k_begin + r) * heads + h) * head_dim;
            for (int64_t d = 0; d < head_dim; ++d) {
              dk_row[d] = static_cast<scalar_t>(s.dk_acc[r * padded_dim + d] * scale);
              dv_row[d] = static_cast<scalar_t>(s.dv_acc[r * padded_dim + d]);
            }
          }
        }
      });

  // dq = scale * (sum of the split accumulators, in a fixed order), transposed back.
  scalar_t* dq_ptr = dq.data_ptr<scalar_t>();
  at::parallel_for(0, heads * count, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> sum(dq_tile);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t h = i / count, g = i % count, b = tiles.tile_seq[g];
      std::fill(sum.begin(), sum.end(), 0.f);
      for (int64_t sp = 0; sp < splits[b]; ++sp) {
        const float* part = dq_tile_at(sp, h, g);
        for (int64_t e = 0; e < dq_tile; ++e) sum[e] += part[e];
      }
      const int64_t q_begin = tiles.begin(g);
      for (int64_t r = 0; r < tiles.rows(g); ++r) {
        scalar_t* dst = dq_ptr + ((q_begin + r) * heads + h) * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) dst[d] = static_cast<scalar_t>(sum[d * kBlock + r] * scale);
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// float64: plain loops in double, for gradient checks. Memory stays O(T * H * D); the backward
// recomputes each row's log-sum-exp in double rather than reading the float32 lse.

double dot(const double* a, const double* b, int64_t n) {
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Log-sum-exp of scale * <q_t, k_s> over the keys of one sequence, non-finite cases as the float32
// kernel: a NaN or +inf score gives NaN (std::max skips a NaN, but exp(NaN - m) and exp(inf - inf) do
// not), and scores that are all -inf give -inf.
double row_logsumexp(const TokenView<double>& q, const TokenView<double>& k, int64_t t, int64_t h, int64_t begin,
                     int64_t end, int64_t head_dim, double scale) {
  double m = -std::numeric_limits<double>::infinity();
  for (int64_t s = begin; s < end; ++s) m = std::max(m, scale * dot(q.row(t, h), k.row(s, h), head_dim));
  const double base = m == -std::numeric_limits<double>::infinity() ? 0.0 : m;
  double sum = 0;
  for (int64_t s = begin; s < end; ++s) sum += std::exp(scale * dot(q.row(t, h), k.row(s, h), head_dim) - base);
  return base + std::log(sum);
}

void forward_double(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const Tiles& tiles, double scale,
                    at::Tensor& out, at::Tensor& lse) {
  const int64_t num_tokens = q.size(0), heads = q.size(1), head_dim = q.size(2);
  const auto qv = view_of<double>(q), kv = view_of<double>(k), vv = view_of<double>(v);
  double* out_ptr = out.data_ptr<double>();
  float* lse_ptr = lse.data_ptr<float>();
  at::parallel_for(0, tiles.batch() * heads, 1, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      const int64_t b = i / heads, h = i % heads;
      const int64_t begin = tiles.seq_start[b], end = tiles.seq_start[b + 1];
      for (int64_t t = begin; t < end; ++t) {
        const double row_lse = row_logsumexp(qv, kv, t, h, begin, end, head_dim, scale);
        double* o = out_ptr + (t * heads + h) * head_dim;
        std::fill(o, o + head_dim, 0.0);
        for (int64_t s = begin; s < end; ++s) {
          const double p = std::exp(scale * dot(qv.row(t, h), kv.row(s, h), head_dim) - row_lse);
          for (int64_t d = 0; d < head_dim; ++d) o[d] += p * vv.row(s, h)[d];
        }
        lse_ptr[h * num_tokens + t] = static_cast<float>(row_lse);
      }
    }
  });
}

void backward_double(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& out, const Tiles& tiles, double scale, at::Tensor& dq, at::Tensor& dk,
                     at::Tensor& dv) {
  const int64_t heads = q.size(1), head_dim = q.size(2);
  const auto qv = view_of<double>(q), kv = view_of<double>(k), vv = view_of<double>(v);
  const auto dov = view_of<double>(dout), ov = view_of<double>(out);
  double* dq_ptr = dq.data_ptr<double>();
  double* dk_ptr = dk.data_ptr<double>();
  double* dv_ptr = dv.data_ptr<double>();
  at::parallel_for(0, tiles.batch() * heads, 1, [&](int64_t first, int64_t last) {
    for (int64_t i = first; i < last; ++i) {
      const int64_t b = i / heads, h = i % heads;
      const int64_t begin = tiles.seq_start[b], end = tiles.seq_start[b + 1];
      for (int64_t t = begin; t < end; ++t) {
        std::fill_n(dq_ptr + (t * heads + h) * head_dim, head_dim, 0.0);
        std::fill_n(dk_ptr + (t * heads + h) * head_dim, head_dim, 0.0);
        std::fill_n(dv_ptr + (t * heads + h) * head_dim, head_dim, 0.0);
      }
      for (int64_t t = begin; t < end; ++t) {
        const double row_lse = row_logsumexp(qv, kv, t, h, begin, end, head_dim, scale);
        const double delta = dot(dov.row(t, h), ov.row(t, h), head_dim);
        double* dq_row = dq_ptr + (t * heads + h) * head_dim;
        for (int64_t s = begin; s < end; ++s) {
          const double p = std::exp(scale * dot(qv.row(t, h), kv.row(s, h), head_dim) - row_lse);
          const double dscore = p * (dot(dov.row(t, h), vv.row(s, h), head_dim) - delta);
          double* dk_row = dk_ptr + (s * heads + h) * head_dim;
          double* dv_row = dv_ptr + (s * heads + h) * head_dim;
          for (int64_t d = 0; d < head_dim; ++d) {
            dv_row[d] += p * dov.row(t, h)[d];
            dq_row[d] += scale * dscore * kv.row(s, h)[d];
            dk_row[d] += scale * dscore * qv.row(t, h)[d];
          }
        }
      }
    }
  });
}

// ---------------------------------------------------------------------------------------------------
// The ops.

bool bfloat16_on_amx() {
  static const bool available = at::native::cpublas::could_pack(at::kBFloat16);
  return available;
}

std::tuple<at::Tensor, at::Tensor> packed_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const at::Tensor& cu_seqlens,
                                                            int64_t max_seqlen, double scale, bool validate,
                                                            bool deterministic) {
  constexpr const char* op = "packed_attention_fwd";
  check_packed_attention_args(q, k, v, cu_seqlens, max_seqlen, scale, op);
  // The CPU schedules from the values of cu_seqlens, so they are always checked (O(batch)); `validate`
  // matters on GPUs, where the check costs a synchronisation. The CPU is always deterministic.
  (void)validate;
  (void)deterministic;
  const at::Tensor cu = cu_seqlens.contiguous();
  const int64_t batch = cu.size(0) - 1, num_tokens = q.size(0), heads = q.size(1), head_dim = q.size(2);
  check_cu_seqlens_values(cu.data_ptr<int32_t>(), batch, num_tokens, max_seqlen, op);
  at::Tensor out = at::empty({num_tokens, heads, head_dim}, q.options());
  at::Tensor lse = at::empty({heads, num_tokens}, q.options().dtype(at::kFloat));
  if (out.numel() == 0) return {out, lse};
  const Tiles tiles(cu.data_ptr<int32_t>(), batch);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), op, [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      forward_double(q, k, v, tiles, scale, out, lse);
    } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (bfloat16_on_amx()) {
        forward_tiled<scalar_t, c10::BFloat16>(q, k, v, tiles, static_cast<float>(scale), out, lse);
      } else {
        forward_tiled<scalar_t, float>(q, k, v, tiles, static_cast<float>(scale), out, lse);
      }
    } else {
      forward_tiled<scalar_t, float>(q, k, v, tiles, static_cast<float>(scale), out, lse);
    }
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> packed_attention_bwd_cpu(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens, int64_t max_seqlen, double scale, bool validate,
    bool deterministic) {
  constexpr const char* op = "packed_attention_bwd";
  check_packed_attention_args(q, k, v, cu_seqlens, max_seqlen, scale, op);
  check_backward_operands(dout, q, out, lse, op);
  (void)validate;
  (void)deterministic;
  const at::Tensor cu = cu_seqlens.contiguous();
  const int64_t batch = cu.size(0) - 1, num_tokens = q.size(0), heads = q.size(1), head_dim = q.size(2);
  check_cu_seqlens_values(cu.data_ptr<int32_t>(), batch, num_tokens, max_seqlen, op);
  at::Tensor dq = at::empty({num_tokens, heads, head_dim}, q.options());
  at::Tensor dk = at::empty({num_tokens, heads, head_dim}, q.options());
  at::Tensor dv = at::empty({num_tokens, heads, head_dim}, q.options());
  if (dq.numel() == 0) return {dq, dk, dv};
  const at::Tensor lse_c = lse.contiguous();
  const Tiles tiles(cu.data_ptr<int32_t>(), batch);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), op, [&] {
    if constexpr (std::is_same_v<scalar_t, double>) {
      backward_double(dout, q, k, v, out, tiles, scale, dq, dk, dv);
    } else if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
      if (bfloat16_on_amx()) {
        backward_tiled<scalar_t, c10::BFloat16>(dout, q, k, v, out, lse_c, tiles, static_cast<float>(scale), dq, dk,
                                                dv);
      } else {
        backward_tiled<scalar_t, float>(dout, q, k, v, out, lse_c, tiles, static_cast<float>(scale), dq, dk, dv);
      }
    } else {
      backward_tiled<scalar_t, float>(dout, q, k, v, out, lse_c, tiles, static_cast<float>(scale), dq, dk, dv);
    }
  });
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmv, CPU, m) {
  m.impl("packed_attention_fwd", &packed_attention_fwd_cpu);
  m.impl("packed_attention_bwd", &packed_attention_bwd_cpu);
}

}  // namespace mmv
