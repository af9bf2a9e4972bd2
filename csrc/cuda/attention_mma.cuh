// Tensor-core fragments for the attention kernels (sm80 and newer): which rows of a shared-memory
// tile each lane hands to ldmatrix so that the registers come out as m16n8k16 operands, the reuse of
// float32 accumulators as the next product's operand, and the asynchronous copy of a tile of rows
// and of a sequence's keys and values.
//
// Fragment layouts (PTX ISA, "mma.m16n8k16"): with g = lane / 4 and c = lane % 4,
//   A (16 x 16, 4 registers of 2 elements): a0 = (g, 2c..2c+1), a1 = (g + 8, 2c..), a2 = (g, 2c + 8..),
//     a3 = (g + 8, 2c + 8..)
//   B (16 x 8, 2 registers):  b0 = (k 2c..2c+1, n g), b1 = (k 2c + 8.., n g)
//   C (16 x 8 float):         c0, c1 = (g, 2c..2c+1), c2, c3 = (g + 8, 2c..2c+1)
// ldmatrix .x4 hands lane l the pair (row l / 4, columns 2 (l % 4)..) of each of four 8 x 8 matrices
// whose row addresses lanes 8i..8i+7 supply; .trans hands out the transposed pair instead. The
// helpers below choose the four matrices so that the registers come out in the layouts above.
//
// Shared-memory tiles are row-major with a pitch of (columns + 8) elements: the 16-byte padding puts
// the eight rows one ldmatrix reads into eight different bank groups.
#pragma once

#include <cstdint>

#include "attention_ptx.cuh"

