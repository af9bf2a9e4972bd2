// packed_attention forward on NVIDIA GPUs.
//
// bfloat16 and float16 with head_dim 32, 64 or 128 on sm80 and newer take the tensor-core kernel, in
// the manner of FlashAttention-2: a thread block owns a block of query rows of one (sequence, head),
// keeps them in registers, streams the sequence's keys and values through shared memory in tiles of
// 64 (cp.async, two stages, so the next tile loads while this one is multiplied), multiplies with
// mma.sync into float32 and keeps a running row maximum and sum (online softmax). The scores of one
// tile never leave registers: their accumulator layout is the operand layout of the next product.
// Tiles come from the device-side schedule of attention_schedule.cuh: no block is launched for
// padding and the host does not wait on cu_seqlens.
//
// Everything else (float32, float64, other head dims, GPUs before sm80) takes a plain kernel with one
// warp per (token, head) that walks the keys of its sequence one by one, in the input's own precision
// for float32 and float64. It is exact but slower (no tensor cores, no data reuse between rows).
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
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

constexpr float kLn2 = 0.6931471805599453f;

struct ForwardParams : PackedProblem {
  void* out;   // (T, H, D), contiguous
  float* lse;  // (H, T)
  int64_t* schedule;
};

// ---------------------------------------------------------------------------------------------------
// Tensor-core kernel.

template <typename Element, int kHeadDim>
struct ForwardMmaShape {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  // 16-row MMA blocks per warp: two share every key fragment read from shared memory, which halves
  // the shared-memory traffic per multiply, while head_dim 128 keeps one to stay within registers.
  static constexpr int kWarpRowBlocks = kHeadDim <= 64 ? 2 : 1;
  static constexpr int kBlockM = 16 * kWarpRowBlocks * kWarps;  // query rows per tile
  static constexpr int kBlockN = 64;                            // keys per step
  static constexpr int kPitch = kHeadDim + 8;
  static constexpr int kQElements = kBlockM * kPitch;
  static constexpr int kKVElements = kBlockN * kPitch;
  static constexpr int kSharedBytes = (kQElements + 4 * kKVElements) * static_cast<int>(sizeof(Element));
};

