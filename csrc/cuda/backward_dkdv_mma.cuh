// backward_mma_kernel: the tensor-core kernel of the backward that owns a block of keys and computes
// their dK and dV (and, with atomics, its share of dQ); dq_from_accumulator_kernel turns the atomic
// float32 dQ into the input dtype.
#pragma once

#include <cstdint>

#include "attention_common.cuh"
#include "attention_mma.cuh"
#include "attention_schedule.cuh"
#include "backward_common.cuh"

namespace mmv {
namespace {

using namespace attention;

// Keys of one (sequence, head) in blocks of 64, 16 per warp; queries stream through in blocks of
// kBlockM (32 for head_dim 128, which keeps the float32 dK and dV of 128 columns within registers).
template <typename Element, int kHeadDim>
struct BackwardMmaShape {
  static constexpr int kWarps = 4;
  static constexpr int kThreads = 32 * kWarps;
  static constexpr int kBlockN = 16 * kWarps;  // keys per tile
  static constexpr int kBlockM = kHeadDim >= 128 ? 32 : 64;  // queries per step
  static constexpr int kPitch = kHeadDim + 8;
  static constexpr int kScorePitch = kBlockM + 8;
  static constexpr int kKVElements = kBlockN * kPitch;
  static constexpr int kQElements = kBlockM * kPitch;
  static constexpr int kScoreElements = kBlockN * kScorePitch;
  static constexpr int kSharedBytes =
      (2 * kKVElements + 4 * kQElements + kScoreElements) * static_cast<int>(sizeof(Element)) +
      4 * kBlockM * static_cast<int>(sizeof(float));
  // dQ of a query block = dS K: warps split it kDqWarpRows x kDqWarpCols.
  static constexpr int kDqWarpRows = kBlockM / 16;
  static constexpr int kDqWarpCols = kWarps / kDqWarpRows;
  static constexpr int kDqCols = kHeadDim / kDqWarpCols;
  static_assert(kDqWarpRows * kDqWarpCols == kWarps && kDqCols % 16 == 0, "dQ warp split");
};

template <typename Element, int kHeadDim>
__global__ void __launch_bounds__(128) backward_mma_kernel(BackwardParams p, bool accumulate_dq) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 800
  using Shape = BackwardMmaShape<Element, kHeadDim>;
  constexpr int kBlockM = Shape::kBlockM;
  constexpr int kBlockN = Shape::kBlockN;
  constexpr int kPitch = Shape::kPitch;
  constexpr int kThreads = Shape::kThreads;
  constexpr int kHeadSteps = kHeadDim / 16;
  constexpr int kHeadTiles = kHeadDim / 8;
  constexpr int kQueryTiles = kBlockM / 8;
  constexpr int kQuerySteps = kBlockM / 16;

  extern __shared__ __align__(16) unsigned char shared_raw[];
  Element* k_tile = reinterpret_cast<Element*>(shared_raw);
  Element* v_tile = k_tile + Shape::kKVElements;
  Element* q_tiles = v_tile + Shape::kKVElements;         // two stages
  Element* do_tiles = q_tiles + 2 * Shape::kQElements;     // two stages
  Element* score_tile = do_tiles + 2 * Shape::kQElements;  // dS^T (keys x queries), for dQ
  float* lse_tiles = reinterpret_cast<float*>(score_tile + Shape::kScoreElements);  // two stages
  float* dsum_tiles = lse_tiles + 2 * kBlockM;                                       // two stages
  const float* lse_work = static_cast<const float*>(p.lse_work);
  const float* dsum = static_cast<const float*>(p.dsum);

  const int tid = threadIdx.x;
  const int lane = tid % 32;
  const int warp = tid / 32;
  const int group = lane / 4;
  const int quad = lane % 4;
  const int warp_key0 = warp * 16;

