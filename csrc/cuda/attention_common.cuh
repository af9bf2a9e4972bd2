// Pieces shared by the CUDA forward and backward of packed_attention: sequence bounds
// that stay inside the token range whatever cu_seqlens holds, warp reductions, and the host-side
// argument handling (the cu_seqlens value check, 16-byte alignment, device limits).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/cuda/CUDAException.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <mutex>
#include <type_traits>
#include <utility>

#include "../checks.h"
#include "element_types.cuh"
#include "launch.cuh"

namespace mmv {
namespace attention {

// Token range [start, end) of sequence b, clamped into [0, num_tokens] with end >= start. With
// validate=False nothing has checked cu_seqlens, so every kernel reads its bounds through this: a
// corrupt cu_seqlens gives wrong answers, never an access outside the tensors.
struct SequenceBounds {
  int start;
  int end;
  __device__ __forceinline__ int length() const { return end - start; }
};

__device__ __forceinline__ SequenceBounds sequence_bounds(const int* cu_seqlens, int b, int num_tokens) {
  const int start = min(max(cu_seqlens[b], 0), num_tokens);
  const int end = min(max(cu_seqlens[b + 1], start), num_tokens);
  return {start, end};
}

// The sequence holding `token`: the last b in [0, batch) with cu_seqlens[b] <= token (batch >= 1).
// On an unchecked, non-monotonic cu_seqlens the search still ends inside [0, batch).
__device__ __forceinline__ int sequence_of_token(const int* cu_seqlens, int batch, int token) {
  int lo = 0, hi = batch - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (cu_seqlens[mid] <= token) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

__device__ __forceinline__ float exp_of(float x) { return expf(x); }
__device__ __forceinline__ double exp_of(double x) { return exp(x); }
__device__ __forceinline__ float log_of(float x) { return logf(x); }
__device__ __forceinline__ double log_of(double x) { return log(x); }

template <typename T>
__device__ __forceinline__ T warp_sum(T v) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// ---------------------------------------------------------------------------------------------------
// Host side.

// Strides and base pointer of a (T, H, D) operand as the kernels read it.
struct TokenHeadView {
  const void* data;
  int64_t stride_token;
  int64_t stride_head;
};

inline TokenHeadView view_of(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1)}; }

constexpr float kLog2e = 1.4426950408889634f;

// What the forward and the backward kernels both read: q, k, v, the sequence bounds and the sizes.
struct PackedProblem {
  TokenHeadView q, k, v;
  const int* cu_seqlens;
  int batch;
  int num_tokens;
  int num_heads;
  int head_dim;
  double scale;
  float scale_log2;  // scale * log2(e): the tensor-core kernels work in powers of 2
};

// cu: the contiguous cu_seqlens, kept alive by the caller while the kernels run.
inline PackedProblem packed_problem(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& cu, double scale) {
  PackedProblem problem{};
  problem.q = view_of(q);
  problem.k = view_of(k);
  problem.v = view_of(v);
  problem.cu_seqlens = cu.data_ptr<int32_t>();
  problem.batch = static_cast<int>(cu.size(0) - 1);
  problem.num_tokens = static_cast<int>(q.size(0));
  problem.num_heads = static_cast<int>(q.size(1));
  problem.head_dim = static_cast<int>(q.size(2));
  problem.scale = scale;
  problem.scale_log2 = static_cast<float>(scale) * kLog2e;
  return problem;
}

// validate=True: one host copy of cu_seqlens (a synchronisation) and the shared value check, before
// any kernel is launched.
inline void check_cu_seqlens_on_host(const at::Tensor& cu_seqlens, int64_t num_tokens, int64_t max_seqlen,
                                     const char* op) {
  const at::Tensor host = cu_seqlens.cpu().contiguous();
  check_cu_seqlens_values(host.data_ptr<int32_t>(), host.size(0) - 1, num_tokens, max_seqlen, op);
}

// The tensor-core kernels move rows in 16-byte pieces: base pointer and the token and head strides
// (where those dimensions have more than one entry) must be multiples of 16 bytes.
inline bool rows_are_16_byte_aligned(const at::Tensor& t) {
  const int64_t granule = 16 / static_cast<int64_t>(t.element_size());
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0) return false;
  for (int dim = 0; dim < 2; ++dim) {
    if (t.size(dim) > 1 && t.stride(dim) % granule != 0) return false;
  }
  return true;
}

// t itself, or a fresh (and so aligned) contiguous copy when its rows cannot be moved in 16-byte
// pieces. Views of a packed qkv projection with D a multiple of 8 never need the copy.
inline at::Tensor with_16_byte_rows(const at::Tensor& t) {
  return rows_are_16_byte_aligned(t) ? t : t.clone(at::MemoryFormat::Contiguous);
}

struct DeviceLimits {
  int multiprocessors;
  int compute_major;
  int shared_memory_per_block_optin;
};

inline DeviceLimits device_limits(int device) {
  DeviceLimits limits{};
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limits.multiprocessors, cudaDevAttrMultiProcessorCount, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limits.compute_major, cudaDevAttrComputeCapabilityMajor, device));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&limits.shared_memory_per_block_optin,
                                        cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  return limits;
}

// What a kernel can do on a device: its machine-code architecture (a kernel whose body was compiled
// out for an older target reports it) and how many of its blocks fit on one multiprocessor.
struct KernelFit {
  int binary_version;
  int blocks_per_multiprocessor;
};

// Raises the kernel's dynamic shared-memory limit and measures its occupancy once per device; the
// answer is cached because both calls cost microseconds of host time on every launch otherwise.
inline KernelFit kernel_fit(const void* kernel, int threads, int shared_bytes, int device) {
  static std::mutex mutex;
  static std::map<std::pair<const void*, int>, KernelFit> cache;
  const std::lock_guard<std::mutex> lock(mutex);
  const auto key = std::make_pair(kernel, device);
  const auto found = cache.find(key);
  if (found != cache.end()) return found->second;
  cudaFuncAttributes attributes{};
  C10_CUDA_CHECK(cudaFuncGetAttributes(&attributes, kernel));
  KernelFit fit{attributes.binaryVersion, 0};
  if (shared_bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, shared_bytes));
  }
  C10_CUDA_CHECK(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&fit.blocks_per_multiprocessor, kernel, threads, shared_bytes));
  cache.emplace(key, fit);
  return fit;
}

}  // namespace attention
}  // namespace mmv
