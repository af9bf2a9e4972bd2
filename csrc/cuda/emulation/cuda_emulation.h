// The CUDA the kernels of csrc/cuda are written in, for a host C++ compiler: forced in front of each
// kernel source (g++ -include) of the test-only extension mmv_emulated, so that the unmodified
// sources compile as C++ and run on the SIMT emulator of runtime.cpp.
//
// - CUDA keywords become plain C++; __shared__ variables are thread_local, so every fiber of a block
//   (one OS thread runs a whole launch) sees the same storage, and the dynamic `shared_raw` array the
//   kernels declare `extern __shared__` in namespace mmv is defined here.
// - threadIdx and friends read the emulator's current thread; __syncthreads, the shuffles and the PTX
//   instruction models (attention_ptx.cuh's MMV_CUDA_EMULATION branch) are calls into the emulator.
// - The runtime API and the c10::cuda pieces the host code uses model two devices, 0 an H100 and 1 an
//   A100; the current one is chosen with torch.ops.mmv_emulated.set_device.
// - The op registrations go to the namespace mmv_emulated under the CPU key: the host ops and kernels
//   take CPU tensors, CPU memory standing in for device memory.
#pragma once

#define MMV_CUDA_EMULATION 1

// Every torch header the kernel sources include, before any CUDA name below exists.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Exception.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// ---------------------------------------------------------------------------------------------------
// Keywords. The body of a kernel guarded by __CUDA_ARCH__ >= 800 is compiled: the emulator runs the
// sm80 instructions on every modelled device.
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)  // nvcc evaluates them for the emulator: runtime.cpp, set_launch_bounds
#define __align__(n) __attribute__((aligned(n)))
#define __shared__ thread_local
#define __CUDA_ARCH__ 800

// ---------------------------------------------------------------------------------------------------
// Vector types.
struct uint3 {
  unsigned x, y, z;
};
struct dim3 {
  unsigned x, y, z;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
struct alignas(8) uint2 {
  unsigned x, y;
};
struct alignas(16) uint4 {
  unsigned x, y, z, w;
};
struct alignas(16) float4 {
  float x, y, z, w;
};
inline uint2 make_uint2(unsigned x, unsigned y) { return {x, y}; }

// ---------------------------------------------------------------------------------------------------
// bfloat16 and float16 (cuda_bf16.h, cuda_fp16.h): storage types with round-to-nearest-even
// conversions, as the hardware converts.
struct __nv_bfloat16 {
  unsigned short x;
};
struct alignas(4) __nv_bfloat162 {
  __nv_bfloat16 x, y;
};
struct __half {
  unsigned short x;
};
struct alignas(4) __half2 {
  __half x, y;
};

inline float __bfloat162float(__nv_bfloat16 v) { return c10::detail::f32_from_bits(v.x); }
inline __nv_bfloat16 __float2bfloat16_rn(float v) { return {c10::detail::round_to_nearest_even(v)}; }
inline float __half2float(__half v) { return c10::detail::fp16_ieee_to_fp32_value(v.x); }
inline __half __float2half_rn(float v) { return {c10::detail::fp16_ieee_from_fp32_value(v)}; }
inline __nv_bfloat162 __floats2bfloat162_rn(float lo, float hi) {
  return {__float2bfloat16_rn(lo), __float2bfloat16_rn(hi)};
}
inline __half2 __floats2half2_rn(float lo, float hi) { return {__float2half_rn(lo), __float2half_rn(hi)}; }

// ---------------------------------------------------------------------------------------------------
// Device math the kernels call that C++ spells differently.
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max(int64_t a, int64_t b) { return a > b ? a : b; }

#define CUDART_INF_F __builtin_huge_valf()
#define CUDART_INF __builtin_huge_val()

// ---------------------------------------------------------------------------------------------------
// Runtime API.
enum cudaError_t {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorLaunchOutOfResources = 701,
  cudaErrorLaunchFailure = 719,
};
enum cudaDeviceAttr {
  cudaDevAttrMaxThreadsPerBlock = 1,
  cudaDevAttrMultiProcessorCount = 16,
  cudaDevAttrComputeCapabilityMajor = 75,
  cudaDevAttrComputeCapabilityMinor = 76,
  cudaDevAttrMaxSharedMemoryPerBlockOptin = 97,
};
enum cudaFuncAttribute {
  cudaFuncAttributeMaxDynamicSharedMemorySize = 8,
};
struct cudaFuncAttributes {
  size_t sharedSizeBytes;
  size_t constSizeBytes;
  size_t localSizeBytes;
  int maxThreadsPerBlock;
  int numRegs;
  int ptxVersion;
  int binaryVersion;
  int cacheModeCA;
  int maxDynamicSharedSizeBytes;
  int preferredShmemCarveout;
};
struct CUstream_st;
using cudaStream_t = CUstream_st*;

cudaError_t cudaGetLastError();
const char* cudaGetErrorString(cudaError_t error);
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attribute, int device);
cudaError_t cudaFuncGetAttributes(cudaFuncAttributes* attributes, const void* kernel);
cudaError_t cudaFuncSetAttribute(const void* kernel, cudaFuncAttribute attribute, int value);
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, const void* kernel, int block_size,
                                                          size_t dynamic_shared_bytes);

