// Portable SIMD for the CPU kernels: GCC/Clang vector extensions of 16 float lanes.
//
// The kernels are compiled once per instruction set (MMV_CPU_CLONES: AVX-512, AVX2, baseline) and the
// loader picks the best clone for the CPU, so these 64-byte vectors become zmm registers where the
// CPU has them and pairs or quads of narrower registers elsewhere. Only inline functions live here;
// they are inlined into each clone and compiled for its instruction set.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <cstdint>
#include <cstring>

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MMV_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define MMV_CPU_CLONES
#endif

#define MMV_INLINE inline __attribute__((always_inline))

namespace mmv::simd {

constexpr int kLanes = 16;

typedef float VecF __attribute__((vector_size(64)));
typedef int32_t VecI __attribute__((vector_size(64)));
typedef uint32_t VecU __attribute__((vector_size(64)));
typedef uint16_t VecU16 __attribute__((vector_size(32)));
typedef _Float16 VecH __attribute__((vector_size(32)));
typedef double VecD __attribute__((vector_size(64)));  // 8 lanes
typedef int64_t VecL __attribute__((vector_size(64)));
typedef float VecF8 __attribute__((vector_size(32)));

MMV_INLINE VecF broadcast(float v) { return VecF{} + v; }

MMV_INLINE VecF load(const float* p) {
  VecF v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
MMV_INLINE VecF load(const c10::BFloat16* p) {
  VecU16 h;
  std::memcpy(&h, p, sizeof(h));
  return reinterpret_cast<VecF>(__builtin_convertvector(h, VecU) << 16);
}
MMV_INLINE VecF load(const c10::Half* p) {
  VecH h;
  std::memcpy(&h, p, sizeof(h));
  return __builtin_convertvector(h, VecF);
}

MMV_INLINE void store(float* p, VecF v) { std::memcpy(p, &v, sizeof(v)); }
MMV_INLINE void store(c10::BFloat16* p, VecF v) {
  // Round to nearest even, as c10::BFloat16 does; NaN stays a quiet NaN.
  const VecU bits = reinterpret_cast<VecU>(v);
  VecU rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  rounded = (v != v) ? VecU{} + 0x7FC0u : rounded;
  const VecU16 h = __builtin_convertvector(rounded, VecU16);
  std::memcpy(p, &h, sizeof(h));
}
MMV_INLINE void store(c10::Half* p, VecF v) {
  const VecH h = __builtin_convertvector(v, VecH);
  std::memcpy(p, &h, sizeof(h));
}

MMV_INLINE float hsum(VecF v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}
MMV_INLINE float hmax(VecF v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = m > v[i] ? m : v[i];
  return m;
}
MMV_INLINE VecF vmax(VecF a, VecF b) { return a > b ? a : b; }

// exp(x) for float32 lanes, x <= 88: 2^n * p(r) with x = n ln2 + r, |r| <= ln2 / 2 and a degree-6
// polynomial (relative error about 2e-7). Inputs below -87.3 give 0, which is what softmax wants of
// scores far below the row maximum; NaN stays NaN.
MMV_INLINE VecF exp(VecF x) {
  const VecF lo = broadcast(-87.3f);
  const VecF hi = broadcast(88.0f);
  VecF clamped = x < lo ? lo : x;
  clamped = clamped > hi ? hi : clamped;
  const VecF scaled = clamped * broadcast(1.44269504088896341f);
  const VecI n = __builtin_convertvector(scaled + (scaled < 0.f ? broadcast(-0.5f) : broadcast(0.5f)), VecI);
  const VecF nf = __builtin_convertvector(n, VecF);
  const VecF r = (clamped - nf * broadcast(0.693359375f)) - nf * broadcast(-2.12194440e-4f);
  VecF p = broadcast(1.9875691500e-4f);
  p = p * r + broadcast(1.3981999507e-3f);
  p = p * r + broadcast(8.3334519073e-3f);
  p = p * r + broadcast(4.1665795894e-2f);
  p = p * r + broadcast(1.6666665459e-1f);
  p = p * r + broadcast(5.0000001201e-1f);
  p = p * (r * r) + r + broadcast(1.0f);
  const VecF result = p * reinterpret_cast<VecF>((n + 127) << 23);
  return x < lo ? VecF{} : result;
}

}  // namespace mmv::simd
