// Small kernels for the tests of the CUDA emulator's checkers: each comes in a correct form and, with
// `plant`, with one bug of the kind the checker exists for. They use the PTX wrappers of the attention
// kernels (attention_mma.cuh), so the instruction models are tested on their own as well.
//
// torch.ops.mmv_emulated.planted_bug(name, plant, x) runs kernel `name` on x (CPU, bfloat16 or
// float32, as each kernel says) and returns what it wrote.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <ATen/ops/zeros.h>
#include <ATen/ops/zeros_like.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <torch/library.h>

#include <cstdint>
#include <string>

#include "../../csrc/cuda/attention_mma.cuh"
#include "../../csrc/cuda/launch.cuh"

namespace mmv {
namespace {

using namespace attention;

constexpr int kRowBytes = 16;  // one ldmatrix row: 8 bfloat16
constexpr int kRowElements = 8;

// One warp: lane l copies row l of x (32 x 8 bfloat16) into shared memory with cp.async, then the warp
// reads matrices 0..3 with ldmatrix, lane l giving the address of row (l + shift) % 32, and stores
// what each lane received. Planted bugs: no barrier between the copies of other lanes and the read
// ("race"), the read before wait_group ("before_wait"), a row past the copied ones ("unwritten"), a
// row address half a row off ("misaligned").
__global__ void __launch_bounds__(32) ldmatrix_kernel(const __nv_bfloat16* x, uint32_t* out, int bug) {
  extern __shared__ __align__(16) unsigned char shared_raw[];
  auto* tile = reinterpret_cast<__nv_bfloat16*>(shared_raw);
  const int lane = threadIdx.x;
  cp_async_16(tile + lane * kRowElements, x + lane * kRowElements, true);
  cp_async_commit();
  const int shift = bug == 1 ? 1 : 0;
  if (bug != 2) {
    cp_async_wait<0>();
    if (bug != 1) __syncthreads();
  }
  const int row = bug == 3 ? lane + 1 : (lane + shift) % 32;
  const int column = bug == 4 ? kRowElements / 2 : 0;
  uint32_t r[4];
  ldmatrix_x4(r, tile + row * kRowElements + column);
  cp_async_wait<0>();
  for (int i = 0; i < 4; ++i) out[lane * 4 + i] = r[i];
}

// D (16 x 8, float) = A (16 x 16) B (16 x 8) from bfloat16 x = [A; B^T; 8 more rows] (32 rows of 16),
// through shared memory, ldmatrix and mma, as the attention kernels
// load their operands.
__global__ void __launch_bounds__(32) mma_kernel(const __nv_bfloat16* x, float* out) {
  extern __shared__ __align__(16) unsigned char shared_raw[];
  constexpr int kPitch = 16 + 8;
  auto* tile = reinterpret_cast<__nv_bfloat16*>(shared_raw);
  const int lane = threadIdx.x;
  for (int chunk = lane; chunk < 32 * 2; chunk += 32) {
    const int r = chunk / 2, c = chunk % 2;
    cp_async_16(tile + r * kPitch + c * kRowElements, x + r * 16 + c * kRowElements, true);
  }
  cp_async_commit();
  cp_async_wait<0>();
  __syncthreads();
  uint32_t a[4], b[4];
  load_a(a, tile, kPitch, 0, 0, lane);
  load_b_from_rows_n(b, tile + 16 * kPitch, kPitch, 0, 0, lane);  // rows n = 0..15 (8 valid)
  float c[4] = {0.f, 0.f, 0.f, 0.f};
  Mma<__nv_bfloat16>::run(c, a, b[0], b[1]);
  const int g = lane / 4, q = lane % 4;
  out[g * 8 + 2 * q] = c[0];
  out[g * 8 + 2 * q + 1] = c[1];
  out[(g + 8) * 8 + 2 * q] = c[2];
  out[(g + 8) * 8 + 2 * q + 1] = c[3];
}

// out[i] = x[i] + x[i + 1] over n floats; the planted bug reads one element past the end.
__global__ void __launch_bounds__(128) neighbour_sum_kernel(const float* x, float* out, int n, int bug) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  const int last = bug ? n : n - 1;  // off by one
  out[i] = x[i] + (i + 1 <= last ? x[i + 1] : 0.f);
}

// Sums 64 floats with a shared-memory tree; the planted bugs return half the block before the
// barrier ("exit") or shuffle with a mask that leaves lanes out ("mask") or names exited lanes
// ("mask_exited").
__global__ void __launch_bounds__(64) block_sum_kernel(const float* x, float* out, int bug) {
  __shared__ float partial[2];
  const int tid = threadIdx.x;
  float v = x[tid];
  if (bug == 3 && tid % 32 >= 16) return;
  const unsigned mask = bug == 2 ? 0x0000ffffu : 0xffffffffu;
  for (int offset = 16; offset > 0; offset /= 2) v += __shfl_xor_sync(mask, v, offset);
  if (tid % 32 == 0) partial[tid / 32] = v;
  if (bug == 1 && tid >= 32) return;
  __syncthreads();
  if (tid == 0) out[0] = partial[0] + partial[1];
}

// A two-stage cp.async pipeline as the attention kernels run it: step s + 1 is copied into the other
// stage while step s is read (lane l copies row l of a step, the warp reads with lane l giving the
// address of row l + 1). The planted bug leaves out the barrier after the read, so the copy of step
// s + 2 overwrites rows the warp may still be reading (write after read).
__global__ void __launch_bounds__(32) pipeline_kernel(const __nv_bfloat16* x, uint32_t* out, int steps, int bug) {
  extern __shared__ __align__(16) unsigned char shared_raw[];
  auto* stages = reinterpret_cast<__nv_bfloat16*>(shared_raw);
  const int lane = threadIdx.x;
  cp_async_16(stages + lane * kRowElements, x + lane * kRowElements, true);
  cp_async_commit();
  for (int s = 0; s < steps; ++s) {
    if (s + 1 < steps) {
      __nv_bfloat16* next = stages + ((s + 1) % 2) * 32 * kRowElements;
      cp_async_16(next + lane * kRowElements, x + ((s + 1) * 32 + lane) * kRowElements, true);
      cp_async_commit();
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
    uint32_t r[4];
    ldmatrix_x4(r, stages + (s % 2) * 32 * kRowElements + ((lane + 1) % 32) * kRowElements);
    for (int i = 0; i < 4; ++i) out[(s * 32 + lane) * 4 + i] = r[i];
    if (!bug) __syncthreads();
  }
}

// out[i] = 2 x[i], a thread per element, with a bound that depends on a template argument as the
// attention kernels' bounds depend on their tile shapes. The planted bug launches it with twice as many
// threads as its bound, which a GPU refuses.
template <int kThreads>
__global__ void __launch_bounds__(kThreads) bounded_kernel(const float* x, float* out) {
  out[threadIdx.x] = 2.f * x[threadIdx.x];
}

// Writes 1: proves that a launch ran.
__global__ void __launch_bounds__(1024) empty_kernel(int* out) {
  if (threadIdx.x == 0 && blockIdx.x == 0) out[0] = 1;
}

at::Tensor planted_bug(const std::string& name, bool plant, const at::Tensor& x, int64_t bug) {
  const int bug_id = plant ? static_cast<int>(bug) : 0;
  const cudaStream_t stream = nullptr;
  if (name == "ldmatrix") {
    at::Tensor out = at::empty({32, 4}, x.options().dtype(at::kInt));
    MMV_LAUNCH(1, 32, 32 * kRowBytes + 16, stream, ldmatrix_kernel)(
        reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()), reinterpret_cast<uint32_t*>(out.data_ptr()), bug_id);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
  if (name == "mma") {
    at::Tensor out = at::empty({16, 8}, x.options().dtype(at::kFloat));
    MMV_LAUNCH(1, 32, 32 * (16 + 8) * 2, stream, mma_kernel)(
        reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()), out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
  if (name == "neighbour_sum") {
    const int n = static_cast<int>(x.numel());
    at::Tensor out = at::empty_like(x);
    MMV_LAUNCH((n + 127) / 128, 128, 0, stream, neighbour_sum_kernel)(x.data_ptr<float>(), out.data_ptr<float>(), n,
                                                                       bug_id);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
  if (name == "block_sum") {
    at::Tensor out = at::zeros({1}, x.options());
    MMV_LAUNCH(1, 64, 0, stream, block_sum_kernel)(x.data_ptr<float>(), out.data_ptr<float>(), bug_id);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
  if (name == "pipeline") {
    const int steps = static_cast<int>(x.size(0) / 32);
    at::Tensor out = at::empty({steps * 32, 4}, x.options().dtype(at::kInt));
    MMV_LAUNCH(1, 32, 2 * 32 * kRowBytes, stream, pipeline_kernel)(
        reinterpret_cast<const __nv_bfloat16*>(x.data_ptr()), reinterpret_cast<uint32_t*>(out.data_ptr()), steps,
        bug_id);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
  if (name == "bounded") {
    constexpr int kThreads = 64;
    TORCH_CHECK_VALUE(x.numel() == kThreads, "planted_bug: bounded takes ", kThreads, " floats, got ", x.numel());
    at::Tensor out = at::zeros_like(x);
    MMV_LAUNCH(1, plant ? 2 * kThreads : kThreads, 0, stream, bounded_kernel<kThreads>)(x.data_ptr<float>(),
                                                                                          out.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return out;
  }
  TORCH_CHECK_VALUE(false, "planted_bug: no kernel named ", name);
}

// Launches empty_kernel with `threads` threads and `shared_bytes` of dynamic shared memory, raising
// the kernel's limit to `attribute_bytes` first when that is positive.
void launch_empty(int64_t threads, int64_t shared_bytes, int64_t attribute_bytes) {
  const void* kernel = reinterpret_cast<const void*>(empty_kernel);
  if (attribute_bytes > 0) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(attribute_bytes)));
  }
  at::Tensor out = at::zeros({1}, at::kInt);
  MMV_LAUNCH(1, static_cast<unsigned>(threads), static_cast<size_t>(shared_bytes), nullptr, empty_kernel)(
      out.data_ptr<int>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  TORCH_CHECK(out.item<int>() == 1, "empty_kernel did not run");
}

}  // namespace
}  // namespace mmv

TORCH_LIBRARY_FRAGMENT(mmv_emulated, m) {
  m.def("planted_bug(str name, bool plant, Tensor x, int bug=1) -> Tensor", &mmv::planted_bug);
  m.def("launch_empty(int threads, int shared_bytes, int attribute_bytes=0) -> ()", &mmv::launch_empty);
}
