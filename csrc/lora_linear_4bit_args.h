// Argument checks shared by the CPU and CUDA implementations of lora_linear_4bit: one wording for every
// error, each naming the argument at fault.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "qlora/common.cuh"
#include "quantize_4bit_args.h"

namespace qlora {

// Which implementation lora_linear_4bit runs on CUDA. Values other than kAuto are for benchmarking.
// The fused small-M path has two GEMV kernels: a block-scaled one (block_scaled_layout; M <= 32 per grid
// slice; one scale per block, weights and x streamed through cp.async rings) and a general one that scales
// every weight. kPathAuto and kPathFusedBlockScaled take the block-scaled kernel where the layout allows it;
// kPathFused always takes the general one.
// Measured on the H200 (2026-11-28, r = 16, bf16, CUDA-graph times, tools/time_lora_paths.py, block-scaled
// vs general): M = 1 8192x28672 66 vs 95 us, 28672x8192 68 vs 94 us; M = 16 8192x28672 102 vs 247 us.
// kPathDequantizeGemm merges the adapter into the dequantized weight by merging_adapter_pays;
// kPathDequantizeGemmMerged always does where it can (no x_lora, 16-bit x, dequantize_lora_supported), and
// kPathDequantizeGemmUnmerged never does. kPathTensorCore is the wgmma GEMM that decodes the weight in its
// main loop (gemm_4bit.cuh: bfloat16, sm_90a, K % 64 == 0, blocksize >= 64), with token tiles chosen by M and
// the grid; kPathTensorCoreWide the same with 256-token tiles whatever M. kPathFusedTiled is the small-M GEMV for
// tile-ordered weights (lora_gemv_tiled.cuh: up to 8 rows of x, 16-bit x, blocksize 64, N % 16 == 0, K % 256 == 0).
enum LoraLinearPath : int64_t {
  kPathAuto = 0,
  kPathFused = 1,
  kPathDequantizeGemm = 2,
  kPathFusedBlockScaled = 3,
  kPathDequantizeGemmMerged = 4,
  kPathDequantizeGemmUnmerged = 5,
  kPathTensorCore = 6,
  kPathTensorCoreWide = 7,
  kPathFusedTiled = 8,
};

// Largest M for which the automatic choice takes the fused small-M kernel rather than dequantize + cuBLAS.
// Measured on the H200 (2026-11-28, r = 16, bf16, `python -m bench --only lora_linear`, µs): the block-scaled
// kernel with x streamed through its ring ties or wins up to M = 64 (4096x4096 40.7 vs 39.4, 8192x28672 250.0
// vs 300.4) and loses at M = 128 (4096x4096 55.3 vs 43.6, 8192x28672 497.2 vs 299.0), where each 32-row slice
// of x decodes the weights again. The general loop lost to dequantize + cuBLAS already at M = 32 (4096x4096 44 vs 33 us,
// 8192x28672 371 vs 288; CUDA-graph times, tools/time_lora_paths.py), so other layouts stop at 32.
// Where the tensor-core GEMM can run, it takes over from the fused kernel at an M set by the CTAs of its launch
// with 32- or 64-token tiles (gemm4bit::gemm_4bit_ctas): above 16 where they fill a third of the SMs. It first paid
// above 16 only where they fill three quarters, above 32 where they fill a third: H200, 2026-11-29,
// tools/time_lora_paths.py, do_bench µs, r = 16, fused (the better layout) against tensor-core: 224 and 128 CTAs,
// 14336x4096 M = 16 35.2 vs 37.1, M = 24 49.2 vs 37.2;
// 8192x8192 M = 16 34.0 vs 36.9, M = 24 48.1 vs 37.2. 64 CTAs, 4096x14336 M = 32 45.1 vs 53.0, M = 48 73.1 vs
// 58.3, M = 64 77.3 vs 58.4; 4096x4096 M = 32 24.8 vs 23.3, M = 48 32.5 vs 25.3. 16 CTAs, 1024x4096: the fused
// kernel wins through its range (M = 48 19.4 vs 24.7, M = 64 22.3 vs 24.9).
// Once the GEMM's split form staged its scales, launches that fill a third of the SMs went over to it from 17 tokens
// too, at any K (H200, 2026-11-29, tools/time_lora_paths.py, do_bench µs, fused against tensor-core): 4096x4096
// M = 24 24.6 vs 21.0, M = 32 26.8 vs 20.3; 4096x8192 M = 24 33.3 vs 30.7, M = 32 34.6 vs 30.8; 4096x14336 M = 24
// 45.8 vs 45.5, M = 32 47.1 vs 45.5. At M = 16 the fused kernel still wins (4096x8192 24.8 vs 30.6).
// With 16-token tiles and x·Aᵀ spread over four CTAs, a launch of one wave that fills three quarters of the SMs
// takes over from 3 tokens (H200, 2026-11-29, tools/time_lora_paths.py, do_bench µs, block-scaled fused against
// tensor-core, 128 CTAs): 8192x28672 M = 1 66.9 vs 69.1, M = 2 69.0 vs 69.2, M = 4 73.3 vs 69.3, M = 16 84.0 vs
// 69.3; 8192x8192 M = 2 30.7 vs 28.7, M = 4 31.4 vs 28.8, M = 16 33.4 vs 29.0. Other launches keep the fused kernel
// to 16: 28672x8192 (448 CTAs) M = 16 90.3 vs 91.3, 4096x14336 (64) 34.0 vs 38.3, 14336x4096 (224) 34.5 vs 33.2,
// 4096x4096 (64) 19.3 vs 17.3 (13.3 vs 13.8 in CUDA graphs).
// Once the split form also split K over a cluster of two CTAs where its grid was small (N = 4096: 128 CTAs instead of
// 64, N = 1024: 32 instead of 16), a full wave of the GEMM won from 1 token unless rows are long, and 32 CTAs from
// 16 tokens (H200, 2026-11-29, tools/time_lora_paths.py, do_bench µs, block-scaled fused against tensor-core):
// 4096x4096 M = 1 17.7 vs 15.7, M = 16 20.0 vs 16.4; 4096x8192 M = 1 23.3 vs 20.5; 4096x14336 M = 1 29.5 vs 26.6,
// M = 16 32.7 vs 27.2; 1024x4096 M = 1-8 within 1 µs, M = 16 17.3 vs 15.3, M = 64 22.7 vs 19.2. With long rows
// the fused kernel keeps 1 and 2 tokens (8192x28672 M = 1 66.9 vs 69.1 above; 8192x8192 M = 1 29.7 vs 28.6 did not).
// Launches of more than a wave of small-tile CTAs, and one wave of the row form, take the GEMM from 9 tokens, where
// x no longer fits one of the fused kernel's 8-token tiles and 9 tokens cost it what 16 do (H200, 2026-11-30,
// tools/time_lora_paths.py, do_bench µs, block-scaled fused against tensor-core): 28672x8192 (448 CTAs) M = 8 77.8 vs
// 86.0, M = 16 89.7 vs 86.7; 8960x4096 (140) M = 8 26.1 vs 28.5, M = 16 29.4 vs 28.8; 14336x4096 (112 of the row
// form) M = 1 29.2 vs 33.0, M = 8 30.8 vs 32.9, M = 16 35.3 vs 33.0.
// Once the fused kernel staged x up to 124 KB whole (kScaledSplitMaxXBytes), long rows on a full wave kept it to 6
// tokens (H200, 2026-11-30, tools/time_lora_paths.py, do_bench µs, block-scaled fused against tensor-core):
// 8192x28672 M = 3 63.1 vs 68.1, M = 4 63.4 vs 68.2, M = 6 63.6 vs 68.0, M = 8 79.3 vs 68.1.
constexpr int64_t kFusedMaxM = 32;
constexpr int64_t kFusedBlockScaledMaxM = 64;
constexpr int64_t kFusedBelowFullWaveTensorCoreMaxM = 6;  // one wave of the split form, K >= kFusedLongRowsK
constexpr int64_t kFusedOneTokenTileMaxM = 8;             // one wave of the row form, or more than a wave
constexpr int64_t kFusedBelowTensorCoreMaxM = 16;         // a GEMM launch filling a third to three quarters of the SMs
constexpr int64_t kFusedBelowSmallTensorCoreMaxM = 8;     // a GEMM launch filling a fifth to a third of the SMs
constexpr int64_t kFusedLongRowsK = 16384;  // from this K the fused kernel keeps a few tokens on a full wave
// tensor_core_ctas: the CTAs of the GEMM's launch with small token tiles (0 where it cannot run); in_rows: whether
// that launch is the row form.
inline int64_t fused_max_m(int64_t blocksize, int64_t K, int64_t tensor_core_ctas, bool in_rows, int num_sms) {
  const int64_t own = block_scaled_layout(blocksize, K) ? kFusedBlockScaledMaxM : kFusedMaxM;
  const int64_t sms = num_sms;
  const bool one_full_wave = tensor_core_ctas <= sms && 4 * tensor_core_ctas >= 3 * sms;
  if (one_full_wave && !in_rows) return K >= kFusedLongRowsK ? std::min(own, kFusedBelowFullWaveTensorCoreMaxM) : 0;
  if (one_full_wave || tensor_core_ctas > sms) return std::min(own, kFusedOneTokenTileMaxM);
  if (3 * tensor_core_ctas >= sms) return std::min(own, kFusedBelowTensorCoreMaxM);
  if (5 * tensor_core_ctas >= sms) return std::min(own, kFusedBelowSmallTensorCoreMaxM);
  return own;
}
// Largest M for which the automatic choice takes the tensor-core GEMM (kPathTensorCore, where it applies) rather
// than dequantize + cuBLAS, above the fused kernel's range; above 128 tokens only where its launch has CTAs for
// three quarters of the SMs (gemm4bit::gemm_4bit_ctas), and above 512 only with 256-token tiles
// (gemm_4bit_wide_tiles_pay: 1024x4096 M = 1024 in 128 CTAs of 128-token tiles took 54.3 µs, against 31.7 for
// dequantize + cuBLAS). Measured on the H200 (2026-11-29, r = 16, bf16, forward µs, tensor-core vs the better
// dequantize + cuBLAS form), with 128-token tiles (`python -m bench`): M = 128 8192x28672 160.9 vs 296.8, 4096x4096
// 54.6 vs 58.6 (and 29.9 vs 110.6 in the run of 18cc912, with 64 CTAs); M = 256 8192x8192 93.4 vs 111.9; with
// 256-token tiles where their grid fills the GPU (gemm_4bit_wide_tiles_pay), `python -m bench` paths rows: M = 512
// 8192x28672 395.9 vs 502.6, 4096x4096 57.0 vs 80.5; M = 1024 8192x28672 813.9 vs 862.7. With x·Aᵀ beside the GEMM
// (lora_down_mma), tools/time_lora_paths.py, do_bench µs, M = 1024: 4096x4096 63.2 vs 77.7 (the automatic choice,
// then dequantize + cuBLAS, 68.1), 14336x4096 242.7 vs 241.7, 4096x14336 185.4 vs 232.5, 8192x8192 234.9 vs 262.4,
// 28672x8192 854.5 vs 909.0. Launches short of the SMs lose above 128 tokens: 1024x4096 M = 512 (64 CTAs) 32.5 vs
// 28.3, M = 256 (32 CTAs) 29.4 vs 29.6. With lora_down_mma beside, at M = 1536 dequantize + cuBLAS won on all seven
// shapes (4096x4096 104.7 vs 136.3, 14336x4096 335.0 vs 385.7, 8192x28672 1242.2 vs 1279.0), and at M = 4096 the
// merged form by 5-15 %: under sustained load both run at the board's power limit, where cuBLAS does more per clock
// than a kernel that also decodes.
constexpr int64_t kTensorCoreMaxM = 1024, kTensorCoreNarrowMaxM = 512;
// Above kTensorCoreMaxM the GEMM takes xa from cuBLAS (lora_down_mma's few CTAs fall behind it there) and still beats
// dequantize + cuBLAS where the weight is large and M moderate, or K is long. tools/time_lora_paths.py --paths
// auto,tensor-core-wide,bf16 on the H200 (2026-11-30), do_bench µs, r = 16, GEMM / dequantize + cuBLAS:
//   M = 1536: 8192x8192 333.1 / 350.5, 8192x28672 1097.6 / 1202.7, 28672x8192 1207.4 / 1247.2, 14336x4096 294.7 /
//             318.0, 4096x14336 329.4 / 329.6, 4096x4096 103.2 / 90.2;
//   M = 2048: 442.5 / 456.8, 1458.4 / 1574.2, 1582.5 / 1623.2, 399.1 / 411.5, 378.2 / 398.6, 122.5 / 116.7;
//   M = 4096: 8192x28672 2890.2 / 3015.8 (bf16 F.linear 2838.6), 4096x14336 731.9 / 731.4, 14336x4096 794.7 / 765.4,
//             28672x8192 3119.8 / 3035.6, 8192x8192 885.5 / 868.0, 4096x4096 228.6 / 220.0.
constexpr int64_t kTensorCoreLargeWeightMaxM = 2048, kTensorCoreLargeWeightMinElements = int64_t{1} << 25;
constexpr int64_t kTensorCoreLongKMaxM = 4096, kTensorCoreLongKMinK = 16384;
inline bool tensor_core_m_in_range(int64_t M, int64_t N, int64_t K) {
  return M <= kTensorCoreMaxM || (M <= kTensorCoreLargeWeightMaxM && N * K >= kTensorCoreLargeWeightMinElements) ||
         (M <= kTensorCoreLongKMaxM && K >= kTensorCoreLongKMinK);
}
// Where the automatic choice takes the tiled small-M GEMV for a tile-ordered weight (it runs up to 8 rows of x) rather
// than the tensor-core GEMM: weights of at least 2^27 elements; and, where the tiled GEMV streams with at least 6 warps
// an SM, weights of at least 2^25 elements or where the GEMM's launch for M is not one full wave. H200, 2026-12-01,
// tools/time_tile_order.py --tiled, do_bench µs, r = 16, M = 1 / 2 / 4 / 8, tiled GEMV against the GEMM on tile
// order, once the tiled GEMV's weight came through shared memory by bulk copies: 8192² 22.7 / 22.4 / 22.6 / 23.3
// against 24.5 / 24.5 / 24.5 / 24.6; 4096x14336 20.0 / 21.0 / 21.1 / 21.5 against 23.2 / 23.3 / 23.4 / 23.6; 5120²
// (GEMM 160 CTAs) 14.6 / 15.8 / 15.4 / 15.7 against 22.4 / 22.5 / 22.8 / 23.2; 1024x4096 (32 CTAs) 12.7 / 12.6 /
// 12.7 / 12.8 against 12.7 / 12.8 / 12.9 / 13.0; but 4096² 14.4 / 14.6 / 14.6 / 14.7 against 13.9 / 14.0 / 13.8 /
// 14.1. Before that (2026-11-30) 8192x28672 52.5 / 58.4 (M = 1 / 8) against 62.9 / 62.8, 28672x8192 53.6 / 60.8
// against 71.6 / 71.6, 14336x4096 24.6 / 26.2 against 26.8 / 27.0. 4096x11008's 43 groups of K allow the tiled GEMV
// one split (256 warps, 2 an SM): 38.3-49.9 against 21.3-21.7 (2026-12-01).
constexpr int64_t kTiledGemvMinElements = int64_t{1} << 27, kTiledGemvStreamingMinElements = int64_t{1} << 25;
constexpr int64_t kTiledGemvMinWarpsPerSm = 6;
inline bool tiled_gemv_pays(int64_t N, int64_t K, int64_t gemm_ctas, int64_t tiled_warps, int num_sms) {
  const bool gemm_one_wave = gemm_ctas <= num_sms && 4 * gemm_ctas >= 3 * static_cast<int64_t>(num_sms);
  const bool tiled_streams = tiled_warps >= kTiledGemvMinWarpsPerSm * num_sms;
  return N * K >= kTiledGemvMinElements ||
         (tiled_streams && (N * K >= kTiledGemvStreamingMinElements || !gemm_one_wave));
}
// Largest LoRA rank the fused kernel stages in shared memory (64 rows x r floats within 48 KB).
constexpr int64_t kFusedMaxRank = 192;

// Whether the large-M path (forward and the backward's grad_x) merges the adapter into the dequantized weight
// (dequantize_4bit_lora) instead of two low-rank GEMMs: where that is exact (the LoRA branch reads x itself, not a
// dropped-out copy), the merging kernel takes the layout (16-bit dtype, dequantize_lora_supported), and the rows'
// traffic M·(N + K) is at least a third of the weight count N·K. The two low-rank GEMMs read all of x and write
// all of y (cost in M·(N + K)); merging costs what the merging kernel takes beyond dequantize_4bit (in N·K).
// Measured on the H200 (2026-11-29, r = 16, bf16, µs; the kernels standalone with CUDA events, the cuBLAS calls
// by triton do_bench), at M = 4096 for 4096², 8192², 8192x28672, 28672x8192: merging beyond dequantizing 5, 19,
// 50, 46; the low-rank GEMMs 38, 58, 99, 107; so the break-even M is about 530, 1350, 2060, 1770, where
// M·(N + K) / (N·K) = 0.26 to 0.33. In `python -m bench` at M = 4096 the merged path then read 1-14 % faster
// than the unmerged one on all four shapes.
inline bool can_merge_adapter(bool lora_reads_x, at::ScalarType dtype, int64_t K, int64_t r) {
  return lora_reads_x && dtype != at::kFloat && dequantize_lora_supported(K, r);
}
// The size rule alone, for int64_t or for c10::SymInt (whose comparison installs a guard on symbolic sizes, so
// that eager and compiled runs take the same path).
template <typename Int>
auto merging_adapter_rows_pay(const Int& M, const Int& N, const Int& K) {
  return M * (N + K) * 3 >= N * K;
}
inline bool merging_adapter_pays(bool lora_reads_x, at::ScalarType dtype, int64_t M, int64_t N, int64_t K,
                                 int64_t r) {
  return can_merge_adapter(lora_reads_x, dtype, K, r) && merging_adapter_rows_pay(M, N, K);
}

struct LoraLinearArgs {
  DequantizeArgs weight;
  int64_t M, N, K, r;
  bool lora;
  std::vector<int64_t> out_shape;  // x.shape[:-1] + [N]
};

inline LoraLinearArgs check_lora_linear_4bit_args(const at::Tensor& x, const at::Tensor& packed,
                                                  const at::Tensor& absmax, int64_t blocksize,
                                                  const std::string& quant_type, c10::SymIntArrayRef shape,
                                                  const std::optional<at::Tensor>& absmax2,
                                                  const std::optional<at::Tensor>& code2,
                                                  const std::optional<at::Tensor>& offset,
                                                  const std::optional<at::Tensor>& bias,
                                                  const std::optional<at::Tensor>& lora_A,
                                                  const std::optional<at::Tensor>& lora_B,
                                                  const std::optional<at::Tensor>& x_lora, int64_t path) {
  check_float_input(x, "x");
  TORCH_CHECK_VALUE(shape.size() == 2, "shape must be the weight's [out_features, in_features], got ", shape);
  TORCH_CHECK_VALUE(x.dim() >= 1, "x must have at least one dimension (in_features last)");
  LoraLinearArgs args;
  args.weight = check_dequantize_4bit_args(packed, absmax, blocksize, quant_type, shape, x.scalar_type(), absmax2,
                                           code2, offset);
  args.N = shape[0].expect_int();
  args.K = shape[1].expect_int();
  check_same_device(packed, x, "packed", "x");
  TORCH_CHECK_VALUE(x.size(-1) == args.K, "x has ", x.size(-1), " features in its last dimension but the weight has ",
                    args.K, " (shape ", shape, ")");
  args.M = args.K > 0 ? x.numel() / args.K : 0;
  if (args.K == 0) {
    args.M = 1;
    for (int64_t d = 0; d + 1 < x.dim(); ++d) args.M *= x.size(d);
  }
  args.out_shape = x.sizes().vec();
  args.out_shape.back() = args.N;
  if (bias.has_value()) {
    check_dtype(*bias, x.scalar_type(), "bias");
    check_same_device(*bias, x, "bias", "x");
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == args.N, "bias must have shape [", args.N, "], got ",
                      bias->sizes());
  }
  TORCH_CHECK_VALUE(lora_A.has_value() == lora_B.has_value(), "lora_A and lora_B must be given together");
  args.lora = lora_A.has_value();
  args.r = 0;
  if (args.lora) {
    check_dtype(*lora_A, x.scalar_type(), "lora_A");
    check_dtype(*lora_B, x.scalar_type(), "lora_B");
    check_same_device(*lora_A, x, "lora_A", "x");
    check_same_device(*lora_B, x, "lora_B", "x");
    TORCH_CHECK_VALUE(lora_A->dim() == 2 && lora_A->size(1) == args.K && lora_A->size(0) > 0,
                      "lora_A must have shape [r, ", args.K, "] with r >= 1, got ", lora_A->sizes());
    args.r = lora_A->size(0);
    TORCH_CHECK_VALUE(lora_B->dim() == 2 && lora_B->size(0) == args.N && lora_B->size(1) == args.r,
                      "lora_B must have shape [", args.N, ", ", args.r, "] (out_features, r), got ", lora_B->sizes());
  }
  if (x_lora.has_value()) {
    TORCH_CHECK_VALUE(args.lora, "x_lora is the input of the LoRA branch and needs lora_A and lora_B");
    check_dtype(*x_lora, x.scalar_type(), "x_lora");
    check_same_device(*x_lora, x, "x_lora", "x");
    TORCH_CHECK_VALUE(x_lora->sizes() == x.sizes(), "x_lora must have the shape of x ", x.sizes(), ", got ",
                      x_lora->sizes());
  }
  TORCH_CHECK_VALUE(path >= kPathAuto && path <= kPathFusedTiled,
                    "path must be 0 (automatic), 1 (fused small-M kernel), 2 (dequantize + GEMM), 3 (fused, "
                    "block-scaled loop), 4 (dequantize + GEMM, adapter merged), 5 (dequantize + GEMM, adapter "
                    "not merged), 6 (tensor-core GEMM decoding the 4-bit weight), 7 (the same with 256-token tiles) or 8 (the "
                    "small-M GEMV for tile-ordered weights), got ", path);
  return args;
}

}  // namespace qlora
