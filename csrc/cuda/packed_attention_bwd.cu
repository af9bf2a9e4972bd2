// packed_attention backward on NVIDIA GPUs.
//
// A preprocess kernel computes D = rowsum(dout * out) per (token, head) and turns the forward's
// log-sum-exp into the unit each path uses. Then, for bfloat16 and float16 with head_dim 32, 64 or 128
// on sm80 and newer, the tensor-core kernel in the manner of FlashAttention-2: a thread block owns 64
// keys of one (sequence, head), keeps their dK and dV in float32 registers and walks the sequence's
// queries in blocks, recomputing the probabilities P from the saved log-sum-exp:
//   dV += P^T dO,   dS = P * (dO V^T - D),   dK += scale * dS^T Q,   dQ += scale * dS K.
// dQ gathers contributions from every key block of the sequence. By default each block adds its part
// to a float32 accumulator with atomics, converted to the input dtype at the end. With deterministic
// the key-block kernel skips dQ and a second kernel computes it per query block, looping over the
// keys in a fixed order: no atomics, so the result is the same bit for bit on every run and whatever
// the order of the sequences in the pack.
//
// Everything else (float32, float64, other head dims, GPUs before sm80) takes plain kernels with one
// warp per (token, head) row, which are deterministic too: one set of warps computes dQ row by row,
// another dK and dV row by row. float64 recomputes the log-sum-exp in float64, since the forward
// stores it in float32.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <math_constants.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

#include "../checks.h"
#include "attention_common.cuh"
#include "attention_mma.cuh"
#include "attention_schedule.cuh"

namespace mmv {
namespace {

using namespace attention;

struct BackwardParams : PackedProblem {
  TokenHeadView out, dout;
  const float* lse;  // (H, T), natural log, as the forward wrote it
  // (H, T) in the path's accumulation type: D = rowsum(dout * out), and the log-sum-exp the path uses
  // (log2 units for the tensor cores, natural log otherwise).
  const void* dsum;
  const void* lse_work;
  void* dq;  // (T, H, D), contiguous
  void* dk;
  void* dv;
  float* dq_accum;  // (T, H, D) float32, zero-filled; only for the atomic dQ path
  int64_t* schedule;
};

// ---------------------------------------------------------------------------------------------------
// Preprocess: one warp per (token, head).

constexpr int kRowThreads = 256;
constexpr int kRowChunks = 8;  // head_dim <= 256 = 8 * 32 lanes

struct RowOfWarp {
  int token;
  int head;
  bool valid;
};

__device__ __forceinline__ RowOfWarp row_of_warp(int64_t warp_id, int num_tokens, int num_heads) {
  if (warp_id >= static_cast<int64_t>(num_tokens) * num_heads) return {0, 0, false};
  return {static_cast<int>(warp_id / num_heads), static_cast<int>(warp_id % num_heads), true};
}

template <typename scalar_t>
__device__ __forceinline__ const scalar_t* row_pointer(const TokenHeadView& view, int token, int head) {
  return static_cast<const scalar_t*>(view.data) + token * view.stride_token + head * view.stride_head;
}

// kRecomputeLse: float64 recomputes the log-sum-exp in float64 from q and k; otherwise it is the
// forward's, times lse_factor (log2(e) turns it into the tensor cores' log2 units).
template <typename scalar_t, bool kRecomputeLse>
__global__ void __launch_bounds__(kRowThreads) backward_preprocess_kernel(BackwardParams p, float lse_factor) {
  using acc_t = opmath_t<scalar_t>;
  const int lane = threadIdx.x % 32;
  const RowOfWarp row =
      row_of_warp((static_cast<int64_t>(blockIdx.x) * kRowThreads + threadIdx.x) / 32, p.num_tokens, p.num_heads);
  if (!row.valid) return;
  const scalar_t* dout = row_pointer<scalar_t>(p.dout, row.token, row.head);
  const scalar_t* out = row_pointer<scalar_t>(p.out, row.token, row.head);
  acc_t dot = 0;
  for (int d = lane; d < p.head_dim; d += 32) dot += to_opmath(dout[d]) * to_opmath(out[d]);
  dot = warp_sum(dot);
  const int64_t index = static_cast<int64_t>(row.head) * p.num_tokens + row.token;

  acc_t lse;
  if constexpr (kRecomputeLse) {
    const SequenceBounds bounds =
        sequence_bounds(p.cu_seqlens, sequence_of_token(p.cu_seqlens, p.batch, row.token), p.num_tokens);
    const scalar_t* q = row_pointer<scalar_t>(p.q, row.token, row.head);
    const acc_t scale = static_cast<acc_t>(p.scale);
    acc_t q_scaled[kRowChunks];
#pragma unroll
    for (int c = 0; c < kRowChunks; ++c) {
      const int d = lane + 32 * c;
      q_scaled[c] = d < p.head_dim ? to_opmath(q[d]) * scale : acc_t(0);
    }
    acc_t row_max = -CUDART_INF;
    acc_t row_sum = 0;
    for (int key = bounds.start; key < bounds.end; ++key) {
      const scalar_t* k_row = row_pointer<scalar_t>(p.k, key, row.head);
      acc_t score = 0;
#pragma unroll
      for (int c = 0; c < kRowChunks; ++c) {
        const int d = lane + 32 * c;
        if (d < p.head_dim) score += q_scaled[c] * to_opmath(k_row[d]);
      }
      score = warp_sum(score);
      const acc_t new_max = score > row_max ? score : row_max;
      // As the forward: subtract 0 while every score is -inf; a NaN score makes the sum NaN.
      const acc_t base = new_max == -CUDART_INF ? acc_t(0) : new_max;
      row_sum = row_sum * exp_of(row_max - base) + exp_of(score - base);
      row_max = new_max;
    }
    lse = row_max + log_of(row_sum);
  } else {
    lse = static_cast<acc_t>(p.lse[index] * lse_factor);
  }
  if (lane == 0) {
    static_cast<acc_t*>(const_cast<void*>(p.dsum))[index] = dot;
    static_cast<acc_t*>(const_cast<void*>(p.lse_work))[index] = lse;
  }
}

// ---------------------------------------------------------------------------------------------------
// Tensor-core kernels.

// Keys of one (sequence, head) in blocks of 64, 16 per warp; queries stream through in blocks of
// kBlockM (32 for head_dim 128, which keeps the float32 dK and dV of 128 columns within registers).
template <typename Element, int kHeadDim>
struct BackwardMmaShape {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockN = 16 * kWarps;  // keys per tile
  static constexpr int kBlockM = kHeadDim >= 128 ? 32 : 64;  // queries per step
  static constexpr int kPitch = kHeadDim + 8;
  static constexpr int kScorePitch = kBlockM + 8;
  static constexpr int kKVElements = kBlockN * kPitch;
  static constexpr int kQElements = kBlockM * kPitch;
  static constexpr int kScoreElements = kBlockN * kScorePitch;
  static constexpr int kSharedBytes =
      (2 * kKVElements + 4 * kQElements + kScoreElements) * static_cast<int>(sizeof(Element)) +
      4 * kBlockM * static_cast<int>(sizeof(float));
  // dQ of a query block = dS K: warps split it kDqWarpRows x kDqWarpCols.
  static constexpr int kDqWarpRows = kBlockM / 16;
  static constexpr int kDqWarpCols = kWarps / kDqWarpRows;
  static constexpr int kDqCols = kHeadDim / kDqWarpCols;
  static_assert(kDqWarpRows * kDqWarpCols == kWarps && kDqCols % 16 == 0, "dQ warp split");
};

template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(128) backward_mma_kernel(BackwardParams p, bool accumulate_dq) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using Shape = BackwardMmaShape<Element, kHeadDim>;
  constexpr int kBlockM = Shape::kBlockM;
  constexpr int kBlockN = Shape::kBlockN;
  constexpr int kPitch = Shape::kPitch;
  constexpr int kThreads = Shape::kThreads;
  constexpr int kHeadSteps = kHeadDim / 16;
  constexpr int kHeadTiles = kHeadDim / 8;
  constexpr int kQueryTiles = kBlockM / 8;
  constexpr int kQuerySteps = kBlockM / 16;

