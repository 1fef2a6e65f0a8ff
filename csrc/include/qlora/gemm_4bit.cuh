// Tensor-core GEMM with the 4-bit weight decoded in its main loop (sm_90a, wgmma), for M between the fused
// GEMV's range and the size where dequantize + cuBLAS wins:
//   y[M, N] = x[M, K] · dequant(W)[N, K]^T (+ s · xa · lora_Bᵀ) (+ bias), x and y bfloat16.
// Why: dequantize + cuBLAS writes and reads the whole bf16 weight (4x the 4-bit bytes) once more per call; at
// M in the hundreds that traffic is a large share of the time, while the fused GEMV decodes the weight again for
// every 32 rows of x.
//
// Layout: a CTA takes 16, 32, 64 or 128 tokens of x (tokens_for: the smallest tile that holds M) and 64 rows of W
// per warpgroup; above 128 tokens, where the grid fills the GPU, 256 tokens and 128 rows (gemm_4bit_wide_tiles_pay:
// a producer warpgroup gives its registers to the two consumers, and K may be split over a cluster of two CTAs
// whose fp32 tiles are summed through distributed shared memory). Producer warps bring each 64-k stage of x
// (128-byte swizzled by the copy engine, K-major, the wgmma B operand) and of W's packed bytes into a ring in
// shared memory with TMA tensor copies; per-stage
// mbarriers (full: the bytes landed; empty: the consumers' wgmma finished) let the warpgroups run out of
// step, so one decodes while another's wgmma run, and the consumer threads spend no instructions on copies.
// A warpgroup decodes its 64 rows into the wgmma A fragments in registers: a byte of two codes is one byte
// permute (its table address), one shared-memory load of the bf16 pair and HMUL2 + HFMA2 by the block's scale
// split into bf16 hi + lo, so each weight is bf16(value) * scale rounded once, within one bf16 rounding of what
// dequantize_4bit writes.
// Split-K (small M · N): three or four warpgroups (split_form_warpgroups) share 64 rows and take alternate
// stages; their sums meet in shared memory at the end, where the output tile is staged to read and write y in
// 16-byte runs. Where even that grid leaves most SMs idle (N = 4096: 64 CTAs), K is also split over a cluster of
// two CTAs, as for the 256-token tiles.
// Stream-K (256-token tiles, and the split form's small token tiles where K is long, whose last wave would be less
// than 90 % full: gemm_4bit_stream_k_ctas): one CTA an SM takes an even span of all tiles' stages; a tile split
// between two CTAs is finished by the second to arrive, which adds the first's fp32 sums from a global workspace
// (Gemm4bitParams::stream_k_partials).
//
// Constraints (the caller checks gemm_4bit_supported): K % 64 == 0, blocksize a power of two >= 64 (a stage's
// 64 weights of a row share one scale), x and the packed weight 16-byte aligned with contiguous rows (the
// tensor maps' rules).
#pragma once

#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>
#include <cudaTypedefs.h>

#include <cstdint>
#include <type_traits>

#include "qlora/common.cuh"
#include "qlora/l2_policy.h"
#include "qlora/launch.cuh"
#include "qlora/mbarrier.cuh"
#include "qlora/pairs.cuh"
#include "qlora/quantize_4bit.cuh"
#include "qlora/tile_order.h"

namespace qlora {

QLORA_HD bool gemm_4bit_supported(int64_t K, int64_t blocksize) { return K % 64 == 0 && blocksize >= 64; }

struct Gemm4bitParams {
  const __nv_bfloat16* x = nullptr;  // [M, K], rows contiguous
  const uint8_t* packed = nullptr;   // [N * K / 2]
  bool tile_order = false;           // packed in tile order (qlora/tile_order.h), else row-major
  BlockScales scales;
  __nv_bfloat16* y = nullptr;        // [M, N]
  int64_t M = 0, N = 0, K = 0;
  int log2_blocksize = 6;
  // Optional, added to the fp32 tile before y's one rounding: the LoRA term lora_scale·xa·lora_Bᵀ, where the
  // caller computes xa = x_lora·Aᵀ in the launch just before (the kernel is its programmatic dependent), and a bias.
  const __nv_bfloat16* xa = nullptr;      // [M, r], rows contiguous
  const __nv_bfloat16* lora_B = nullptr;  // [N, r], rows contiguous
  int r = 0;                              // 0: no LoRA term
  float lora_scale = 0.0f;
  const __nv_bfloat16* bias = nullptr;    // [N]
  // The stream-K form in stream_k_ctas CTAs (gemm_4bit_stream_k_ctas; 0: not), with its
  // workspace: stream_k_partial_floats(stream_k_ctas) floats and as many counters, zero before the launch (a launch
  // leaves them zero).
  int stream_k_ctas = 0;
  float* stream_k_partials = nullptr;
  unsigned* stream_k_arrivals = nullptr;
};

namespace gemm4bit {

// What the kernel takes: the tensor maps of x ([M, K] bf16, box 64 k x tile_rows tokens, 128-byte swizzle: one
// for the full token tiles, one for the last) and of the packed weight ([N, K / 2] bytes, box 32 bytes x the
// CTA's rows), built on the host for each launch.
struct KernelArgs {
  CUtensorMap x_map;
  CUtensorMap x_last_map;
  CUtensorMap w_map;
  Gemm4bitParams p;
  // Stream-K (stream_k_tiles > 0): the grid's CTAs take equal spans of all tiles' stages in order, tiles row tile
  // first; a tile split between two CTAs is finished by whichever of them gets there second.
  int stream_k_tiles_n = 0, stream_k_tiles = 0;
};
// Tokens of x the box of the tile at token m_base holds: just the rows below M, and the tile's other rows stay
// stale (a token's outputs read only its own row, and stale ones are never stored). A box that reaches past M
// instead arrives zero-filled, and much slower: M = 160 (a last tile of 32 tokens) took 298 µs on 8192x28672
// against 227 for M = 256 (H200, 2026-11-29, standalone program).
__host__ __device__ constexpr int tile_rows(int64_t M, int64_t m_base, int tokens) {
  return M - m_base < tokens ? static_cast<int>(M - m_base) : tokens;
}

using Bf16 = MmaType<__nv_bfloat16>;

// W's copies take an L2 evict_first policy where the token tiles are at most 64 tokens: the plan's smallest tile
// that holds M, so one token tile and each byte of W read once. Its lines, not the dirty ones a previous kernel left
// in L2, then go first. H200, 2026-12-01, tools/gemm_forms.cu --dq, three interleaved runs, µs, without -> with:
// M = 1 8192x28672 64.4-64.5 -> 62.6, 28672x8192 78.8-78.9 -> 77.1-77.2, 8192² 24.6 -> 23.5-23.7; M = 16 63.9-64.5 ->
// 62.6-63.0, 80.0-80.1 -> 78.1-78.3, 8192² 24.2-24.4 -> 23.2-23.3; M = 64 84.9-85.3 -> 83.3-83.5. Chosen at compile
// time: the same choice made at run time by a branch in the producer lost instead (M = 16 28672x8192 81.7-81.8).
// With larger tiles (W read by more than one token tile, or the launch compute-bound) the policy lost: M = 256
// 4096² 23.1-23.3 -> 23.5-23.6, 8192x28672 160.0 -> 161.4; M = 1024 8192x28672 601.7 -> 608.8.
template <int kTokens>
constexpr bool kWReadOnce = kTokens <= 64;

constexpr int kStageK = 64;               // k per stage
static_assert(kStageK == kTileOrderK, "a stage is one 64-k block of a tile-ordered weight");
constexpr int kMaxRows = 128;             // W rows per CTA, at most
constexpr int kWStageBytes = kMaxRows * kStageK / 2;       // 4 KB
constexpr int kTableBytes = kLanePairTableBytes;           // fill_lane_pair_table, bf16
// x rows per CTA (the wgmma N): the smallest of 16, 32, 64 and 128 that holds M, so that few tokens do not pay for
// a 128-token product. Measured on the H200 (2026-11-29, standalone program, µs, 8192x28672 split-K form):
// M = 32 98 with 32-token tiles against 112 with 64; M = 64 113 with 64 against 156 with 128 (library); M = 16
// with 16-token tiles against 32 (GEMM alone, tools/gemm_forms --dq, two interleaved runs, 2026-11-29):
// 8192x28672 68.5 -> 65.1, 28672x8192 83.8 -> 81.0, 4096x4096 15.0 -> 14.2.
constexpr int kMaxTokens = 128;
constexpr int kWideTokens = 256;  // the row form's large tile (see producer_threads)
constexpr int64_t kSmallTokensMaxM = 64;  // M up to this takes a tile below kMaxTokens
constexpr int tokens_for(int64_t M) { return M <= 16 ? 16 : M <= 32 ? 32 : M <= kSmallTokensMaxM ? 64 : kMaxTokens; }
// Whether x's token tiles fit the grid's y dimension (M past kSmallTokensMaxM takes kMaxTokens a tile).
inline bool gemm_4bit_rows_fit(int64_t M) { return (M + kMaxTokens - 1) / kMaxTokens <= 65535; }
constexpr int kSharedBytesPerCta = 227 * 1024;  // the most a CTA may opt in to on sm_90
constexpr int kFixedSharedBytes =
    1024 /* alignment */ + kTableBytes + 256 * 4 /* code2 */ + 24 /* segment and xa barriers, arrival order */;
// Whether tiles of `tokens` tokens are block-scaled (Tile::kBlockScaled).
constexpr bool block_scaled_tiles(int tokens) { return tokens <= 32; }
// Ring stages of the row form's tiles below 256 tokens, where the shared memory would hold 26, 20 and 13 for 16, 32
// and 64 tokens: 8 against those, GEMM alone, µs, M = 16 / 32: 14336x4096 26.9 -> 25.3 / 27.9 -> 26.5, 13824x5120
// 31.3 -> 29.5 / 32.6 -> 31.1, 16384x4096 27.6 -> 26.4 / 28.6 -> 27.9; M = 48 / 64: 14336x4096 36.3 -> 35.7 / 36.1 ->
// 35.4, 16384x4096 (M = 40 / 64) 37.0 -> 35.9 / 36.7 -> 35.6, 13824x5120 M = 64 43.7 -> 43.2. 6 stages lost, 10-16
// within 0.5 of 8. The split form lost with 8 or 12 (8192x28672 M = 16 65.2 -> 81.5 / 69.0). H200, 2026-11-30,
// tools/gemm_forms.cu --dq, two interleaved runs, y the same bit for bit.
constexpr int kRowFormMaxStages = 8;
template <int kTokens, bool kSplitForm>
struct Tile {
  static constexpr int kXStageBytes = kTokens * kStageK * 2;         // a multiple of the 1024-byte swizzle atom
  // 256-token tiles: two of the producer warpgroup's idle warps work out each stage's block scales (a bf16 pair of
  // hi and one of lo a row) into a slot of their own, so the consumers read 8 bytes a row instead of loading and
  // converting them. The split form does the same in its W stages' unused half (kScalesInWStage in the kernel); the
  // row form of 32-128 tokens has no room for it: a slot would cost 128 tokens a stage.
  static constexpr bool kScaleRing = kTokens == kWideTokens;
  // 16- and 32-token tiles, where the consumers' instructions a stage are the limit (ncu: issue slots 62 % busy,
  // 1.8 eligible warps a scheduler at 8192x28672 M = 16): a stage's four wgmma multiply the unscaled codes into a
  // fresh set of accumulators, which the stage's block scale (one a row: a stage lies in one block) then adds to the
  // tile's, 8 or 16 FFMA a thread instead of scaling every code pair (32 HMUL2 and HFMA2).
  static constexpr bool kBlockScaled = block_scaled_tiles(kTokens);
  static constexpr int kScaleSlotBytes = kScaleRing ? kMaxRows * 8 : 0;
  static constexpr int kStageBytes = kXStageBytes + kWStageBytes + 2 * 8 /* full and empty barriers */ + kScaleSlotBytes;
  // As many stages as the shared memory holds (8, 13, 20 and 26 for 128, 64, 32 and 16 tokens): against 6 and 12 they
  // took 8192x28672 from 137.6 to 128.4 µs at M = 128 and from 240.4 to 225.8 at M = 256 (H200, 2026-11-29,
  // standalone program, L2 emptied between runs), and changed the small tiles by 1-3 %. The row form's tiles below
  // 256 tokens take fewer (kRowFormMaxStages).
  static constexpr int kFitStages = (kSharedBytesPerCta - kFixedSharedBytes) / kStageBytes;
  static constexpr int kStages =
      !kSplitForm && kTokens < kWideTokens && kFitStages > kRowFormMaxStages ? kRowFormMaxStages : kFitStages;
  static constexpr int kAccumulators = kTokens / 2;                  // per thread: 64 rows x kTokens / 128
  static constexpr int kSmemBytes = kFixedSharedBytes + kStages * kStageBytes;
  static_assert(kSmemBytes <= kSharedBytesPerCta, "ring exceeds shared memory");
  // Free for the epilogue once every stage is consumed: the rings and the table after them.
  static constexpr int kEpilogueBytes = kStages * (kXStageBytes + kWStageBytes) + kTableBytes;
};
// W rows a CTA takes: 64 a warpgroup, or 64 shared by all of them in the split-K form; the two launch forms.
constexpr int cta_rows(int warpgroups, bool split_k) { return split_k ? 64 : 64 * warpgroups; }
constexpr int kRowFormWarpgroups = 2;
// The split form's warpgroups: 4 for the small token tiles; 3 for 128 tokens, whose 64 accumulators a thread
// leave no registers for a fourth. Each has a producer warp and ring slots of its own (a pipeline a warpgroup),
// since the stages come faster than one thread can issue their copies. Measured on the H200 (2026-11-29,
// standalone program, NF4 + double quantization, µs): 8192x28672 M = 16 109.0 with 3 warpgroups and one
// producer, 82.6 with 4 warpgroups and 4 producers; M = 64 119.0 -> 93.2; 8192x8192 M = 16 36.0 -> 30.4. The
// row form keeps one producer: all its warpgroups consume every stage, and more producers did not change it.
constexpr int split_form_warpgroups(int tokens) { return tokens == 128 ? 3 : 4; }
// W rows a CTA of a launch form takes: the split form's 64 (its warpgroups share them), or the row form's 64 a warpgroup.
constexpr int form_rows(int tokens, bool split_form) {
  return split_form ? cta_rows(split_form_warpgroups(tokens), true) : cta_rows(kRowFormWarpgroups, false);
}
constexpr int pipelines(int warpgroups, bool split_k) { return split_k ? warpgroups : 1; }
// 256-token tiles (row form only): a warpgroup's 128 accumulators a thread need more registers than an even share
// of the register file gives 384 threads, so the producers are a whole warpgroup that hands registers to the
// consumers (setmaxnreg acts on whole warpgroups). kWideTokens is defined above, beside kMaxTokens.
constexpr int kProducerRegisters = 40, kWideConsumerRegisters = 232;  // 128 * 40 + 256 * 232 <= 64 K
// Whether a producer warp of its own stages xa for the LoRA term (see the kernel's xa_warp): from 128 tokens, whose
// rings hold two slots a pipeline; the wide tiles' producer warpgroup has a warp to spare, the 128-token tiles get one.
// Smaller tiles keep it on the first copies' warp: one more warp capped the 64-token split form's registers at 96,
// where it spilled.
constexpr bool xa_warp_of_its_own(int tokens) { return tokens >= kMaxTokens; }
constexpr int producer_threads(int tokens, int warpgroups, bool split_k) {
  return tokens == kWideTokens ? 128 : 32 * (pipelines(warpgroups, split_k) + (xa_warp_of_its_own(tokens) ? 1 : 0));
}
constexpr int cta_threads(int tokens, int warpgroups, bool split_k) {
  return 128 * warpgroups + producer_threads(tokens, warpgroups, split_k);
}
// CTAs of a launch with `rows` rows of W and `tokens` tokens of x a CTA (by default the tile tokens_for gives M).
inline int64_t cta_count(int64_t M, int64_t N, int rows, int tokens = 0) {
  if (tokens == 0) tokens = tokens_for(M);
  return ((N + rows - 1) / rows) * ((M + tokens - 1) / tokens);
}

// A 3-D box of `map` at (c0, c1, c2) into shared memory at dst; its bytes count on bar.
template <bool kEvictFirst = false>
__device__ __forceinline__ void tma_load_3d(uint32_t dst, const CUtensorMap* map, int c0, int c1, int c2, uint32_t bar) {
  if constexpr (kEvictFirst)
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1, {%2, %3, "
        "%4}], [%5], %6;\n" ::"r"(dst), "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar),
        "l"(kL2EvictFirst)
        : "memory");
  else
    asm volatile(
        "cp.async.bulk.tensor.3d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], [%5];\n"
        ::"r"(dst), "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(bar)
        : "memory");
}
// A 2-D box of `map` at (c0, c1) into shared memory at dst; its bytes count on bar.
template <bool kEvictFirst = false>
__device__ __forceinline__ void tma_load_2d(uint32_t dst, const CUtensorMap* map, int c0, int c1, uint32_t bar) {
  if constexpr (kEvictFirst)
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes.L2::cache_hint [%0], [%1, {%2, "
        "%3}], [%4], %5;\n" ::"r"(dst), "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar),
        "l"(kL2EvictFirst)
        : "memory");
  else
    asm volatile(
        "cp.async.bulk.tensor.2d.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], [%4];\n"
        ::"r"(dst), "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(bar)
        : "memory");
}

// Every consumer thread of the cluster's CTAs has arrived (producers have exited), and their shared-memory writes
// before it are visible to the others after it.
__device__ __forceinline__ void cluster_sync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
// 16 bytes at the shared-memory address `local` of the cluster's CTA `rank`.
__device__ __forceinline__ float4 load_cluster_f4(uint32_t local, uint32_t rank) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(local), "r"(rank));
  float4 v;
  asm volatile("ld.shared::cluster.v4.f32 {%0, %1, %2, %3}, [%4];\n"
               : "=f"(v.x), "=f"(v.y), "=f"(v.z), "=f"(v.w)
               : "r"(remote)
               : "memory");
  return v;
}

// Stores 16 bytes at the shared-memory address `local` of the cluster's CTA `rank`.
__device__ __forceinline__ void store_cluster_f4(uint32_t local, uint32_t rank, float4 v) {
  uint32_t remote;
  asm volatile("mapa.shared::cluster.u32 %0, %1, %2;\n" : "=r"(remote) : "r"(local), "r"(rank));
  asm volatile("st.shared::cluster.v4.f32 [%0], {%1, %2, %3, %4};\n" ::"r"(remote), "f"(v.x), "f"(v.y), "f"(v.z), "f"(v.w)
               : "memory");
}

// A lane's run of 8 floats, 32 bytes, as two 16-byte loads (load(byte offset of the half)). Where a quarter warp's lanes
// read adjacent runs, lanes 4-7 of each 8 load the upper half first, so that each load instruction finds its 8 lanes on
// distinct banks (in order, lanes l and l + 4 would share them). Scalar loads had met 4-way conflicts.
template <typename Load>
__device__ __forceinline__ void load_run(int lane, Load load, float (&v)[8]) {
  const bool upper_first = lane & 4;
  const float4 a = load(upper_first ? 16 : 0), b = load(upper_first ? 0 : 16);
  const float4 lo = upper_first ? b : a, hi = upper_first ? a : b;
  v[0] = lo.x, v[1] = lo.y, v[2] = lo.z, v[3] = lo.w, v[4] = hi.x, v[5] = hi.y, v[6] = hi.z, v[7] = hi.w;
}
__device__ __forceinline__ void load_run(const float* at, int lane, float (&v)[8]) {
  load_run(lane, [&](int offset) { return *reinterpret_cast<const float4*>(at + offset / 4); }, v);
}

// A descriptor's address field: the 16-byte unit of a shared address below 2^18.
__device__ __forceinline__ uint32_t descriptor_address(uint32_t addr) { return (addr & 0x3FFFF) >> 4; }
// K-major B operand with the 128-byte swizzle: 8 token rows of 128 bytes per 1024-byte atom.
__device__ __forceinline__ uint64_t swizzled_descriptor_at(uint32_t address_field) {
  return static_cast<uint64_t>(address_field) | (static_cast<uint64_t>(1024 >> 4) << 32) | (static_cast<uint64_t>(1) << 62);
}
__device__ __forceinline__ uint64_t swizzled_descriptor(uint32_t addr) {
  return swizzled_descriptor_at(descriptor_address(addr));
}

// K-major B operand without swizzle: 8x16-byte core matrices, k_stride bytes apart along K and token_stride apart
// along the tokens.
__device__ __forceinline__ uint64_t interleaved_descriptor(uint32_t addr, uint32_t k_stride, uint32_t token_stride) {
  return descriptor_address(addr) | (static_cast<uint64_t>(k_stride >> 4) << 16) |
         (static_cast<uint64_t>(token_stride >> 4) << 32);
}
// Where a token tile's xa waits for the epilogue: the code table's unused halves (its rows are 256 bytes apart and
// hold 128 bytes of lane copies), one 8x16-byte core matrix (8 tokens, 8 columns) each, 8 column blocks (64 columns)
// of a token block in consecutive rows.
constexpr int kXaColumnBlocks = 8;
__host__ __device__ constexpr uint32_t xa_core_offset(int token, int column_block) {
  return 128 + 256 * ((token / 8) * kXaColumnBlocks + column_block) + 16 * (token % 8);
}
// Columns col and col + 1 of a bf16 row as one word, col in the low half; columns from `count` on read as zero.
__device__ __forceinline__ uint32_t bf16_pair_or_zero(const uint16_t* row, int col, int count) {
  return (col < count ? uint32_t{row[col]} : 0u) | (col + 1 < count ? uint32_t{row[col + 1]} << 16 : 0u);
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
__device__ __forceinline__ void wgmma_fence(uint32_t (&a)[4][4]) {  // every write of a is issued before it
  asm volatile("wgmma.fence.sync.aligned;\n"
               : "+r"(a[0][0]), "+r"(a[0][1]), "+r"(a[0][2]), "+r"(a[0][3]), "+r"(a[1][0]), "+r"(a[1][1]),
                 "+r"(a[1][2]), "+r"(a[1][3]), "+r"(a[2][0]), "+r"(a[2][1]), "+r"(a[2][2]), "+r"(a[2][3]),
                 "+r"(a[3][0]), "+r"(a[3][1]), "+r"(a[3][2]), "+r"(a[3][3])::"memory");
}
__device__ __forceinline__ void wgmma_fence(uint32_t (&a)[4]) {
  asm volatile("wgmma.fence.sync.aligned;\n" : "+r"(a[0]), "+r"(a[1]), "+r"(a[2]), "+r"(a[3])::"memory");
}
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
// Waits until at most kPending committed groups are still running.
template <int kPending = 0>
__device__ __forceinline__ void wgmma_wait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(kPending) : "memory");
}
// Commits the wgmma issued since the last commit and waits until at most kPending groups are still running.
template <int kPending = 0>
__device__ __forceinline__ void wgmma_commit_and_wait() {
  wgmma_commit();
  wgmma_wait<kPending>();
}
#define QLORA_ACC8(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), \
                      "+f"(d[i + 6]), "+f"(d[i + 7])
