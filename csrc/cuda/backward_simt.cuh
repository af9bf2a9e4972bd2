// backward_simt_kernel and its launcher: the plain backward for every case the tensor cores leave
// out, one warp per (token, head) row.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <math_constants.h>

#include <cstdint>
#include <type_traits>

#include "attention_common.cuh"
#include "backward_common.cuh"
#include "backward_preprocess.cuh"

namespace mmv {
namespace {

using namespace attention;

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

}  // namespace
}  // namespace mmv
