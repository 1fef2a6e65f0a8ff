// Tensor-core GEMM with the 4-bit weight decoded in its main loop (sm_90a, wgmma), for M between the fused
// GEMV's range and the size where dequantize + cuBLAS wins:
//   y[M, N] = x[M, K] · dequant(W)[N, K]^T  (+ y when accumulating), x and y bfloat16.
// Why: dequantize + cuBLAS writes and reads the whole bf16 weight (4x the 4-bit bytes) once more per call; at
// M in the hundreds that traffic is a large share of the time, while the fused GEMV decodes the weight again for
// every 32 rows of x.
//
// Layout: a CTA takes 128 tokens of x and 64 rows of W per warpgroup. Each 64-k stage of x (128-byte
// swizzled, K-major, the wgmma B operand) and of W's packed bytes travels through a cp.async ring in shared
// memory; per-stage mbarriers (full: the copies landed; empty: the consumers' wgmma finished) let the
// warpgroups run out of step, so one decodes while another's wgmma run. A warpgroup decodes its 64 rows
// into the wgmma A fragments in registers: a byte of two codes is one byte permute (its table address), one
// shared-memory load of the bf16 pair and HMUL2 + HFMA2 by the block's scale split into bf16 hi + lo, so each
// weight is bf16(value) * scale rounded once, within one bf16 rounding of what dequantize_4bit writes.
// Split-K (small M · N): three warpgroups share 64 rows and take alternate stages; their sums meet in
// shared memory at the end, where the output tile is staged to read and write y in 16-byte runs.
//
// Constraints (the caller checks gemm_4bit_supported): K % 64 == 0, blocksize a power of two >= 64 (a stage's
// 64 weights of a row share one scale), x and the packed weight 16-byte aligned with contiguous rows.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "qlora/common.cuh"
#include "qlora/pairs.cuh"
#include "qlora/quantize_4bit.cuh"

