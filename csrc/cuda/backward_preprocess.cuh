// backward_preprocess_kernel: D = rowsum(dout * out) per (token, head), and the forward's
// log-sum-exp in the unit the backward path uses. One warp per (token, head).
#pragma once

#include <cstdint>

#include <math_constants.h>

#include "attention_common.cuh"
#include "backward_common.cuh"

namespace mmv {
namespace {

using namespace attention;

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

}  // namespace
}  // namespace mmv