// d += A (64x16, registers) · B (16 x kTokens, shared memory); fp32 accumulators in the wgmma fragment order.
// kAccumulate false: d = A · B.
template <bool kAccumulate = true>
__device__ __forceinline__ void wgmma_bf16(float (&d)[8], const uint32_t (&a)[4], uint64_t b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %13, 0;\n"  // scale-d
      "wgmma.mma_async.sync.aligned.m64n16k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7}, {%8, %9, %10, %11}, %12, p, 1, 1, 0;\n}\n"
      : QLORA_ACC8(0)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "n"(kAccumulate ? 1 : 0));
}
template <bool kAccumulate = true>
__device__ __forceinline__ void wgmma_bf16(float (&d)[16], const uint32_t (&a)[4], uint64_t b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %21, 0;\n"  // scale-d
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}, {%16, %17, %18, %19}, %20, p, 1, 1, 0;\n}\n"
      : QLORA_ACC8(0), QLORA_ACC8(8)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "n"(kAccumulate ? 1 : 0));
}
__device__ __forceinline__ void wgmma_bf16(float (&d)[32], const uint32_t (&a)[4], uint64_t b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, "
      "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31}, {%32, %33, %34, %35}, %36, p, 1, 1, 0;\n}\n"
      : QLORA_ACC8(0), QLORA_ACC8(8), QLORA_ACC8(16), QLORA_ACC8(24)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}
__device__ __forceinline__ void wgmma_bf16(float (&d)[64], const uint32_t (&a)[4], uint64_t b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, "
      "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, "
      "%43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}, "
      "{%64, %65, %66, %67}, %68, p, 1, 1, 0;\n}\n"
      : QLORA_ACC8(0), QLORA_ACC8(8), QLORA_ACC8(16), QLORA_ACC8(24), QLORA_ACC8(32), QLORA_ACC8(40),
        QLORA_ACC8(48), QLORA_ACC8(56)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}
