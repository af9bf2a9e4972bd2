// What the kernels of packed_attention's CUDA backward share: their parameters, and the mapping of
// one warp to one (token, head) row that the preprocess and the plain kernel use.
#pragma once

#include <cstdint>

#include "attention_common.cuh"

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

}  // namespace
}  // namespace mmv
