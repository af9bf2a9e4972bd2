// Work scheduling for the tensor-core attention kernels, computed on the device from cu_seqlens.
//
// A work tile is (sequence, head, block of `block_rows` rows of that sequence). A one-block kernel
// orders the sequences longest first (their tiles cost the most), counts each sequence's tiles and
// writes their prefix sum. The attention kernels then run a persistent grid, sized by the device and
// not by the batch: each thread block claims the next tile from a counter and binary-searches the
// prefix sum for its coordinates. No block is spent on padding, the host never waits for cu_seqlens,
// and long sequences start first so that short ones fill the gaps at the end.
//
// Schedule layout (int64, 2 * batch + 3 entries):
//   [0] claim counter (set to 0 by the schedule kernel)   [1] number of tiles
//   [2, 2 + batch)            sequence ids, longest first
//   [2 + batch, 3 + 2 batch)  first tile of each of those sequences, then the total
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "attention_common.cuh"

namespace mmv {
namespace attention {
namespace {

constexpr int kScheduleThreads = 1024;
// Longer batches keep their own order: the sort keys live in shared memory.
constexpr int kMaxSortedSequences = 4096;

__device__ __forceinline__ int64_t tiles_of(int length, int block_rows, int num_heads) {
  return (static_cast<int64_t>(length) + block_rows - 1) / block_rows * num_heads;
}

__global__ void __launch_bounds__(kScheduleThreads)
    build_tile_schedule_kernel(const int* __restrict__ cu_seqlens, int batch, int num_tokens, int num_heads,
                               int block_rows, int64_t* __restrict__ schedule) {
  __shared__ uint64_t sort_keys[kMaxSortedSequences];
  __shared__ int64_t warp_totals[kScheduleThreads / 32];
  __shared__ int64_t carry;
  int64_t* order = schedule + 2;
  int64_t* first_tile = schedule + 2 + batch;
  const int tid = threadIdx.x;
  const bool sorted = batch <= kMaxSortedSequences;

  if (sorted) {
    // Bitonic sort of (longer first, then lower id first): a total order, so the schedule does not
    // depend on anything but cu_seqlens.
    int padded = 1;
    while (padded < batch) padded *= 2;
    for (int i = tid; i < padded; i += kScheduleThreads) {
      uint64_t key = ~uint64_t{0};
      if (i < batch) {
        const uint32_t length = static_cast<uint32_t>(sequence_bounds(cu_seqlens, i, num_tokens).length());
        key = (static_cast<uint64_t>(0xffffffffu - length) << 32) | static_cast<uint32_t>(i);
      }
      sort_keys[i] = key;
    }
    __syncthreads();
    for (int size = 2; size <= padded; size *= 2) {
      for (int stride = size / 2; stride > 0; stride /= 2) {
        for (int i = tid; i < padded; i += kScheduleThreads) {
          const int partner = i ^ stride;
          if (partner > i) {
            const bool ascending = (i & size) == 0;
            const uint64_t a = sort_keys[i], b = sort_keys[partner];
            if ((a > b) == ascending) {
              sort_keys[i] = b;
              sort_keys[partner] = a;
            }
          }
        }
        __syncthreads();
      }
    }
  }

  // Exclusive prefix sum of tiles, chunk by chunk of kScheduleThreads sequences.
  if (tid == 0) carry = 0;
  __syncthreads();
  const int lane = tid % 32, warp = tid / 32;
  for (int chunk = 0; chunk < batch; chunk += kScheduleThreads) {
    const int position = chunk + tid;
    int sequence = 0;
    int64_t tiles = 0;
    if (position < batch) {
      sequence = sorted ? static_cast<int>(sort_keys[position] & 0xffffffffu) : position;
      tiles = tiles_of(sequence_bounds(cu_seqlens, sequence, num_tokens).length(), block_rows, num_heads);
    }
    int64_t inclusive = tiles;
#pragma unroll
    for (int offset = 1; offset < 32; offset *= 2) {
      const int64_t up = __shfl_up_sync(0xffffffffu, inclusive, offset);
      if (lane >= offset) inclusive += up;
    }
    if (lane == 31) warp_totals[warp] = inclusive;
    __syncthreads();
    if (warp == 0) {
      int64_t warp_inclusive = warp_totals[lane];
#pragma unroll
      for (int offset = 1; offset < 32; offset *= 2) {
        const int64_t up = __shfl_up_sync(0xffffffffu, warp_inclusive, offset);
        if (lane >= offset) warp_inclusive += up;
      }
      warp_totals[lane] = warp_inclusive;
    }
    __syncthreads();
    const int64_t before_warp = warp == 0 ? 0 : warp_totals[warp - 1];
    const int64_t exclusive = carry + before_warp + inclusive - tiles;
    if (position < batch) {
      order[position] = sequence;
      first_tile[position] = exclusive;
    }
    __syncthreads();
    if (tid == kScheduleThreads - 1) carry = exclusive + tiles;
    __syncthreads();
  }
  if (tid == 0) {
    schedule[0] = 0;
    schedule[1] = carry;
    first_tile[batch] = carry;
  }
}

// Builds the schedule of tiles of `block_rows` rows on `stream`; cu_seqlens is contiguous int32 on the
// device and batch >= 1.
inline at::Tensor build_tile_schedule(const at::Tensor& cu_seqlens, int64_t num_tokens, int64_t num_heads,
                                      int block_rows, cudaStream_t stream) {
  const int64_t batch = cu_seqlens.size(0) - 1;
  at::Tensor schedule = at::empty({2 * batch + 3}, cu_seqlens.options().dtype(at::kLong));
  MMV_LAUNCH(1, kScheduleThreads, 0, stream, build_tile_schedule_kernel)(
      cu_seqlens.data_ptr<int32_t>(), static_cast<int>(batch), static_cast<int>(num_tokens),
      static_cast<int>(num_heads), block_rows, schedule.data_ptr<int64_t>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return schedule;
}

// Upper bound on the tiles of a valid batch, for sizing the persistent grid without reading
// cu_seqlens: sum over b of ceil(L_b / rows) <= T / rows + B.
inline int64_t max_tiles(int64_t num_tokens, int64_t batch, int64_t num_heads, int block_rows) {
  return (num_tokens / block_rows + batch) * num_heads;
}

// A claimed tile, decoded.
struct Tile {
  SequenceBounds bounds;
  int head;
  int block;  // row block within the sequence
  bool valid;
};

__device__ __forceinline__ Tile decode_tile(const int64_t* schedule, int64_t tile,
                                            const int* __restrict__ cu_seqlens, int batch, int num_tokens,
                                            int num_heads, int block_rows) {
  const int64_t* order = schedule + 2;
  const int64_t* first_tile = schedule + 2 + batch;
  int lo = 0, hi = batch - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (first_tile[mid] <= tile) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  Tile t{};
  const int64_t sequence = order[lo];
  if (sequence < 0 || sequence >= batch) return t;
  t.bounds = sequence_bounds(cu_seqlens, static_cast<int>(sequence), num_tokens);
  const int64_t blocks = (static_cast<int64_t>(t.bounds.length()) + block_rows - 1) / block_rows;
  const int64_t within = tile - first_tile[lo];
  if (blocks == 0 || within < 0 || within >= blocks * num_heads) return t;
  t.head = static_cast<int>(within / blocks);
  t.block = static_cast<int>(within % blocks);
  t.valid = true;
  return t;
}

// The persistent loop of a thread block: claims tiles until none is left and calls work(tile) for
// each valid one. The next claim is issued before the current tile's work, so its latency hides behind
// it; the barriers around the shared slot keep thread 0 from overwriting a tile id still being read.
template <typename Work>
__device__ __forceinline__ void for_each_tile(int64_t* schedule, const int* __restrict__ cu_seqlens, int batch,
                                              int num_tokens, int num_heads, int block_rows, Work&& work) {
  __shared__ int64_t claimed;
  unsigned long long* counter = reinterpret_cast<unsigned long long*>(schedule);
  const int64_t total = schedule[1];
  if (threadIdx.x == 0) claimed = static_cast<int64_t>(atomicAdd(counter, 1ull));
  __syncthreads();
  int64_t tile = claimed;
  __syncthreads();
  while (tile < total) {
    int64_t next = 0;
    if (threadIdx.x == 0) next = static_cast<int64_t>(atomicAdd(counter, 1ull));
    const Tile t = decode_tile(schedule, tile, cu_seqlens, batch, num_tokens, num_heads, block_rows);
    if (t.valid) work(t);
    if (threadIdx.x == 0) claimed = next;
    __syncthreads();
    tile = claimed;
    __syncthreads();
  }
}

}  // namespace
}  // namespace attention
}  // namespace mmv