template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(128) forward_mma_kernel(ForwardParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using Shape = ForwardMmaShape<Element, kHeadDim>;
  constexpr int kRowBlocks = Shape::kWarpRowBlocks;
  constexpr int kBlockM = Shape::kBlockM;
  constexpr int kBlockN = Shape::kBlockN;
  constexpr int kPitch = Shape::kPitch;
  constexpr int kThreads = Shape::kThreads;
  constexpr int kHeadSteps = kHeadDim / 16;  // k-steps of Q K^T
  constexpr int kOutTiles = kHeadDim / 8;    // 8-column tiles of O
  constexpr int kKeyTiles = kBlockN / 8;     // 8-column tiles of S
  constexpr int kKeySteps = kBlockN / 16;    // k-steps of P V

  extern __shared__ __align__(16) unsigned char shared_raw[];
  Element* q_tile = reinterpret_cast<Element*>(shared_raw);
  Element* k_tiles = q_tile + Shape::kQElements;      // two stages
  Element* v_tiles = k_tiles + 2 * Shape::kKVElements;  // two stages

  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int group = lane / 4;  // g of the fragment layouts
  const int quad = lane % 4;   // c of the fragment layouts
  const int warp_row0 = warp * 16 * kRowBlocks;

  for_each_tile(p.schedule, p.cu_seqlens, p.batch, p.num_tokens, p.num_heads, kBlockM, [&](const Tile& t) {
    const int start = t.bounds.start;
    const int end = t.bounds.end;
    const int q_row0 = start + t.block * kBlockM;
    const int key_blocks = (end - start + kBlockN - 1) / kBlockN;
    const Element* q_head = static_cast<const Element*>(p.q.data) + t.head * p.q.stride_head;
    const Element* k_head = static_cast<const Element*>(p.k.data) + t.head * p.k.stride_head;
    const Element* v_head = static_cast<const Element*>(p.v.data) + t.head * p.v.stride_head;

    load_rows_async<kBlockM, kHeadDim, kThreads>(q_tile, q_head, p.q.stride_token, q_row0, end, tid);
    cp_async_commit();
    const KeyValuePipeline<kBlockN, kHeadDim, kThreads, Element> kv{
        k_tiles, v_tiles, k_head, v_head, p.k.stride_token, p.v.stride_token, start, end, key_blocks, tid};
    kv.load(0);

    float o[kRowBlocks][kOutTiles][4];
    float row_max[kRowBlocks][2];
    float row_sum[kRowBlocks][2];  // this thread's share of the row sum; the quad is summed at the end
#pragma unroll
    for (int mb = 0; mb < kRowBlocks; ++mb) {
#pragma unroll
      for (int dt = 0; dt < kOutTiles; ++dt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) o[mb][dt][e] = 0.f;
      }
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        row_max[mb][half] = -CUDART_INF_F;
        row_sum[mb][half] = 0.f;
      }
    }

    for (int j = 0; j < key_blocks; ++j) {
      kv.wait_for(j);
      const Element* k_tile = kv.k_tile(j);
      const Element* v_tile = kv.v_tile(j);

      // S = Q K^T for this warp's rows and the 64 keys of the step.
      float s[kRowBlocks][kKeyTiles][4];
#pragma unroll
      for (int mb = 0; mb < kRowBlocks; ++mb) {
#pragma unroll
        for (int nt = 0; nt < kKeyTiles; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) s[mb][nt][e] = 0.f;
        }
      }
#pragma unroll
      for (int kk = 0; kk < kHeadSteps; ++kk) {
        // Query fragments are re-read from shared memory at every step: kept in registers they would
        // push the accumulators into local memory.
        uint32_t q_frag[kRowBlocks][4];
#pragma unroll
        for (int mb = 0; mb < kRowBlocks; ++mb) load_a(q_frag[mb], q_tile, kPitch, warp_row0 + mb * 16, kk * 16, lane);
#pragma unroll
        for (int n2 = 0; n2 < kKeySteps; ++n2) {
          uint32_t b[4];
          load_b_from_rows_n(b, k_tile, kPitch, n2 * 16, kk * 16, lane);
#pragma unroll
          for (int mb = 0; mb < kRowBlocks; ++mb) {
            Mma<Element>::run(s[mb][2 * n2], q_frag[mb], b[0], b[1]);
            Mma<Element>::run(s[mb][2 * n2 + 1], q_frag[mb], b[2], b[3]);
          }
        }
      }

      // Scores in log2 units; keys past the sequence's end (zero-filled rows) drop out.
      const int valid_keys = end - (start + j * kBlockN);
#pragma unroll
      for (int mb = 0; mb < kRowBlocks; ++mb) {
#pragma unroll
        for (int nt = 0; nt < kKeyTiles; ++nt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) {
            const int key = nt * 8 + quad * 2 + (e & 1);
            s[mb][nt][e] = key < valid_keys ? s[mb][nt][e] * p.scale_log2 : -CUDART_INF_F;
          }
        }
      }

      // Online softmax: rescale what was accumulated so far to the new row maximum.
#pragma unroll
      for (int mb = 0; mb < kRowBlocks; ++mb) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          float tile_max = -CUDART_INF_F;
#pragma unroll
          for (int nt = 0; nt < kKeyTiles; ++nt) {
            tile_max = fmaxf(tile_max, fmaxf(s[mb][nt][2 * half], s[mb][nt][2 * half + 1]));
          }
          tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 1));
          tile_max = fmaxf(tile_max, __shfl_xor_sync(0xffffffffu, tile_max, 2));
          const float new_max = fmaxf(row_max[mb][half], tile_max);
          // A row that has seen only masked keys keeps -inf; subtracting 0 then avoids inf - inf.
          const float base = new_max == -CUDART_INF_F ? 0.f : new_max;
          const float correction = exp2f(row_max[mb][half] - base);
          row_max[mb][half] = new_max;
          float tile_sum = 0.f;