namespace mmv {
namespace emulation {

// ---------------------------------------------------------------------------------------------------
// The emulated thread that runs now, and its block's coordinates.
struct ThreadCoordinates {
  uint3 thread_index;
};
extern ThreadCoordinates* current_thread;
extern uint3 block_index;
extern dim3 block_dim;
extern dim3 grid_dim;

// Barriers, shuffles, atomics, PTX instruction models: runtime.cpp.
void syncthreads();
enum class Shuffle { kXor, kUp };
void shuffle(Shuffle kind, unsigned mask, void* value, int bytes, int argument);
enum class MmaInput { kBFloat16, kFloat16 };
void mma_m16n8k16(MmaInput input, float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
void ldmatrix_x4(uint32_t (&r)[4], const void* shared, bool transpose);
void cp_async(void* shared, const void* global, int copy_bytes, int source_bytes);
void cp_async_commit_group();
void cp_async_wait_group(int pending);

// A kernel launch: the configuration, checked against the modelled device, and a type-erased call of
// the kernel with the launch's arguments, run once per emulated thread.
struct LaunchConfig {
  const void* kernel;
  const char* name;
  dim3 grid;
  dim3 block;
  size_t dynamic_shared_bytes;
  unsigned char* dynamic_shared;  // this translation unit's `shared_raw`
  const char* file;
  int line;
  const char* caller;  // the launching function, with its template arguments
};
void run_kernel(const LaunchConfig& config, void (*thread_body)(const void*), const void* closure);

template <typename... Params>
class Launcher {
 public:
  Launcher(void (*kernel)(Params...), LaunchConfig config) : kernel_(kernel), config_(config) {
    config_.kernel = reinterpret_cast<const void*>(kernel);
  }

  // Converts the arguments to the kernel's parameter types once, as a launch does, and hands every
  // thread its own copy.
  template <typename... Args>
  void operator()(Args&&... args) const {
    struct Closure {
      void (*kernel)(Params...);
      std::tuple<std::decay_t<Params>...> params;
    } closure{kernel_, std::tuple<std::decay_t<Params>...>(std::forward<Args>(args)...)};
    run_kernel(
        config_,
        [](const void* c) {
          const auto* self = static_cast<const Closure*>(c);
          std::apply(self->kernel, self->params);
        },
        &closure);
  }

 private:
  void (*kernel_)(Params...);
  LaunchConfig config_;
};

template <typename... Params>
Launcher<Params...> launch(void (*kernel)(Params...), const char* name, dim3 grid, dim3 block, size_t shared_bytes,
                           cudaStream_t, unsigned char* dynamic_shared, const char* file, int line,
                           const char* caller) {
  return Launcher<Params...>(kernel,
                             {nullptr, name, grid, block, shared_bytes, dynamic_shared, file, line, caller});
}

// Largest dynamic shared memory of any modelled device (the H100's 227 KB opt-in).
constexpr size_t kMaxDynamicSharedBytes = 227 * 1024;

}  // namespace emulation

namespace {
// The dynamic shared memory that kernels declare `extern __shared__ ... shared_raw[]`.
thread_local __attribute__((aligned(128))) unsigned char shared_raw[emulation::kMaxDynamicSharedBytes];
}  // namespace
}  // namespace mmv

#define MMV_LAUNCH(grid, block, shared_bytes, stream, ...)                                                 \
  ::mmv::emulation::launch(__VA_ARGS__, #__VA_ARGS__, grid, block, shared_bytes, stream, ::mmv::shared_raw, \
                           __FILE__, __LINE__, __PRETTY_FUNCTION__)

#define threadIdx (::mmv::emulation::current_thread->thread_index)
#define blockIdx (::mmv::emulation::block_index)
#define blockDim (::mmv::emulation::block_dim)
#define gridDim (::mmv::emulation::grid_dim)

inline void __syncthreads() { ::mmv::emulation::syncthreads(); }

template <typename T>
T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move up to 8 bytes");
  ::mmv::emulation::shuffle(::mmv::emulation::Shuffle::kXor, mask, &value, sizeof(T), lane_mask);
  return value;
}

