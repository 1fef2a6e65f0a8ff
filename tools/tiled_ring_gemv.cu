// The tiled small-M GEMV (lora_gemv_tiled.cuh) as the library runs it on sm_90 (one 2 KB slot a warp, filled by a
// 1-D bulk copy with an L2 evict_first policy while the warp decodes the group before) against forms with more slots
// a warp, without the policy, or with the first copy issued after x is staged rather than at entry; and probes that
// take one part of the decode out (timing only, their y differs): "read only" folds the loaded words into the sums
// instead of decoding them, "no lookup" feeds the code words to the mma as they are, "no table load" keeps the PRMT
// that forms a lookup's address but not its shared load, "no x load" takes the mma's B fragments from registers, "no
// scales" adds each block's products unscaled. Same plan (grid, warps, K splits), x·Aᵀ and split-K epilogue as the
// library's; timed as the benchmarks time (256 MB written before each run), the forms interleaved; y's hash shows
// whether they agree bit for bit. NF4 with double quantization, blocksize 64, bf16, r = 16, s = 2.
//
//   nvcc -O3 -std=c++20 --expt-relaxed-constexpr -arch=sm_90a -diag-suppress 177 -I csrc/include -I tools \
//     tools/tiled_ring_gemv.cu -o /tmp/tiled_ring_gemv && /tmp/tiled_ring_gemv 2 8192,28672,1 28672,8192,1
//
// Arguments: rounds, then shapes "N,K,M". Prints µs a form and round, and y's hash.
#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "qlora/l2_policy.h"
#include "qlora/lora_gemv_tiled.cuh"
#include "qlora/mbarrier.cuh"
#include "flushed_timing.cuh"
#include "tiled_lora_case.cuh"
#include "tool_host.cuh"

using namespace qlora;
using bf16 = __nv_bfloat16;

constexpr int kGroupBytes = kTiledGemvGroupBytes;

__device__ __forceinline__ void bulk_group_copy(uint32_t dst, const void* src, uint32_t bar, bool evict_first) {
  if (evict_first)
    bulk_copy_to_shared(dst, src, kGroupBytes, bar, kL2EvictFirst);
  else
    bulk_copy_to_shared(dst, src, kGroupBytes, bar);
}

// This form's shared memory: the pair table, code2, x's rows, xa's, then its ring and the slots' barriers.
__host__ __device__ inline int64_t ring_base(int64_t M, int64_t split_k, int r, bool fused_epilogue) {
  return kLanePairTableBytes + kTiledCode2Bytes + M * tiled_x_words(split_k) * 4 + (fused_epilogue ? M * r * 4 : 0);
}
__host__ __device__ inline int64_t ring_offset(int64_t base) { return (base + 127) / 128 * 128; }
inline int64_t ring_smem(int64_t base, int warps, int slots) {
  return ring_offset(base) + int64_t{warps} * slots * (kGroupBytes + 8);
}

using GroupScales = TiledScales<true>;

// What a probe form leaves out of the decode (Probe::kFull: nothing, as the library decodes).
enum class Probe { kFull, kReadOnly, kNoLookup, kNoTableLoad, kNoXLoad, kNoScales };

// decode_tiled_group (bf16, double quantization) with one part taken out, per kProbe.
template <Probe kProbe>
__device__ __forceinline__ void probe_group(float (&acc)[2][2], uint32_t table, const uint4 (&w)[kTiledGemvGroupBlocks],
                                            const GroupScales& sc, const uint32_t* x_group, uint32_t lane4,
                                            const float* code2, float mean, bool x_row_used) {
  if constexpr (kProbe == Probe::kFull) {
    decode_tiled_group<bf16>(acc, table, w, sc, x_group, x_row_used, lane4, code2, mean);
  } else if constexpr (kProbe == Probe::kReadOnly) {
    acc[0][0] += __uint_as_float((w[0].x ^ w[1].y ^ w[2].z ^ w[3].w ^ sc.q[0] ^ sc.q[1]) & 0x3fffffu);
  } else {
#pragma unroll
    for (int j = 0; j < kTiledGemvGroupBlocks; ++j) {
      float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
      uint32_t xr[8];
      if constexpr (kProbe == Probe::kNoXLoad) {
#pragma unroll
        for (int i = 0; i < 8; ++i) xr[i] = i % 2 ? lane4 : __float_as_uint(mean);
      } else {
        load_tiled_x_block(xr, x_group + j * 32, x_row_used);
      }
      const uint2 row_g = make_uint2(w[j].x, w[j].y), row_g8 = make_uint2(w[j].z, w[j].w);
#pragma unroll
      for (int s = 0; s < 4; ++s) {
        uint32_t a[4];
        if constexpr (kProbe == Probe::kNoLookup) {
          a[0] = s < 2 ? row_g.x : row_g.y;
          a[1] = s < 2 ? row_g8.x : row_g8.y;
          a[2] = a[0] ^ lane4;
          a[3] = a[1] ^ lane4;
        } else if constexpr (kProbe == Probe::kNoTableLoad) {
          tiled_a_step(a, row_g, row_g8, s, [&](uint32_t lo, uint32_t hi, int byte) {
            return tiled_pair_offset(lo, hi, byte, lane4);
          });
        } else {
          tiled_a_step(a, row_g, row_g8, s, [&](uint32_t lo, uint32_t hi, int byte) {
            return tiled_pair(table, lo, hi, byte, lane4);
          });
        }
        const uint32_t b[2] = {xr[2 * s], xr[2 * s + 1]};
        MmaType<bf16>::mma(d, a, b);
      }
      if constexpr (kProbe == Probe::kNoScales) {
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          acc[h][0] += d[2 * h];
          acc[h][1] += d[2 * h + 1];
        }
      } else {
        add_scaled_block(acc, d, sc, j, code2, mean);
      }
    }
  }
}