#pragma unroll
          for (int nt = 0; nt < kKeyTiles; ++nt) {
            s[mb][nt][2 * half] = exp2f(s[mb][nt][2 * half] - base);
            s[mb][nt][2 * half + 1] = exp2f(s[mb][nt][2 * half + 1] - base);
            tile_sum += s[mb][nt][2 * half] + s[mb][nt][2 * half + 1];
          }
          row_sum[mb][half] = row_sum[mb][half] * correction + tile_sum;
#pragma unroll
          for (int dt = 0; dt < kOutTiles; ++dt) {
            o[mb][dt][2 * half] *= correction;
            o[mb][dt][2 * half + 1] *= correction;
          }
        }
      }

      // O += P V, P straight from the score registers.
#pragma unroll
      for (int kk = 0; kk < kKeySteps; ++kk) {
        uint32_t p_frag[kRowBlocks][4];
#pragma unroll
        for (int mb = 0; mb < kRowBlocks; ++mb) accumulator_to_a<Element>(p_frag[mb], s[mb], kk);
#pragma unroll
        for (int d2 = 0; d2 < kHeadDim / 16; ++d2) {
          uint32_t b[4];
          load_b_from_rows_k(b, v_tile, kPitch, kk * 16, d2 * 16, lane);
#pragma unroll
          for (int mb = 0; mb < kRowBlocks; ++mb) {
            Mma<Element>::run(o[mb][2 * d2], p_frag[mb], b[0], b[1]);
            Mma<Element>::run(o[mb][2 * d2 + 1], p_frag[mb], b[2], b[3]);
          }
        }
      }
      __syncthreads();  // the next step's loads overwrite the stage this one read
    }

    Element* out = static_cast<Element*>(p.out);
#pragma unroll
    for (int mb = 0; mb < kRowBlocks; ++mb) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        float sum = row_sum[mb][half];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        const int row = q_row0 + warp_row0 + mb * 16 + group + 8 * half;
        if (row < end) {
          // No guard on sum: a row of only -inf scores (sum 0) gives NaN, a NaN score NaN, as the reference.
          const float inverse = 1.f / sum;
          Element* out_row = out + (static_cast<int64_t>(row) * p.num_heads + t.head) * kHeadDim + quad * 2;
#pragma unroll
          for (int dt = 0; dt < kOutTiles; ++dt) {
            *reinterpret_cast<uint32_t*>(out_row + dt * 8) =
                Mma<Element>::pack(o[mb][dt][2 * half] * inverse, o[mb][dt][2 * half + 1] * inverse);
          }
          if (quad == 0) {
            p.lse[static_cast<int64_t>(t.head) * p.num_tokens + row] = (row_max[mb][half] + log2f(sum)) * kLn2;
          }
        }
      }
    }
  });
#endif
}

