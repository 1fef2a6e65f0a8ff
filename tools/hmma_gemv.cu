// An M = 1 GEMV prototype against the library's small-M op (LoRA off), timed as the benchmarks time (256 MB written
// before each run), NF4 with double quantization, blocksize 64, bf16.
//
// Each warp owns a tile of 16 rows and a K split. The packed bytes go straight from global memory into registers
// (no shared-memory ring), Q - 1 groups of four 64-blocks in flight a warp while one is decoded. mma.sync m16n8k16
// takes the decoded weights as A; each k16 step lies inside one 64-block, so the block's scale multiplies the step
// sums once (two FFMA a block). From the row-major bytes (bitsandbytes' layout) a lane takes 8 bytes of a block row
// in one load, its k slots a permutation of K (x read to match); from the tiled copy (tile_order) a warp's loads
// are 512 contiguous bytes and K keeps its order.
// A byte of two codes is one PRMT (its address in a per-lane table of bf16 pairs, rows 256 bytes apart) and one LDS.
// x of the CTA's K split is staged once in shared memory.
//
//   nvcc -O3 -std=c++20 --expt-relaxed-constexpr -arch=sm_90a -I csrc/include -I tools -diag-suppress 177 \
//     tools/hmma_gemv.cu -o /tmp/hmma_gemv && /tmp/hmma_gemv 8192,28672,1 28672,8192,1 4096,4096,1
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "qlora/lora_gemv_tiled.cuh"
#include "flushed_timing.cuh"
#include "tool_host.cuh"

using namespace qlora;
using bf16 = __nv_bfloat16;

namespace {

constexpr int kTableBytes = kLanePairTableBytes;
constexpr int kFixedShared = kTableBytes + 256 * 4;

struct Weight {
  const uint8_t* packed;
  const uint8_t* qabsmax;
  const float* absmax2;
  const float* code2;
  const float* offset;
  int64_t N, K;
};

// Four consecutive 64-blocks of a lane's two rows (g and g + 8 of the tile): 8 bytes of each block row, the four
// blocks' code bytes of each row in one word, and each row's second-level scale (one for the four).
struct Quad {
  uint2 w[2][4];
  uint32_t q[2];
  float a2[2];
};

__device__ __forceinline__ uint2 load_streaming(const uint8_t* p) {
  uint2 v;
  asm volatile("ld.global.nc.L1::no_allocate.v2.u32 {%0, %1}, [%2];\n" : "=r"(v.x), "=r"(v.y) : "l"(p));
  return v;
}

// kTiled: the packed bytes in tile order (see tile_order): a warp's four loads of a quad read 2 KB in a row.
// kAhead: a quad's next loads go out before it is decoded (kQuads in flight, one more quad of registers).
// kReadOnly: timing only, the words summed instead of decoded (what the loads alone cost).
template <int kWarps, int kQuads, int kMinCtas, bool kTiled, bool kAhead = false, bool kReadOnly = false>
__global__ void __launch_bounds__(kWarps * 32, kMinCtas)
    hmma_gemv_kernel(const bf16* __restrict__ x, Weight wt, int splits, float* partial, bf16* y) {
  extern __shared__ __align__(16) uint8_t smem[];
  const int tid = threadIdx.x, lane = tid % 32, warp = tid / 32;
  uint32_t* table = reinterpret_cast<uint32_t*>(smem);
  float* code2 = reinterpret_cast<float*>(smem + kTableBytes);
  uint16_t* xs = reinterpret_cast<uint16_t*>(smem + kFixedShared);
  fill_lane_pair_table<bf16>(table, [](int code) { return kNF4ValuesDevice[code]; }, tid, kWarps * 32);
  for (int i = tid; i < 256; i += kWarps * 32) code2[i] = wt.code2[i];
  const int64_t blocks_per_row = wt.K / 64;
  const int split_blocks = static_cast<int>(blocks_per_row / splits);
  const int ctas_per_split = gridDim.x / splits;
  const int split = blockIdx.x / ctas_per_split;
  const int64_t b_begin = static_cast<int64_t>(split) * split_blocks;
  if constexpr (kTiled) {  // natural k: lane t's pairs 8s + t and 8s + t + 4 of a block (step s), side by side
    const uint32_t* src = reinterpret_cast<const uint32_t*>(x + b_begin * 64);
    uint32_t* dst = reinterpret_cast<uint32_t*>(xs);
    for (int i = tid; i < split_blocks * 32; i += kWarps * 32) {
      const int block = i / 32, lane_t = i % 32 / 8, pair = i % 8;
      dst[i] = src[block * 32 + 8 * (pair / 2) + lane_t + 4 * (pair % 2)];
    }
  } else {
    const uint4* src = reinterpret_cast<const uint4*>(x + b_begin * 64);
    uint4* dst = reinterpret_cast<uint4*>(xs);
    for (int i = tid; i < split_blocks * 8; i += kWarps * 32) dst[i] = src[i];
  }
  __syncthreads();
  const int64_t tile = static_cast<int64_t>(blockIdx.x % ctas_per_split) * kWarps + warp;
  if (tile * 16 >= wt.N) return;
  const int g = lane / 4, t = lane % 4;
  const int64_t r0 = tile * 16 + g;
  const int64_t row_bytes = wt.K / 2;
  const uint8_t* w_at[2] = {wt.packed + r0 * row_bytes + b_begin * 32 + 8 * t,
                            wt.packed + (r0 + 8) * row_bytes + b_begin * 32 + 8 * t};
  const int64_t block_at[2] = {r0 * blocks_per_row + b_begin, (r0 + 8) * blocks_per_row + b_begin};
  const int quads = split_blocks / 4;
  const uint8_t* tiled_at = wt.packed + (tile * (blocks_per_row / 4) + b_begin / 4) * 2048 + lane * 16;
  auto load = [&](Quad& qd, int quad) {
    if constexpr (kTiled) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const uint4 v = load_streaming16(tiled_at + quad * 2048 + c * 512);
        qd.w[c / 2][2 * (c % 2)] = make_uint2(v.x, v.y);
        qd.w[c / 2][2 * (c % 2) + 1] = make_uint2(v.z, v.w);
      }
    }
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      if constexpr (!kTiled) {
#pragma unroll
        for (int j = 0; j < 4; ++j) qd.w[h][j] = load_streaming(w_at[h] + (4 * quad + j) * 32);
      }
      const int64_t block = block_at[h] + 4 * quad;
      qd.q[h] = __ldg(reinterpret_cast<const uint32_t*>(wt.qabsmax + block));
      qd.a2[h] = __ldg(wt.absmax2 + (block >> 8));
    }
  };
  const uint32_t table_base = static_cast<uint32_t>(__cvta_generic_to_shared(table));
  const uint32_t lane4 = lane * 4;
  const float mean = *wt.offset;
  float acc[2] = {0.0f, 0.0f};
  Quad ring[kQuads];
