// Tiles and matrix products for the CPU attention kernels.
//
// Attention is computed on tiles of kBlock tokens x head_dim. The matrix products go through
// PyTorch's batch-reduce GEMM (at::native::cpublas::brgemm, oneDNN micro-kernels: AMX for bfloat16
// where the CPU has it, AVX-512 for float32). brgemm computes C (+)= A * B with A and C row-major and B
// row-major for float32, or in the VNNI layout made by cpublas::pack for bfloat16; it has no
// transpose flag. So before the products run, every operand a product needs as B is copied once into
// "panels" in the layout brgemm wants, per (head, block); the copies cost one pass over q, k, v
// (and dout) and are shared by every tile product that uses them.
//
// Panel kinds, each kPanelElems(head_dim) elements per (head, block):
//   rows:        kBlock x Dp row-major, an A operand (and, for float32, a B operand)
//   rows_packed: the same block as a B operand: kBlock rows (reduction) x Dp columns, in column
//                chunks of at most 64 (the widest bfloat16 B panel cpublas::pack accepts)
//   cols_packed: the block transposed as a B operand: Dp rows (reduction) x kBlock columns
// Dp is head_dim rounded up to 16 (bfloat16 pairs rows and packs columns in 16s); padding rows,
// columns and tail-block tokens are zero, so they add nothing to any product.
#pragma once

#include <ATen/native/CPUBlas.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace mmv::attention {

constexpr int64_t kBlock = 64;       // tokens per query or key tile
constexpr int64_t kChunk = 64;       // widest B panel, in columns
constexpr int64_t kColumnAlign = 16;  // B panel widths and reduction depths are multiples of this

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
inline int64_t padded_head_dim(int64_t head_dim) { return round_up(head_dim, kColumnAlign); }
inline int64_t panel_elems(int64_t head_dim) { return kBlock * padded_head_dim(head_dim); }

// bfloat16 inputs multiply in bfloat16 (AMX) when the CPU can pack bfloat16 B panels; everything
// else multiplies in float32 (float16 has no fast CPU path here: widening it is exact).
template <typename compute_t>
constexpr bool uses_vnni() {
  return std::is_same_v<compute_t, c10::BFloat16>;
}

template <typename compute_t>
inline at::ScalarType scalar_type_of() {
  return std::is_same_v<compute_t, float> ? at::kFloat : at::kBFloat16;
}

// C (+)= A * B where B is a packed panel of `depth` rows (the reduction) and `width` columns, stored
// in chunks of kChunk columns each laid out with leading dimension = the chunk's width. A is
// rows x depth with leading dimension lda, C is rows x width with leading dimension ldc.
template <typename compute_t>
inline void gemm_panel(int64_t rows, int64_t width, int64_t depth, const compute_t* a, int64_t lda,
                       const compute_t* b_panel, float* c, int64_t ldc, bool accumulate) {
  for (int64_t col = 0; col < width; col += kChunk) {
    const int64_t chunk = std::min(kChunk, width - col);
    at::native::cpublas::brgemm(rows, chunk, depth, lda, chunk, ldc, accumulate, a, b_panel + col * depth,
                                c + col, uses_vnni<compute_t>());
  }
}

// Copies a (depth x width) row-major float/bfloat16 block `src` (leading dimension ld_src, already in
// compute type and zero-padded) into the chunked panel layout at `dst`.
template <typename compute_t>
inline void pack_panel(const compute_t* src, int64_t ld_src, int64_t depth, int64_t width, compute_t* dst) {
  for (int64_t col = 0; col < width; col += kChunk) {
    const int64_t chunk = std::min(kChunk, width - col);
    compute_t* out = dst + col * depth;
    if (uses_vnni<compute_t>()) {
      at::native::cpublas::pack(depth, chunk, ld_src, chunk, at::kBFloat16, at::kBFloat16, src + col, out);
    } else {
      for (int64_t r = 0; r < depth; ++r) std::copy(src + r * ld_src + col, src + r * ld_src + col + chunk, out + r * chunk);
    }
  }
}

}  // namespace mmv::attention