namespace mmv {
namespace attention {

// A fragment of the 16 x 16 block at (row0, col0) of a row-major tile.
template <typename Element>
__device__ __forceinline__ void load_a(uint32_t (&a)[4], const Element* tile, int pitch, int row0, int col0,
                                       int lane) {
  const int row = row0 + (lane & 7) + ((lane >> 3) & 1) * 8;
  const int col = col0 + (lane >> 4) * 8;
  ldmatrix_x4(a, tile + row * pitch + col);
}

// A fragment of the 16 x 16 block at (row0, col0) of the transpose of a tile: the tile holds A^T,
// row-major, so A's rows are the tile's columns.
template <typename Element>
__device__ __forceinline__ void load_a_transposed(uint32_t (&a)[4], const Element* tile, int pitch, int row0,
                                                  int col0, int lane) {
  const int tile_row = col0 + (lane & 7) + (lane >> 4) * 8;
  const int tile_col = row0 + ((lane >> 3) & 1) * 8;
  ldmatrix_x4_trans(a, tile + tile_row * pitch + tile_col);
}

// B fragments for B = tile^T, the tile row-major (n, k) as K is in Q K^T: b[0], b[1] for n-columns
// n0..n0+7 and b[2], b[3] for n0+8..n0+15, over k = k0..k0+15.
template <typename Element>
__device__ __forceinline__ void load_b_from_rows_n(uint32_t (&b)[4], const Element* tile, int pitch, int n0,
                                                   int k0, int lane) {
  const int row = n0 + (lane & 7) + (lane >> 4) * 8;
  const int col = k0 + ((lane >> 3) & 1) * 8;
  ldmatrix_x4(b, tile + row * pitch + col);
}

// B fragments for B = tile, the tile row-major (k, n) as V is in P V: b[0], b[1] for n-columns
// n0..n0+7 and b[2], b[3] for n0+8..n0+15, over k = k0..k0+15.
template <typename Element>
__device__ __forceinline__ void load_b_from_rows_k(uint32_t (&b)[4], const Element* tile, int pitch, int k0,
                                                   int n0, int lane) {
  const int row = k0 + (lane & 7) + ((lane >> 3) & 1) * 8;
  const int col = n0 + (lane >> 4) * 8;
  ldmatrix_x4_trans(b, tile + row * pitch + col);
}

// The A fragment of k-step kk from a float accumulator tile c[n-tile][4] (rows of the warp's 16-row
// block, columns 8 per n-tile): the C layout of n-tiles 2kk and 2kk+1 is the A layout of one 16-wide
// k-step, so probabilities feed the next product without leaving registers.
template <typename Element, int kNTiles>
__device__ __forceinline__ void accumulator_to_a(uint32_t (&a)[4], const float (&c)[kNTiles][4], int kk) {
  a[0] = Mma<Element>::pack(c[2 * kk][0], c[2 * kk][1]);
  a[1] = Mma<Element>::pack(c[2 * kk][2], c[2 * kk][3]);
  a[2] = Mma<Element>::pack(c[2 * kk + 1][0], c[2 * kk + 1][1]);
  a[3] = Mma<Element>::pack(c[2 * kk + 1][2], c[2 * kk + 1][3]);
}

// Copies rows [row0, row0 + kRows) of one head of a (T, H, D) operand into a shared tile of pitch
// kHeadDim + 8, zero-filling the rows at or past row_end (row0 < row_end). `head_base` points at
// (token 0, this head); row_stride is the token stride in elements.
template <int kRows, int kHeadDim, int kThreads, typename Element>
__device__ __forceinline__ void load_rows_async(Element* tile, const Element* head_base, int64_t row_stride,
                                                int row0, int row_end, int tid) {
  constexpr int kChunksPerRow = kHeadDim * static_cast<int>(sizeof(Element)) / 16;
  constexpr int kElementsPerChunk = 16 / static_cast<int>(sizeof(Element));
  constexpr int kPitch = kHeadDim + 8;
  constexpr int kChunks = kRows * kChunksPerRow;
#pragma unroll
  for (int step = 0; step < (kChunks + kThreads - 1) / kThreads; ++step) {
    const int i = tid + step * kThreads;
    if (kChunks % kThreads != 0 && i >= kChunks) break;
    const int r = i / kChunksPerRow;
    const int c = i % kChunksPerRow;
    const bool valid = row0 + r < row_end;
    const Element* src = head_base + static_cast<int64_t>(valid ? row0 + r : row0) * row_stride + c * kElementsPerChunk;
    cp_async_16(tile + r * kPitch + c * kElementsPerChunk, src, valid);
  }
}

// The keys and values of one (sequence, head) streamed through two shared-memory stages of kBlockN
// rows each with cp.async, block j + 1 loading while block j is used:
//   pipeline.load(0);          // block 0, committed as its own group
//   for each block j:
//     pipeline.wait_for(j);    // issues block j + 1, waits for block j, then a barrier
//     ... read pipeline.k_tile(j), pipeline.v_tile(j) ...
//     __syncthreads();         // before block j + 2 overwrites this stage
template <int kBlockN, int kHeadDim, int kThreads, typename Element>
struct KeyValuePipeline {
  static constexpr int kStageElements = kBlockN * (kHeadDim + 8);
  Element* k_tiles;  // two stages each
  Element* v_tiles;
  const Element* k_head;  // (token 0, this head)
  const Element* v_head;
  int64_t k_stride;  // token strides, in elements
  int64_t v_stride;
  int start;  // the sequence's rows [start, end)
  int end;
  int blocks;  // ceil((end - start) / kBlockN)
  int tid;

  __device__ __forceinline__ void load(int j) const {
    const int stage = j & 1;
    const int row0 = start + j * kBlockN;
    load_rows_async<kBlockN, kHeadDim, kThreads>(k_tiles + stage * kStageElements, k_head, k_stride, row0, end, tid);
    load_rows_async<kBlockN, kHeadDim, kThreads>(v_tiles + stage * kStageElements, v_head, v_stride, row0, end, tid);
    cp_async_commit();
  }

  __device__ __forceinline__ void wait_for(int j) const {
    if (j + 1 < blocks) {
      load(j + 1);
      cp_async_wait<1>();
    } else {
      cp_async_wait<0>();
    }
    __syncthreads();
  }

  __device__ __forceinline__ const Element* k_tile(int j) const { return k_tiles + (j & 1) * kStageElements; }
  __device__ __forceinline__ const Element* v_tile(int j) const { return v_tiles + (j & 1) * kStageElements; }
};

}  // namespace attention
}  // namespace mmv
