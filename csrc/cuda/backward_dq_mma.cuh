// backward_dq_mma_kernel: the tensor-core kernel of the deterministic backward that owns a block of
// queries and computes their dQ, walking the keys in a fixed order.
#pragma once

#include <cstdint>

#include "attention_common.cuh"
#include "attention_mma.cuh"
#include "attention_schedule.cuh"
#include "backward_common.cuh"

namespace mmv {
namespace {

using namespace attention;

// dQ for deterministic mode: a thread block owns 64 queries of one (sequence, head), 16 per warp, and
// walks the sequence's keys in a fixed order, recomputing P and dS; dQ stays in registers.
template <typename Element, int kHeadDim>
struct DqMmaShape {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockM = 16 * kWarps;  // queries per tile
  static constexpr int kBlockN = kHeadDim >= 128 ? 32 : 64;  // keys per step
  static constexpr int kPitch = kHeadDim + 8;
  static constexpr int kQElements = kBlockM * kPitch;
  static constexpr int kKVElements = kBlockN * kPitch;
  static constexpr int kSharedBytes = (2 * kQElements + 4 * kKVElements) * static_cast<int>(sizeof(Element));
};

template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(128) backward_dq_mma_kernel(BackwardParams p) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using Shape = DqMmaShape<Element, kHeadDim>;
  constexpr int kBlockM = Shape::kBlockM;
  constexpr int kBlockN = Shape::kBlockN;
  constexpr int kPitch = Shape::kPitch;
  constexpr int kThreads = Shape::kThreads;
  constexpr int kHeadSteps = kHeadDim / 16;
  constexpr int kHeadTiles = kHeadDim / 8;
  constexpr int kKeyTiles = kBlockN / 8;
  constexpr int kKeySteps = kBlockN / 16;

  extern __shared__ __align__(16) unsigned char shared_raw[];
  Element* q_tile = reinterpret_cast<Element*>(shared_raw);
  Element* do_tile = q_tile + Shape::kQElements;
  Element* k_tiles = do_tile + Shape::kQElements;       // two stages
  Element* v_tiles = k_tiles + 2 * Shape::kKVElements;  // two stages
  const float* lse_work = static_cast<const float*>(p.lse_work);
  const float* dsum = static_cast<const float*>(p.dsum);

  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int group = lane / 4;
  const int quad = lane % 4;
  const int warp_row0 = warp * 16;

  for_each_tile(p.schedule, p.cu_seqlens, p.batch, p.num_tokens, p.num_heads, kBlockM, [&](const Tile& t) {
    const int start = t.bounds.start;
    const int end = t.bounds.end;
    const int q_row0 = start + t.block * kBlockM;
    const int key_blocks = (end - start + kBlockN - 1) / kBlockN;
    const Element* q_head = static_cast<const Element*>(p.q.data) + t.head * p.q.stride_head;
    const Element* k_head = static_cast<const Element*>(p.k.data) + t.head * p.k.stride_head;
    const Element* v_head = static_cast<const Element*>(p.v.data) + t.head * p.v.stride_head;
    const Element* do_head = static_cast<const Element*>(p.dout.data) + t.head * p.dout.stride_head;

    load_rows_async<kBlockM, kHeadDim, kThreads>(q_tile, q_head, p.q.stride_token, q_row0, end, tid);
    load_rows_async<kBlockM, kHeadDim, kThreads>(do_tile, do_head, p.dout.stride_token, q_row0, end, tid);
    cp_async_commit();
    const KeyValuePipeline<kBlockN, kHeadDim, kThreads, Element> kv{
        k_tiles, v_tiles, k_head, v_head, p.k.stride_token, p.v.stride_token, start, end, key_blocks, tid};
    kv.load(0);

    float row_lse[2];
    float row_dsum[2];
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = q_row0 + warp_row0 + group + 8 * half;
      const int64_t index = static_cast<int64_t>(t.head) * p.num_tokens + row;
      row_lse[half] = row < end ? lse_work[index] : 0.f;
      row_dsum[half] = row < end ? dsum[index] : 0.f;
    }

    // The warp's queries and output gradients stay in registers for the whole tile.
    cp_async_wait<1>();
    __syncthreads();
    uint32_t q_frag[kHeadSteps][4];
    uint32_t do_frag[kHeadSteps][4];
#pragma unroll
    for (int kk = 0; kk < kHeadSteps; ++kk) {
      load_a(q_frag[kk], q_tile, kPitch, warp_row0, kk * 16, lane);
      load_a(do_frag[kk], do_tile, kPitch, warp_row0, kk * 16, lane);
    }

    float dq[kHeadTiles][4];
#pragma unroll
    for (int dt = 0; dt < kHeadTiles; ++dt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) dq[dt][e] = 0.f;
    }