// lora_gemv_tiled_kernel<bf16, NF4, double quantization> with the weight's groups through shared memory.
template <int kSlots, bool kEvictFirst, bool kIssueAtEntry, Probe kProbe = Probe::kFull>
__global__ void __launch_bounds__(kTiledGemvMaxWarps * 32, 1) ring_gemv_kernel(const LoraLinearParams<bf16> p) {
  using T = bf16;
  extern __shared__ __align__(128) uint8_t smem[];
  uint32_t* table = reinterpret_cast<uint32_t*>(smem);
  float* code2 = reinterpret_cast<float*>(smem + kLanePairTableBytes);
  uint32_t* xs = reinterpret_cast<uint32_t*>(smem + kLanePairTableBytes + kTiledCode2Bytes);
  const int tid = threadIdx.x, threads = blockDim.x, warps = threads / 32;
  const int64_t split_k = p.K / gridDim.y, k_begin = blockIdx.y * split_k;
  const int64_t x_words = tiled_x_words(split_k);
  float* xa_s = reinterpret_cast<float*>(xs + p.M * x_words);
  const bool fused_epilogue = p.partial == nullptr;
  const int64_t base_bytes = ring_base(p.M, split_k, p.r, fused_epilogue);
  const int warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const uint32_t smem_s = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  const uint32_t ring_s = smem_s + static_cast<uint32_t>(ring_offset(base_bytes)) + warp * kSlots * kGroupBytes;
  const uint32_t bar_s = smem_s + static_cast<uint32_t>(ring_offset(base_bytes)) + warps * kSlots * kGroupBytes +
                         warp * kSlots * 8;

  const int64_t tile = static_cast<int64_t>(blockIdx.x) * warps + warp;
  const bool has_tile = tile < p.N / kTileOrderRows;
  const int64_t blocks_per_row = p.K / kTileOrderK, b_begin = k_begin / kTileOrderK;
  const int groups = static_cast<int>(split_k / kTiledGemvGroupK);
  const uint8_t* w_tile = p.packed + (tile * blocks_per_row + b_begin) * kTileOrderBytes;
  const auto issue = [&](int slot, int group) {  // lane 0
    mbar_arrive_expecting(bar_s + 8 * slot, kGroupBytes);
    bulk_group_copy(ring_s + slot * kGroupBytes, w_tile + int64_t{group} * kGroupBytes, bar_s + 8 * slot, kEvictFirst);
  };
  if (has_tile && lane == 0) {
    for (int s = 0; s < kSlots; ++s) mbar_init(bar_s + 8 * s, 1);
    mbar_init_fence();
    if constexpr (kIssueAtEntry)
      for (int s = 0; s < kSlots && s < groups; ++s) issue(s, s);
  }

  const float lane_value = lane_code_value<QuantType::NF4>();
  const float code2_value = tid < 256 ? p.scales.code2[tid] : 0.0f;
  const float mean = *p.scales.offset;
  stage_tiled_x(p.x, p.M, p.K, k_begin, split_k, xs, tid, threads);
  fill_lane_pair_table<T>(table, [&](int code) { return __shfl_sync(0xffffffffu, lane_value, code); }, tid, threads);
  if (tid < 256) code2[tid] = code2_value;
  for (int i = tid + threads; i < 256; i += threads) code2[i] = p.scales.code2[i];
  if constexpr (!kIssueAtEntry)
    if (has_tile && lane == 0)
      for (int s = 0; s < kSlots && s < groups; ++s) issue(s, s);
  __syncthreads();

  float acc[2][2] = {{0.0f, 0.0f}, {0.0f, 0.0f}};
  if (has_tile) {
    const int64_t row_block[2] = {(tile * kTileOrderRows + g) * blocks_per_row + b_begin,
                                  (tile * kTileOrderRows + g + 8) * blocks_per_row + b_begin};
    const uint32_t table_base = static_cast<uint32_t>(__cvta_generic_to_shared(table));
    const uint32_t lane4 = lane * 4;
    const uint32_t* x_row = xs + (g < p.M ? g : p.M - 1) * x_words + 8 * t;
    // The scales are read a group ahead: eight groups share a 32-byte sector, so most come from L1.
    GroupScales next;
    load_tiled_scales(next, p.scales, row_block, 0);
#pragma unroll 1
    for (int group = 0; group < groups; ++group) {
      const int slot = group % kSlots;
      mbar_wait(bar_s + 8 * slot, static_cast<uint32_t>(group / kSlots) & 1u);
      uint4 w[kTiledGemvGroupBlocks];
#pragma unroll
      for (int j = 0; j < kTiledGemvGroupBlocks; ++j)
        w[j] = load_shared16(ring_s + slot * kGroupBytes + j * kTileOrderBytes + lane * 16);
      const GroupScales sc = next;
      if (group + kSlots < groups) {
        __syncwarp();
        if (lane == 0) {
          fence_before_copies();
          issue(slot, group + kSlots);
        }
      }
      if (group + 1 < groups) load_tiled_scales(next, p.scales, row_block, group + 1);
      probe_group<kProbe>(acc, table_base, w, sc, x_row + kTiledGemvGroupBlocks * group * 32, lane4, code2, mean,
                          g < p.M);
    }
  }
  allow_dependent_launch();
  if (fused_epilogue && p.lora_B != nullptr) {
    wait_for_prior_grid();
    stage_lora_rows(p, xa_s, 0, static_cast<int>(p.M));
    __syncthreads();
  }
  if (has_tile) store_tiled_sums(p, acc, xa_s, tile, g, 2 * t);
  wait_for_prior_grid();
}