  for_each_tile(p.schedule, p.cu_seqlens, p.batch, p.num_tokens, p.num_heads, kBlockN, [&](const Tile& t) {
    const int start = t.bounds.start;
    const int end = t.bounds.end;
    const int k_row0 = start + t.block * kBlockN;
    const int valid_keys = end - k_row0;
    const int query_blocks = (end - start + kBlockM - 1) / kBlockM;
    const Element* q_head = static_cast<const Element*>(p.q.data) + t.head * p.q.stride_head;
    const Element* k_head = static_cast<const Element*>(p.k.data) + t.head * p.k.stride_head;
    const Element* v_head = static_cast<const Element*>(p.v.data) + t.head * p.v.stride_head;
    const Element* do_head = static_cast<const Element*>(p.dout.data) + t.head * p.dout.stride_head;
    const int64_t head_rows = static_cast<int64_t>(t.head) * p.num_tokens;

    const auto load_queries = [&](int stage, int q_row0) {
      load_rows_async<kBlockM, kHeadDim, kThreads>(q_tiles + stage * Shape::kQElements, q_head, p.q.stride_token,
                                                   q_row0, end, tid);
      load_rows_async<kBlockM, kHeadDim, kThreads>(do_tiles + stage * Shape::kQElements, do_head,
                                                   p.dout.stride_token, q_row0, end, tid);
      if (tid < 2 * kBlockM) {
        const int i = tid % kBlockM;
        const bool valid = q_row0 + i < end;
        const int64_t index = head_rows + (valid ? q_row0 + i : q_row0);
        if (tid < kBlockM) {
          cp_async_4(lse_tiles + stage * kBlockM + i, lse_work + index, valid);
        } else {
          cp_async_4(dsum_tiles + stage * kBlockM + i, dsum + index, valid);
        }
      }
    };

    load_rows_async<kBlockN, kHeadDim, kThreads>(k_tile, k_head, p.k.stride_token, k_row0, end, tid);
    load_rows_async<kBlockN, kHeadDim, kThreads>(v_tile, v_head, p.v.stride_token, k_row0, end, tid);
    load_queries(0, start);
    cp_async_commit();

    float dk[kHeadTiles][4];
    float dv[kHeadTiles][4];
#pragma unroll
    for (int dt = 0; dt < kHeadTiles; ++dt) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        dk[dt][e] = 0.f;
        dv[dt][e] = 0.f;
      }
    }

    for (int i = 0; i < query_blocks; ++i) {
      const int stage = i & 1;
      if (i + 1 < query_blocks) {
        load_queries(stage ^ 1, start + (i + 1) * kBlockM);
        cp_async_commit();
        cp_async_wait<1>();
      } else {
        cp_async_wait<0>();
      }
      __syncthreads();
      const Element* q_tile = q_tiles + stage * Shape::kQElements;
      const Element* do_tile = do_tiles + stage * Shape::kQElements;
      const float* lse_rows = lse_tiles + stage * kBlockM;
      const float* dsum_rows = dsum_tiles + stage * kBlockM;
      const int q_row0 = start + i * kBlockM;
      const int valid_queries = end - q_row0;

      // S^T = K Q^T and dP^T = V dO^T for the warp's 16 keys and the block's queries.
      float st[kQueryTiles][4];
      float dpt[kQueryTiles][4];
#pragma unroll
      for (int nt = 0; nt < kQueryTiles; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          st[nt][e] = 0.f;
          dpt[nt][e] = 0.f;
        }
      }
#pragma unroll
      for (int kk = 0; kk < kHeadSteps; ++kk) {
        uint32_t k_frag[4];
        uint32_t v_frag[4];
        load_a(k_frag, k_tile, kPitch, warp_key0, kk * 16, lane);
        load_a(v_frag, v_tile, kPitch, warp_key0, kk * 16, lane);
#pragma unroll
        for (int n2 = 0; n2 < kQuerySteps; ++n2) {
          uint32_t b[4];
          load_b_from_rows_n(b, q_tile, kPitch, n2 * 16, kk * 16, lane);
          Mma<Element>::run(st[2 * n2], k_frag, b[0], b[1]);
          Mma<Element>::run(st[2 * n2 + 1], k_frag, b[2], b[3]);
          load_b_from_rows_n(b, do_tile, kPitch, n2 * 16, kk * 16, lane);
          Mma<Element>::run(dpt[2 * n2], v_frag, b[0], b[1]);
          Mma<Element>::run(dpt[2 * n2 + 1], v_frag, b[2], b[3]);
        }
      }

      // P^T and dS^T in place; keys or queries past the sequence's end contribute nothing.
#pragma unroll
      for (int nt = 0; nt < kQueryTiles; ++nt) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int key = warp_key0 + group + 8 * (e >> 1);
          const int query = nt * 8 + quad * 2 + (e & 1);
          const bool valid = key < valid_keys && query < valid_queries;
          const float prob = valid ? exp2f(st[nt][e] * p.scale_log2 - lse_rows[query]) : 0.f;
          dpt[nt][e] = valid ? prob * (dpt[nt][e] - dsum_rows[query]) : 0.f;
          st[nt][e] = prob;
        }
      }

      // dV += P^T dO and dK += dS^T Q (scaled at the end), operands straight from registers.