template <typename T>
T __shfl_up_sync(unsigned mask, T value, unsigned delta) {
  static_assert(std::is_trivially_copyable_v<T> && sizeof(T) <= 8, "shuffles move up to 8 bytes");
  ::mmv::emulation::shuffle(::mmv::emulation::Shuffle::kUp, mask, &value, sizeof(T), static_cast<int>(delta));
  return value;
}

// The threads of a block never run at the same time: a read-modify-write is atomic.
inline float atomicAdd(float* address, float value) {
  const float old = *address;
  *address = old + value;
  return old;
}
inline unsigned long long atomicAdd(unsigned long long* address, unsigned long long value) {
  const unsigned long long old = *address;
  *address = old + value;
  return old;
}

inline size_t __cvta_generic_to_shared(const void* p) { return reinterpret_cast<size_t>(p); }

// ---------------------------------------------------------------------------------------------------
// c10::cuda: one stream, a guard that changes nothing, and launch checks that read the emulator's
// last error (a failed check of the emulator raises at the launch itself, naming kernel, block and
// thread).
namespace c10 {
namespace cuda {
struct CUDAStream {
  operator cudaStream_t() const { return nullptr; }
  cudaStream_t stream() const { return nullptr; }
};
inline CUDAStream getCurrentCUDAStream(int = -1) { return {}; }
// The modelled device the emulator runs as: 0 the H100, 1 the A100 (mmv_emulated.set_device).
c10::DeviceIndex current_device();
struct CUDAGuard {
  explicit CUDAGuard(c10::Device) {}
  explicit CUDAGuard(int) {}
};
}  // namespace cuda
}  // namespace c10

#define C10_CUDA_CHECK(EXPR)                                                                            \
  do {                                                                                                  \
    const cudaError_t mmv_emulation_error = (EXPR);                                                     \
    TORCH_CHECK(mmv_emulation_error == cudaSuccess, "CUDA error: ", cudaGetErrorString(mmv_emulation_error)); \
  } while (0)
#define C10_CUDA_KERNEL_LAUNCH_CHECK() C10_CUDA_CHECK(cudaGetLastError())

// ---------------------------------------------------------------------------------------------------
// Registrations go to mmv_emulated, CPU key.
#undef TORCH_LIBRARY
#define TORCH_LIBRARY(ns, m) _TORCH_LIBRARY_FRAGMENT(mmv_emulated, m, C10_UID)
#undef TORCH_LIBRARY_IMPL
#define TORCH_LIBRARY_IMPL(ns, k, m) _TORCH_LIBRARY_IMPL(mmv_emulated, CPU, m, C10_UID)