// launch_lora_gemv_tiled with the ring kernel (bfloat16, x·Aᵀ by lora_down_mma beside).
template <int kSlots, bool kEvictFirst, bool kIssueAtEntry, Probe kProbe = Probe::kFull>
cudaError_t launch_ring(LoraLinearParams<bf16> p, const TiledGemvPlan& plan, const bf16* lora_A, float* scratch,
                        bf16* xa, int num_sms) {
  p.warp_splits = 1;
  p.xa = xa;
  place_gemv_scratch(p, scratch, plan.xa_splits, plan.splits);
  const bool overlap = dependent_launch_supported();
  cudaError_t err = launch_lora_down_mma(p.x, lora_A, xa, p.M, p.K, p.r, 0);
  if (err != cudaSuccess) return err;
  constexpr auto kernel = ring_gemv_kernel<kSlots, kEvictFirst, kIssueAtEntry, kProbe>;
  const int64_t smem = ring_smem(ring_base(p.M, p.K / plan.splits, p.r, plan.splits == 1), plan.warps, kSlots);
  if (smem > kTiledGemvMaxSmem) return cudaErrorInvalidValue;
  err = opt_in_dynamic_smem<kernel>(kTiledGemvMaxSmem);
  if (err == cudaSuccess)
    err = launch_maybe_dependent(kernel, plan.grid, dim3(plan.warps * 32), static_cast<size_t>(smem), 0, overlap, p);
  if (err != cudaSuccess || plan.splits == 1) return err;
  return launch_lora_epilogue(p, plan.splits, num_sms, overlap, 0);
}

struct Form {
  const char* name;
  cudaError_t (*launch)(LoraLinearParams<bf16>, const TiledGemvPlan&, const bf16*, float*, bf16*, int);
  int slots;
};

cudaError_t launch_tree(LoraLinearParams<bf16> p, const TiledGemvPlan& plan, const bf16* lora_A, float* scratch,
                        bf16* xa, int num_sms) {
  return launch_lora_gemv_tiled<bf16>(p, plan, nullptr, lora_A, scratch, xa, QuantType::NF4, num_sms, 0);
}