template <typename Element, int kHeadDim>
bool try_forward_mma(ForwardParams p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                     const at::Tensor& cu_seqlens, cudaStream_t stream) {
  using Shape = ForwardMmaShape<Element, kHeadDim>;
  const void* kernel = reinterpret_cast<const void*>(forward_mma_kernel<Element, kHeadDim>);
  const int device = c10::cuda::current_device();  // q's, set by the CUDAGuard of the op
  const DeviceLimits limits = device_limits(device);
  if (limits.compute_major < 8 || limits.shared_memory_per_block_optin < Shape::kSharedBytes) return false;
  const KernelFit fit = kernel_fit(kernel, Shape::kThreads, Shape::kSharedBytes, device);
  if (fit.binary_version < 80 || fit.blocks_per_multiprocessor < 1) return false;

  const at::Tensor q_rows = with_16_byte_rows(q);
  const at::Tensor k_rows = with_16_byte_rows(k);
  const at::Tensor v_rows = with_16_byte_rows(v);
  p.q = view_of(q_rows);
  p.k = view_of(k_rows);
  p.v = view_of(v_rows);
  const at::Tensor schedule =
      build_tile_schedule(cu_seqlens, p.num_tokens, p.num_heads, Shape::kBlockM, stream);
  p.schedule = schedule.data_ptr<int64_t>();
  const int64_t blocks = std::max<int64_t>(
      1, std::min<int64_t>(int64_t{limits.multiprocessors} * fit.blocks_per_multiprocessor,
                           max_tiles(p.num_tokens, p.batch, p.num_heads, Shape::kBlockM)));
  MMV_LAUNCH(static_cast<unsigned>(blocks), Shape::kThreads, Shape::kSharedBytes, stream,
             forward_mma_kernel<Element, kHeadDim>)(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return true;
}

template <typename Element>
bool try_forward_tensor_cores(const ForwardParams& p, const at::Tensor& q, const at::Tensor& k,
                              const at::Tensor& v, const at::Tensor& cu_seqlens, cudaStream_t stream) {
  switch (p.head_dim) {
    case 32:
      return try_forward_mma<Element, 32>(p, q, k, v, cu_seqlens, stream);
    case 64:
      return try_forward_mma<Element, 64>(p, q, k, v, cu_seqlens, stream);
    case 128:
      return try_forward_mma<Element, 128>(p, q, k, v, cu_seqlens, stream);
    default:
      return false;
  }
}

// ---------------------------------------------------------------------------------------------------
// Plain kernel: one warp per (token, head); lane l holds channels l, l + 32, ... of head_dim <= 256.

constexpr int kSimtThreads = 256;
constexpr int kSimtChunks = 8;

template <typename scalar_t>
__global__ void __launch_bounds__(kSimtThreads) forward_simt_kernel(ForwardParams p) {
  using acc_t = opmath_t<scalar_t>;
  const int64_t warp_id = (static_cast<int64_t>(blockIdx.x) * kSimtThreads + threadIdx.x) / 32;
  const int lane = threadIdx.x % 32;
  if (warp_id >= static_cast<int64_t>(p.num_tokens) * p.num_heads) return;
  const int token = static_cast<int>(warp_id / p.num_heads);
  const int head = static_cast<int>(warp_id % p.num_heads);
  const SequenceBounds bounds =
      sequence_bounds(p.cu_seqlens, sequence_of_token(p.cu_seqlens, p.batch, token), p.num_tokens);
  const auto* q = static_cast<const scalar_t*>(p.q.data) + token * p.q.stride_token + head * p.q.stride_head;
  const auto* k_head = static_cast<const scalar_t*>(p.k.data) + head * p.k.stride_head;
  const auto* v_head = static_cast<const scalar_t*>(p.v.data) + head * p.v.stride_head;
  const acc_t scale = static_cast<acc_t>(p.scale);

  acc_t q_scaled[kSimtChunks];
  acc_t acc[kSimtChunks];
#pragma unroll
  for (int c = 0; c < kSimtChunks; ++c) {
    const int d = lane + 32 * c;
    q_scaled[c] = d < p.head_dim ? to_opmath(q[d]) * scale : acc_t(0);
    acc[c] = 0;
  }
  acc_t row_max = -CUDART_INF;
  acc_t row_sum = 0;
  for (int key = bounds.start; key < bounds.end; ++key) {
    const scalar_t* k_row = k_head + key * p.k.stride_token;
    const scalar_t* v_row = v_head + key * p.v.stride_token;
    acc_t dot = 0;
#pragma unroll
    for (int c = 0; c < kSimtChunks; ++c) {
      const int d = lane + 32 * c;
      if (d < p.head_dim) dot += q_scaled[c] * to_opmath(k_row[d]);
    }
    dot = warp_sum(dot);
    const acc_t new_max = dot > row_max ? dot : row_max;
    // While every score so far is -inf, subtract 0 (not -inf - -inf = NaN); a NaN score stays NaN.
    const acc_t base = new_max == -CUDART_INF ? acc_t(0) : new_max;
    const acc_t correction = exp_of(row_max - base);
    const acc_t weight = exp_of(dot - base);
    row_sum = row_sum * correction + weight;
#pragma unroll
    for (int c = 0; c < kSimtChunks; ++c) {
      const int d = lane + 32 * c;
      if (d < p.head_dim) acc[c] = acc[c] * correction + weight * to_opmath(v_row[d]);
    }
    row_max = new_max;
  }

  const acc_t inverse = acc_t(1) / row_sum;  // sum 0 (only -inf scores) or NaN gives NaN, as the reference
  scalar_t* out = static_cast<scalar_t*>(p.out) + (static_cast<int64_t>(token) * p.num_heads + head) * p.head_dim;
#pragma unroll
  for (int c = 0; c < kSimtChunks; ++c) {
    const int d = lane + 32 * c;
    if (d < p.head_dim) out[d] = from_opmath<scalar_t>(acc[c] * inverse);
  }
  if (lane == 0) {
    p.lse[static_cast<int64_t>(head) * p.num_tokens + token] =
        static_cast<float>(row_max + log_of(row_sum));
  }
}

template <typename scalar_t>
void launch_forward_simt(const ForwardParams& p, cudaStream_t stream) {
  const int64_t warps = static_cast<int64_t>(p.num_tokens) * p.num_heads;
  const int64_t blocks = (warps * 32 + kSimtThreads - 1) / kSimtThreads;
  TORCH_CHECK_VALUE(blocks <= 0x7fffffff, "packed_attention_fwd: too many (token, head) rows for one launch: ",
                    warps);
  MMV_LAUNCH(static_cast<unsigned>(blocks), kSimtThreads, 0, stream, forward_simt_kernel<scalar_t>)(p);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// ---------------------------------------------------------------------------------------------------
// The op.

std::tuple<at::Tensor, at::Tensor> packed_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& cu_seqlens,
                                                             int64_t max_seqlen, double scale, bool validate,
                                                             bool deterministic) {
  constexpr const char* op = "packed_attention_fwd";
  check_packed_attention_args(q, k, v, cu_seqlens, max_seqlen, scale, op);
  (void)deterministic;  // the forward is deterministic whatever the flag
  const int64_t num_tokens = q.size(0), num_heads = q.size(1), head_dim = q.size(2);
  const int64_t batch = cu_seqlens.size(0) - 1;
  const c10::cuda::CUDAGuard guard(q.device());
  if (validate) check_cu_seqlens_on_host(cu_seqlens, num_tokens, max_seqlen, op);

  at::Tensor out = at::empty({num_tokens, num_heads, head_dim}, q.options());
  at::Tensor lse = at::empty({num_heads, num_tokens}, q.options().dtype(at::kFloat));
  if (out.numel() == 0 || batch == 0) return {out, lse};
  const at::Tensor cu = cu_seqlens.contiguous();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  ForwardParams p{};
  static_cast<PackedProblem&>(p) = packed_problem(q, k, v, cu, scale);
  p.out = out.data_ptr();
  p.lse = lse.data_ptr<float>();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, q.scalar_type(), op, [&] {
    using element_t = typename CudaType<scalar_t>::type;
    if constexpr (std::is_same_v<element_t, __nv_bfloat16> || std::is_same_v<element_t, __half>) {
      if (try_forward_tensor_cores<element_t>(p, q, k, v, cu, stream)) return;
    }
    launch_forward_simt<element_t>(p, stream);
  });
  return {out, lse};
}

}  // namespace

TORCH_LIBRARY_IMPL(mmv, CUDA, m) { m.impl("packed_attention_fwd", &packed_attention_fwd_cuda); }

}  // namespace mmv