    for (int j = 0; j < key_blocks; ++j) {
      kv.wait_for(j);
      const Element* k_tile = kv.k_tile(j);
      const Element* v_tile = kv.v_tile(j);

      float s[kKeyTiles][4];
      float dp[kKeyTiles][4];
#pragma unroll
      for (int nt = 0; nt < kKeyTiles; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[nt][e] = 0.f;
          dp[nt][e] = 0.f;
        }
      }
#pragma unroll
      for (int kk = 0; kk < kHeadSteps; ++kk) {
#pragma unroll
        for (int n2 = 0; n2 < kKeySteps; ++n2) {
          uint32_t b[4];
          load_b_from_rows_n(b, k_tile, kPitch, n2 * 16, kk * 16, lane);
          Mma<Element>::run(s[2 * n2], q_frag[kk], b[0], b[1]);
          Mma<Element>::run(s[2 * n2 + 1], q_frag[kk], b[2], b[3]);
          load_b_from_rows_n(b, v_tile, kPitch, n2 * 16, kk * 16, lane);
          Mma<Element>::run(dp[2 * n2], do_frag[kk], b[0], b[1]);
          Mma<Element>::run(dp[2 * n2 + 1], do_frag[kk], b[2], b[3]);
        }
      }

      const int valid_keys = end - (start + j * kBlockN);
#pragma unroll
      for (int nt = 0; nt < kKeyTiles; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = nt * 8 + quad * 2 + (e & 1);
          const int half = e >> 1;
          const float prob = key < valid_keys ? exp2f(s[nt][e] * p.scale_log2 - row_lse[half]) : 0.f;
          s[nt][e] = key < valid_keys ? prob * (dp[nt][e] - row_dsum[half]) : 0.f;
        }
      }

      // dQ += dS K, dS straight from registers.
#pragma unroll
      for (int kk = 0; kk < kKeySteps; ++kk) {
        uint32_t ds_frag[4];
        accumulator_to_a<Element>(ds_frag, s, kk);
#pragma unroll
        for (int d2 = 0; d2 < kHeadDim / 16; ++d2) {
          uint32_t b[4];
          load_b_from_rows_k(b, k_tile, kPitch, kk * 16, d2 * 16, lane);
          Mma<Element>::run(dq[2 * d2], ds_frag, b[0], b[1]);
          Mma<Element>::run(dq[2 * d2 + 1], ds_frag, b[2], b[3]);
        }
      }
      __syncthreads();
    }

    const float scale = static_cast<float>(p.scale);
    Element* dq_out = static_cast<Element*>(p.dq);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int row = q_row0 + warp_row0 + group + 8 * half;
      if (row < end) {
        Element* dq_row = dq_out + (static_cast<int64_t>(row) * p.num_heads + t.head) * kHeadDim + quad * 2;
#pragma unroll
        for (int dt = 0; dt < kHeadTiles; ++dt) {
          *reinterpret_cast<uint32_t*>(dq_row + dt * 8) =
              Mma<Element>::pack(dq[dt][2 * half] * scale, dq[dt][2 * half + 1] * scale);
        }
      }
    }
  });
#endif
}

}  // namespace
}  // namespace mmv
