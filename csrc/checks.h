// Argument validation shared by the CPU and CUDA implementations.
//
// Every check names the argument it rejects, so that a user reading the Python exception knows which
// tensor to fix. Type problems raise TypeError, everything else ValueError. Nothing here launches work:
// the checks run before any kernel touches memory.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <cstdint>
#include <string>

namespace mmv {

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

// A (T, H, D) tensor whose last dimension is contiguous: views such as qkv[:, 0] of a packed
// (T, 3, H, D) projection qualify without a copy.
inline void check_token_head_tensor(const at::Tensor& t, const char* op, const char* name) {
  TORCH_CHECK_VALUE(t.dim() == 3, op, ": ", name, " must have shape (tokens, heads, head_dim), got ",
                    t.dim(), " dimensions with shape ", t.sizes());
  TORCH_CHECK_TYPE(is_supported_float(t.scalar_type()), op, ": ", name,
                   " must be float32, bfloat16, float16 or float64, got ", t.scalar_type());
  // An empty tensor's strides are never used (autograd may hand over zero strides).
  TORCH_CHECK_VALUE(t.numel() == 0 || t.size(2) <= 1 || t.stride(2) == 1, op, ": ", name,
                    " must be contiguous in its last dimension (head_dim), got strides ", t.strides());
  TORCH_CHECK_VALUE(t.size(0) < (int64_t{1} << 31), op, ": ", name,
                    " has more tokens than int32 cu_seqlens can index: ", t.size(0));
}

inline void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* op,
                              const char* name, const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " must be on the same device as ",
                    ref_name, " (", ref.device(), "), got ", t.device());
}

// An operand that must match q: a (T, H, D) tensor of q's shape, dtype and device.
inline void check_like_q(const at::Tensor& t, const at::Tensor& q, const char* op, const char* name) {
  check_token_head_tensor(t, op, name);
  TORCH_CHECK_VALUE(t.sizes() == q.sizes(), op, ": ", name, " must have the shape of q ", q.sizes(),
                    ", got ", t.sizes());
  TORCH_CHECK_TYPE(t.scalar_type() == q.scalar_type(), op, ": ", name, " must have q's dtype ",
                   q.scalar_type(), ", got ", t.scalar_type());
  check_same_device(t, q, op, name, "q");
}

inline void check_rope3d_args(const at::Tensor& x, const at::Tensor& coords, const at::Tensor& freqs,
                              at::IntArrayRef sections) {
  constexpr const char* op = "rope3d";
  check_token_head_tensor(x, op, "x");
  const int64_t head_dim = x.size(2);
  TORCH_CHECK_VALUE(head_dim % 2 == 0, op, ": x's head_dim must be even, got ", head_dim);
  const int64_t num_pairs = head_dim / 2;

  check_same_device(coords, x, op, "coords", "x");
  TORCH_CHECK_TYPE(coords.scalar_type() == at::kFloat, op, ": coords must be float32, got ",
                   coords.scalar_type());
  TORCH_CHECK_VALUE(coords.dim() == 2 && coords.size(0) == x.size(0) && coords.size(1) == 3, op,
                    ": coords must have shape (tokens, 3) = (", x.size(0), ", 3), got ", coords.sizes());

  check_same_device(freqs, x, op, "freqs", "x");
  TORCH_CHECK_TYPE(freqs.scalar_type() == at::kFloat, op, ": freqs must be float32, got ",
                   freqs.scalar_type());
  TORCH_CHECK_VALUE(freqs.dim() == 1 && freqs.size(0) == num_pairs, op,
                    ": freqs must have shape (head_dim / 2,) = (", num_pairs, ",), got ", freqs.sizes());

  TORCH_CHECK_VALUE(sections.size() == 3, op,
                    ": sections must hold three pair counts (z, y, x), got ", sections.size(), " values");
  // Each count is checked against the pairs left before it is added, so that no sum can overflow.
  int64_t total = 0;
  for (int64_t s : sections) {
    TORCH_CHECK_VALUE(s >= 0, op, ": sections must be non-negative, got ", sections);
    TORCH_CHECK_VALUE(s <= num_pairs - total, op, ": sections ", sections, " sum to more than the ", num_pairs,
                      " rotary pairs of head_dim ", head_dim);
    total += s;
  }
}