#pragma unroll
  for (int i = 0; i < kQuads; ++i)
    if (i < quads) load(ring[i], i);
  for (int base = 0; base < quads; base += kQuads) {
#pragma unroll
    for (int i = 0; i < kQuads; ++i) {
      const int quad = base + i;
      if (quad >= quads) break;
      auto decode = [&](const Quad& qd) {
        if constexpr (kReadOnly) {
#pragma unroll
          for (int h = 0; h < 2; ++h)
#pragma unroll
            for (int j = 0; j < 4; ++j) acc[h] += __uint_as_float((qd.w[h][j].x ^ qd.w[h][j].y) & 0x3fffffffu);
        } else {
#pragma unroll
          for (int j = 0; j < 4; ++j) {
            const int block = 4 * quad + j;
            float d[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            // both orders: a lane's 8 bytes of a block row pair with x's words 8t .. 8t + 7 as staged above
            tiled_block_mma<bf16>(d, table_base, qd.w[0][j], qd.w[1][j],
                                  reinterpret_cast<const uint32_t*>(xs) + block * 32 + 8 * t, lane4, true);
#pragma unroll
            for (int h = 0; h < 2; ++h) {
              const float scale = code2[(qd.q[h] >> (8 * j)) & 255] * qd.a2[h] + mean;
              acc[h] = fmaf(scale, d[2 * h], acc[h]);
            }
          }
        }
      };
      if constexpr (kAhead) {
        const Quad qd = ring[i];
        if (quad + kQuads < quads) load(ring[i], quad + kQuads);
        decode(qd);
      } else {
        decode(ring[i]);
        if (quad + kQuads < quads) load(ring[i], quad + kQuads);  // kQuads - 1 quads stay in flight meanwhile
      }
    }
  }
  if (t == 0) {
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int64_t n = r0 + 8 * h;
      if (splits == 1)
        y[n] = __float2bfloat16_rn(acc[h]);
      else
        partial[split * wt.N + n] = acc[h];
    }
  }
}

__global__ void sum_splits(const float* partial, int splits, int64_t N, bf16* y) {
  const int64_t n = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (n >= N) return;
  float v = 0.0f;
  for (int s = 0; s < splits; ++s) v += partial[s * N + n];
  y[n] = __float2bfloat16_rn(v);
}