#pragma unroll
      for (int kk = 0; kk < kQuerySteps; ++kk) {
        uint32_t p_frag[4];
        uint32_t ds_frag[4];
        accumulator_to_a<Element>(p_frag, st, kk);
        accumulator_to_a<Element>(ds_frag, dpt, kk);
#pragma unroll
        for (int d2 = 0; d2 < kHeadDim / 16; ++d2) {
          uint32_t b[4];
          load_b_from_rows_k(b, do_tile, kPitch, kk * 16, d2 * 16, lane);
          Mma<Element>::run(dv[2 * d2], p_frag, b[0], b[1]);
          Mma<Element>::run(dv[2 * d2 + 1], p_frag, b[2], b[3]);
          load_b_from_rows_k(b, q_tile, kPitch, kk * 16, d2 * 16, lane);
          Mma<Element>::run(dk[2 * d2], ds_frag, b[0], b[1]);
          Mma<Element>::run(dk[2 * d2 + 1], ds_frag, b[2], b[3]);
        }
      }

      if (accumulate_dq) {
        // dQ = dS K needs dS by query rows: go through shared memory, then add this key block's part.
#pragma unroll
        for (int nt = 0; nt < kQueryTiles; ++nt) {
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            const int key = warp_key0 + group + 8 * half;
            *reinterpret_cast<uint32_t*>(score_tile + key * Shape::kScorePitch + nt * 8 + quad * 2) =
                Mma<Element>::pack(dpt[nt][2 * half], dpt[nt][2 * half + 1]);
          }
        }
        __syncthreads();
        constexpr int kDqCols = Shape::kDqCols;
        const int dq_row0 = (warp % Shape::kDqWarpRows) * 16;
        const int dq_col0 = (warp / Shape::kDqWarpRows) * kDqCols;
        float dq[kDqCols / 8][4];
#pragma unroll
        for (int dt = 0; dt < kDqCols / 8; ++dt) {
#pragma unroll
          for (int e = 0; e < 4; ++e) dq[dt][e] = 0.f;
        }
#pragma unroll
        for (int kk = 0; kk < kBlockN / 16; ++kk) {
          uint32_t a[4];
          load_a_transposed(a, score_tile, Shape::kScorePitch, dq_row0, kk * 16, lane);
#pragma unroll
          for (int d2 = 0; d2 < kDqCols / 16; ++d2) {
            uint32_t b[4];
            load_b_from_rows_k(b, k_tile, kPitch, kk * 16, dq_col0 + d2 * 16, lane);
            Mma<Element>::run(dq[2 * d2], a, b[0], b[1]);
            Mma<Element>::run(dq[2 * d2 + 1], a, b[2], b[3]);
          }
        }
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          const int query = dq_row0 + group + 8 * half;
          if (query < valid_queries) {
            float* dst = p.dq_accum + (static_cast<int64_t>(q_row0 + query) * p.num_heads + t.head) * kHeadDim +
                         dq_col0 + quad * 2;
#pragma unroll
            for (int dt = 0; dt < kDqCols / 8; ++dt) {
              atomicAdd(dst + dt * 8, dq[dt][2 * half]);
              atomicAdd(dst + dt * 8 + 1, dq[dt][2 * half + 1]);
            }
          }
        }
      }
      __syncthreads();  // the next step's loads (and dS) overwrite what this one read
    }

    const float scale = static_cast<float>(p.scale);
    Element* dk_out = static_cast<Element*>(p.dk);
    Element* dv_out = static_cast<Element*>(p.dv);
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int key = warp_key0 + group + 8 * half;
      if (key < valid_keys) {
        const int64_t offset = (static_cast<int64_t>(k_row0 + key) * p.num_heads + t.head) * kHeadDim + quad * 2;
#pragma unroll
        for (int dt = 0; dt < kHeadTiles; ++dt) {
          *reinterpret_cast<uint32_t*>(dk_out + offset + dt * 8) =
              Mma<Element>::pack(dk[dt][2 * half] * scale, dk[dt][2 * half + 1] * scale);
          *reinterpret_cast<uint32_t*>(dv_out + offset + dt * 8) =
              Mma<Element>::pack(dv[dt][2 * half], dv[dt][2 * half + 1]);
        }
      }
    }
  });
#endif
}

// dq = scale * accumulator, in the input dtype; four elements per thread (numel is a multiple of 8).
template <typename Element>
__global__ void __launch_bounds__(256)
    dq_from_accumulator_kernel(const float4* __restrict__ accumulator, uint2* __restrict__ dq, int64_t quads,
                               float scale) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < quads;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float4 a = accumulator[i];
    dq[i] = make_uint2(Mma<Element>::pack(a.x * scale, a.y * scale), Mma<Element>::pack(a.z * scale, a.w * scale));
  }
}

}  // namespace
}  // namespace mmv