  extern __shared__ __align__(16) unsigned char shared_raw[];
  Element* k_tile = reinterpret_cast<Element*>(shared_raw);
  Element* v_tile = k_tile + Shape::kKVElements;
  Element* q_tiles = v_tile + Shape::kKVElements;         // two stages
  Element* do_tiles = q_tiles + 2 * Shape::kQElements;     // two stages
  Element* score_tile = do_tiles + 2 * Shape::kQElements;  // dS^T (keys x queries), for dQ
  float* lse_tiles = reinterpret_cast<float*>(score_tile + Shape::kScoreElements);  // two stages
  float* dsum_tiles = lse_tiles + 2 * kBlockM;                                       // two stages
  const float* lse_work = static_cast<const float*>(p.lse_work);
  const float* dsum = static_cast<const float*>(p.dsum);

  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int group = lane / 4;
  const int quad = lane % 4;
  const int warp_key0 = warp * 16;

  for_each_tile(p.schedule, p.cu_seqlens, p.batch, p.num_tokens, p.num_heads, kBlockN, [&](const Tile& t) {
    const int start = t.bounds.start;
    const int end = t.bounds.end;
    const int k_row0 = start + t.block * kBlockN;
    const int valid_keys = end - k_row0;
    const int query_blocks = (end - start + kBlockM - 1) / kBlockM;
    const Element* q_head = static_cast<const Element*>(p.q.data) + t.head * p.q.stride_head;
    const Element* k_head = static_cast<const Element*>(p.k.data) + t.head * p.k.stride_head;
    const Element* v_head = static_cast<const Element*>(p.v.data) + t.head * p.v.stride_head;
    const Element* do_head = static_cast<const Element*>(p.dout.data) + t.head * p.dout.stride_head;
    const int64_t head_rows = static_cast<int64_t>(t.head) * p.num_tokens;

    const auto load_queries = [&](int stage, int q_row0) {
      load_rows_async<kBlockM, kHeadDim, kThreads>(q_tiles + stage * Shape::kQElements, q_head, p.q.stride_token,
                                                   q_row0, end, tid);
      load_rows_async<kBlockM, kHeadDim, kThreads>(do_tiles + stage * Shape::kQElements, do_head,
                                                   p.dout.stride_token, q_row0, end, tid);
      if (tid < 2 * kBlockM) {
        const int i = tid % kBlockM;
        const bool valid = q_row0 + i < end;
        const int64_t index = head_rows + (valid ? q_row0 + i : q_row0);
        if (tid < kBlockM) {
          cp_async_4(lse_tiles + stage * kBlockM + i, lse_work + index, valid);
        } else {
          cp_async_4(dsum_tiles + stage * kBlockM + i, dsum + index, valid);
        }
      }
    };

    load_rows_async<kBlockN, kHeadDim, kThreads>(k_tile, k_head, p.k.stride_token, k_row0, end, tid);
    load_rows_async<kBlockN, kHeadDim, kThreads>(v_tile, v_head, p.v.stride_token, k_row0, end, tid);
    load_queries(0, start);
    cp_async_commit();

    float dk[kHeadTiles][4];
    float dv[kHeadTiles][4];
#pragma unroll
    for (int dt = 0; dt < kHeadTiles; ++dt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        dk[dt][e] = 0.f;
        dv[dt][e] = 0.f;
      }
    }

    for (int i = 0; i < query_blocks; ++i) {
      const int stage = i & 1;
      if (i + 1 < query_blocks) {
        load_queries(stage ^ 1, start + (i + 1) * kBlockM);
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      const Element* q_tile = q_tiles + stage * Shape::kQElements;
      const Element* do_tile = do_tiles + stage * Shape::kQElements;
      const float* lse_rows = lse_tiles + stage * kBlockM;
      const float* dsum_rows = dsum_tiles + stage * kBlockM;
      const int q_row0 = start + i * kBlockM;
      const int valid_queries = end - q_row0;

      // S^T = K Q^T and dP^T = V dO^T for the warp's 16 keys and the block's queries.
      float st[kQueryTiles][4];
      float dpt[kQueryTiles][4];
#pragma unroll
      for (int nt = 0; nt < kQueryTiles; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          st[nt][e] = 0.f;
          dpt[nt][e] = 0.f;
        }
      }
#pragma unroll
      for (int kk = 0; kk < kHeadSteps; ++kk) {
        uint32_t k_frag[4];
        uint32_t v_frag[4];
        load_a(k_frag, k_tile, kPitch, warp_key0, kk * 16, lane);
        load_a(v_frag, v_tile, kPitch, warp_key0, kk * 16, lane);
#pragma unroll
        for (int n2 = 0; n2 < kQuerySteps; ++n2) {
          uint32_t b[4];
          load_b_from_rows_n(b, q_tile, kPitch, n2 * 16, kk * 16, lane);
          Mma<Element>::run(st[2 * n2], k_frag, b[0], b[1]);
          Mma<Element>::run(st[2 * n2 + 1], k_frag, b[2], b[3]);
          load_b_from_rows_n(b, do_tile, kPitch, n2 * 16, kk * 16, lane);
          Mma<Element>::run(dpt[2 * n2], v_frag, b[0], b[1]);
          Mma<Element>::run(dpt[2 * n2 + 1], v_frag, b[2], b[3]);
        }
      }

      // P^T and dS^T in place; keys or queries past the sequence's end contribute nothing.
#pragma unroll
      for (int nt = 0; nt < kQueryTiles; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = warp_key0 + group + 8 * (e >> 1);
          const int query = nt * 8 + quad * 2 + (e & 1);
          const bool valid = key < valid_keys && query < valid_queries;
          const float prob = valid ? exp2f(st[nt][e] * p.scale_log2 - lse_rows[query]) : 0.f;
          dpt[nt][e] = valid ? prob * (dpt[nt][e] - dsum_rows[query]) : 0.f;
          st[nt][e] = prob;
        }
      }

      // dV += P^T dO and dK += dS^T Q (scaled at the end), operands straight from registers.
#pragma unroll
      for (int kk = 0; kk < kQuerySteps; ++kk) {
        uint32_t p_frag[4];
        uint32_t ds_frag[4];
        accumulator_to_a<Element>(p_frag, st, kk);
        accumulator_to_a<Element>(ds_frag, dpt, kk);
#pragma unroll
        for (int d2 = 0; d2 < kHeadDim / 16; ++d2) {
          uint32_t b[4];
          load_b_from_rows_k(b, do_tile, kPitch, kk * 16, d2 * 16, lane);
          Mma<Element>::run(dv[2 * d2], p_frag, b[0], b[1]);
          Mma<Element>::run(dv[2 * d2 + 1], p_frag, b[2], b[3]);
          load_b_from_rows_k(b, q_tile, kPitch, kk * 16, d2 * 16, lane);
          Mma<Element>::run(dk[2 * d2], ds_frag, b[0], b[1]);
          Mma<Element>::run(dk[2 * d2 + 1], ds_frag, b[2], b[3]);
        }
      }

      if (accumulate_dq) {
        // dQ = dS K needs dS by query rows: go through shared memory, then add this key block's part.
#pragma unroll
        for (int nt = 0; nt < kQueryTiles; ++nt) {
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int key = warp_key0 + group + 8 * half;
            *reinterpret_cast<uint32_t*>(score_tile + key * Shape::kScorePitch + nt * 8 + quad * 2) =
                Mma<Element>::pack(dpt[nt][2 * half], dpt[nt][2 * half + 1]);
          }
        }
        __syncthreads();
        constexpr int kDqCols = Shape::kDqCols;
        const int dq_row0 = (warp % Shape::kDqWarpRows) * 16;
        const int dq_col0 = (warp / Shape::kDqWarpRows) * kDqCols;
        float dq[kDqCols / 8][4];
#pragma unroll
        for (int dt = 0; dt < kDqCols / 8; ++dt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) dq[dt][e] = 0.f;
        }
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) {
          uint32_t a[4];
          load_a_transposed(a, score_tile, Shape::kScorePitch, dq_row0, kk * 16, lane);
#pragma unroll
          for (int d2 = 0; d2 < kDqCols / 16; ++d2) {
            uint32_t b[4];
            load_b_from_rows_k(b, k_tile, kPitch, kk * 16, dq_col0 + d2 * 16, lane);
            Mma<Element>::run(dq[2 * d2], a, b[0], b[1]);
            Mma<Element>::run(dq[2 * d2 + 1], a, b[2], b[3]);
          }
        }
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int query = dq_row0 + group + 8 * half;
          if (query < valid_queries) {
            float* dst = p.dq_accum + (static_cast<int64_t>(q_row0 + query) * p.num_heads + t.head) * kHeadDim +
                         dq_col0 + quad * 2;
#pragma unroll
            for (int dt = 0; dt < kDqCols / 8; ++dt) {
              atomicAdd(dst + dt * 8, dq[dt][2 * half]);
              atomicAdd(dst + dt * 8 + 1, dq[dt][2 * half + 1]);
            }
          }
        }
      }
      __syncthreads();  // the next step's loads (and dS) overwrite what this one read
    }

    const float scale = static_cast<float>(p.scale);
    Element* dk_out = static_cast<Element*>(p.dk);
    Element* dv_out = static_cast<Element*>(p.dv);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int key = warp_key0 + group + 8 * half;
      if (key < valid_keys) {
        const int64_t offset = (static_cast<int64_t>(k_row0 + key) * p.num_heads + t.head) * kHeadDim + quad * 2;
#pragma unroll
        for (int dt = 0; dt < kHeadTiles; ++dt) {
          *reinterpret_cast<uint32_t*>(dk_out + offset + dt * 8) =
              Mma<Element>::pack(dk[dt][2 * half] * scale, dk[dt][2 * half + 1] * scale);
          *reinterpret_cast<uint32_t*>(dv_out + offset + dt * 8) =
              Mma<Element>::pack(dv[dt][2 * half], dv[dt][2 * half + 1]);
        }
      }
    }
  });
