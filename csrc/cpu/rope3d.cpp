// rope3d on the CPU: one fused pass over x, multi-threaded over tokens.
//
// Per token, the angles of its rotary pairs are computed once (float32, as docs/design.md defines them) and
// their sines and cosines are shared by every head; no per-token table is ever written to memory. The
// loops use 16-lane vectors (simd.h), compiled for several instruction sets.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "../checks.h"
#include "simd.h"

namespace mmv {
namespace {

using simd::kLanes;
using simd::VecD;
using simd::VecF;
using simd::VecF8;
using simd::VecL;

// sin and cos of 8 float32 angles, accurate to float32 rounding for |theta| up to about 1e6 rad.
// Positions in millimetres reach hundreds of radians, so the range reduction uses a two-part pi/2
// in double, and the polynomials run in double too; the selects keep it branch-free.
MMV_INLINE void sincos8(const float* theta, float* sin_out, float* cos_out) {
  VecF8 theta_f;
  std::memcpy(&theta_f, theta, sizeof(theta_f));
  const VecD x = __builtin_convertvector(theta_f, VecD);
  const VecD k = (x * 0.636619772367581343075535053490057448 + 6755399441055744.0) - 6755399441055744.0;
  const VecD r = (x - k * 1.57079632673412561417e+00) - k * 6.07710050650619224932e-11;  // |r| <= pi/4
  const VecD r2 = r * r;
  // Taylor series to r^11 and r^12: truncation error below 2e-9 on [-pi/4, pi/4].
  const VecD s =
      r + r * r2 *
              (-1.0 / 6 + r2 * (1.0 / 120 + r2 * (-1.0 / 5040 + r2 * (1.0 / 362880 + r2 * (-1.0 / 39916800)))));
  const VecD c =
      1.0 + r2 * (-0.5 + r2 * (1.0 / 24 +
                               r2 * (-1.0 / 720 + r2 * (1.0 / 40320 + r2 * (-1.0 / 3628800 + r2 * (1.0 / 479001600))))));
  const VecL quadrant = __builtin_convertvector(k, VecL);
  const VecL swap = (quadrant & 1) != 0;
  const VecD sin_abs = swap ? c : s;
  const VecD cos_abs = swap ? s : c;
  const VecF8 sin_f = __builtin_convertvector((quadrant & 2) != 0 ? -sin_abs : sin_abs, VecF8);
  const VecF8 cos_f = __builtin_convertvector(((quadrant + 1) & 2) != 0 ? -cos_abs : cos_abs, VecF8);
  std::memcpy(sin_out, &sin_f, sizeof(sin_f));
  std::memcpy(cos_out, &cos_f, sizeof(cos_f));
}

struct RopeProblem {
  int64_t num_heads;
  int64_t num_pairs;
  int64_t num_rotated;
  int64_t x_stride_token;
  int64_t x_stride_head;
  const int64_t* pair_axis;  // (num_rotated,): 0, 1 or 2
  const float* coords;       // (T, 3) contiguous
  const float* freqs;        // (num_pairs,)
};

// Rotates the pairs [0, num_rotated) of one (token, head) row and copies the rest. Pair j is
// (j, j + P), or (2j, 2j + 1) when interleaved; an interleaved row is handled as channels, with the
// per-channel tables cos2[i] = cos(theta[i / 2]) and sin2[i] = -+sin(theta[i / 2]).
template <typename scalar_t, bool kInterleaved>
MMV_INLINE void rotate_row(const scalar_t* __restrict in, scalar_t* __restrict out, const float* cos_t,
                           const float* sin_t, int64_t num_pairs, int64_t num_rotated) {
  if constexpr (kInterleaved) {
    const int64_t rotated = 2 * num_rotated;
    int64_t i = 0;
    for (; i + kLanes <= rotated; i += kLanes) {
      const VecF x = simd::load(in + i);
      const VecF swapped = __builtin_shuffle(x, simd::VecI{1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14});
      simd::store(out + i, x * simd::load(cos_t + i) + swapped * simd::load(sin_t + i));
    }
    for (; i < rotated; i += 2) {
      const float u = static_cast<float>(in[i]), v = static_cast<float>(in[i + 1]);
      out[i] = static_cast<scalar_t>(u * cos_t[i] + v * sin_t[i]);
      out[i + 1] = static_cast<scalar_t>(v * cos_t[i + 1] + u * sin_t[i + 1]);
    }
    std::copy(in + rotated, in + 2 * num_pairs, out + rotated);
  } else {
    const scalar_t* __restrict in_v = in + num_pairs;
    scalar_t* __restrict out_v = out + num_pairs;
    int64_t j = 0;
    for (; j + kLanes <= num_rotated; j += kLanes) {
      const VecF u = simd::load(in + j), v = simd::load(in_v + j);
      const VecF c = simd::load(cos_t + j), s = simd::load(sin_t + j);
      simd::store(out + j, u * c - v * s);
      simd::store(out_v + j, v * c + u * s);
    }
    for (; j < num_rotated; ++j) {
      const float u = static_cast<float>(in[j]), v = static_cast<float>(in_v[j]);
      out[j] = static_cast<scalar_t>(u * cos_t[j] - v * sin_t[j]);
      out_v[j] = static_cast<scalar_t>(v * cos_t[j] + u * sin_t[j]);
    }
    std::copy(in + num_rotated, in + num_pairs, out + num_rotated);
    std::copy(in_v + num_rotated, in_v + num_pairs, out_v + num_rotated);
  }
}

// Tokens [begin, end) for float32 / bfloat16 / float16 inputs, float32 arithmetic. Angles and their
// sines and cosines are computed for a block of tokens at a time, so the vector loads of the angles
// never wait on the scalar stores that wrote them.
template <typename scalar_t, bool kInterleaved>
MMV_INLINE void rope_tokens_float(const RopeProblem& p, const scalar_t* x, scalar_t* out, int64_t begin,
                                  int64_t end) {
  constexpr int64_t kBlock = 32;
  const int64_t padded = (p.num_rotated + kLanes - 1) / kLanes * kLanes;
  const int64_t table = kInterleaved ? 2 * padded : padded;
  std::vector<float> theta(kBlock * padded, 0.f), sin_v(kBlock * padded), cos_v(kBlock * padded);
  std::vector<float> sin_t(kBlock * table), cos_t(kBlock * table);
  const int64_t head_dim = 2 * p.num_pairs;
  for (int64_t block = begin; block < end; block += kBlock) {
    const int64_t count = std::min(kBlock, end - block);
    for (int64_t i = 0; i < count; ++i) {
      const float* c = p.coords + 3 * (block + i);
      for (int64_t j = 0; j < p.num_rotated; ++j) theta[i * padded + j] = c[p.pair_axis[j]] * p.freqs[j];
    }
    for (int64_t j = 0; j < count * padded; j += 8) sincos8(&theta[j], &sin_v[j], &cos_v[j]);
    const float* sin_use = sin_v.data();
    const float* cos_use = cos_v.data();
    if constexpr (kInterleaved) {
      for (int64_t i = 0; i < count; ++i) {
        for (int64_t j = 0; j < p.num_rotated; ++j) {
          cos_t[i * table + 2 * j] = cos_t[i * table + 2 * j + 1] = cos_v[i * padded + j];
          sin_t[i * table + 2 * j] = -sin_v[i * padded + j];
          sin_t[i * table + 2 * j + 1] = sin_v[i * padded + j];
        }
      }
      sin_use = sin_t.data();
      cos_use = cos_t.data();
    }
    for (int64_t i = 0; i < count; ++i) {
      const int64_t t = block + i;
      for (int64_t h = 0; h < p.num_heads; ++h) {
        rotate_row<scalar_t, kInterleaved>(x + t * p.x_stride_token + h * p.x_stride_head,
                                           out + (t * p.num_heads + h) * head_dim, cos_use + i * table,
                                           sin_use + i * table, p.num_pairs, p.num_rotated);
      }
    }
  }
}

// One cloned entry point per (dtype, layout): target_clones needs plain functions, and the inlined
// loops are then compiled for each instruction set.
#define MMV_DEFINE_ROPE_TOKENS(name, scalar_t, interleaved)                                        \
  MMV_CPU_CLONES void name(const RopeProblem& p, const scalar_t* x, scalar_t* out, int64_t begin, \
                           int64_t end) {                                                          \
    rope_tokens_float<scalar_t, interleaved>(p, x, out, begin, end);                               \
  }
MMV_DEFINE_ROPE_TOKENS(rope_tokens_f32, float, false)
MMV_DEFINE_ROPE_TOKENS(rope_tokens_f32_interleaved, float, true)
MMV_DEFINE_ROPE_TOKENS(rope_tokens_bf16, c10::BFloat16, false)
MMV_DEFINE_ROPE_TOKENS(rope_tokens_bf16_interleaved, c10::BFloat16, true)
MMV_DEFINE_ROPE_TOKENS(rope_tokens_f16, c10::Half, false)
MMV_DEFINE_ROPE_TOKENS(rope_tokens_f16_interleaved, c10::Half, true)
#undef MMV_DEFINE_ROPE_TOKENS

void rope_tokens(const RopeProblem& p, const float* x, float* out, int64_t b, int64_t e, bool interleaved) {
  interleaved ? rope_tokens_f32_interleaved(p, x, out, b, e) : rope_tokens_f32(p, x, out, b, e);
}
void rope_tokens(const RopeProblem& p, const c10::BFloat16* x, c10::BFloat16* out, int64_t b, int64_t e,
                 bool interleaved) {
  interleaved ? rope_tokens_bf16_interleaved(p, x, out, b, e) : rope_tokens_bf16(p, x, out, b, e);
}
void rope_tokens(const RopeProblem& p, const c10::Half* x, c10::Half* out, int64_t b, int64_t e,
                 bool interleaved) {
  interleaved ? rope_tokens_f16_interleaved(p, x, out, b, e) : rope_tokens_f16(p, x, out, b, e);
}

// float64 is for gradient checks: angles still come from float32 products (the definition), but
// their sines and cosines and the rotation are computed in double.
void rope_tokens(const RopeProblem& p, const double* x, double* out, int64_t begin, int64_t end,
                 bool interleaved) {
  const int64_t head_dim = 2 * p.num_pairs;
  std::vector<double> sin_v(p.num_rotated), cos_v(p.num_rotated);
  for (int64_t t = begin; t < end; ++t) {
    for (int64_t j = 0; j < p.num_rotated; ++j) {
      const double theta = static_cast<double>(p.coords[3 * t + p.pair_axis[j]] * p.freqs[j]);
      sin_v[j] = std::sin(theta);
      cos_v[j] = std::cos(theta);
    }
    for (int64_t h = 0; h < p.num_heads; ++h) {
      const double* in = x + t * p.x_stride_token + h * p.x_stride_head;
      double* o = out + (t * p.num_heads + h) * head_dim;
      std::copy(in, in + head_dim, o);
      for (int64_t j = 0; j < p.num_rotated; ++j) {
        const int64_t iu = interleaved ? 2 * j : j;
        const int64_t iv = interleaved ? 2 * j + 1 : j + p.num_pairs;
        o[iu] = in[iu] * cos_v[j] - in[iv] * sin_v[j];
        o[iv] = in[iv] * cos_v[j] + in[iu] * sin_v[j];
      }
    }
  }
}

at::Tensor rope3d_cpu(const at::Tensor& x, const at::Tensor& coords, const at::Tensor& freqs,
                      at::IntArrayRef sections, bool interleaved) {
  check_rope3d_args(x, coords, freqs, sections);
  const int64_t num_tokens = x.size(0);
  const int64_t num_heads = x.size(1);
  const int64_t head_dim = x.size(2);
  at::Tensor out = at::empty({num_tokens, num_heads, head_dim}, x.options());
  if (out.numel() == 0) return out;

  const at::Tensor coords_c = coords.contiguous();
  const at::Tensor freqs_c = freqs.contiguous();
  std::vector<int64_t> pair_axis;
  for (int64_t axis = 0; axis < 3; ++axis) pair_axis.insert(pair_axis.end(), sections[axis], axis);

  RopeProblem problem{num_heads,
                      head_dim / 2,
                      static_cast<int64_t>(pair_axis.size()),
                      x.stride(0),
                      x.stride(1),
                      pair_axis.data(),
                      coords_c.data_ptr<float>(),
                      freqs_c.data_ptr<float>()};
  // Chunks of at least ~32K elements keep threading overhead small on short inputs.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, num_heads * head_dim));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "rope3d_cpu", [&] {
    const scalar_t* x_ptr = x.data_ptr<scalar_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    at::parallel_for(0, num_tokens, grain, [&](int64_t begin, int64_t end) {
      rope_tokens(problem, x_ptr, out_ptr, begin, end, interleaved);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(mmv, CPU, m) { m.impl("rope3d", &rope3d_cpu); }

}  // namespace mmv