// The packed bytes of row-major [N, K / 2] in the order the tiled kernel reads them: for each 16-row tile and each
// quad of four 64-blocks, four chunks of 512 bytes, chunk c = (h, p) holding for lane l = 4g + t the 8 bytes of
// lane t in blocks 2p and 2p + 1 of row 16·tile + g + 8h. Lane t's bytes of a block row are t, t + 4, ..., t + 28:
// byte 2s + e of them holds k = 16s + 2t + 8e and the next, the k of the mma A fragment of lane (g, t) at k16 step s
// in natural order (as wgmma's register A fragment too), so x needs no permutation in memory.
std::vector<uint8_t> tile_order(const std::vector<uint8_t>& packed, int64_t N, int64_t K) {
  std::vector<uint8_t> out(packed.size());
  const int64_t quads = K / 256;
  size_t o = 0;
  for (int64_t tile = 0; tile < N / 16; ++tile)
    for (int64_t quad = 0; quad < quads; ++quad)
      for (int c = 0; c < 4; ++c)
        for (int lane = 0; lane < 32; ++lane)
          for (int i = 0; i < 16; ++i) {
            const int64_t row = tile * 16 + lane / 4 + 8 * (c / 2), block = 4 * quad + 2 * (c % 2) + i / 8;
            out[o++] = packed[row * (K / 2) + block * 32 + lane % 4 + 4 * (i % 8)];
          }
  return out;
}

struct Config {
  int warps, quads, min_ctas, splits;
  bool tiled, ahead, read_only;
};

template <int kWarps, int kQuads, int kMinCtas, bool kTiled, bool kAhead = false, bool kReadOnly = false>
cudaError_t launch(const bf16* x, const Weight& wt, int splits, float* partial, bf16* y) {
  constexpr auto kernel = hmma_gemv_kernel<kWarps, kQuads, kMinCtas, kTiled, kAhead, kReadOnly>;
  constexpr int kMostShared = 227 * 1024;  // the most a CTA may opt in to on sm_90, asked for once, not every launch
  const int shared = kFixedShared + static_cast<int>(wt.K / splits) * 2;
  if (shared > kMostShared) return cudaErrorInvalidValue;
  const cudaError_t opted = opt_in_dynamic_smem<kernel>(kMostShared);
  if (opted != cudaSuccess) return opted;
  const int64_t tiles = wt.N / 16;
  const int ctas_per_split = static_cast<int>((tiles + kWarps - 1) / kWarps);
  kernel<<<ctas_per_split * splits, kWarps * 32, shared>>>(x, wt, splits, partial, y);
  if (splits > 1) sum_splits<<<static_cast<unsigned>((wt.N + 255) / 256), 256>>>(partial, splits, wt.N, y);
  return cudaGetLastError();
}

cudaError_t launch_config(const Config& c, const bf16* x, const Weight& wt, float* partial, bf16* y) {
#define QLORA_CONFIG(W, Q, C, T, A, R)                                                                          \
  if (c.warps == W && c.quads == Q && c.min_ctas == C && c.tiled == T && c.ahead == A && c.read_only == R) \
    return launch<W, Q, C, T, A, R>(x, wt, c.splits, partial, y);
  QLORA_CONFIG(16, 3, 1, false, false, false)
  QLORA_CONFIG(14, 3, 1, false, false, false)
  QLORA_CONFIG(16, 3, 1, true, false, false)
  QLORA_CONFIG(14, 3, 1, true, false, false)
  QLORA_CONFIG(8, 3, 2, true, false, false)
  QLORA_CONFIG(7, 3, 2, true, false, false)
  QLORA_CONFIG(16, 2, 1, true, true, false)
  QLORA_CONFIG(14, 2, 1, true, true, false)
  QLORA_CONFIG(16, 3, 1, true, true, false)
  QLORA_CONFIG(14, 3, 1, true, true, false)
  QLORA_CONFIG(16, 3, 1, true, false, true)
  QLORA_CONFIG(14, 3, 1, true, false, true)
  QLORA_CONFIG(16, 3, 1, false, false, true)
  QLORA_CONFIG(14, 3, 1, false, false, true)
#undef QLORA_CONFIG
  return cudaErrorInvalidValue;
}

}  // namespace