int main(int argc, char** argv) {
  setvbuf(stdout, nullptr, _IONBF, 0);
  if (argc < 3) {
    printf("usage: %s rounds N,K,M...\n", argv[0]);
    return 1;
  }
  const int sms = sm_count_or_complain(argv[0]);
  if (sms == 0) return 1;
  char* flush = nullptr;
  cudaMalloc(&flush, kFlushBytes);
  const int rounds = atoi(argv[1]);
  const int r = 16;
  const Form forms[] = {
      {"library: 1 slot, evict_first", launch_tree, 0},
      {"1 slot, evict_first", launch_ring<1, true, true>, 1},
      {"1 slot, evict_first, read only", launch_ring<1, true, true, Probe::kReadOnly>, 1},
      {"1 slot, evict_first, no lookup", launch_ring<1, true, true, Probe::kNoLookup>, 1},
      {"1 slot, evict_first, no table load", launch_ring<1, true, true, Probe::kNoTableLoad>, 1},
      {"1 slot, evict_first, no x load", launch_ring<1, true, true, Probe::kNoXLoad>, 1},
      {"1 slot, evict_first, no scales", launch_ring<1, true, true, Probe::kNoScales>, 1},
      {"2 slots, evict_first, no lookup", launch_ring<2, true, true, Probe::kNoLookup>, 2},
      {"2 slots, evict_first, read only", launch_ring<2, true, true, Probe::kReadOnly>, 2},
      {"4 slots, evict_first, read only", launch_ring<4, true, true, Probe::kReadOnly>, 4},
      {"1 slot", launch_ring<1, false, true>, 1},
      {"1 slot, evict_first, after x", launch_ring<1, true, false>, 1},
      {"2 slots, evict_first", launch_ring<2, true, true>, 2},
      {"2 slots", launch_ring<2, false, true>, 2},
      {"3 slots, evict_first", launch_ring<3, true, true>, 3},
      {"4 slots, evict_first", launch_ring<4, true, true>, 4},
  };
  for (int a = 2; a < argc; ++a) {
    long long N, K, M;
    if (!parse_gemm_shape(argv[a], &N, &K, &M)) return 1;
    TiledGemvPlan plan;
    if (const char* why = plan_lora_gemv_tiled(M, N, K, r, kTileOrderK, true, sms, &plan)) {
      printf("%s: %s\n", argv[a], why);
      continue;
    }
    const TiledLoraCase c = tiled_lora_case(N, K, M, r, 2.0f);
    const LoraLinearParams<bf16>& p = c.p;
    const bf16* A = c.A;
    float* scratch;
    cudaMalloc(&scratch, std::max<int64_t>(plan.scratch_floats, 1) * 4);
    bf16* xa;
    cudaMalloc(&xa, M * r * 2);
    printf("%lldx%lld M=%lld: %d warps a CTA, %d K splits, %u CTAs\n", N, K, M, plan.warps, plan.splits,
           plan.grid.x * plan.grid.y);
    std::vector<std::string> lines(std::size(forms));
    for (int round = 0; round < rounds; ++round) {
      for (size_t f = 0; f < std::size(forms); ++f) {
        const Form& form = forms[f];
        if (form.slots > 0 &&
            ring_smem(ring_base(M, K / plan.splits, r, plan.splits == 1), plan.warps, form.slots) > kTiledGemvMaxSmem) {
          lines[f] = "does not fit shared memory";
          continue;
        }
        const auto launch = [&] {
          if (const cudaError_t err = form.launch(p, plan, A, scratch, xa, sms); err != cudaSuccess) {
            printf("%s: %s\n", form.name, cudaGetErrorString(err));
            exit(1);
          }
        };
        cudaMemset(p.y, 0, N * M * 2);
        launch();
        if (cudaDeviceSynchronize() != cudaSuccess) {
          printf("%s: %s\n", form.name, cudaGetErrorString(cudaGetLastError()));
          return 1;
        }
        const unsigned long long hash = bits_hash(host_copy(p.y, N * M));
        const float us = flushed_median_us(flush, launch, 60, 10);
        char buf[96];
        snprintf(buf, sizeof buf, "%s%6.1f", lines[f].empty() ? "" : ",", us);
        if (round == 0) {
          char head[96];
          snprintf(head, sizeof head, "y %016llx  us", hash);
          lines[f] = head;
        }
        lines[f] += buf;
      }
    }
    for (size_t f = 0; f < std::size(forms); ++f) printf("  %-36s %s\n", forms[f].name, lines[f].c_str());
    c.weight.release();
  }
  return 0;
}