__device__ __forceinline__ void wgmma_bf16(float (&d)[128], const uint32_t (&a)[4], uint64_t b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, 1, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 "
      "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, "
      "%22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, "
      "%43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, "
      "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, %80, %81, %82, %83, %84, "
      "%85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, %96, %97, %98, %99, %100, %101, %102, %103, %104, "
      "%105, %106, %107, %108, %109, %110, %111, %112, %113, %114, %115, %116, %117, %118, %119, %120, %121, "
      "%122, %123, %124, %125, %126, %127}, "
      "{%128, %129, %130, %131}, %132, p, 1, 1, 0;\n}\n"
      : QLORA_ACC8(0), QLORA_ACC8(8), QLORA_ACC8(16), QLORA_ACC8(24), QLORA_ACC8(32), QLORA_ACC8(40),
        QLORA_ACC8(48), QLORA_ACC8(56), QLORA_ACC8(64), QLORA_ACC8(72), QLORA_ACC8(80), QLORA_ACC8(88),
        QLORA_ACC8(96), QLORA_ACC8(104), QLORA_ACC8(112), QLORA_ACC8(120)
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b));
}
#undef QLORA_ACC8
// Keeps the accumulators' uses after the wgmma that wrote them.
template <int kCount>
__device__ __forceinline__ void fence_accumulators(float (&d)[kCount]) {
#pragma unroll
  for (int i = 0; i < kCount; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
#endif

// A block's scale as loaded, before the conversion: (qabsmax, absmax2) with double quantization, else (0, absmax).
struct RawScale {
  uint32_t code;
  float value;
};
template <bool kDoubleQuant>
__device__ __forceinline__ RawScale load_raw_scale(const Gemm4bitParams& p, int64_t element) {
  const int64_t block = element >> p.log2_blocksize;
  if constexpr (kDoubleQuant)
    return RawScale{__ldg(p.scales.qabsmax + block), __ldg(p.scales.absmax2 + block / kAbsmaxBlocksize)};
  else
    return RawScale{0u, __ldg(p.scales.absmax + block)};
}

// kWarpgroups x 64 rows of W a CTA, or (kSplitK) 64 rows with the stages dealt round-robin to the warpgroups;
// producer warps after them issue the copies. kTileOrder: the packed weight is in tile order (qlora/tile_order.h), so
// a W stage holds its rows' 16-row tiles one after another, 512 bytes each, and a lane reads its fragments' 16 bytes
// with one shared load.
template <QuantType QT, bool kDoubleQuant, int kTokens, int kWarpgroups, bool kSplitK, bool kStreamK = false,
          bool kTileOrder = false>
__global__ void __launch_bounds__(cta_threads(kTokens, kWarpgroups, kSplitK), 1) gemm_4bit_kernel(const __grid_constant__ KernelArgs args) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  using T = Tile<kTokens, kSplitK>;
  constexpr int kStages = T::kStages, kXStageBytes = T::kXStageBytes;
  // 256-token tiles and the row form's 64-token tiles: a warpgroup decodes the next k16 step while its wgmma runs
  // (see run_segment). ncu of the 28672x8192 M = 256 stream-K launch had put the tensor pipe at 72 % of its active
  // cycles and the consumer warps half of their time at the wait for their own wgmma (cuBLAS: 96 % at the same
  // shape); with this, 76 % and 182.5 -> 176.7 µs (H200, 2026-11-29, tools/stream_k_gemm.cu). The row form's
  // 64-token tiles: 14336x4096 M = 64 36.7 -> 35.6 µs, 13824x5120 43.1 -> 41.0, 16384x4096 37.5 -> 36.2, where the
  // split form's 64-token tiles lost 12-14 µs (8192x28672 and 28672x8192) and 128-token tiles 3-47 (H200, 2026-11-30,
  // tools/xa_beside_gemm.cu, two interleaved runs, GEMM without LoRA).
  constexpr bool kStepPipelined = kTokens == kWideTokens || (kTokens == 64 && !kSplitK);
  const Gemm4bitParams& p = args.p;
  constexpr int kThreads = 128 * kWarpgroups;  // the consumers; the producer warps come after them
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
  const uint32_t segment_done = barriers + 8 * 2 * kStages;  // the consumers are done with a segment's epilogue
  const uint32_t arrival_order = segment_done + 8;  // stream-K: whether this CTA reached a split tile second
  const uint32_t xa_full = arrival_order + 8;       // a segment's xa is staged (see stage_xa)
  const uint32_t scale_ring = xa_full + 8;          // T::kScaleRing: a slot of T::kScaleSlotBytes a stage
  constexpr int kScaleWarps = 2;
  // The split form's 64 rows fill half of a W stage; its producer warps stage each stage's block scales in the
  // other half, as the 256-token tiles' scale warps do in slots of their own. With double quantization the
  // consumers' loads of the code byte and its second-level scale, and the conversion, had sat in their loop:
  // 4096x4096 M = 256 26.0 -> 24.1 µs, 8192x28672 M = 32 88.7 -> 77.6, M = 64 100.9 -> 92.1 (H200, 2026-11-29,
  // standalone program, same outputs bit for bit).
  constexpr bool kScalesInWStage = kSplitK;
  // The split form's 128-token tiles issue the copies of their free slots at once, ahead of the stages' scales, which
  // wait on two dependent loads (the code byte, then its second-level value): 4096² M = 256 23.5 -> 23.0 µs, 4096x14336
  // 62.2 -> 61.9. The smaller tiles, with 3-6 free slots a pipeline against 2, lost 0.7-3.1 µs that way (4096² M = 16,
  // 8192² M = 32, 8192x28672 and 28672x8192 M = 16), not yet understood. H200, 2026-11-30, tools/xa_beside_gemm.cu,
  // two interleaved runs, GEMM without LoRA.
  constexpr bool kCopiesAhead = kScalesInWStage && kTokens == kMaxTokens;
  static_assert(!kScalesInWStage || kRows * (kStageK / 2 + 8) <= kWStageBytes, "scales beside the split form's W stage");
  constexpr bool kScalesStaged = T::kScaleRing || kScalesInWStage;
  constexpr bool kShareCode2 = kDoubleQuant && T::kScaleRing;  // see share_code2
  // The row form's block-scaled tiles take a warpgroup's stages in pairs (see run_segment): 16 tokens, 14336x4096
  // M = 16 30.4 -> 28.2 µs, 13824x5120 34.0 -> 31.9, 16384x4096 31.6 -> 29.2; 32 tokens, M = 32 30.0 -> 27.8, 34.8 ->
  // 31.5 and 30.9 -> 28.7. The split form's 16-token tiles lost up to 1.2 µs (8192x28672 and 28672x8192). H200,
  // 2026-11-30, tools/xa_beside_gemm.cu, two interleaved runs, GEMM without LoRA.
  constexpr bool kStagePairs = T::kBlockScaled && !kSplitK;
  auto scale_slot = [&](int slot) {  // kScalesStaged: a stage's scales, a bf16 pair of hi and one of lo a row
    return reinterpret_cast<uint2*>(kScalesInWStage ? smem + (w_ring - base) + slot * kWStageBytes + kRows * kStageK / 2
                                                    : smem + (scale_ring - base) + slot * T::kScaleSlotBytes);
  };
  // Stage s belongs to pipeline s % kPipelines, whose slots are its own, so each slot's full and empty phases
  // alternate: a slot shared by pipelines that run out of step could be two phases ahead of a waiter, which
  // the parity wait cannot tell from done.
  constexpr int kPipelines = pipelines(kWarpgroups, kSplitK), kSlots = kStages / kPipelines;
  auto slot_of = [&](int stage) { return (stage % kPipelines) * kSlots + (stage / kPipelines) % kSlots; };
  auto round_of = [&](int stage) { return stage / kPipelines / kSlots; };  // how often the slot was used before

  const int tid = threadIdx.x, lane = tid % 32, warpgroup = tid / 128, warp = (tid / 32) % 4;
  // Split-K over a cluster (gridDim.z CTAs of the same tile; 256-token tiles and the split form): CTA z takes stages
  // [k_begin, k_begin + stages); the epilogue sums the cluster's tiles through distributed shared memory.
  const int splits = static_cast<int>(gridDim.z), split = static_cast<int>(blockIdx.z);
  const int all_stages = static_cast<int>(p.K / kStageK), per_split = (all_stages + splits - 1) / splits;
  // What a CTA works through: one segment (its tile, or its cluster's share of it), or with stream-K the segments
  // of its span [it_begin, it_end) of all tiles' stages: the tail of a tile split with the CTA before, whole tiles,
  // the head of one split with the CTA after (a span is at least a tile long, so no tile meets three CTAs).
  struct Segment {
    int64_t n_base, m_base;
    int k_begin, stages;
    // The first k of one of its stages; past the last, the last's (for loads issued ahead of their stage).
    __device__ int64_t stage_k(int stage) const {
      return static_cast<int64_t>(k_begin + min(stage, stages - 1)) * kStageK;
    }
  };
  static_assert(!kStreamK || (kTokens == kWideTokens && pipelines(kWarpgroups, kSplitK) == 1) ||
                    (kSplitK && kTokens <= kSmallTokensMaxM),
                "stream-K: wide tiles, or the split form's small ones");
  // 32-bit stage indices (the launcher checks that they fit): the producers run on 40 registers.
  const int it_total = kStreamK ? args.stream_k_tiles * all_stages : 1;
  const int it_begin = kStreamK ? static_cast<int>(int64_t{it_total} * blockIdx.x / gridDim.x) : 0;
  const int it_end = kStreamK ? static_cast<int>(int64_t{it_total} * (blockIdx.x + 1) / gridDim.x) : 1;
  auto segment_at = [&](int it) {
    if constexpr (!kStreamK) {
      const int k_begin = split * per_split;
      return Segment{static_cast<int64_t>(blockIdx.x) * kRows, static_cast<int64_t>(blockIdx.y) * kTokens, k_begin,
                     min(all_stages - k_begin, per_split)};
    }
    const int tile = it / all_stages, k0 = it % all_stages, k1 = min(all_stages, k0 + (it_end - it));
    return Segment{static_cast<int64_t>(tile % args.stream_k_tiles_n) * kRows,
                   static_cast<int64_t>(tile / args.stream_k_tiles_n) * kTokens, k0, k1 - k0};
  };
  // visit(segment, the CTA's stages before it, its index, whether another follows) for each of the CTA's segments.
  auto for_each_segment = [&](auto&& visit) {
    if constexpr (kStreamK) {
      int before = 0, index = 0;
      for (int it = it_begin; it < it_end; ++index) {
        const Segment seg = segment_at(it);
        it += seg.stages;
        visit(seg, before, index, it < it_end);
        before += seg.stages;
      }
    } else {
      visit(segment_at(0), 0, 0, false);
    }
  };

  if (tid == 0) {
    for (int s = 0; s < kStages; ++s) {
      // the copies' producer (and the scale warps, or with kCopiesAhead its arrival once the scales are staged)
      mbar_init(full(s), T::kScaleRing ? 1 + kScaleWarps : kCopiesAhead ? 2 : 1);
      mbar_init(empty(s), (kSplitK ? 128 : kThreads) / 32);  // one arrival per consumer warp of the stage
    }
    mbar_init(segment_done, 1);
    mbar_init(xa_full, 1);
    mbar_init_fence();
  }
  __syncthreads();  // the barriers are initialised before a producer arms one
  static_assert(kTokens != kWideTokens || (!kSplitK && kWarpgroups == 2), "256-token tiles: row form, 2 warpgroups");
  if constexpr (kTokens == kWideTokens) {
    if (tid >= kThreads)
      asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(kProducerRegisters));
    else
      asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(kWideConsumerRegisters));
  }

  if (tid >= kThreads) {  // the producers: rows past N arrive as zeros and their outputs are never stored
    auto raw_at = [&](int64_t element) { return load_raw_scale<kDoubleQuant>(p, element); };  // a stage ahead
    // The 256-token tiles' scale warps put the second-level codes in shared memory themselves (`threads` of them,
    // this one `index` among them; named barrier 2), their loads issued beside the first stage's raw scales, where
    // a load of code2[code] after those had made the first stage wait on two round trips to memory. With double
    // quantization, GEMM alone, µs: 8192² M = 256 54.7 -> 53.8, 8192x28672 M = 256 163.5 -> 161.1, M = 1024 621.2 ->
    // 612.1, 28672x8192 M = 256 (no stream-K) 185.8 -> 182.2. The split form's producer warps lost that way (4096²
    // M = 256 23.3 -> 24.4, 28672x8192 M = 16 79.9 -> 86.7), so they keep their loads. H200, 2026-11-30,
    // tools/gemm_forms.cu --dq, two interleaved runs, y the same bit for bit.
    auto share_code2 = [&](int threads, int index) {
      if constexpr (kShareCode2) {
        for (int i = index; i < 256; i += threads) code2_s[i] = __ldg(p.scales.code2 + i);
        asm volatile("bar.sync 2, %0;\n" ::"r"(threads) : "memory");
      }
    };
    auto split_bits = [&](RawScale r, float mean) {  // kBlockScaled: the scale itself
      const float scale =
          kDoubleQuant ? mul_then_add(kShareCode2 ? code2_s[r.code] : __ldg(p.scales.code2 + r.code), r.value, mean)
                       : r.value;
      if constexpr (T::kBlockScaled) return make_uint2(__float_as_uint(scale), 0u);
      const SplitScale<__nv_bfloat16> split = split_scale<__nv_bfloat16>(scale);
      return make_uint2(as_u32(split.hi), as_u32(split.lo));
    };
    // Rows row and row + kRows / 2 of a stage's scales into its slot, as the consumers read them.
    auto stage_scales = [&](int slot, int row, RawScale r0, RawScale r1, float mean) {
      uint2* const out = scale_slot(slot);
      out[row] = split_bits(r0, mean);
      out[row + kRows / 2] = split_bits(r1, mean);
    };
    const int pipeline = (tid - kThreads) / 32;
    // A segment's xa, staged by a producer warp once the launch before has finished, so that the epilogue finds it in
    // shared memory (xa_full) instead of loading it then: from 128 tokens a warp after the copies' warps, below that
    // the first copies' warp after its last copy, which the rings leave late where they hold few slots a pipeline (the
    // epilogue then waits for xa's loads). At most 64 columns; the epilogue loads any beyond.
    const bool xa_warp = pipeline == (xa_warp_of_its_own(kTokens) ? kPipelines : 0);
    // Stream-K with that warp one of the copies' warps: each segment's xa right after its copies, since a segment's
    // copies wait for the epilogue of the one before, which may wait for its xa.
    constexpr bool kXaBetweenCopies = kStreamK && !xa_warp_of_its_own(kTokens);
    static_assert(!kXaBetweenCopies || kScalesInWStage, "the whole copies' warp runs the copy loop");
    auto stage_xa = [&](const Segment& seg) {
      const uint16_t* const xa = reinterpret_cast<const uint16_t*>(p.xa);
      const bool vectors = p.r % 8 == 0 && reinterpret_cast<uintptr_t>(xa) % 16 == 0;
      const int blocks = min(kXaColumnBlocks, 2 * ((p.r + 15) / 16));  // the column blocks the epilogue's steps read
      // 256-token tiles: the warp starts with the main loop and runs on kProducerRegisters, where unrolling spilled.
      constexpr int kUnroll = kTokens == kWideTokens ? 1 : 4;
#pragma unroll kUnroll
      for (int chunk = lane; chunk < kTokens * blocks; chunk += 32) {
        const int t = chunk / blocks, block = chunk % blocks, col = 8 * block;
        const int64_t m = seg.m_base + t;
        uint4 v = make_uint4(0u, 0u, 0u, 0u);
        if (m < p.M && col < p.r) {
          if (vectors) {
            v = *reinterpret_cast<const uint4*>(xa + m * p.r + col);
          } else {
            uint32_t w[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) w[i] = bf16_pair_or_zero(xa + m * p.r, col + 2 * i, p.r);
            v = make_uint4(w[0], w[1], w[2], w[3]);
          }
        }
        *reinterpret_cast<uint4*>(smem + (table - base) + xa_core_offset(t, block)) = v;
      }
      asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // the generic stores, before wgmma reads them
      __syncwarp();
      if (lane == 0) mbar_arrive(xa_full);
    };
    if ((kScalesInWStage || lane == 0) && pipeline < kPipelines) {
      // A segment's copies (issued: the CTA's stages before it); kScalesInWStage: the whole warp, whose lanes stage
      // rows lane and lane + 32 of each stage's scales before lane 0's arrival releases them with the copies.
      auto issue_segment = [&](const Segment& seg, int issued) {
        const int rows = tile_rows(p.M, seg.m_base, kTokens);
        const CUtensorMap* x_map = rows < kTokens ? &args.x_last_map : &args.x_map;
        const uint32_t stage_bytes = rows * kStageK * 2 + kRows * kStageK / 2;
        const float mean = kScalesInWStage && kDoubleQuant ? *p.scales.offset : 0.0f;
        const int64_t e0 = min(seg.n_base + lane, p.N - 1) * p.K, e1 = min(seg.n_base + lane + kRows / 2, p.N - 1) * p.K;
        auto copy_stage = [&](int stage, int slot) {
          mbar_arrive_expecting(full(slot), stage_bytes);
          tma_load_2d(x_ring + slot * kXStageBytes, x_map, (seg.k_begin + stage) * kStageK, static_cast<int>(seg.m_base),
                      full(slot));
          const uint32_t w_slot = w_ring + slot * kWStageBytes;
          const int n_tile = static_cast<int>(seg.n_base / kTileOrderRows), w_col = (seg.k_begin + stage) * (kStageK / 2);
          if constexpr (kTileOrder)
            tma_load_3d<kWReadOnce<kTokens>>(w_slot, &args.w_map, 0, seg.k_begin + stage, n_tile, full(slot));
          else
            tma_load_2d<kWReadOnce<kTokens>>(w_slot, &args.w_map, w_col, static_cast<int>(seg.n_base), full(slot));
        };
        RawScale now0{}, now1{};
        if constexpr (kScalesInWStage) now0 = raw_at(e0 + seg.stage_k(pipeline)), now1 = raw_at(e1 + seg.stage_k(pipeline));
        if constexpr (kCopiesAhead)  // the free slots' copies now, their scales in the loop
          for (int stage = pipeline; lane == 0 && stage < seg.stages && round_of(issued + stage) == 0; stage += kPipelines)
            copy_stage(stage, slot_of(issued + stage));
        for (int stage = pipeline; stage < seg.stages; stage += kPipelines) {
          const int slot = slot_of(issued + stage), round = round_of(issued + stage);
          if constexpr (kScalesInWStage) {
            const RawScale next0 = raw_at(e0 + seg.stage_k(stage + kPipelines));
            const RawScale next1 = raw_at(e1 + seg.stage_k(stage + kPipelines));
            if (round > 0) mbar_wait(empty(slot), (round - 1) & 1);
            stage_scales(slot, lane, now0, now1, mean);
            now0 = next0;
            now1 = next1;
            __syncwarp();
            if (lane != 0) continue;
            if (!kCopiesAhead || round > 0) copy_stage(stage, slot);
            if (kCopiesAhead) mbar_arrive(full(slot));
          } else {
            if (round > 0) mbar_wait(empty(slot), (round - 1) & 1);
            copy_stage(stage, slot);
          }
        }
      };
      for_each_segment([&](const Segment& seg, int issued, int index, bool) {
        if (index > 0) mbar_wait(segment_done, (index - 1) & 1);  // its epilogue reused the rings
        issue_segment(seg, issued);
        if constexpr (kXaBetweenCopies) {
          if (p.r > 0 && xa_warp) {  // the last segment's xa is used: its epilogue is done
            if (index == 0) {
              __syncwarp();
              wait_for_prior_grid();  // xa comes from the launch before this one (launch.cuh)
            }
            stage_xa(seg);
          }
        }
      });
    }
    if (!kXaBetweenCopies && p.r > 0 && split == 0 && xa_warp) {
      __syncwarp();
      wait_for_prior_grid();  // xa comes from the launch before this one (launch.cuh)
      for_each_segment([&](const Segment& seg, int, int index, bool) {
        if (index > 0) mbar_wait(segment_done, (index - 1) & 1);  // the last segment's xa is used
        stage_xa(seg);
      });
    }
    if constexpr (T::kScaleRing) {
      const int scale_thread = tid - kThreads - 32 * (4 - kScaleWarps);  // the last kScaleWarps warps
      if (scale_thread >= 0) {
        static_assert(kRows == 2 * 32 * kScaleWarps, "a scale thread a pair of rows");
        const float mean = kDoubleQuant ? *p.scales.offset : 0.0f;
        // Rows scale_thread and scale_thread + 64 of each stage. The scale slots lie outside the epilogue's space,
        // so unlike the copies they need no wait for an epilogue: the empty barriers alone order them.
        // Stream-K: before the first segment, where within it the scale warps spilled (40 registers).
        if constexpr (kStreamK) share_code2(32 * kScaleWarps, scale_thread);
        auto stage_segment = [&](const Segment& seg, int issued) {
          const int64_t e0 = min(seg.n_base + scale_thread, p.N - 1) * p.K;
          const int64_t e1 = min(seg.n_base + scale_thread + kRows / 2, p.N - 1) * p.K;
          RawScale now0 = raw_at(e0 + seg.stage_k(0)), now1 = raw_at(e1 + seg.stage_k(0));
          if constexpr (!kStreamK) share_code2(32 * kScaleWarps, scale_thread);
          for (int stage = 0; stage < seg.stages; ++stage) {
            const RawScale next0 = raw_at(e0 + seg.stage_k(stage + 1)), next1 = raw_at(e1 + seg.stage_k(stage + 1));
            const int slot = slot_of(issued + stage), round = round_of(issued + stage);
            if (round > 0) mbar_wait(empty(slot), (round - 1) & 1);
            stage_scales(slot, scale_thread, now0, now1, mean);
            __syncwarp();
            if (lane == 0) mbar_arrive(full(slot));
            now0 = next0;
            now1 = next1;
          }
        };
        for_each_segment([&](const Segment& seg, int issued, int, bool) { stage_segment(seg, issued); });
      }
    }
    return;
  }
  // The consumers build the tables while the producers' first copies are in flight. Their loads (code values, code2,
  // then the mean after the barrier) stay in turn: issued together at entry, or after the barriers' set-up, the
  // 16-token split forms lost 0.7-3 µs (28672x8192 M = 16 77.5 -> 78.8; H200, 2026-12-01, tools/gemm_forms.cu --dq).
  auto build_table = [&] {
    const float* values = code_values<QT>();
    fill_lane_pair_table<__nv_bfloat16>(reinterpret_cast<uint32_t*>(smem + (table - base)),
                                        [&](int code) { return values[code]; }, tid, kThreads);
  };
  build_table();
  if (kDoubleQuant && !kShareCode2)  // else the producers fill it (share_code2)
    for (int i = tid; i < 256; i += kThreads) code2_s[i] = p.scales.code2[i];
  asm volatile("bar.sync 1, %0;\n" ::"n"(kThreads) : "memory");
  const float mean = kDoubleQuant ? *p.scales.offset : 0.0f;

  // Fragment rows of this thread: r0 and r0 + 8 of its warp's 16; its byte of each 4-byte word is lane % 4.
  const int r0 = (kSplitK ? 0 : warpgroup * 64) + warp * 16 + lane / 4;
  // A scale's loads are issued two stages ahead of its use.
  auto load_scale = [&](int64_t element) { return load_raw_scale<kDoubleQuant>(p, element); };
  auto scale_of = [&](RawScale r) { return kDoubleQuant ? mul_then_add(code2_s[r.code], r.value, mean) : r.value; };
  // A lookup's address: the byte permute's (lane * 4, byte lane % 4 of the word, the window's top two bytes), plus
  // the table's offset from the window. The split forms take the top bytes from base: ptxas keeps the table's base
  // out of the uniform registers there, so each lookup paid an add (tools/sass_loops.py: the 32-token split form's
  // loop 131 -> 119 instructions); the row forms keep it in one and take 0.
  const uint32_t window = kSplitK ? base & 0xFFFF0000u : 0u, table_offset = table - window;
  constexpr uint32_t kSelectorBase = kSplitK ? 0x7604u : 0x5504u;
  const uint32_t lane_bytes = window | lane * 4, selector = kSelectorBase | ((lane % 4) << 4);
  auto as_pair = [](uint32_t bits) { return *reinterpret_cast<const Bf16::Pair*>(&bits); };
  // k16 step j of x's stage in slot: the ring's address field once, plus the offset's (every offset inside the CTA's
  // shared memory keeps it below 2^18).
  const uint32_t x_ring_field = descriptor_address(x_ring);
  auto x_descriptor = [&](int slot, int j) {
    return swizzled_descriptor_at(x_ring_field + static_cast<uint32_t>((slot * kXStageBytes + 32 * j) >> 4));
  };
  // k16 step j of xa's first 64 columns (staged by stage_xa) from token `token` on: the LoRA term's wgmma B operand.
  auto xa_descriptor = [&](int token, int j) {
    return interleaved_descriptor(table + xa_core_offset(token, 2 * j), 256, 256 * kXaColumnBlocks);
  };
  // Word i of a fragment row (see run_segment) and the byte of it this thread decodes: byte lane % 4 of the row's
  // i-th word in row-major order; byte i % 4 of a word a lane holds whole in tile order.
  auto lookup_address = [&](uint32_t word, int i) {
    const uint32_t byte_selector = kTileOrder ? kSelectorBase | ((i % 4) << 4) : selector;
    return __byte_perm(word, lane_bytes, byte_selector) + table_offset;
  };
  auto lookup = [&](uint32_t word, int i) {  // the code pair of this thread's byte of word, unscaled
    uint32_t bits;
    asm("ld.shared.b32 %0, [%1];\n" : "=r"(bits) : "r"(lookup_address(word, i)));
    return bits;
  };
  auto decode = [&](uint32_t word, int i, const SplitScale<__nv_bfloat16>& scale) {
    return scaled_pair<__nv_bfloat16>(as_pair(lookup(word, i)), scale);
  };
  // Volatile: the lookup stays where it is written, ahead of the wgmma wait whose latency it is meant to overlap.
  auto lookup_ahead = [&](uint32_t word, int i) {
    uint32_t bits;
    asm volatile("ld.shared.b32 %0, [%1];\n" : "=r"(bits) : "r"(lookup_address(word, i)));
    return bits;
  };

  // A segment's stages (consumed: the CTA's stages before it; segment: its place among the CTA's segments), then its
  // tile's epilogue where this CTA finishes the tile; whether it did.
  auto run_segment = [&](const Segment& seg, int consumed, int segment) {
    const int64_t element0 = min(seg.n_base + r0, p.N - 1) * p.K, element1 = min(seg.n_base + r0 + 8, p.N - 1) * p.K;
    const bool adds_lora = p.r > 0 && split == 0 && (!kSplitK || warpgroup == 0);
    // The LoRA term's lora_B fragment of columns c .. c + 15 (rows r0 and r0 + 8, as the wgmma A operand), zero past r.
    auto load_b_step = [&](int c, uint32_t (&frag)[4]) {
      const uint16_t* const lora_b = reinterpret_cast<const uint16_t*>(p.lora_B);
      auto b_pair = [&](int64_t n, int col) -> uint32_t {
        return adds_lora && n < p.N ? bf16_pair_or_zero(lora_b + n * p.r, col, p.r) : 0u;
      };
      const int64_t n0 = seg.n_base + r0, n1 = n0 + 8;
      const int col = c + 2 * (lane % 4);
      frag[0] = b_pair(n0, col);
      frag[1] = b_pair(n1, col);
      frag[2] = b_pair(n0, col + 8);
      frag[3] = b_pair(n1, col + 8);
    };
    // Its first 16 columns (all of them at r <= 16) are loaded before the main loop: loaded in the epilogue, where
    // nothing else hides their latency behind a stream of the weight from DRAM, they had cost 2.1 µs a tile
    // (4096x4096 M = 1 12.3 -> 14.4 µs with the term, 28672x8192 M = 16 85.0 -> 93.2 over its four rounds of CTAs;
    // H200, 2026-11-29, tools/xa_beside_gemm.cu).
    uint32_t b_first[4] = {0u, 0u, 0u, 0u};
    if (adds_lora) load_b_step(0, b_first);
    // The split form's block-scaled tiles (16 and 32 tokens) with r <= 16: the LoRA term's product issued with the
    // last stage's wgmma, in accumulators of its own, where the product after the main loop had lengthened every CTA's
    // chain to its first store by about 1 µs (fence, product, wait). Every warpgroup takes part (lora_B zeros past the
    // first), and every CTA's last stage issues it, used or not, so that no wgmma sits in a path that differs between
    // them. With xa ready / beside the GEMM as the op launches it, µs: 4096² M = 1 13.4 -> 12.6 / 14.6 -> 13.8; M = 16
    // 13.8 -> 13.2 / 15.1 -> 14.3; 28672x8192 M = 16 89.2 -> 87.0 / 90.0 -> 87.6; 1024x4096 M = 16 12.7 -> 12.0 / 13.9
    // -> 13.1 (H200, 2026-11-30, tools/xa_beside_gemm.cu, two interleaved runs, y the same bit for bit). Not the
    // 32-token stream-K kernels, which it made spill.
    constexpr bool kEarlyLora = kSplitK && T::kBlockScaled && !(kTokens == 32 && kStreamK);
    const bool early_lora = kEarlyLora && p.r > 0 && p.r <= 16 && split == 0;
    // Where unused, 8: the smallest accumulator set of wgmma_bf16, which the product's discarded branch still names.
    constexpr int kEarlyLoraFloats = kEarlyLora ? kTokens / 2 : 8;
    float lora_early[kEarlyLoraFloats];
#pragma unroll
    for (int i = 0; i < kEarlyLoraFloats; ++i) lora_early[i] = 0.0f;
    float acc[T::kAccumulators];
#pragma unroll
    for (int i = 0; i < T::kAccumulators; ++i) acc[i] = 0.0f;
    const int first = kSplitK ? warpgroup : 0, step = kSplitK ? kWarpgroups : 1;
    RawScale now0{}, now1{}, next0{}, next1{};
    // kStepPipelined: a warpgroup decodes step j + 1 while earlier steps' wgmma run, so its tensor-core work does not
    // stop for its own decoding. Step j of a stage decodes into register set j % kStepSets and then waits until at
    // most kStepSets - 1 wgmma are pending, which frees the set the next step writes. With a set per step (against
    // two) a warpgroup keeps three wgmma queued while it waits on the next stage and decodes its first step: 2-2.5 %
    // faster (H200, 2026-11-29, tools/stream_k_gemm.cu). A stage's slot is released once its last wgmma is done,
    // kStepSets - 1 steps after it was issued.
    constexpr int kStepSets = 4;
    uint32_t a_steps[kStepSets][4];
    int running_slot = -1;  // the slot of the stage whose last wgmma may still run
    float part[T::kAccumulators];  // kBlockScaled: a stage's products, before its scale
    // kStagePairs: a warpgroup's stages in pairs, each pair's two stages decoded and their wgmma queued into sets of
    // their own before it waits for the first; the first's block scale then runs under the second's wgmma. ptxas keeps
    // such reads of finished accumulators beside running wgmma only where no wgmma is left running at the loop's end
    // (C7514 otherwise: every wgmma serialized), hence pairs rather than a pipeline across the whole loop.
    float parts[2][T::kAccumulators];
    uint32_t a_sets[2][4][4];
    int held_slot[2] = {0, 0};
    float held_s0[2] = {0.0f, 0.0f}, held_s1[2] = {0.0f, 0.0f};
    auto release = [&](int slot) {  // this warp's wgmma are done with the slot
      __syncwarp();
      if (lane == 0) mbar_arrive(empty(slot));
    };
    auto finish_held = [&](auto set, auto pending) {  // waits until `pending` groups run, then scales set's products
      constexpr int P = decltype(set)::value;
      wgmma_wait<decltype(pending)::value>();
      fence_accumulators(parts[P]);
      release(held_slot[P]);
#pragma unroll
      for (int i = 0; i < T::kAccumulators; ++i) acc[i] = fmaf(i % 4 < 2 ? held_s0[P] : held_s1[P], parts[P][i], acc[i]);
    };
    if constexpr (!kScalesStaged) {
      now0 = load_scale(element0 + seg.stage_k(first)), now1 = load_scale(element1 + seg.stage_k(first));
      next0 = load_scale(element0 + seg.stage_k(first + step)), next1 = load_scale(element1 + seg.stage_k(first + step));
    }
    // This warpgroup's stages take the slots of one pipeline in turn (step is kPipelines, and consumed a multiple of
    // it), so the slot and the barriers' phase advance by a step instead of dividing by kSlots.
    static_assert(!kSplitK || kWarpgroups == kPipelines, "a split warpgroup, a pipeline");
    const int pipeline_slots = slot_of(consumed + first) - slot_of(consumed + first) % kSlots;
    int slot_index = slot_of(consumed + first) % kSlots, phase = round_of(consumed + first) & 1;
    auto consume_stage = [&](int k, auto parity, auto with_lora) __attribute__((always_inline)) {
      const int slot = pipeline_slots + slot_index;
      const int full_phase = phase;
      if (++slot_index == kSlots) slot_index = 0, phase ^= 1;
      float s0 = 0.0f, s1 = 0.0f;
      if constexpr (!kScalesStaged) {
        s0 = scale_of(now0), s1 = scale_of(now1);
        now0 = next0;
        now1 = next1;
        next0 = load_scale(element0 + seg.stage_k(k + 2 * step));
        next1 = load_scale(element1 + seg.stage_k(k + 2 * step));
      }
      mbar_wait(full(slot), full_phase);
      const uint8_t* w_stage = smem + (w_ring - base) + slot * kWStageBytes;
      // Rows r0 and r0 + 8, word i holding the thread's code byte of k 8i + 2 (lane % 4) and + 1 (see lookup_address).
      uint32_t row0[8], row1[8];
      if constexpr (kTileOrder) {
        const uint4 w = *reinterpret_cast<const uint4*>(w_stage + (r0 / kTileOrderRows) * kTileOrderBytes + 16 * lane);
#pragma unroll
        for (int i = 0; i < 8; ++i) row0[i] = i < 4 ? w.x : w.y, row1[i] = i < 4 ? w.z : w.w;
      } else {
        const uint4 a_lo = *reinterpret_cast<const uint4*>(w_stage + r0 * 32);
        const uint4 a_hi = *reinterpret_cast<const uint4*>(w_stage + r0 * 32 + 16);
        const uint4 b_lo = *reinterpret_cast<const uint4*>(w_stage + (r0 + 8) * 32);
        const uint4 b_hi = *reinterpret_cast<const uint4*>(w_stage + (r0 + 8) * 32 + 16);
        const uint32_t lo[8] = {a_lo.x, a_lo.y, a_lo.z, a_lo.w, a_hi.x, a_hi.y, a_hi.z, a_hi.w};
        const uint32_t hi[8] = {b_lo.x, b_lo.y, b_lo.z, b_lo.w, b_hi.x, b_hi.y, b_hi.z, b_hi.w};
#pragma unroll
        for (int i = 0; i < 8; ++i) row0[i] = lo[i], row1[i] = hi[i];
      }
      SplitScale<__nv_bfloat16> scale0, scale1;
      if constexpr (kScalesStaged) {
        const uint2* const staged = scale_slot(slot);
        const uint2 bits0 = staged[r0], bits1 = staged[r0 + 8];
        if constexpr (T::kBlockScaled) {
          s0 = __uint_as_float(bits0.x), s1 = __uint_as_float(bits1.x);
        } else {
          scale0 = {as_pair(bits0.x), as_pair(bits0.y)};
          scale1 = {as_pair(bits1.x), as_pair(bits1.y)};
        }
      } else if constexpr (!T::kBlockScaled) {
        scale0 = split_scale<__nv_bfloat16>(s0), scale1 = split_scale<__nv_bfloat16>(s1);
      }
      // k16 step j: rows r0 / r0 + 8, k 16j + 2c.. and 16j + 8 + 2c..
      auto decode_step = [&](int j, uint32_t (&a)[4]) {
        if constexpr (T::kBlockScaled) {
          a[0] = lookup(row0[2 * j], 2 * j);
          a[1] = lookup(row1[2 * j], 2 * j);
          a[2] = lookup(row0[2 * j + 1], 2 * j + 1);
          a[3] = lookup(row1[2 * j + 1], 2 * j + 1);
        } else {
          a[0] = decode(row0[2 * j], 2 * j, scale0);
          a[1] = decode(row1[2 * j], 2 * j, scale1);
          a[2] = decode(row0[2 * j + 1], 2 * j + 1, scale0);
          a[3] = decode(row1[2 * j + 1], 2 * j + 1, scale1);
        }
      };
      if constexpr (kStepPipelined) {
        // Step j + 1's table lookups are issued before the wait that follows step j's wgmma, so that their latency
        // overlaps it.
        auto lookup_step = [&](int j, uint32_t (&bits)[4]) {
          bits[0] = lookup_ahead(row0[2 * j], 2 * j);
          bits[1] = lookup_ahead(row1[2 * j], 2 * j);
          bits[2] = lookup_ahead(row0[2 * j + 1], 2 * j + 1);
          bits[3] = lookup_ahead(row1[2 * j + 1], 2 * j + 1);
        };
        uint32_t bits[4];
        lookup_step(0, bits);
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          uint32_t (&a)[4] = a_steps[j % kStepSets];
          a[0] = scaled_pair<__nv_bfloat16>(as_pair(bits[0]), scale0);
          a[1] = scaled_pair<__nv_bfloat16>(as_pair(bits[1]), scale1);
          a[2] = scaled_pair<__nv_bfloat16>(as_pair(bits[2]), scale0);
          a[3] = scaled_pair<__nv_bfloat16>(as_pair(bits[3]), scale1);
          wgmma_fence(a);
          wgmma_bf16(acc, a, x_descriptor(slot, j));
          wgmma_commit();
          if (j < 3) lookup_step(j + 1, bits);
          wgmma_wait<kStepSets - 1>();  // the step kStepSets - 1 back is done, and its registers are free
          if (j == kStepSets - 2 && running_slot >= 0) release(running_slot);  // the last stage's last step is done
        }
        running_slot = slot;
      } else if constexpr (kStagePairs) {
        constexpr int P = decltype(parity)::value;
        uint32_t(&a)[4][4] = a_sets[P];
#pragma unroll
        for (int j = 0; j < 4; ++j) decode_step(j, a[j]);
        wgmma_fence(a);
        wgmma_bf16<false>(parts[P], a[0], x_descriptor(slot, 0));
#pragma unroll
        for (int j = 1; j < 4; ++j) wgmma_bf16(parts[P], a[j], x_descriptor(slot, j));
        wgmma_commit();
        held_slot[P] = slot, held_s0[P] = s0, held_s1[P] = s1;
      } else if constexpr (T::kBlockScaled) {
        uint32_t a[4][4];
#pragma unroll
        for (int j = 0; j < 4; ++j) decode_step(j, a[j]);
        if constexpr (decltype(with_lora)::value) {
          if (early_lora) mbar_wait(xa_full, segment & 1);
          wgmma_fence(b_first);
        }
        wgmma_fence(a);
        wgmma_bf16<false>(part, a[0], x_descriptor(slot, 0));
#pragma unroll
        for (int j = 1; j < 4; ++j) wgmma_bf16(part, a[j], x_descriptor(slot, j));
        if constexpr (decltype(with_lora)::value)
          wgmma_bf16<false>(lora_early, b_first, xa_descriptor(0, 0));
        wgmma_commit_and_wait();
        fence_accumulators(part);
        if constexpr (decltype(with_lora)::value) fence_accumulators(lora_early);
        release(slot);
        // accumulator 4j + e: row r0, or r0 + 8 for e >= 2
#pragma unroll
        for (int i = 0; i < T::kAccumulators; ++i) acc[i] = fmaf(i % 4 < 2 ? s0 : s1, part[i], acc[i]);
      } else {
        static_assert(!decltype(with_lora)::value, "the LoRA product rides the block-scaled stage only");
        uint32_t a[4][4];
#pragma unroll
        for (int j = 0; j < 4; ++j) decode_step(j, a[j]);
        wgmma_fence(a);
#pragma unroll
        for (int j = 0; j < 4; ++j) wgmma_bf16(acc, a[j], x_descriptor(slot, j));
        wgmma_commit_and_wait();
        fence_accumulators(acc);
        release(slot);
      }
    };
    if constexpr (kStagePairs) {  // stage parity at compile time: the register sets alternate
      using Set0 = std::integral_constant<int, 0>;
      using Set1 = std::integral_constant<int, 1>;
      int k = first;
      for (; k + step < seg.stages; k += 2 * step) {
        consume_stage(k, Set0{}, std::false_type{});
        consume_stage(k + step, Set1{}, std::false_type{});
        finish_held(Set0{}, Set1{});  // one group, the second stage's, may still run
        finish_held(Set1{}, Set0{});
      }
      if (k < seg.stages) {
        consume_stage(k, Set0{}, std::false_type{});
        finish_held(Set0{}, Set0{});
      }
    } else {
      using Set0 = std::integral_constant<int, 0>;
      if constexpr (kEarlyLora) {
        int k = first;
        for (; k + step < seg.stages; k += step) consume_stage(k, Set0{}, std::false_type{});
        if (k < seg.stages) consume_stage(k, Set0{}, std::true_type{});
      } else {
        for (int k = first; k < seg.stages; k += step) consume_stage(k, Set0{}, std::false_type{});
      }
    }
    if constexpr (kStepPipelined) {
      wgmma_commit_and_wait();
      fence_accumulators(acc);
      if (running_slot >= 0) release(running_slot);
    }

    // Stream-K, a tile split with another CTA: the first to get here hands its sums over through the workspace, the
    // second adds them (a + b: the same either way) and finishes the tile. Counter b of the boundary between CTAs b
    // and b + 1: 1 when the first has arrived, 2 more once its sums are stored and the second has arrived. The second
    // waits only on a CTA that is running and waits on nothing, so any order of scheduling completes.
    bool finish = true;
    if (kStreamK && seg.stages < all_stages) {
      const int64_t boundary = seg.k_begin == 0 ? blockIdx.x : blockIdx.x - 1;
      unsigned* const counter = p.stream_k_arrivals + boundary;
      float* const sums = p.stream_k_partials + boundary * T::kAccumulators * kThreads + tid;
      // Not in the rings: the other warpgroup may still be reading the segment's last stage there.
      unsigned* const order = reinterpret_cast<unsigned*>(smem + (arrival_order - base));
      if (tid == 0) *order = atomicAdd(counter, 1u);
      asm volatile("bar.sync 1, %0;\n" ::"n"(kThreads) : "memory");
      finish = *order != 0;
      if (!finish) {
#pragma unroll
        for (int i = 0; i < T::kAccumulators; ++i) __stcg(sums + i * kThreads, acc[i]);
        __threadfence();
        asm volatile("bar.sync 1, %0;\n" ::"n"(kThreads) : "memory");
        if (tid == 0) atomicAdd(counter, 1u);
      } else {
        if (tid == 0) {
          while (atomicOr(counter, 0u) != 3u) __nanosleep(64);
          *counter = 0;  // for the next launch
        }
        asm volatile("bar.sync 1, %0;\n" ::"n"(kThreads) : "memory");
        __threadfence();
#pragma unroll
        for (int i = 0; i < T::kAccumulators; ++i) acc[i] += __ldcg(sums + i * kThreads);
      }
    }
    if (finish) {
      // Epilogue through shared memory, so that y is read and written in 16-byte runs of one token rather than the
      // fragments' scattered 2-byte outputs (whose read-modify-writes would serialize). Split-K: one slice per
      // warpgroup, summed in warpgroup order.
      // Every stage consumed, so every copy landed: the rings are free. Consumers only: the producers have left.
      asm volatile("bar.sync 1, %0;\n" ::"n"(kThreads) : "memory");
      constexpr int kStride = kRows + 4;  // floats per token row: the fragment writes of a warp hit 32 banks
      constexpr int kSlices = kSplitK ? kWarpgroups : 1;
      static_assert(kSlices * kTokens * kStride * 4 <= T::kEpilogueBytes, "tile exceeds the rings");
      static_assert(kSlices * kTokens * kStride * 4 <= kStages * (kXStageBytes + kWStageBytes),
                    "the tile stays out of the code table, where xa waits");
      // lora_B's fragments for the LoRA term below.
      uint32_t b_frags[4][4];
      auto load_b = [&](int c0) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (c0 == 0 && j == 0) {
#pragma unroll
            for (int i = 0; i < 4; ++i) b_frags[0][i] = b_first[i];
          } else {
            load_b_step(c0 + 16 * j, b_frags[j]);
          }
        }
      };
      float* const tile = reinterpret_cast<float*>(smem);
      float* const slice = tile + (kSplitK ? warpgroup : 0) * kTokens * kStride;
      // accumulator 4j + e: row r0 (+ 8 for e >= 2), token 8j + 2 (lane % 4) (+ 1 for odd e)
      auto slice_at = [&](int j, int e) -> float& {
        return slice[(8 * j + 2 * (lane % 4) + (e & 1)) * kStride + r0 + (e >= 2 ? 8 : 0)];
      };
      // The LoRA term's first 64 columns go into the tile's own accumulators before they are stored, as
      // s · (acc / s + xa·lora_Bᵀ), instead of a product of their own added to the stored slice (a read-modify-write of
      // the whole tile in shared memory). Only where 1 / s and the products stay normal; with s a power of two the
      // scalings are exact. The condition is the CTA's alike, as the loop below holds barriers. Row-form tiles of 128
      // and 256 tokens only: in the split forms the change cost their main loops 3-7 instructions, and 128-token tiles
      // there 0.4-1.3 µs (H200, tools/xa_beside_gemm.cu: 8192² M = 128 41.3 -> 42.6 µs without LoRA), while the row
      // form's 128-token tiles gained 0.8 (28672x8192 M = 128 with xa ready 138.7 -> 137.9).
      // The LoRA term as wgmma products: lora_B's rows (A, from registers) times the token tile's xa (B, in shared
      // memory), r in chunks of 64, the columns past r zero. The first chunk a producer warp staged in the code table's
      // free halves (stage_xa); later ones the consumers stage in the xa tile, with the same 128-byte swizzle as x's
      // stages. add_lora_chunk adds chunk c0's product to acc.
      constexpr int kXaTile = (kSlices * kTokens * kStride * 4 + 1023) / 1024 * 1024;
      static_assert(kXaTile + kTokens * 128 <= T::kEpilogueBytes, "xa tile exceeds the rings");
      auto await_first_chunk = [&] {
        load_b(0);
        mbar_wait(xa_full, segment & 1);
      };
      // The product of chunk c0 into accumulators d, xa's k16 step j at descriptor(j).
      auto add_lora_product = [&](auto& d, int c0, auto descriptor) {
        wgmma_fence(b_frags);
#pragma unroll
        for (int j = 0; j < 4; ++j)
          if (c0 + 16 * j < p.r)  // steps wholly past r would add zeros
            wgmma_bf16(d, b_frags[j], descriptor(j));
        wgmma_commit_and_wait();
        fence_accumulators(d);
      };
      auto add_lora_chunk = [&](int c0) {
        add_lora_product(acc, c0, [&](int j) {
          return c0 == 0 ? xa_descriptor(0, j) : swizzled_descriptor(base + kXaTile + 32 * j);
        });
      };
      const float lora_scale = p.lora_scale;
      const bool lora_fits_acc = kTokens >= kMaxTokens && !kSplitK && p.r > 0 && fabsf(lora_scale) >= 0x1p-60f &&
                                 fabsf(lora_scale) <= 0x1p60f;
      const bool lora_in_acc = lora_fits_acc && split == 0;
      if (lora_in_acc && adds_lora) {
        await_first_chunk();
        const float inverse = 1.0f / lora_scale;
#pragma unroll
        for (int i = 0; i < T::kAccumulators; ++i) acc[i] *= inverse;
        add_lora_chunk(0);
#pragma unroll
        for (int i = 0; i < T::kAccumulators; ++i) acc[i] *= lora_scale;
      }
      // The split form: the term's first 64 columns as products of their own, added to the accumulators before they are
      // stored, where the wait for xa had queued behind the tile's stores. Every warpgroup takes part, so that no wgmma
      // sits in a path that differs between them (ptxas serialized every wgmma of the kernel otherwise); past the first,
      // their lora_B fragments are zeros. 64- and 128-token tiles take the product in parts of 16 and 32 tokens: whole,
      // it spilled their registers. GEMM with xa ready, µs: 4096² M = 256 24.4, 24.3 -> 24.0, 24.1; 4096x14336 M = 256
      // 62.2, 61.8 -> 61.7, 61.6; 8192x28672 M = 64 87.5, 87.4 -> 86.6, 86.9; 28672x8192 M = 64 109.5, 109.6 -> 109.1,
      // 108.8 (H200, 2026-11-30, tools/xa_beside_gemm.cu, two interleaved runs, y the same bit for bit).
      const bool lora_before_store = kSplitK && p.r > 0 && split == 0;
      if (early_lora) {
#pragma unroll
        for (int i = 0; i < kEarlyLoraFloats; ++i) acc[i] += p.lora_scale * lora_early[i];
      } else if (lora_before_store) {
        constexpr int kPart = kTokens <= 32 ? kTokens : kTokens == 64 ? 16 : 32;
        await_first_chunk();
#pragma unroll
        for (int part = 0; part < kTokens / kPart; ++part) {
          float lora[kPart / 2];
#pragma unroll
          for (int i = 0; i < kPart / 2; ++i) lora[i] = 0.0f;
          add_lora_product(lora, 0, [&](int j) { return xa_descriptor(part * kPart, j); });
#pragma unroll
          for (int i = 0; i < kPart / 2; ++i) acc[part * kPart / 2 + i] += p.lora_scale * lora[i];
        }
      }
      // The row form's K split over two CTAs, with the whole LoRA term (if any) in the accumulators: each CTA sends
      // the half of its sums that the other finishes straight from its registers into the other's shared memory, in
      // its threads' order (the same thread of the other CTA holds the same rows), and rounds its own half to y
      // through a bf16 tile, where the whole fp32 tile had been staged first and summed by runs (6 µs of the 8192²
      // M = 256 launch from the end of its main loop to the last store of y). GEMM alone, double quantization, µs:
      // 8192² M = 256 54.7 -> 54.0, and 53.8 -> 53.2 with share_code2; 8192x28672 M = 256 161.1 -> 160.7 with it (H200,
      // 2026-11-30, tools/gemm_forms.cu --dq, two interleaved runs, y the same bit for bit).
      auto exchange_halves = [&](auto own_half) {
        constexpr int kOwn = decltype(own_half)::value, kHalf = T::kAccumulators / 2;
        constexpr int kYStride = kRows + 8;  // bf16 a token: a warp's 2-byte stores below fall in distinct words
        constexpr int kIncomingBytes = kHalf * kThreads * 4;
        static_assert(kIncomingBytes + kTokens / 2 * kYStride * 2 <= kStages * (kXStageBytes + kWStageBytes),
                      "the exchange stays out of the code table");
        const float* const incoming = reinterpret_cast<const float*>(smem);
        __nv_bfloat16* const staged = reinterpret_cast<__nv_bfloat16*>(smem + kIncomingBytes);
        cluster_sync();  // both CTAs are past their main loops: their rings are free
#pragma unroll
        for (int i = 0; i < kHalf / 4; ++i) {
          const int a = (1 - kOwn) * kHalf + 4 * i;
          store_cluster_f4(base + static_cast<uint32_t>((i * kThreads + tid) * 16), split ^ 1,
                           make_float4(acc[a], acc[a + 1], acc[a + 2], acc[a + 3]));
        }
        cluster_sync();
        float bias[2] = {0.0f, 0.0f};
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int64_t n = seg.n_base + r0 + 8 * h;
          if (p.bias != nullptr && n < p.N) bias[h] = __bfloat162float(p.bias[n]);
        }
