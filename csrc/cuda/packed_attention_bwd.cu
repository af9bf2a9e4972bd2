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
//
// The kernels live in backward_preprocess.cuh, backward_dkdv_mma.cuh (keys' dK, dV and atomic dQ),
// backward_dq_mma.cuh (deterministic dQ) and backward_simt.cuh; this file holds the tensor-core
// launcher and the op.
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
#include "backward_common.cuh"
#include "backward_dkdv_mma.cuh"
#include "backward_dq_mma.cuh"
#include "backward_preprocess.cuh"
#include "backward_simt.cuh"

namespace mmv {
namespace {

using namespace attention;

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