namespace qlora {

QLORA_HD bool gemm_4bit_supported(int64_t K, int64_t blocksize) { return K % 64 == 0 && blocksize >= 64; }

struct Gemm4bitParams {
  const __nv_bfloat16* x = nullptr;  // [M, K], rows contiguous
  const uint8_t* packed = nullptr;   // [N * K / 2]
  BlockScales scales;
  __nv_bfloat16* y = nullptr;        // [M, N]
  int64_t M = 0, N = 0, K = 0;
  int log2_blocksize = 6;
  bool accumulate = false;           // y += result instead of y = result
};

namespace gemm4bit {

using Bf16 = MmaType<__nv_bfloat16>;

constexpr int kTokens = 128;              // x rows per CTA (wgmma N)
constexpr int kStageK = 64;               // k per stage
constexpr int kStages = 6;
constexpr int kMaxRows = 128;             // W rows per CTA, at most
constexpr int kXStageBytes = kTokens * kStageK * 2;        // 16 KB, a multiple of the 1024-byte swizzle atom
constexpr int kWStageBytes = kMaxRows * kStageK / 2;       // 4 KB
constexpr int kTableBytes = 256 * 256;                     // bf16 pair of byte b for lane l at b * 256 + l * 4
// W rows a CTA takes: 64 a warpgroup, or 64 shared by all of them in the split-K form; the two launch forms.
constexpr int cta_rows(int warpgroups, bool split_k) { return split_k ? 64 : 64 * warpgroups; }
constexpr int kRowFormWarpgroups = 2, kSplitFormWarpgroups = 3;
inline int64_t cta_count(int64_t M, int64_t N, int rows) { return ((N + rows - 1) / rows) * ((M + kTokens - 1) / kTokens); }
constexpr int kSmemBytes = 1024 /* alignment */ + kStages * (kXStageBytes + kWStageBytes) + kTableBytes +
                           256 * 4 /* code2 */ + 2 * kStages * 8 /* barriers */;

__device__ __forceinline__ void mbar_init(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count));
}
__device__ __forceinline__ void mbar_arrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
// Arrives on bar once this thread's earlier cp.async copies have landed.
__device__ __forceinline__ void mbar_arrive_copies(uint32_t bar) {
  asm volatile("cp.async.mbarrier.arrive.noinc.shared::cta.b64 [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void mbar_wait(uint32_t bar, uint32_t parity) {
  uint32_t done = 0;
  do {
    asm volatile(
        "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
        : "=r"(done)
        : "r"(bar), "r"(parity)
        : "memory");
  } while (!done);
}

// K-major B operand with the 128-byte swizzle: 8 token rows of 128 bytes per 1024-byte atom.
__device__ __forceinline__ uint64_t swizzled_descriptor(uint32_t addr) {
  return static_cast<uint64_t>((addr & 0x3FFFF) >> 4) | (static_cast<uint64_t>(1024 >> 4) << 32) |
         (static_cast<uint64_t>(1) << 62);
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void wgmma_fence(uint32_t (&a)[4][4]) {  // every write of a is issued before it
  asm volatile("wgmma.fence.sync.aligned;\n"
               : "+r"(a[0][0]), "+r"(a[0][1]), "+r"(a[0][2]), "+r"(a[0][3]), "+r"(a[1][0]), "+r"(a[1][1]),
                 "+r"(a[1][2]), "+r"(a[1][3]), "+r"(a[2][0]), "+r"(a[2][1]), "+r"(a[2][2]), "+r"(a[2][3]),
                 "+r"(a[3][0]), "+r"(a[3][1]), "+r"(a[3][2]), "+r"(a[3][3])::"memory");
}
__device__ __forceinline__ void wgmma_commit_and_wait() {
  asm volatile("wgmma.commit_group.sync.aligned;\nwgmma.wait_group.sync.aligned 0;\n" ::: "memory");
}
#define QLORA_ACC8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
                      "+f"(d[i + 6]), "+f"(d[i + 7])
// d[64] += A (64x16, registers) · B (16x128, shared memory); fp32 accumulators in the wgmma fragment order.
__device__ __forceinline__ void wgmma_m64n128k16(float (&d)[64], const uint32_t (&a)[4], uint64_t b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"  // scale-d: accumulate into d
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, "
      "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, "
      "%43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "{%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
      : QLORA_ACC8(0), QLORA_ACC8(8), QLORA_ACC8(16), QLORA_ACC8(24), QLORA_ACC8(32), QLORA_ACC8(40),
        QLORA_ACC8(48), QLORA_ACC8(56)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}
#undef QLORA_ACC8
// Keeps the accumulators' uses after the wgmma that wrote them.
__device__ __forceinline__ void fence_accumulators(float (&d)[64]) {
#pragma unroll
  for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
#endif

// kWarpgroups x 64 rows of W a CTA, or (kSplitK) 64 rows with the stages dealt round-robin to the warpgroups.
template <QuantType QT, bool kDoubleQuant, int kWarpgroups, bool kSplitK>
__global__ void __launch_bounds__(128 * kWarpgroups, 1) gemm_4bit_kernel(const Gemm4bitParams p) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kThreads = 128 * kWarpgroups;
  constexpr int kRows = cta_rows(kWarpgroups, kSplitK);
  static_assert(kRows <= kMaxRows, "W stage too small");
  extern __shared__ uint8_t smem_raw[];
  const uint32_t raw = static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw));
  const uint32_t base = (raw + 1023) & ~1023u;  // the swizzle atoms need 1024-byte alignment
  uint8_t* const smem = smem_raw + (base - raw);
  const uint32_t x_ring = base, w_ring = base + kStages * kXStageBytes;
  const uint32_t table = w_ring + kStages * kWStageBytes;
  float* const code2_s = reinterpret_cast<float*>(smem + (table - base) + kTableBytes);
  const uint32_t barriers = table + kTableBytes + 256 * 4;
  auto full = [&](int slot) { return barriers + 8 * slot; };
  auto empty = [&](int slot) { return barriers + 8 * (kStages + slot); };

  const int tid = threadIdx.x, lane = tid % 32, warpgroup = tid / 128, warp = (tid / 32) % 4;
  const int64_t n_base = static_cast<int64_t>(blockIdx.x) * kRows, m_base = static_cast<int64_t>(blockIdx.y) * kTokens;
  const int stages = static_cast<int>(p.K / kStageK);

  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      mbar_init(full(s), kThreads);
      mbar_init(empty(s), kSplitK ? 128 : kThreads);
    }
    asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory");
  }
  __syncthreads();

  // Copy roles. x: 16-byte granule i of a stage is token row i / 8, chunk i % 8, stored at chunk (i % 8) ^ (row % 8)
  // (the 128-byte swizzle); rows past M repeat row M - 1. W: two granules per row, rows past N repeat row N - 1.
  constexpr int kXGranules = kTokens * kStageK * 2 / 16;
  constexpr int kXCopies = (kXGranules + kThreads - 1) / kThreads;
  const __nv_bfloat16* x_src[kXCopies];
  uint32_t x_dst[kXCopies];