int main(int argc, char** argv) {
  setvbuf(stdout, nullptr, _IONBF, 0);
  const int sms = sm_count_or_complain(argv[0]);
  if (sms == 0) return 1;
  std::vector<std::array<int64_t, 3>> shapes = {{8192, 28672, 1}, {28672, 8192, 1}, {4096, 4096, 1}, {8192, 8192, 1}};
  if (!gemm_shapes_from_args(argc, argv, 1, &shapes)) return 1;
  char* flush = nullptr;
  cudaMalloc(&flush, kFlushBytes);
  for (const auto& shape : shapes) {
    const int64_t N = shape[0], K = shape[1], M = shape[2];
    if (M != 1 || N % 16 != 0 || K % 256 != 0) {
      printf("%lldx%lld M=%lld: the prototype takes M = 1, N a multiple of 16, K of 256\n", (long long)N,
             (long long)K, (long long)M);
      continue;
    }
    std::mt19937 rng(1);
    const DqWeightSample sample = dq_weight_sample(N, K, M, rng);
    Weight wt{device_copy(sample.packed), device_copy(sample.qabsmax), device_copy(sample.absmax2),
              device_copy(sample.code2), device_copy(std::vector<float>{sample.offset}), N, K};
    const uint8_t* tiled_packed = device_copy(tile_order(sample.packed, N, K));
    bf16* x = reinterpret_cast<bf16*>(device_copy(sample.x));
    bf16* y;
    cudaMalloc(&y, N * 2);
    float* partial;
    cudaMalloc(&partial, 64 * N * 4);
    auto report = [&](const char* name, auto run) {
      cudaMemset(y, 0, N * 2);
      if (run() != cudaSuccess || cudaDeviceSynchronize() != cudaSuccess) {
        printf("  %-34s failed: %s\n", name, cudaGetErrorString(cudaGetLastError()));
        return;
      }
      const std::vector<uint16_t> hy = host_copy(y, N);
      const float us = flushed_median_us(flush, [&] { run(); }, 60, 10);
      double max_err = 0, max_ref = 0;
      for (int i = 0; i < 256; ++i) {
        const int64_t n = (N - 1) * i / 255;
        const double ref = nf4_dq_row_dot(sample, n, K, [&](int64_t k) { return from_bf16(sample.x[k]); });
        max_err = std::max(max_err, std::fabs(from_bf16(hy[n]) - ref));
        max_ref = std::max(max_ref, std::fabs(ref));
      }
      printf("  %-56s %7.1f us  %5.0f GB/s  err %.2e\n", name, us, (N * K / 2.0 + N * K / 64.0) / us / 1e3,
             max_err / max_ref);
    };
    printf("%lldx%lld M=1\n", (long long)N, (long long)K);
    {
      LoraLinearPlan plan;
      if (plan_lora_linear_4bit<bf16>(M, N, K, 0, 6, QuantType::NF4, sms, true, &plan) == cudaSuccess) {
        float* scratch;
        cudaMalloc(&scratch, std::max<int64_t>(plan.scratch_floats, 1) * 4);
        LoraLinearParams<bf16> p{};
        p.x = x;
        p.packed = wt.packed;
        p.scales.qabsmax = wt.qabsmax;
        p.scales.absmax2 = wt.absmax2;
        p.scales.code2 = wt.code2;
        p.scales.offset = wt.offset;
        p.y = y;
        p.M = M;
        p.N = N;
        p.K = K;
        p.log2_blocksize = 6;
        report("library op", [&] {
          return launch_lora_linear_4bit<bf16>(p, plan, nullptr, nullptr, scratch, QuantType::NF4, sms, 0);
        });
        cudaFree(scratch);
      }
    }
    const int64_t tiles = N / 16, quads_per_row = K / 256;
    for (const int warps : {16, 14, 8, 7}) {
      const int min_ctas = warps > 8 ? 1 : 2;
      const int64_t ctas_per_split = (tiles + warps - 1) / warps;
      for (int splits = 1; splits <= 16; ++splits) {
        if (quads_per_row % splits != 0 || ctas_per_split * splits > static_cast<int64_t>(sms) * min_ctas) continue;
        if (2 * ctas_per_split * splits < static_cast<int64_t>(sms) * min_ctas) continue;  // under half the slots
        // {quads, tiled, ahead, read only}
        const int variants[][4] = {{3, 0, 0, 0}, {3, 1, 0, 0}, {2, 1, 1, 0}, {3, 1, 1, 0}, {3, 1, 0, 1}, {3, 0, 0, 1}};
        for (const auto& v : variants) {
          const Config c{warps, v[0], min_ctas, splits, v[1] != 0, v[2] != 0, v[3] != 0};
          if (warps <= 8 && (!c.tiled || c.ahead || c.read_only)) continue;
          Weight w = wt;
          if (c.tiled) w.packed = tiled_packed;
          char name[96];
          snprintf(name, sizeof name, "%d warps x %d CTAs, %d quads, %d split(s)%s%s%s", warps, min_ctas, c.quads,
                   splits, c.tiled ? ", tiled" : "", c.ahead ? ", ahead" : "", c.read_only ? ", READ ONLY" : "");
          report(name, [&] { return launch_config(c, x, w, partial, y); });
        }
      }
    }
    cudaFree((void*)wt.packed); cudaFree((void*)wt.qabsmax); cudaFree((void*)wt.absmax2); cudaFree((void*)wt.code2);
    cudaFree((void*)wt.offset); cudaFree((void*)tiled_packed); cudaFree(x); cudaFree(y); cudaFree(partial);
  }
  return 0;
}