// Shapes, dtypes and devices of an attention call. The values inside cu_seqlens are checked by
// check_cu_seqlens_values, which needs them on the host.
inline void check_packed_attention_args(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                        const at::Tensor& cu_seqlens, int64_t max_seqlen, double scale,
                                        const char* op) {
  check_token_head_tensor(q, op, "q");
  check_like_q(k, q, op, "k");
  check_like_q(v, q, op, "v");
  const int64_t head_dim = q.size(2);
  TORCH_CHECK_VALUE(head_dim >= 1 && head_dim <= 256, op, ": head_dim must be between 1 and 256, got ",
                    head_dim);

  check_same_device(cu_seqlens, q, op, "cu_seqlens", "q");
  TORCH_CHECK_TYPE(cu_seqlens.scalar_type() == at::kInt, op, ": cu_seqlens must be int32, got ",
                   cu_seqlens.scalar_type());
  TORCH_CHECK_VALUE(cu_seqlens.dim() == 1 && cu_seqlens.size(0) >= 1, op,
                    ": cu_seqlens must have shape (batch + 1,), got ", cu_seqlens.sizes());
  TORCH_CHECK_VALUE(max_seqlen >= -1, op,
                    ": max_seqlen must be a non-negative bound on every sequence length (or -1 for "
                    "none), got ",
                    max_seqlen);
  TORCH_CHECK_VALUE(std::isfinite(scale), op, ": scale must be finite, got ", scale);
}

// The values of cu_seqlens (a host pointer): starts at 0, never decreases, ends at the token count,
// and no sequence is longer than max_seqlen (-1: no bound).
inline void check_cu_seqlens_values(const int32_t* cu, int64_t batch, int64_t num_tokens,
                                    int64_t max_seqlen, const char* op) {
  TORCH_CHECK_VALUE(cu[0] == 0, op, ": cu_seqlens must start at 0, got cu_seqlens[0] = ", cu[0]);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t length = int64_t{cu[b + 1]} - cu[b];
    TORCH_CHECK_VALUE(length >= 0, op, ": cu_seqlens must be non-decreasing, got cu_seqlens[", b,
                      "] = ", cu[b], " > cu_seqlens[", b + 1, "] = ", cu[b + 1]);
    TORCH_CHECK_VALUE(max_seqlen < 0 || length <= max_seqlen, op, ": sequence ", b, " has length ",
                      length, ", longer than max_seqlen = ", max_seqlen);
  }
  TORCH_CHECK_VALUE(cu[batch] == num_tokens, op, ": cu_seqlens must end at the number of tokens ",
                    num_tokens, ", got cu_seqlens[", batch, "] = ", cu[batch]);
}

// The extra operands of packed_attention_bwd: dout and out like q, lse float32 (heads, tokens).
inline void check_backward_operands(const at::Tensor& dout, const at::Tensor& q, const at::Tensor& out,
                                    const at::Tensor& lse, const char* op) {
  check_like_q(dout, q, op, "dout");
  check_like_q(out, q, op, "out");
  check_same_device(lse, q, op, "lse", "q");
  TORCH_CHECK_TYPE(lse.scalar_type() == at::kFloat, op, ": lse must be float32, got ", lse.scalar_type());
  TORCH_CHECK_VALUE(lse.dim() == 2 && lse.size(0) == q.size(1) && lse.size(1) == q.size(0), op,
                    ": lse must have shape (heads, tokens) = (", q.size(1), ", ", q.size(0), "), got ",
                    lse.sizes());
}

}  // namespace mmv
