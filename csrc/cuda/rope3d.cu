// rope3d on NVIDIA GPUs.
//
// Memory-bound: each element of x is read once and written once. A thread block owns a few tokens: it
// first computes the sines and cosines of those tokens' rotary angles into shared memory (float32
// angles and the accurate sincosf, since positions in millimetres reach hundreds of radians), then
// every head of those tokens is rotated with 16-byte loads and stores where the layout allows.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <cstdint>

#include "../checks.h"
#include "element_types.cuh"
#include "launch.cuh"

namespace mmv {
namespace {

constexpr int kThreads = 256;
constexpr int kTokensPerBlock = 4;
constexpr int kMaxPairs = 128;  // head_dim up to 256 keeps the sin/cos tile in shared memory

struct RopeArgs {
  int64_t num_tokens;
  int num_heads;
  int num_pairs;
  int num_rotated;
  int sections_z;
  int sections_zy;
  int64_t x_stride_token;
  int64_t x_stride_head;
  const float* coords;  // (T, 3) contiguous
  const float* freqs;   // (P,)
};

// kVec elements move per load; kVec == 1 is the path for layouts that are not 16-byte aligned.
template <typename scalar_t, int kVec, bool kInterleaved>
__global__ void __launch_bounds__(kThreads)
    rope3d_kernel(const scalar_t* __restrict__ x, scalar_t* __restrict__ out, RopeArgs a) {
  using acc_t = opmath_t<scalar_t>;
  __shared__ acc_t sin_tile[kTokensPerBlock][kMaxPairs];
  __shared__ acc_t cos_tile[kTokensPerBlock][kMaxPairs];
  const int64_t token0 = static_cast<int64_t>(blockIdx.x) * kTokensPerBlock;

  for (int i = threadIdx.x; i < kTokensPerBlock * a.num_rotated; i += kThreads) {
    const int local = i / a.num_rotated;
    const int j = i % a.num_rotated;
    const int64_t t = token0 + local;
    if (t >= a.num_tokens) continue;
    const int axis = j < a.sections_z ? 0 : (j < a.sections_zy ? 1 : 2);
    const float theta = a.coords[3 * t + axis] * a.freqs[j];  // float32 angle, as defined
    if constexpr (sizeof(acc_t) == 8) {
      double s, c;
      sincos(static_cast<double>(theta), &s, &c);
      sin_tile[local][j] = s;
      cos_tile[local][j] = c;
    } else {
      float s, c;
      sincosf(theta, &s, &c);
      sin_tile[local][j] = s;
      cos_tile[local][j] = c;
    }
  }
  __syncthreads();

  // Work items: (token, head, group of kVec pairs) for rotate-half, (token, head, group of kVec / 2
  // pairs) for interleaved, where a group is one vector load.
  constexpr int kPairsPerItem = kInterleaved ? (kVec >= 2 ? kVec / 2 : 1) : kVec;
  const int groups = (a.num_pairs + kPairsPerItem - 1) / kPairsPerItem;
  const int items = kTokensPerBlock * a.num_heads * groups;
  const int head_dim = 2 * a.num_pairs;
  for (int i = threadIdx.x; i < items; i += kThreads) {
    const int g = i % groups;
    const int h = (i / groups) % a.num_heads;
    const int local = i / (groups * a.num_heads);
    const int64_t t = token0 + local;
    if (t >= a.num_tokens) continue;
    const scalar_t* in_row = x + t * a.x_stride_token + h * a.x_stride_head;
    scalar_t* out_row = out + (t * a.num_heads + h) * head_dim;
    const int j0 = g * kPairsPerItem;

    if constexpr (kInterleaved && kVec >= 2) {
      // kVec consecutive channels = kVec / 2 pairs; the group never straddles head_dim because
      // head_dim is a multiple of kVec on this path.
      union {
        uint4 raw;
        scalar_t v[kVec];
      } buf;
      buf.raw = *reinterpret_cast<const uint4*>(in_row + 2 * j0);
#pragma unroll
      for (int p = 0; p < kVec / 2; ++p) {
        const int j = j0 + p;
        if (j < a.num_rotated) {
          const acc_t u = to_opmath(buf.v[2 * p]);
          const acc_t v = to_opmath(buf.v[2 * p + 1]);
          const acc_t c = cos_tile[local][j], s = sin_tile[local][j];
          buf.v[2 * p] = from_opmath<scalar_t>(u * c - v * s);
          buf.v[2 * p + 1] = from_opmath<scalar_t>(v * c + u * s);
        }
      }
      *reinterpret_cast<uint4*>(out_row + 2 * j0) = buf.raw;
    } else if constexpr (!kInterleaved && kVec >= 2) {
      // kVec pairs: channels [j0, j0 + kVec) and [P + j0, P + j0 + kVec); P is a multiple of kVec.
      union {
        uint4 raw;
        scalar_t v[kVec];
      } ubuf, vbuf;
      ubuf.raw = *reinterpret_cast<const uint4*>(in_row + j0);
      vbuf.raw = *reinterpret_cast<const uint4*>(in_row + a.num_pairs + j0);
#pragma unroll
      for (int p = 0; p < kVec; ++p) {
        const int j = j0 + p;
        if (j < a.num_rotated) {
          const acc_t u = to_opmath(ubuf.v[p]);
          const acc_t v = to_opmath(vbuf.v[p]);
          const acc_t c = cos_tile[local][j], s = sin_tile[local][j];
          ubuf.v[p] = from_opmath<scalar_t>(u * c - v * s);
          vbuf.v[p] = from_opmath<scalar_t>(v * c + u * s);
        }
      }
      *reinterpret_cast<uint4*>(out_row + j0) = ubuf.raw;
      *reinterpret_cast<uint4*>(out_row + a.num_pairs + j0) = vbuf.raw;
    } else {
      const int j = j0;
      const int iu = kInterleaved ? 2 * j : j;
      const int iv = kInterleaved ? 2 * j + 1 : j + a.num_pairs;
      const acc_t u = to_opmath(in_row[iu]);
      const acc_t v = to_opmath(in_row[iv]);
      if (j < a.num_rotated) {
        const acc_t c = cos_tile[local][j], s = sin_tile[local][j];
        out_row[iu] = from_opmath<scalar_t>(u * c - v * s);
        out_row[iv] = from_opmath<scalar_t>(v * c + u * s);
      } else {
        out_row[iu] = in_row[iu];
        out_row[iv] = in_row[iv];
      }
    }
  }
}

template <typename scalar_t, int kVec>
void launch(const at::Tensor& x, at::Tensor& out, const RopeArgs& args, bool interleaved,
            cudaStream_t stream) {
  const dim3 grid(static_cast<unsigned>((args.num_tokens + kTokensPerBlock - 1) / kTokensPerBlock));
  const auto* in_ptr = reinterpret_cast<const scalar_t*>(x.data_ptr());
  auto* out_ptr = reinterpret_cast<scalar_t*>(out.data_ptr());
  if (interleaved) {
    MMV_LAUNCH(grid, kThreads, 0, stream, rope3d_kernel<scalar_t, kVec, true>)(in_ptr, out_ptr, args);
  } else {
    MMV_LAUNCH(grid, kThreads, 0, stream, rope3d_kernel<scalar_t, kVec, false>)(in_ptr, out_ptr, args);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

at::Tensor rope3d_cuda(const at::Tensor& x, const at::Tensor& coords, const at::Tensor& freqs,
                       at::IntArrayRef sections, bool interleaved) {
  check_rope3d_args(x, coords, freqs, sections);
  const int64_t num_tokens = x.size(0);
  const int64_t num_heads = x.size(1);
  const int64_t head_dim = x.size(2);
  TORCH_CHECK_VALUE(head_dim <= 2 * kMaxPairs, "rope3d: head_dim up to ", 2 * kMaxPairs,
                    " is supported on CUDA, got ", head_dim);
  at::Tensor out = at::empty({num_tokens, num_heads, head_dim}, x.options());
  if (out.numel() == 0) return out;
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor coords_c = coords.contiguous();
  const at::Tensor freqs_c = freqs.contiguous();

  RopeArgs args;
  args.num_tokens = num_tokens;
  args.num_heads = static_cast<int>(num_heads);
  args.num_pairs = static_cast<int>(head_dim / 2);
  args.num_rotated = static_cast<int>(sections[0] + sections[1] + sections[2]);
  args.sections_z = static_cast<int>(sections[0]);
  args.sections_zy = static_cast<int>(sections[0] + sections[1]);
  args.x_stride_token = x.stride(0);
  args.x_stride_head = x.stride(1);
  args.coords = coords_c.data_ptr<float>();
  args.freqs = freqs_c.data_ptr<float>();
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rope3d_cuda", [&] {
    using cuda_t = typename CudaType<scalar_t>::type;
    constexpr int kVec = 16 / sizeof(scalar_t);
    // 16-byte accesses need the base, both strides and the half-row (or row) to be multiples of
    // 16 bytes; otherwise take the element-wise path.
    const int64_t granule = interleaved ? head_dim : head_dim / 2;
    const bool aligned = reinterpret_cast<uintptr_t>(x.data_ptr()) % 16 == 0 &&
                         reinterpret_cast<uintptr_t>(out.data_ptr()) % 16 == 0 &&
                         x.stride(0) % kVec == 0 && x.stride(1) % kVec == 0 && granule % kVec == 0;
    if (aligned && kVec >= 2) {
      launch<cuda_t, kVec>(x, out, args, interleaved, stream);
    } else {
      launch<cuda_t, 1>(x, out, args, interleaved, stream);
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmv, CUDA, m) { m.impl("rope3d", &rope3d_cuda); }

}  // namespace mmv