#endif
}

// dQ for deterministic mode: a thread block owns 64 queries of one (sequence, head), 16 per warp, and
// walks the sequence's keys in a fixed order, recomputing P and dS; dQ stays in registers.
template <typename Element, int kHeadDim>
struct DqMmaShape {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockM = 16 * kWarps;  // queries per tile
  static constexpr int kBlockN = kHeadDim >= 128 ? 32 : 64;  // keys per step
  static constexpr int kPitch = kHeadDim + 8;
  static constexpr int kQElements = kBlockM * kPitch;
  static constexpr int kKVElements = kBlockN * kPitch;
  static constexpr int kSharedBytes = (2 * kQElements + 4 * kKVElements) * static_cast<int>(sizeof(Element));
};

template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(128) backward_dq_mma_kernel(BackwardParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using Shape = DqMmaShape<Element, kHeadDim>;
  constexpr int kBlockM = Shape::kBlockM;
  constexpr int kBlockN = Shape::kBlockN;
  constexpr int kPitch = Shape::kPitch;
  constexpr int kThreads = Shape::kThreads;
  constexpr int kHeadSteps = kHeadDim / 16;
  constexpr int kHeadTiles = kHeadDim / 8;
  constexpr int kKeyTiles = kBlockN / 8;
  constexpr int kKeySteps = kBlockN / 16;

  extern __shared__ __align__(16) unsigned char shared_raw[];
  Element* q_tile = reinterpret_cast<Element*>(shared_raw);
  Element* do_tile = q_tile + Shape::kQElements;
  Element* k_tiles = do_tile + Shape::kQElements;       // two stages
  Element* v_tiles = k_tiles + 2 * Shape::kKVElements;  // two stages
  const float* lse_work = static_cast<const float*>(p.lse_work);
  const float* dsum = static_cast<const float*>(p.dsum);

  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int group = lane / 4;
  const int quad = lane % 4;
  const int warp_row0 = warp * 16;

  for_each_tile(p.schedule, p.cu_seqlens, p.batch, p.num_tokens, p.num_heads, kBlockM, [&](const Tile& t) {
    const int start = t.bounds.start;
    const int end = t.bounds.end;
    const int q_row0 = start + t.block * kBlockM;
    const int key_blocks = (end - start + kBlockN - 1) / kBlockN;
    const Element* q_head = static_cast<const Element*>(p.q.data) + t.head * p.q.stride_head;
    const Element* k_head = static_cast<const Element*>(p.k.data) + t.head * p.k.stride_head;
    const Element* v_head = static_cast<const Element*>(p.v.data) + t.head * p.v.stride_head;
    const Element* do_head = static_cast<const Element*>(p.dout.data) + t.head * p.dout.stride_head;

    load_rows_async<kBlockM, kHeadDim, kThreads>(q_tile, q_head, p.q.stride_token, q_row0, end, tid);
    load_rows_async<kBlockM, kHeadDim, kThreads>(do_tile, do_head, p.dout.stride_token, q_row0, end, tid);
    cp_async_commit();
    load_rows_async<kBlockN, kHeadDim, kThreads>(k_tiles, k_head, p.k.stride_token, start, end, tid);
    load_rows_async<kBlockN, kHeadDim, kThreads>(v_tiles, v_head, p.v.stride_token, start, end, tid);
    cp_async_commit();

    float row_lse[2];
    float row_dsum[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = q_row0 + warp_row0 + group + 8 * half;
      const int64_t index = static_cast<int64_t>(t.head) * p.num_tokens + row;
      row_lse[half] = row < end ? lse_work[index] : 0.f;
      row_dsum[half] = row < end ? dsum[index] : 0.f;
    }

    // The warp's queries and output gradients stay in registers for the whole tile.
    cp_async_wait<1>();
    __syncthreads();
    uint32_t q_frag[kHeadSteps][4];
    uint32_t do_frag[kHeadSteps][4];
#pragma unroll
    for (int kk = 0; kk < kHeadSteps; ++kk) {
      load_a(q_frag[kk], q_tile, kPitch, warp_row0, kk * 16, lane);
      load_a(do_frag[kk], do_tile, kPitch, warp_row0, kk * 16, lane);
    }

    float dq[kHeadTiles][4];
#pragma unroll
    for (int dt = 0; dt < kHeadTiles; ++dt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) dq[dt][e] = 0.f;
    }

    for (int j = 0; j < key_blocks; ++j) {
      const int stage = j & 1;
      if (j + 1 < key_blocks) {
        const int next_row0 = start + (j + 1) * kBlockN;
        load_rows_async<kBlockN, kHeadDim, kThreads>(k_tiles + (stage ^ 1) * Shape::kKVElements, k_head,
                                                     p.k.stride_token, next_row0, end, tid);
        load_rows_async<kBlockN, kHeadDim, kThreads>(v_tiles + (stage ^ 1) * Shape::kKVElements, v_head,
                                                     p.v.stride_token, next_row0, end, tid);
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      const Element* k_tile = k_tiles + stage * Shape::kKVElements;
      const Element* v_tile = v_tiles + stage * Shape::kKVElements;

      float s[kKeyTiles][4];
      float dp[kKeyTiles][4];
#pragma unroll
      for (int nt = 0; nt < kKeyTiles; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[nt][e] = 0.f;
          dp[nt][e] = 0.f;
        }
      }
#pragma unroll
      for (int kk = 0; kk < kHeadSteps; ++kk) {
#pragma unroll
        for (int n2 = 0; n2 < kKeySteps; ++n2) {
          uint32_t b[4];
          load_b_from_rows_n(b, k_tile, kPitch, n2 * 16, kk * 16, lane);
          Mma<Element>::run(s[2 * n2], q_frag[kk], b[0], b[1]);
          Mma<Element>::run(s[2 * n2 + 1], q_frag[kk], b[2], b[3]);
          load_b_from_rows_n(b, v_tile, kPitch, n2 * 16, kk * 16, lane);
          Mma<Element>::run(dp[2 * n2], do_frag[kk], b[0], b[1]);
          Mma<Element>::run(dp[2 * n2 + 1], do_frag[kk], b[2], b[3]);
        }
      }

      const int valid_keys = end - (start + j * kBlockN);
#pragma unroll
      for (int nt = 0; nt < kKeyTiles; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = nt * 8 + quad * 2 + (e & 1);
          const int half = e >> 1;
          const float prob = key < valid_keys ? exp2f(s[nt][e] * p.scale_log2 - row_lse[half]) : 0.f;
          s[nt][e] = key < valid_keys ? prob * (dp[nt][e] - row_dsum[half]) : 0.f;
        }
      }

      // dQ += dS K, dS straight from registers.
#pragma unroll
      for (int kk = 0; kk < kKeySteps; ++kk) {
        uint32_t ds_frag[4];
        accumulator_to_a<Element>(ds_frag, s, kk);
#pragma unroll
        for (int d2 = 0; d2 < kHeadDim / 16; ++d2) {
          uint32_t b[4];
          load_b_from_rows_k(b, k_tile, kPitch, kk * 16, d2 * 16, lane);
          Mma<Element>::run(dq[2 * d2], ds_frag, b[0], b[1]);
          Mma<Element>::run(dq[2 * d2 + 1], ds_frag, b[2], b[3]);
        }
      }
      __syncthreads();
    }

    const float scale = static_cast<float>(p.scale);
    Element* dq_out = static_cast<Element*>(p.dq);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = q_row0 + warp_row0 + group + 8 * half;
      if (row < end) {
        Element* dq_row = dq_out + (static_cast<int64_t>(row) * p.num_heads + t.head) * kHeadDim + quad * 2;
#pragma unroll
        for (int dt = 0; dt < kHeadTiles; ++dt) {
          *reinterpret_cast<uint32_t*>(dq_row + dt * 8) =
              Mma<Element>::pack(dq[dt][2 * half] * scale, dq[dt][2 * half + 1] * scale);
        }
      }
    }
  });