#pragma unroll
        for (int i = 0; i < kHalf / 4; ++i) {
          const float4 w = *reinterpret_cast<const float4*>(incoming + (i * kThreads + tid) * 4);
          const float other[4] = {w.x, w.y, w.z, w.w};
#pragma unroll
          for (int e = 0; e < 4; ++e) {  // accumulator 4i + e of the half: token 8i + 2 (lane % 4) + (e & 1) of it
            float v = acc[kOwn * kHalf + 4 * i + e] + other[e];
            if (p.bias != nullptr) v += bias[e / 2];
            staged[(8 * i + 2 * (lane % 4) + (e & 1)) * kYStride + r0 + (e >= 2 ? 8 : 0)] = __float2bfloat16_rn(v);
          }
        }
        asm volatile("bar.sync 1, %0;\n" ::"n"(kThreads) : "memory");
        for (int chunk = tid; chunk < kTokens / 2 * (kRows / 8); chunk += kThreads) {
          const int t = chunk / (kRows / 8), n_local = chunk % (kRows / 8) * 8;
          const int64_t m = seg.m_base + kOwn * (kTokens / 2) + t, n = seg.n_base + n_local;
          if (m >= p.M || n >= p.N) continue;
          const uint4 bits = *reinterpret_cast<const uint4*>(staged + t * kYStride + n_local);
          __nv_bfloat16* const out = p.y + m * p.N + n;
          if (n + 8 <= p.N && reinterpret_cast<uintptr_t>(out) % 16 == 0) {
            *reinterpret_cast<uint4*>(out) = bits;
          } else {
            const __nv_bfloat16* const values = reinterpret_cast<const __nv_bfloat16*>(&bits);
            for (int i = 0; i < 8 && n + i < p.N; ++i) out[i] = values[i];
          }
        }
      };
      if constexpr (kTokens == kWideTokens && !kStreamK) {  // the row form splits K for these tiles only
        if (splits == 2 && (p.r == 0 || (lora_fits_acc && p.r <= kXaColumnBlocks * 8))) {  // alike in both CTAs
          if (split == 0)
            exchange_halves(std::integral_constant<int, 0>{});
          else
            exchange_halves(std::integral_constant<int, 1>{});
          return true;
        }
      }
