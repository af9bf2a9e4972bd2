// Element types shared by the CUDA kernels: the CUDA type behind each c10 element type, and the type
// arithmetic runs in (float64 stays float64, everything else accumulates in float32).
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <type_traits>

namespace mmv {

// c10's element types and the CUDA types the kernels compute with.
template <typename T>
struct CudaType {
  using type = T;
};
template <>
struct CudaType<c10::BFloat16> {
  using type = __nv_bfloat16;
};
template <>
struct CudaType<c10::Half> {
  using type = __half;
};

// The arithmetic type of element type T.
template <typename T>
using opmath_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <typename T>
__device__ __forceinline__ opmath_t<T> to_opmath(T v) {
  return static_cast<opmath_t<T>>(v);
}
template <>
__device__ __forceinline__ float to_opmath<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}
template <>
__device__ __forceinline__ float to_opmath<__half>(__half v) {
  return __half2float(v);
}

template <typename T>
__device__ __forceinline__ T from_opmath(opmath_t<T> v) {
  return static_cast<T>(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_opmath<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}
template <>
__device__ __forceinline__ __half from_opmath<__half>(float v) {
  return __float2half_rn(v);
}

}  // namespace mmv