#pragma unroll
  for (int c = 0; c < kXCopies; ++c) {
    const int i = min(tid + kThreads * c, kXGranules - 1), row = i / 8, chunk = i % 8;
    x_src[c] = p.x + min(m_base + row, p.M - 1) * p.K + chunk * 8;
    x_dst[c] = row * 128 + ((chunk ^ (row % 8)) * 16);
  }
  const int w_row = tid / 2;
  const uint8_t* w_src = p.packed + min(n_base + w_row, p.N - 1) * (p.K / 2) + (tid % 2) * 16;
  const uint32_t w_dst = w_row * 32 + (tid % 2) * 16;
  auto issue = [&](int stage) {
    const int slot = stage % kStages;
    if (stage >= kStages) mbar_wait(empty(slot), (stage / kStages - 1) & 1);
#pragma unroll
    for (int c = 0; c < kXCopies; ++c)
      if (tid + kThreads * c < kXGranules) cp_async16(x_ring + slot * kXStageBytes + x_dst[c], x_src[c] + stage * kStageK);
    if (w_row < kRows) cp_async16(w_ring + slot * kWStageBytes + w_dst, w_src + stage * (kStageK / 2));
    mbar_arrive_copies(full(slot));
  };
  constexpr int kAhead = kStages - 2;  // stages in flight beyond the one being consumed
  int issued = 0;
  while (issued < stages && issued < kAhead) issue(issued++);

  {
    const float* values = QT == QuantType::NF4 ? kNF4ValuesDevice : kFP4ValuesDevice;
    uint32_t* t = reinterpret_cast<uint32_t*>(smem + (table - base));
    for (int i = tid; i < 256 * 32; i += kThreads) t[(i / 32) * 64 + i % 32] = as_u32(Bf16::pair(values[i / 32 >> 4], values[i / 32 & 15]));
    if (kDoubleQuant)
      for (int i = tid; i < 256; i += kThreads) code2_s[i] = p.scales.code2[i];
  }
  __syncthreads();
  const float mean = kDoubleQuant ? *p.scales.offset : 0.0f;

  // Fragment rows of this thread: r0 and r0 + 8 of its warp's 16; its byte of each 4-byte word is lane % 4.
  const int r0 = (kSplitK ? 0 : warpgroup * 64) + warp * 16 + lane / 4;
  const int64_t element0 = min(n_base + r0, p.N - 1) * p.K, element1 = min(n_base + r0 + 8, p.N - 1) * p.K;
  // A scale's loads are issued two stages ahead of its use: (qabsmax, absmax2) or (0, absmax).
  struct RawScale {
    uint32_t code;
    float value;
  };
  auto load_scale = [&](int64_t element) {
    const int64_t block = element >> p.log2_blocksize;
    if constexpr (kDoubleQuant)
      return RawScale{__ldg(p.scales.qabsmax + block), __ldg(p.scales.absmax2 + block / kAbsmaxBlocksize)};
    else
      return RawScale{0u, __ldg(p.scales.absmax + block)};
  };
  auto scale_of = [&](RawScale r) { return kDoubleQuant ? mul_then_add(code2_s[r.code], r.value, mean) : r.value; };
  const uint32_t lane_bytes = lane * 4, selector = 0x5504u | ((lane % 4) << 4);  // (lane * 4, byte lane % 4, 0, 0)
  auto decode = [&](uint32_t word, const SplitScale<__nv_bfloat16>& scale) {
    uint32_t bits;
    asm("ld.shared.b32 %0, [%1];\n" : "=r"(bits) : "r"(table + __byte_perm(word, lane_bytes, selector)));
    return scaled_pair<__nv_bfloat16>(*reinterpret_cast<const Bf16::Pair*>(&bits), scale);
  };

  float acc[64];