#pragma unroll
      for (int j = 0; j < kTokens / 8; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) slice_at(j, e) = acc[4 * j + e];
      if (p.r > 0) {
        // The chunks not in acc, each as a product of its own added to the stored slice. It runs once per CTA; in the
        // split form only the first warpgroup adds it, to its slice, and with split-K over a cluster only the
        // cluster's first CTA.
        const uint16_t* const xa = reinterpret_cast<const uint16_t*>(p.xa);
        for (int c0 = lora_in_acc || lora_before_store ? 64 : 0; split == 0 && c0 < p.r; c0 += 64) {
          if (c0 == 0) {
            if (adds_lora) await_first_chunk();
          } else {
            wait_for_prior_grid();  // xa comes from the launch before this one (launch.cuh)
            for (int chunk = tid; chunk < kTokens * 8; chunk += kThreads) {  // 16 bytes: token t, columns c0 + 8c ..
              const int t = chunk / 8, c = chunk % 8;
              const int64_t m = seg.m_base + t;
              uint32_t w[4];
#pragma unroll
              for (int i = 0; i < 4; ++i) w[i] = m < p.M ? bf16_pair_or_zero(xa + m * p.r, c0 + 8 * c + 2 * i, p.r) : 0u;
              *reinterpret_cast<uint4*>(smem + kXaTile + t * 128 + ((c ^ (t % 8)) * 16)) = make_uint4(w[0], w[1], w[2], w[3]);
            }
            asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // the generic stores, before wgmma reads them
            asm volatile("bar.sync 1, %0;\n" ::"n"(kThreads) : "memory");
            if (adds_lora) load_b(c0);
          }
          if (adds_lora) {
#pragma unroll
            for (int i = 0; i < T::kAccumulators; ++i) acc[i] = 0.0f;
            add_lora_chunk(c0);
#pragma unroll
            for (int j = 0; j < kTokens / 8; ++j)
#pragma unroll
              for (int e = 0; e < 4; ++e) slice_at(j, e) += p.lora_scale * acc[4 * j + e];
          }
          asm volatile("bar.sync 1, %0;\n" ::"n"(kThreads) : "memory");  // before the next chunk overwrites the tile
        }
      }
      asm volatile("bar.sync 1, %0;\n" ::"n"(kThreads) : "memory");
      // Split-K over a cluster: once every CTA has staged its tile, CTA z finishes tokens [z, z + 1) * kTokens / splits,
      // summing the cluster's tiles in rank order (and each tile's slices in warpgroup order).
      if (splits > 1) cluster_sync();
      constexpr int kRunsPerToken = kRows / 8;
      const int tokens_here = kTokens / splits, first_token = split * tokens_here;
      // The row form's K split over two CTAs where exchange_halves does not apply (r > 64, or s too small or large
      // to divide by): each stores the tokens the other finishes into the other's shared memory, past its tile, so
      // that the sums below read their own shared memory only. Reading the other CTA's
      // tile (each load a round trip) had taken 5.2 µs of the 8192² M = 256 launch from the cluster's barrier to the
      // last store of y, this 4.5 with the runs' loads below (H200, 2026-11-30, clock64 in each CTA).
      static_assert(kSplitK || kTokens * 3 / 2 * kStride * 4 <= T::kEpilogueBytes, "no room for the other half");
      const bool pushed = !kSplitK && splits == 2;
      float* const incoming = tile + kTokens * kStride;
      if (pushed) {
        const int other = split ^ 1, other_first = other * tokens_here;
        const uint32_t incoming_at = base + static_cast<uint32_t>(kTokens * kStride) * 4;
        for (int i = tid; i < tokens_here * kRows / 4; i += kThreads) {
          const int t = i / (kRows / 4), c = i % (kRows / 4) * 4;
          const float4 v = *reinterpret_cast<const float4*>(tile + (other_first + t) * kStride + c);
          store_cluster_f4(incoming_at + static_cast<uint32_t>(t * kStride + c) * 4, other, v);
        }
        cluster_sync();
      }
      for (int run = tid; run < tokens_here * kRunsPerToken; run += kThreads) {
        const int token = first_token + run / kRunsPerToken, n_local = (run % kRunsPerToken) * 8;
        const int64_t m = seg.m_base + token, n = seg.n_base + n_local;
        if (m >= p.M || n >= p.N) continue;
        float v[8];
        if (pushed) {  // the two CTAs' sums, a + b in either CTA
          float w[8];
          load_run(tile + token * kStride + n_local, lane, v);
          load_run(incoming + (token - first_token) * kStride + n_local, lane, w);
#pragma unroll
          for (int i = 0; i < 8; ++i) v[i] += w[i];
        } else if (splits > 1) {
          const uint32_t at = base + static_cast<uint32_t>(token * kStride + n_local) * 4;
#pragma unroll
          for (int i = 0; i < 8; ++i) v[i] = 0.0f;
          for (int rank = 0; rank < splits; ++rank)
#pragma unroll
            for (int sl = 0; sl < kSlices; ++sl) {
              const uint32_t at_slice = at + static_cast<uint32_t>(sl * kTokens * kStride) * 4;
              float w[8];
              load_run(lane, [&](uint32_t offset) { return load_cluster_f4(at_slice + offset, rank); }, w);
#pragma unroll
              for (int i = 0; i < 8; ++i) v[i] += w[i];
            }
        } else {
          load_run(tile + token * kStride + n_local, lane, v);
#pragma unroll
          for (int sl = 1; sl < kSlices; ++sl) {
            float w[8];
            load_run(tile + (sl * kTokens + token) * kStride + n_local, lane, w);
#pragma unroll
            for (int i = 0; i < 8; ++i) v[i] += w[i];
          }
        }
        if (p.bias != nullptr)
#pragma unroll
          for (int i = 0; i < 8; ++i) v[i] += n + i < p.N ? __bfloat162float(p.bias[n + i]) : 0.0f;
        __nv_bfloat16* const out = p.y + m * p.N + n;
        if (n + 8 <= p.N && reinterpret_cast<uintptr_t>(out) % 16 == 0) {
          uint4 bits;
          __nv_bfloat162* pairs = reinterpret_cast<__nv_bfloat162*>(&bits);
#pragma unroll
          for (int i = 0; i < 4; ++i) pairs[i] = __floats2bfloat162_rn(v[2 * i], v[2 * i + 1]);
          *reinterpret_cast<uint4*>(out) = bits;
        } else {
          for (int i = 0; i < 8 && n + i < p.N; ++i) out[i] = __float2bfloat16_rn(v[i]);
        }
      }
      if (splits > 1 && !pushed) cluster_sync();  // the other CTAs may still read this one's tile
    }
    return finish;
  };
  for_each_segment([&](const Segment& seg, int consumed, int index, bool more) {
    const bool finished = run_segment(seg, consumed, index);
    if (more) {  // the producer waits for this before the next segment's copies
      asm volatile("bar.sync 1, %0;\n" ::"n"(kThreads) : "memory");
      if (finished && p.r > kXaColumnBlocks * 8) {  // the xa tile of columns past 64 overlapped the code table
        build_table();
        asm volatile("bar.sync 1, %0;\n" ::"n"(kThreads) : "memory");
      }
      if (tid == 0) mbar_arrive(segment_done);
    }
  });
  if (p.r > 0) wait_for_prior_grid();  // before exit, also where no segment finished a tile (launch.cuh)
