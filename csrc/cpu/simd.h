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
// Round to nearest even without the NaN fix-up, for values computed by the kernel itself: their NaNs are
// quiet NaNs, which the rounding carry cannot turn into infinities. Used on probability tiles.
MMV_INLINE void store_computed(c10::BFloat16* p, VecF v) {
  const VecU bits = reinterpret_cast<VecU>(v);
  const VecU16 h = __builtin_convertvector((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16, VecU16);
  std::memcpy(p, &h, sizeof(h));
}
MMV_INLINE void store_computed(float* p, VecF v) { store(p, v); }

MMV_INLINE void store(c10::Half* p, VecF v) {
  const VecH h = __builtin_convertvector(v, VecH);
  std::memcpy(p, &h, sizeof(h));
}

// Lane i holds i.
inline constexpr VecF kLaneIndex = {0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15};

MMV_INLINE VecF vmax(VecF a, VecF b) { return a > b ? a : b; }

// Horizontal reductions by halving: four shuffle steps instead of fifteen scalar ones.
MMV_INLINE float hsum(VecF v) {
  v += __builtin_shuffle(v, VecI{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7});
  v += __builtin_shuffle(v, VecI{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11});
  v += __builtin_shuffle(v, VecI{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13});
  v += __builtin_shuffle(v, VecI{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
  return v[0];
}
MMV_INLINE float hmax(VecF v) {
  v = vmax(v, __builtin_shuffle(v, VecI{8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7}));
  v = vmax(v, __builtin_shuffle(v, VecI{4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11}));
  v = vmax(v, __builtin_shuffle(v, VecI{2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13}));
  v = vmax(v, __builtin_shuffle(v, VecI{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14}));
  return v[0];
}

// 2^x for float32 lanes, x <= 127: 2^n * p(f) with n = round(x), |f| <= 1/2 and the Taylor polynomial
// of 2^f of degree kDegree: relative error about 1.2e-7 at degree 6 (float32 results), 2.3e-6 at
// degree 5 (enough for results rounded to bfloat16). Inputs below -126 give 0, which is what softmax
// wants of scores far below the row maximum (and of masked, -inf, scores); NaN stays NaN: both clamps
// are written so that their comparison is false for NaN, which then flows through the polynomial.
template <int kDegree = 6>
MMV_INLINE VecF exp2(VecF x) {
  static_assert(kDegree == 5 || kDegree == 6, "exp2: degree 5 or 6");
  const VecF lo = broadcast(-126.f);
  const VecF clamped = x < lo ? lo : x;
  const VecF x_in = clamped > 127.f ? broadcast(127.f) : clamped;
  // Adding 1.5 * 2^23 rounds to an integer, which then sits in the low mantissa bits.
  const VecF shifted = x_in + 12582912.f;
  const VecF n = shifted - 12582912.f;
  const VecI n_int = reinterpret_cast<VecI>(shifted) - 0x4B400000;
  const VecF f = x_in - n;
  VecF p = broadcast(1.3333558146428443e-3f);  // ln2^5 / 5!
  if constexpr (kDegree == 6) p = 1.5403530393381606e-4f * f + p;  // ln2^6 / 6!
  p = p * f + 9.618129107628477e-3f;           // ln2^4 / 4!
  p = p * f + 5.550410866482158e-2f;           // ln2^3 / 3!
  p = p * f + 2.402265069591007e-1f;           // ln2^2 / 2!
  p = p * f + 6.931471805599453e-1f;           // ln2
  p = p * f + 1.f;
  const VecF result = p * reinterpret_cast<VecF>((n_int + 127) << 23);
  return x < lo ? VecF{} : result;
}

}  // namespace mmv::simd