#pragma unroll
  for (int i = 0; i < 64; ++i) acc[i] = 0.0f;
  const int first = kSplitK ? warpgroup : 0, step = kSplitK ? kWarpgroups : 1;
  auto stage_k = [&](int stage) { return static_cast<int64_t>(min(stage, stages - 1)) * kStageK; };
  RawScale now0 = load_scale(element0 + stage_k(first)), now1 = load_scale(element1 + stage_k(first));
  RawScale next0 = load_scale(element0 + stage_k(first + step)), next1 = load_scale(element1 + stage_k(first + step));
  for (int k = first; k < stages; k += step) {
    while (issued < stages && issued <= k + kAhead) issue(issued++);
    const float s0 = scale_of(now0), s1 = scale_of(now1);
    now0 = next0;
    now1 = next1;
    next0 = load_scale(element0 + stage_k(k + 2 * step));
    next1 = load_scale(element1 + stage_k(k + 2 * step));
    const int slot = k % kStages;
    mbar_wait(full(slot), (k / kStages) & 1);
    // cp.async wrote through the generic proxy; wgmma reads through the async proxy.
    asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
    const uint8_t* w_stage = smem + (w_ring - base) + slot * kWStageBytes;
    const uint4 a_lo = *reinterpret_cast<const uint4*>(w_stage + r0 * 32);
    const uint4 a_hi = *reinterpret_cast<const uint4*>(w_stage + r0 * 32 + 16);
    const uint4 b_lo = *reinterpret_cast<const uint4*>(w_stage + (r0 + 8) * 32);
    const uint4 b_hi = *reinterpret_cast<const uint4*>(w_stage + (r0 + 8) * 32 + 16);
    const uint32_t row0[8] = {a_lo.x, a_lo.y, a_lo.z, a_lo.w, a_hi.x, a_hi.y, a_hi.z, a_hi.w};
    const uint32_t row1[8] = {b_lo.x, b_lo.y, b_lo.z, b_lo.w, b_hi.x, b_hi.y, b_hi.z, b_hi.w};
    const SplitScale<__nv_bfloat16> scale0 = split_scale<__nv_bfloat16>(s0), scale1 = split_scale<__nv_bfloat16>(s1);
    uint32_t a[4][4];  // k16 step j: rows r0 / r0 + 8, k 16j + 2c.. and 16j + 8 + 2c..
#pragma unroll
    for (int j = 0; j < 4; ++j) {
      a[j][0] = decode(row0[2 * j], scale0);
      a[j][1] = decode(row1[2 * j], scale1);
      a[j][2] = decode(row0[2 * j + 1], scale0);
      a[j][3] = decode(row1[2 * j + 1], scale1);
    }
    wgmma_fence(a);
#pragma unroll
    for (int j = 0; j < 4; ++j) wgmma_m64n128k16(acc, a[j], swizzled_descriptor(x_ring + slot * kXStageBytes + 32 * j));
    wgmma_commit_and_wait();
    fence_accumulators(acc);
    mbar_arrive(empty(slot));
  }
  while (issued < stages) issue(issued++);  // a warpgroup that finished early still owes its share of the copies
  asm volatile("cp.async.wait_all;\n" ::: "memory");

  // Epilogue through shared memory, so that y is read and written in 16-byte runs of one token rather than the
  // fragments' scattered 2-byte outputs (whose read-modify-writes would serialize). Split-K: one slice per
  // warpgroup, summed in warpgroup order.
  __syncthreads();  // every stage consumed and every copy landed: the rings are free
  constexpr int kStride = kRows + 4;  // floats per token row: the fragment writes of a warp hit 32 banks
  constexpr int kSlices = kSplitK ? kWarpgroups : 1;
  static_assert(kSlices * kTokens * kStride * 4 <= kStages * (kXStageBytes + kWStageBytes), "tile exceeds the rings");
  float* const tile = reinterpret_cast<float*>(smem);
  {
    float* slice = tile + (kSplitK ? warpgroup : 0) * kTokens * kStride;
#pragma unroll
    for (int j = 0; j < 16; ++j)  // accumulator 4j + e: row r0 (+ 8 for e >= 2), token 8j + 2 (lane % 4) (+ 1 for odd e)
#pragma unroll
      for (int e = 0; e < 4; ++e) slice[(8 * j + 2 * (lane % 4) + (e & 1)) * kStride + r0 + (e >= 2 ? 8 : 0)] = acc[4 * j + e];
  }
  __syncthreads();
  constexpr int kRunsPerToken = kRows / 8;
  for (int run = tid; run < kTokens * kRunsPerToken; run += kThreads) {
    const int token = run / kRunsPerToken, n_local = (run % kRunsPerToken) * 8;
    const int64_t m = m_base + token, n = n_base + n_local;
    if (m >= p.M || n >= p.N) continue;
    float v[8];
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      v[i] = tile[token * kStride + n_local + i];
#pragma unroll
      for (int sl = 1; sl < kSlices; ++sl) v[i] += tile[(sl * kTokens + token) * kStride + n_local + i];
    }
    __nv_bfloat16* const out = p.y + m * p.N + n;
    if (n + 8 <= p.N && reinterpret_cast<uintptr_t>(out) % 16 == 0) {
      uint4 bits = p.accumulate ? *reinterpret_cast<const uint4*>(out) : make_uint4(0, 0, 0, 0);
      __nv_bfloat162* pairs = reinterpret_cast<__nv_bfloat162*>(&bits);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 old = __bfloat1622float2(pairs[i]);
        pairs[i] = __floats2bfloat162_rn(v[2 * i] + old.x, v[2 * i + 1] + old.y);
      }
      *reinterpret_cast<uint4*>(out) = bits;
    } else {
      for (int i = 0; i < 8 && n + i < p.N; ++i)
        out[i] = __float2bfloat16_rn(v[i] + (p.accumulate ? __bfloat162float(out[i]) : 0.0f));
    }
  }