#else
  __trap();  // built without sm_90a code: gemm_4bit_built() is false and the launcher refuses
#endif
}

// The split-K form where the row form would fill less than three quarters of the SMs, and for the small token
// tiles where it would take more than a wave: measured on the H200 (2026-11-29, standalone programs, µs), M = 128
// 8192x28672 split 134.5 vs rows 230.1; M = 512 8192x28672 (256 CTAs of rows) 508.2 vs 459.0; 28672x8192 (224
// CTAs of rows; tools/gemm_forms.cu --dq) M = 16 and 32 95.8 vs 117.2, M = 64 112.7 vs 123.2, M = 128 151.0 vs
// 148.0. Four warpgroups decode the small tiles' stages faster than the row form's two.
inline bool gemm_4bit_split_k(int64_t M, int64_t N, int num_sms) {
  const int64_t row_ctas = cta_count(M, N, cta_rows(kRowFormWarpgroups, false));
  return 4 * row_ctas < 3 * static_cast<int64_t>(num_sms) || (M <= kSmallTokensMaxM && row_ctas > num_sms);
}

// 256-token tiles above 128 tokens, where their launch (row form, K split in two where that fills more SMs) has
// CTAs for three quarters of the SMs. Against 128-token tiles on the H200 (2026-11-29, standalone program, NF4 +
// double quantization, no LoRA, µs, outputs bit-identical without the split): M = 4096 4096² 286.5 -> 206.7, 8192²
// 1134 -> 809, 8192x28672 4123 -> 2900, 28672x8192 4349 -> 3121 (665-680 TFLOP/s where K is long); M = 256
// 28672x8192 (224 CTAs) 308 -> 223; M = 256 8192x28672 without the split (64 CTAs against 128) 253 -> 349. A
// warpgroup decodes a stage for 256 tokens' products instead of 128, so the decoding that kept 128-token tiles
// near 470 TFLOP/s now hides under the wgmma.
inline int64_t wide_tiles(int64_t M, int64_t N) { return cta_count(M, N, cta_rows(kRowFormWarpgroups, false), kWideTokens); }
// K splits of a tile (a cluster of CTAs, summed through distributed shared memory): 2 where one split's grid has
// CTAs for less than three quarters of the SMs and each split keeps at least kMinStagesPerSplit stages. Measured on
// the H200 (2026-11-29, standalone program, NF4 + double quantization, µs), 256-token tiles against 128-token tiles in
// their own form: M = 256 8192x28672 232.6 -> 178.0 (2 splits), 8192x8192 74.3 -> 60.5 (2); 4096x4096 25.6 -> 49.2
// with 4 splits of 16 stages, where the per-CTA costs (table, pipeline fill, epilogue) outweigh the work.
constexpr int kMaxSplits = 2, kMinStagesPerSplit = 8;
inline int k_splits(int64_t ctas, int64_t K, int num_sms) {
  int splits = 1;
  while (splits < kMaxSplits && 4 * ctas * splits < 3 * static_cast<int64_t>(num_sms) &&
         K / kStageK >= 2 * splits * kMinStagesPerSplit)
    splits *= 2;
  return splits;
}
inline int wide_splits(int64_t M, int64_t N, int64_t K, int num_sms) { return k_splits(wide_tiles(M, N), K, num_sms); }
inline bool gemm_4bit_wide_tiles_pay(int64_t M, int64_t N, int64_t K, int num_sms) {
  return M > kMaxTokens && 4 * wide_tiles(M, N) * wide_splits(M, N, K, num_sms) >= 3 * static_cast<int64_t>(num_sms);
}
// How launch_gemm_4bit launches for M tokens: the token tile, the split form or the row form, and the K splits of a
// 256-token tile (a cluster of that many CTAs). `wide`: 256-token tiles whatever M.
struct LaunchPlan {
  int tokens;
  bool split_form;
  int splits;
};
inline LaunchPlan launch_plan(int64_t M, int64_t N, int64_t K, int num_sms, bool wide) {
  if (wide || gemm_4bit_wide_tiles_pay(M, N, K, num_sms)) return {kWideTokens, false, wide_splits(M, N, K, num_sms)};
  const int tokens = tokens_for(M);
  if (!gemm_4bit_split_k(M, N, num_sms)) return {tokens, false, 1};
  return {tokens, true, k_splits(cta_count(M, N, form_rows(tokens, true), tokens), K, num_sms)};
}
// Tiles of a launch plan's form (its CTAs without a K split).
inline int64_t plan_tiles(int64_t M, int64_t N, const LaunchPlan& plan) {
  return cta_count(M, N, form_rows(plan.tokens, plan.split_form), plan.tokens);
}
// The launches with a stream-K form: 256-token tiles, and the split form's small token tiles, without a K split; the
// latter where a tile has at least kSplitStreamKMinStages stages. Measured on the H200 (2026-11-30, GEMM alone,
// tools/stream_k_gemm.cu, µs, tiles -> stream-K): 28672x8192 M = 16 85.2 -> 80.6, M = 32 90.2 -> 85.5, M = 64 106.4 ->
// 99.7, where a tile has 128 stages; with 64-65 stages 8960x4096 M = 16 26.4 -> 24.0 but 11008x4096 M = 16 27.3 ->
// 26.8 and 20480x4160 M = 40 49.4 -> 51.4, and in the op (tools/time_lora_paths.py) 11008x4096 lost at M = 32 and 64
// (31.4 -> 34.5 and 37.4 -> 40.0 µs, the counters then zeroed by a launch of their own each call). The CTAs that run
// the second wave of a short launch share the memory with fewer others and finish it faster than its share of the
// stages says, so stream-K gains less than the waves suggest, and a segment's pipeline fills anew after each epilogue.
constexpr int kSplitStreamKMinStages = 128;
constexpr bool stream_k_applies(const LaunchPlan& plan, int64_t K) {
  return plan.splits == 1 && (plan.tokens == kWideTokens || (plan.split_form && plan.tokens <= kSmallTokensMaxM &&
                                                             K / kStageK >= kSplitStreamKMinStages));
}
// CTAs of the stream-K form, or 0 where it does not apply: where the tiles, one CTA each without a K split, make at
// least a wave but fill their last one to less than nine tenths (28672x8192 at M = 256: 224 tiles of 256 tokens, two
// waves, the second 70 % full; at M <= 64, 448 tiles of the split form, four waves, the last 39 % full), the launch
// is one CTA an SM with an even share of the tiles' stages, on the SMs that a kernel running beside it (busy_sms:
// lora_down_mma's) leaves free, since a CTA that starts late finishes late.
inline int gemm_4bit_stream_k_ctas(int64_t M, int64_t N, int64_t K, int num_sms, int busy_sms = 0) {
  const LaunchPlan plan = launch_plan(M, N, K, num_sms, false);
  if (!stream_k_applies(plan, K)) return 0;
  const int64_t tiles = plan_tiles(M, N, plan), waves = (tiles + num_sms - 1) / num_sms, ctas = num_sms - busy_sms;
  const bool fits = ctas > 0 && tiles >= ctas && tiles * (K / kStageK) <= INT32_MAX;  // launch_as's conditions
  return fits && 10 * tiles < 9 * waves * num_sms ? static_cast<int>(ctas) : 0;
}
// The floats of Gemm4bitParams::stream_k_partials a launch of `ctas` CTAs needs: a tile of fp32 sums a boundary.
constexpr int64_t stream_k_partial_floats(int ctas) {
  return int64_t{ctas} * Tile<kWideTokens, false>::kAccumulators * 128 * kRowFormWarpgroups;
}
// The CTAs of the launch launch_gemm_4bit makes for M tokens without `wide`.
inline int64_t gemm_4bit_ctas(int64_t M, int64_t N, int64_t K, int num_sms) {
  const LaunchPlan plan = launch_plan(M, N, K, num_sms, false);
  return plan_tiles(M, N, plan) * plan.splits;
}