#endif
}

// dq = scale * accumulator, in the input dtype; four elements per thread (numel is a multiple of 8).
template <typename Element>
__global__ void __launch_bounds__(256)
    dq_from_accumulator_kernel(const float4* __restrict__ accumulator, uint2* __restrict__ dq, int64_t quads,
                               float scale) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < quads;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float4 a = accumulator[i];
    dq[i] = make_uint2(Mma<Element>::pack(a.x * scale, a.y * scale), Mma<Element>::pack(a.z * scale, a.w * scale));
  }
}

struct BackwardOutputs {
  at::Tensor dq, dk, dv;
};

template <typename Element, int kHeadDim>
bool try_backward_mma(BackwardParams p, const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k,
                      const at::Tensor& v, const at::Tensor& cu_seqlens, bool deterministic,
                      BackwardOutputs& grads, cudaStream_t stream) {
  using Shape = BackwardMmaShape<Element, kHeadDim>;
  using DqShape = DqMmaShape<Element, kHeadDim>;
  const void* kernel = reinterpret_cast<const void*>(backward_mma_kernel<Element, kHeadDim>);
  const void* dq_kernel = reinterpret_cast<const void*>(backward_dq_mma_kernel<Element, kHeadDim>);
  const int device = c10::cuda::current_device();  // q's, set by the CUDAGuard of the op
  const DeviceLimits limits = device_limits(device);
  const int needed_shared = std::max(Shape::kSharedBytes, DqShape::kSharedBytes);
  if (limits.compute_major < 8 || limits.shared_memory_per_block_optin < needed_shared) return false;
  const KernelFit fit = kernel_fit(kernel, Shape::kThreads, Shape::kSharedBytes, device);
  const KernelFit dq_fit = kernel_fit(dq_kernel, DqShape::kThreads, DqShape::kSharedBytes, device);
  if (fit.binary_version < 80 || fit.blocks_per_multiprocessor < 1) return false;
  if (dq_fit.binary_version < 80 || dq_fit.blocks_per_multiprocessor < 1) return false;

  const at::Tensor q_rows = with_16_byte_rows(q);
  const at::Tensor k_rows = with_16_byte_rows(k);
  const at::Tensor v_rows = with_16_byte_rows(v);
  const at::Tensor dout_rows = with_16_byte_rows(dout);
  p.q = view_of(q_rows);
  p.k = view_of(k_rows);
  p.v = view_of(v_rows);
  p.dout = view_of(dout_rows);

  const at::Tensor dsum = at::empty({p.num_heads, p.num_tokens}, q.options().dtype(at::kFloat));
  const at::Tensor lse_log2 = at::empty({p.num_heads, p.num_tokens}, q.options().dtype(at::kFloat));
  p.dsum = dsum.data_ptr<float>();
  p.lse_work = lse_log2.data_ptr<float>();
  const int64_t rows = static_cast<int64_t>(p.num_tokens) * p.num_heads;
  MMV_LAUNCH(static_cast<unsigned>((rows * 32 + kRowThreads - 1) / kRowThreads), kRowThreads, 0, stream,
             backward_preprocess_kernel<Element, false>)(p, kLog2e);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  at::Tensor dq_accum;
  if (!deterministic) {
    dq_accum = at::zeros({p.num_tokens, p.num_heads, kHeadDim}, q.options().dtype(at::kFloat));
    p.dq_accum = dq_accum.data_ptr<float>();
  }
  const at::Tensor schedule = build_tile_schedule(cu_seqlens, p.num_tokens, p.num_heads, Shape::kBlockN, stream);
  p.schedule = schedule.data_ptr<int64_t>();
  const int64_t blocks = std::max<int64_t>(
      1, std::min<int64_t>(int64_t{limits.multiprocessors} * fit.blocks_per_multiprocessor,
                           max_tiles(p.num_tokens, p.batch, p.num_heads, Shape::kBlockN)));
  MMV_LAUNCH(static_cast<unsigned>(blocks), Shape::kThreads, Shape::kSharedBytes, stream,
             backward_mma_kernel<Element, kHeadDim>)(p, !deterministic);
  C10_CUDA_KERNEL_LAUNCH_CHECK();

  if (deterministic) {
    const at::Tensor dq_schedule =
        build_tile_schedule(cu_seqlens, p.num_tokens, p.num_heads, DqShape::kBlockM, stream);
    p.schedule = dq_schedule.data_ptr<int64_t>();
    const int64_t dq_blocks = std::max<int64_t>(
        1, std::min<int64_t>(int64_t{limits.multiprocessors} * dq_fit.blocks_per_multiprocessor,
                             max_tiles(p.num_tokens, p.batch, p.num_heads, DqShape::kBlockM)));
    MMV_LAUNCH(static_cast<unsigned>(dq_blocks), DqShape::kThreads, DqShape::kSharedBytes, stream,
               backward_dq_mma_kernel<Element, kHeadDim>)(p);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  } else {
    const int64_t quads = dq_accum.numel() / 4;
    const int64_t convert_blocks = std::min<int64_t>((quads + 255) / 256, int64_t{limits.multiprocessors} * 8);
    MMV_LAUNCH(static_cast<unsigned>(convert_blocks), 256, 0, stream, dq_from_accumulator_kernel<Element>)(
        reinterpret_cast<const float4*>(dq_accum.data_ptr<float>()), reinterpret_cast<uint2*>(grads.dq.data_ptr()),
        quads, static_cast<float>(p.scale));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
  return true;
}

template <typename Element>
bool try_backward_tensor_cores(const BackwardParams& p, const at::Tensor& dout, const at::Tensor& q,
                               const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_seqlens,
                               bool deterministic, BackwardOutputs& grads, cudaStream_t stream) {
  switch (p.head_dim) {
    case 32:
      return try_backward_mma<Element, 32>(p, dout, q, k, v, cu_seqlens, deterministic, grads, stream);
    case 64:
      return try_backward_mma<Element, 64>(p, dout, q, k, v, cu_seqlens, deterministic, grads, stream);
    case 128:
      return try_backward_mma<Element, 128>(p, dout, q, k, v, cu_seqlens, deterministic, grads, stream);
    default:
      return false;
  }
}

// ---------------------------------------------------------------------------------------------------
// Plain kernel: warps [0, T H) compute dQ rows, warps [T H, 2 T H) dK and dV rows.

template <typename scalar_t>
__global__ void __launch_bounds__(kRowThreads) backward_simt_kernel(BackwardParams p) {
  using acc_t = opmath_t<scalar_t>;
  const int lane = threadIdx.x % 32;
  const int64_t warp_id = (static_cast<int64_t>(blockIdx.x) * kRowThreads + threadIdx.x) / 32;
  const int64_t rows = static_cast<int64_t>(p.num_tokens) * p.num_heads;
  const bool key_role = warp_id >= rows;
  const RowOfWarp row = row_of_warp(key_role ? warp_id - rows : warp_id, p.num_tokens, p.num_heads);
  if (!row.valid) return;
  const SequenceBounds bounds =
      sequence_bounds(p.cu_seqlens, sequence_of_token(p.cu_seqlens, p.batch, row.token), p.num_tokens);
  const acc_t scale = static_cast<acc_t>(p.scale);
  const auto* lse = static_cast<const acc_t*>(p.lse_work);
  const auto* dsum = static_cast<const acc_t*>(p.dsum);
  const int64_t head_rows = static_cast<int64_t>(row.head) * p.num_tokens;

  // This warp's own row of the two operands it keeps: (q, dout) for dQ, (k, v) for dK and dV.
  const scalar_t* first = row_pointer<scalar_t>(key_role ? p.k : p.q, row.token, row.head);
  const scalar_t* second = row_pointer<scalar_t>(key_role ? p.v : p.dout, row.token, row.head);
  acc_t own_first[kRowChunks], own_second[kRowChunks], acc_first[kRowChunks], acc_second[kRowChunks];
#pragma unroll
  for (int c = 0; c < kRowChunks; ++c) {
    const int d = lane + 32 * c;
    own_first[c] = d < p.head_dim ? to_opmath(first[d]) : acc_t(0);
    own_second[c] = d < p.head_dim ? to_opmath(second[d]) : acc_t(0);
    acc_first[c] = 0;
    acc_second[c] = 0;
  }

  for (int other = bounds.start; other < bounds.end; ++other) {
    // For a query row, `other` walks the keys; for a key row, the queries.
    const int query = key_role ? other : row.token;
    const scalar_t* q_or_k = row_pointer<scalar_t>(key_role ? p.q : p.k, other, row.head);
    const scalar_t* do_or_v = row_pointer<scalar_t>(key_role ? p.dout : p.v, other, row.head);
    acc_t other_first[kRowChunks], other_second[kRowChunks];
    acc_t score = 0, dprob = 0;
#pragma unroll
    for (int c = 0; c < kRowChunks; ++c) {
      const int d = lane + 32 * c;
      other_first[c] = d < p.head_dim ? to_opmath(q_or_k[d]) : acc_t(0);
      other_second[c] = d < p.head_dim ? to_opmath(do_or_v[d]) : acc_t(0);
      score += own_first[c] * other_first[c];   // q . k
      dprob += own_second[c] * other_second[c];  // dout . v
    }
    score = warp_sum(score);
    dprob = warp_sum(dprob);
    const acc_t prob = exp_of(score * scale - lse[head_rows + query]);
    const acc_t dscore = prob * (dprob - dsum[head_rows + query]);
#pragma unroll
    for (int c = 0; c < kRowChunks; ++c) {
      acc_first[c] += dscore * other_first[c];                // dQ += dS k, or dK += dS q
      if (key_role) acc_second[c] += prob * other_second[c];  // dV += P dout
    }
  }

  const int64_t offset = (static_cast<int64_t>(row.token) * p.num_heads + row.head) * p.head_dim;
  scalar_t* first_out = static_cast<scalar_t*>(key_role ? p.dk : p.dq) + offset;
#pragma unroll
  for (int c = 0; c < kRowChunks; ++c) {
    const int d = lane + 32 * c;
    if (d < p.head_dim) first_out[d] = from_opmath<scalar_t>(acc_first[c] * scale);
  }
  if (key_role) {
    scalar_t* dv_out = static_cast<scalar_t*>(p.dv) + offset;
#pragma unroll
    for (int c = 0; c < kRowChunks; ++c) {
      const int d = lane + 32 * c;
      if (d < p.head_dim) dv_out[d] = from_opmath<scalar_t>(acc_second[c]);
    }
  }
}

template <typename scalar_t>
void launch_backward_simt(BackwardParams p, const at::Tensor& q, cudaStream_t stream) {
  using acc_t = opmath_t<scalar_t>;
  constexpr bool kRecomputeLse = std::is_same_v<scalar_t, double>;
  const at::ScalarType acc_type = kRecomputeLse ? at::kDouble : at::kFloat;
  const at::Tensor dsum = at::empty({p.num_heads, p.num_tokens}, q.options().dtype(acc_type));
  const at::Tensor lse_work = at::empty({p.num_heads, p.num_tokens}, q.options().dtype(acc_type));
  p.dsum = dsum.data_ptr<acc_t>();
  p.lse_work = lse_work.data_ptr<acc_t>();
  const int64_t rows = static_cast<int64_t>(p.num_tokens) * p.num_heads;
  const int64_t blocks = (2 * rows * 32 + kRowThreads - 1) / kRowThreads;
  TORCH_CHECK_VALUE(blocks <= 0x7fffffff, "packed_attention_bwd: too many (token, head) rows for one launch: ",
                    rows);
  MMV_LAUNCH(static_cast<unsigned>((rows * 32 + kRowThreads - 1) / kRowThreads), kRowThreads, 0, stream,
             backward_preprocess_kernel<scalar_t, kRecomputeLse>)(p, 1.f);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  MMV_LAUNCH(static_cast<unsigned>(blocks), kRowThreads, 0, stream, backward_simt_kernel<scalar_t>)(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------------
// The op.

std::tuple<at::Tensor, at::Tensor, at::Tensor> packed_attention_bwd_cuda(
    const at::Tensor& dout, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens, int64_t max_seqlen, double scale, bool validate,
    bool deterministic) {
  constexpr const char* op = "packed_attention_bwd";
  check_packed_attention_args(q, k, v, cu_seqlens, max_seqlen, scale, op);
  check_backward_operands(dout, q, out, lse, op);
  const int64_t num_tokens = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t batch = cu_seqlens.size(0) - 1;
  const c10::cuda::CUDAGuard guard(q.device());
  if (validate) check_cu_seqlens_on_host(cu_seqlens, num_tokens, max_seqlen, op);

  BackwardOutputs grads{at::empty({num_tokens, num_heads, head_dim}, q.options()),
                        at::empty({num_tokens, num_heads, head_dim}, q.options()),
                        at::empty({num_tokens, num_heads, head_dim}, q.options())};
  if (grads.dq.numel() == 0 || batch == 0) return {grads.dq, grads.dk, grads.dv};
  const at::Tensor cu = cu_seqlens.contiguous();
  const at::Tensor lse_c = lse.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  BackwardParams p{};
  static_cast<PackedProblem&>(p) = packed_problem(q, k, v, cu, scale);
  p.out = view_of(out);
  p.dout = view_of(dout);
  p.lse = lse_c.data_ptr<float>();
  p.dq = grads.dq.data_ptr();
  p.dk = grads.dk.data_ptr();
  p.dv = grads.dv.data_ptr();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), op, [&] {
    using element_t = typename CudaType<scalar_t>::type;
    if constexpr (std::is_same_v<element_t, __nv_bfloat16> || std::is_same_v<element_t, __half>) {
      if (try_backward_tensor_cores<element_t>(p, dout, q, k, v, cu, deterministic, grads, stream)) {
        return;
      }
    }
    launch_backward_simt<element_t>(p, q, stream);
  });
  return {grads.dq, grads.dk, grads.dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmv, CUDA, m) { m.impl("packed_attention_bwd", &packed_attention_bwd_cuda); }

}  // namespace mmv