#else
  __trap();  // built without sm_90a code: gemm_4bit_built() is false and the launcher refuses
#endif
}

// The split-K form where the row form would fill less than three quarters of the SMs: measured on the H200
// (2026-11-28, standalone program, µs), M = 128 8192x28672 split 189 vs rows 317; M = 256 8192x28672
// (128 CTAs of rows) 370 vs 314.
inline bool gemm_4bit_split_k(int64_t M, int64_t N, int num_sms) {
  return 4 * cta_count(M, N, cta_rows(kRowFormWarpgroups, false)) < 3 * static_cast<int64_t>(num_sms);
}

// CTAs of the launch gemm_4bit_split_k picks.
inline int64_t gemm_4bit_ctas(int64_t M, int64_t N, int num_sms) {
  return gemm_4bit_split_k(M, N, num_sms) ? cta_count(M, N, cta_rows(kSplitFormWarpgroups, true))
                                          : cta_count(M, N, cta_rows(kRowFormWarpgroups, false));
}

template <QuantType QT, bool kDoubleQuant, int kWarpgroups, bool kSplitK>
cudaError_t launch_as(const Gemm4bitParams& p, cudaStream_t stream) {
  auto kernel = gemm_4bit_kernel<QT, kDoubleQuant, kWarpgroups, kSplitK>;
  const cudaError_t attribute = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (attribute != cudaSuccess) return attribute;
  constexpr int rows = cta_rows(kWarpgroups, kSplitK);
  const dim3 grid(static_cast<unsigned>((p.N + rows - 1) / rows), static_cast<unsigned>((p.M + kTokens - 1) / kTokens));
  kernel<<<grid, 128 * kWarpgroups, kSmemBytes, stream>>>(p);
  return cudaGetLastError();
}

template <QuantType QT, bool kDoubleQuant>
cudaError_t launch_for(const Gemm4bitParams& p, int num_sms, cudaStream_t stream) {
  return gemm_4bit_split_k(p.M, p.N, num_sms) ? launch_as<QT, kDoubleQuant, kSplitFormWarpgroups, true>(p, stream)
                                              : launch_as<QT, kDoubleQuant, kRowFormWarpgroups, false>(p, stream);
}

}  // namespace gemm4bit

// Whether the launch is one wave that fills at least three quarters of the SMs: the kernel's time is its waves
// times a CTA's, and measured against dequantize + cuBLAS it wins only there (H200, 2026-11-28, r = 16,
// `python -m bench --only lora_linear`, forward µs with the LoRA term, tensor-core vs dequantize + cuBLAS):
// 8192x28672 M = 128 (128 CTAs) 213.7 vs 298.1, M = 256 (128) 337.8 vs 357.3; 8192x8192 M = 256 (128) 114.2
// vs 113.3; 4096x4096 M = 128 (64) 46.6 vs 42.6; 28672x8192 M = 256 (448, 3.4 waves) 397.7 vs 372.4.
inline bool gemm_4bit_fills_one_wave(int64_t M, int64_t N, int num_sms) {
  const int64_t ctas = gemm4bit::gemm_4bit_ctas(M, N, num_sms);
  return 4 * ctas >= 3 * static_cast<int64_t>(num_sms) && ctas <= num_sms;
}

// Only for bfloat16, gemm_4bit_supported layouts and a device the sm_90a code runs on (the caller checks).
inline cudaError_t launch_gemm_4bit(const Gemm4bitParams& p, QuantType quant_type, int num_sms, cudaStream_t stream) {
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  if (!gemm_4bit_supported(p.K, int64_t{1} << p.log2_blocksize) || (p.M + gemm4bit::kTokens - 1) / gemm4bit::kTokens > 65535)
    return cudaErrorInvalidValue;
  const bool dq = p.scales.absmax == nullptr;
  if (quant_type == QuantType::NF4)
    return dq ? gemm4bit::launch_for<QuantType::NF4, true>(p, num_sms, stream)
              : gemm4bit::launch_for<QuantType::NF4, false>(p, num_sms, stream);
  return dq ? gemm4bit::launch_for<QuantType::FP4, true>(p, num_sms, stream)
            : gemm4bit::launch_for<QuantType::FP4, false>(p, num_sms, stream);
}

}  // namespace qlora