// cuTensorMapEncodeTiled from the driver through the runtime, so that the library needs no link to libcuda.
inline PFN_cuTensorMapEncodeTiled_v12000 tensor_map_encoder() {
  static const PFN_cuTensorMapEncodeTiled_v12000 encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found;
#if CUDART_VERSION >= 12050
    const cudaError_t status =
        cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &found);
#else
    const cudaError_t status = cudaGetDriverEntryPoint("cuTensorMapEncodeTiled", &fn, cudaEnableDefault, &found);
#endif
    return status == cudaSuccess && found == cudaDriverEntryPointSuccess
               ? reinterpret_cast<PFN_cuTensorMapEncodeTiled_v12000>(fn)
               : nullptr;
  }();
  return encode;
}

// A tile-ordered packed weight [N, K] as [N / 16][K / 64][128 words] (a 512-byte run is more than a box's 256
// elements of bytes), whose boxes are one 64-k block of box_rows / 16 tiles.
inline bool encode_tile_order(CUtensorMap* map, const void* packed, int64_t N, int64_t K, int box_rows) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  constexpr int kWords = kTileOrderBytes / 4;
  const cuuint64_t dims[3] = {kWords, static_cast<cuuint64_t>(K / kTileOrderK), static_cast<cuuint64_t>(N / kTileOrderRows)};
  const cuuint64_t strides[2] = {kTileOrderBytes, static_cast<cuuint64_t>(K / kTileOrderK * kTileOrderBytes)};
  const cuuint32_t box[3] = {kWords, 1, static_cast<cuuint32_t>(box_rows / kTileOrderRows)}, unit[3] = {1, 1, 1};
  return encode(map, CU_TENSOR_MAP_DATA_TYPE_UINT32, 3, const_cast<void*>(packed), dims, strides, box, unit,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_NONE, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// A row-major [rows, cols] tensor of `type` whose boxes are box_cols x box_rows elements.
inline bool encode_2d(CUtensorMap* map, CUtensorMapDataType type, int element_bytes, const void* data, int64_t rows,
                      int64_t cols, int box_cols, int box_rows, CUtensorMapSwizzle swizzle) {
  const PFN_cuTensorMapEncodeTiled_v12000 encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  const cuuint64_t dims[2] = {static_cast<cuuint64_t>(cols), static_cast<cuuint64_t>(rows)};
  const cuuint64_t row_stride[1] = {static_cast<cuuint64_t>(cols * element_bytes)};
  const cuuint32_t box[2] = {static_cast<cuuint32_t>(box_cols), static_cast<cuuint32_t>(box_rows)}, unit[2] = {1, 1};
  return encode(map, type, 2, const_cast<void*>(data), dims, row_stride, box, unit, CU_TENSOR_MAP_INTERLEAVE_NONE,
                swizzle, CU_TENSOR_MAP_L2_PROMOTION_L2_256B, CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

// splits > 1: split-K over clusters of that many CTAs (256-token tiles and the split form). stream_k_ctas > 0: the stream-K form
// in that many CTAs (256-token tiles, no split, p's stream-K workspace set).
template <QuantType QT, bool kDoubleQuant, int kTokens, int kWarpgroups, bool kSplitK, bool kStreamK = false,
          bool kTileOrder = false>
cudaError_t launch_as(const Gemm4bitParams& p, cudaStream_t stream, int splits = 1, int stream_k_ctas = 0) {
  if (splits > 1 && kTokens != kWideTokens && !kSplitK) return cudaErrorInvalidValue;
  if (kStreamK != (stream_k_ctas > 0) ||
      (kStreamK && (splits > 1 || p.stream_k_partials == nullptr || p.stream_k_arrivals == nullptr)))
    return cudaErrorInvalidValue;
  if (p.tile_order != kTileOrder || (kTileOrder && !tile_order_supported(p.N, p.K))) return cudaErrorInvalidValue;
  constexpr auto kernel = gemm_4bit_kernel<QT, kDoubleQuant, kTokens, kWarpgroups, kSplitK, kStreamK, kTileOrder>;
  constexpr int kSmemBytes = Tile<kTokens, kSplitK>::kSmemBytes;
  static_assert(!kStreamK || Tile<kTokens, kSplitK>::kAccumulators * 128 * kWarpgroups <= stream_k_partial_floats(1),
                "a boundary's sums exceed its share of the stream-K workspace");
  const cudaError_t attribute = opt_in_dynamic_smem<kernel>(kSmemBytes);
  if (attribute != cudaSuccess) return attribute;
  constexpr int rows = cta_rows(kWarpgroups, kSplitK);
  KernelArgs args;
  args.p = p;
  const int64_t tiles = (p.M + kTokens - 1) / kTokens;
  auto encode_x = [&](CUtensorMap* map, int box_rows) {
    return encode_2d(map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, 2, p.x, p.M, p.K, kStageK, box_rows, CU_TENSOR_MAP_SWIZZLE_128B);
  };
  const int rows_first = tile_rows(p.M, 0, kTokens), rows_last = tile_rows(p.M, (tiles - 1) * kTokens, kTokens);
  if (!encode_x(&args.x_map, rows_first)) return cudaErrorNotSupported;
  if (rows_last == rows_first)  // every tile full, or just one: the same box
    args.x_last_map = args.x_map;
  else if (!encode_x(&args.x_last_map, rows_last))
    return cudaErrorNotSupported;
  const bool w_encoded = kTileOrder ? encode_tile_order(&args.w_map, p.packed, p.N, p.K, rows)
                                    : encode_2d(&args.w_map, CU_TENSOR_MAP_DATA_TYPE_UINT8, 1, p.packed, p.N, p.K / 2,
                                                kStageK / 2, rows, CU_TENSOR_MAP_SWIZZLE_NONE);
  if (!w_encoded) return cudaErrorNotSupported;
  dim3 grid(static_cast<unsigned>((p.N + rows - 1) / rows), static_cast<unsigned>(tiles), static_cast<unsigned>(splits));
  if (stream_k_ctas > 0) {
    const int64_t stream_k_tiles = int64_t{grid.x} * grid.y;
    // A span must hold a whole tile, and the stage indices fit 32 bits.
    if (stream_k_tiles < stream_k_ctas || stream_k_tiles * (p.K / kStageK) > INT32_MAX) return cudaErrorInvalidValue;
    args.stream_k_tiles_n = static_cast<int>(grid.x);
    args.stream_k_tiles = static_cast<int>(stream_k_tiles);
    grid = dim3(static_cast<unsigned>(stream_k_ctas));
  }
  // Only on sm_90 (launch_gemm_4bit), where dependent launches run: with LoRA, after the launch that computes xa.
  return launch_in_clusters(kernel, grid, dim3(cta_threads(kTokens, kWarpgroups, kSplitK)), kSmemBytes, stream, p.r > 0,
                            dim3(1, 1, static_cast<unsigned>(splits)), args);
}

template <QuantType QT, bool kDoubleQuant, bool kTileOrder, int kTokens>
cudaError_t launch_with(const Gemm4bitParams& p, const LaunchPlan& plan, cudaStream_t stream) {
  constexpr int kSplitWarpgroups = split_form_warpgroups(kTokens);
  if constexpr (kTokens <= kSmallTokensMaxM)
    if (p.stream_k_ctas > 0)
      return launch_as<QT, kDoubleQuant, kTokens, kSplitWarpgroups, true, true, kTileOrder>(p, stream, 1, p.stream_k_ctas);
  return plan.split_form
             ? launch_as<QT, kDoubleQuant, kTokens, kSplitWarpgroups, true, false, kTileOrder>(p, stream, plan.splits)
             : launch_as<QT, kDoubleQuant, kTokens, kRowFormWarpgroups, false, false, kTileOrder>(p, stream);
}

template <QuantType QT, bool kDoubleQuant, bool kTileOrder>
cudaError_t launch_for(const Gemm4bitParams& p, int num_sms, bool wide, cudaStream_t stream) {
  const LaunchPlan plan = launch_plan(p.M, p.N, p.K, num_sms, wide);
  if (p.stream_k_ctas > 0 && !stream_k_applies(plan, p.K)) return cudaErrorInvalidValue;
  switch (plan.tokens) {
    case 16: return launch_with<QT, kDoubleQuant, kTileOrder, 16>(p, plan, stream);
    case 32: return launch_with<QT, kDoubleQuant, kTileOrder, 32>(p, plan, stream);
    case 64: return launch_with<QT, kDoubleQuant, kTileOrder, 64>(p, plan, stream);
    case kMaxTokens: return launch_with<QT, kDoubleQuant, kTileOrder, kMaxTokens>(p, plan, stream);
    default:
      if (p.stream_k_ctas > 0)
        return launch_as<QT, kDoubleQuant, kWideTokens, kRowFormWarpgroups, false, true, kTileOrder>(p, stream, 1,
                                                                                                     p.stream_k_ctas);
      return launch_as<QT, kDoubleQuant, kWideTokens, kRowFormWarpgroups, false, false, kTileOrder>(p, stream,
                                                                                                    plan.splits);
  }
}

}  // namespace gemm4bit

// CTAs a cluster in the launch launch_gemm_4bit makes (tiles split over K run in clusters of the splits):
// a kernel running beside the GEMM takes its SMs in clusters of as many, so that it leaves whole cluster slots free.
inline unsigned gemm_4bit_cluster_size(int64_t M, int64_t N, int64_t K, int num_sms, bool wide) {
  return static_cast<unsigned>(gemm4bit::launch_plan(M, N, K, num_sms, wide).splits);
}

// Only for bfloat16, gemm_4bit_supported layouts and a device the sm_90a code runs on (the caller checks), and for
// packed bytes in the order kTileOrder names (p.tile_order). `wide`: 256-token tiles whatever M (for tests and
// benchmarks); otherwise the tile is chosen by M and the grid. The library builds each order in a translation unit
// of its own, so that they compile side by side.
template <bool kTileOrder>
cudaError_t launch_gemm_4bit_in_order(const Gemm4bitParams& p, QuantType quant_type, int num_sms, bool wide,
                                      cudaStream_t stream) {
  if (p.M == 0 || p.N == 0) return cudaSuccess;
  if (!gemm_4bit_supported(p.K, int64_t{1} << p.log2_blocksize) || !gemm4bit::gemm_4bit_rows_fit(p.M))
    return cudaErrorInvalidValue;
  const bool dq = p.scales.absmax == nullptr;
  if (quant_type == QuantType::NF4)
    return dq ? gemm4bit::launch_for<QuantType::NF4, true, kTileOrder>(p, num_sms, wide, stream)
              : gemm4bit::launch_for<QuantType::NF4, false, kTileOrder>(p, num_sms, wide, stream);
  return dq ? gemm4bit::launch_for<QuantType::FP4, true, kTileOrder>(p, num_sms, wide, stream)
            : gemm4bit::launch_for<QuantType::FP4, false, kTileOrder>(p, num_sms, wide, stream);
}

inline cudaError_t launch_gemm_4bit(const Gemm4bitParams& p, QuantType quant_type, int num_sms, bool wide,
                                    cudaStream_t stream) {
  return p.tile_order ? launch_gemm_4bit_in_order<true>(p, quant_type, num_sms, wide, stream)
                      : launch_gemm_4bit_in_order<false>(p, quant_type, num_sms, wide, stream);
}

}  // namespace qlora
