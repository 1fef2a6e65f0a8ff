// CUDA glue for lora_linear_4bit: argument checks, the choice between the fused small-M kernel, the
// tensor-core GEMM that decodes the weight in its main loop, and dequantize + cuBLAS; allocation, the current
// stream.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <map>
#include <mutex>
#include <utility>

#include "../dequantize_4bit_op.h"
#include "../lora_linear_4bit_args.h"
#include "../packed_order.h"
#include "inputs.h"
#include "dispatch.h"
#include "gemm_4bit_tile_ordered.h"
#include "lora_gemv_tiled.h"
#include "qlora/build_info.h"
#include "qlora/gemm_4bit.cuh"
#include "qlora/lora_down_mma.cuh"
#include "qlora/lora_linear_4bit.cuh"

namespace qlora {
namespace {

// Why the fused kernel cannot take these arguments, or nullptr when it can.
const char* fused_unsupported(const at::Tensor& x, const LoraLinearArgs& args) {
  if (x.scalar_type() != at::kHalf && x.scalar_type() != at::kBFloat16)
    return "x must be float16 or bfloat16 (float32 runs dequantize + GEMM)";
  if (args.K % 32 != 0) return "in_features (K) must be a multiple of 32";
  if (args.r > kFusedMaxRank) return "the LoRA rank must be at most 192";
  if (args.M > 65535) return "x must have at most 65535 rows";
  return nullptr;
}

// The small-M kernels' inputs, contiguous and aligned where their vector loads need it, alive for the launch, and y.
struct GemvInputs {
  at::Tensor x, packed, bias, lora_A, lora_B, x_lora, y;
  ScaleInputs scales;

  template <typename T>
  LoraLinearParams<T> params(const LoraLinearArgs& args, double scale, int64_t blocksize) const {
    LoraLinearParams<T> prm{};
    prm.x = static_cast<const T*>(x.const_data_ptr());
    prm.packed = packed.const_data_ptr<uint8_t>();
    prm.scales = scales.scales;
    prm.bias = bias.defined() ? static_cast<const T*>(bias.const_data_ptr()) : nullptr;
    prm.lora_B = lora_B.defined() ? static_cast<const T*>(lora_B.const_data_ptr()) : nullptr;
    prm.r = static_cast<int>(args.r);
    prm.scale = static_cast<float>(scale);
    prm.y = static_cast<T*>(y.data_ptr());
    prm.M = args.M;
    prm.N = args.N;
    prm.K = args.K;
    prm.log2_blocksize = log2_exact(blocksize);
    return prm;
  }
  template <typename T>
  const T* x_lora_ptr() const { return x_lora.defined() ? static_cast<const T*>(x_lora.const_data_ptr()) : nullptr; }
  template <typename T>
  const T* lora_A_ptr() const { return lora_A.defined() ? static_cast<const T*>(lora_A.const_data_ptr()) : nullptr; }
};

// packed is passed in the order the kernel reads. absmax aligned as well: the tiled GEMV reads a row's four block scales
// with one load.
GemvInputs gemv_inputs(const at::Tensor& x2, const at::Tensor& packed, const at::Tensor& absmax,
                       const LoraLinearArgs& args, const std::optional<at::Tensor>& absmax2,
                       const std::optional<at::Tensor>& code2, const std::optional<at::Tensor>& offset,
                       const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& lora_A,
                       const std::optional<at::Tensor>& lora_B, const std::optional<at::Tensor>& xl2) {
  GemvInputs in;
  in.x = aligned_contiguous(x2);
  in.packed = aligned_contiguous(packed);
  in.scales = contiguous_scales(aligned_contiguous(absmax), absmax2, code2, offset, args.weight.double_quant);
  if (bias.has_value()) in.bias = bias->contiguous();
  if (args.lora) {
    in.lora_A = aligned_contiguous(*lora_A);
    in.lora_B = lora_B->contiguous();
    if (xl2.has_value()) in.x_lora = aligned_contiguous(*xl2);
  }
  in.y = at::empty({args.M, args.N}, in.x.options());
  return in;
}

at::Tensor fused_forward(const at::Tensor& x2, const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                         const LoraLinearArgs& args, const std::optional<at::Tensor>& absmax2,
                         const std::optional<at::Tensor>& code2, const std::optional<at::Tensor>& offset,
                         const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& lora_A,
                         const std::optional<at::Tensor>& lora_B, double scale, const std::optional<at::Tensor>& xl2,
                         bool allow_block_scaled, int num_sms) {
  // The fused kernels read row-major bytes.
  const GemvInputs in = gemv_inputs(x2, to_row_order(packed), absmax, args, absmax2, code2, offset, bias, lora_A,
                                    lora_B, xl2);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_half(in.x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    LoraLinearPlan plan;
    C10_CUDA_CHECK(plan_lora_linear_4bit<T>(args.M, args.N, args.K, static_cast<int>(args.r), log2_exact(blocksize),
                                            args.weight.quant_type, num_sms, allow_block_scaled, &plan));
    at::Tensor scratch = at::empty({std::max<int64_t>(plan.scratch_floats, 1)}, in.x.options().dtype(at::kFloat));
    C10_CUDA_CHECK(launch_lora_linear_4bit<T>(in.params<T>(args, scale, blocksize), plan, in.x_lora_ptr<T>(),
                                              in.lora_A_ptr<T>(), scratch.data_ptr<float>(), args.weight.quant_type,
                                              num_sms, stream));
  });
  return in.y;
}

// Why the tiled small-M GEMV cannot take these arguments, or nullptr when it can (and its plan).
const char* tiled_gemv_unsupported(const at::Tensor& x, const LoraLinearArgs& args, int64_t blocksize, int num_sms,
                                   TiledGemvPlan* plan) {
  if (!args.weight.tile_order) return "packed must be in tile order (qlora.tile_order)";
  if (x.scalar_type() != at::kHalf && x.scalar_type() != at::kBFloat16) return "x must be float16 or bfloat16";
  return plan_lora_gemv_tiled(args.M, args.N, args.K, static_cast<int>(args.r), blocksize,
                              x.scalar_type() == at::kBFloat16, num_sms, plan);
}

at::Tensor tiled_gemv_forward(const at::Tensor& x2, const at::Tensor& packed, const at::Tensor& absmax,
                              const LoraLinearArgs& args, const TiledGemvPlan& plan,
                              const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& code2,
                              const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& bias,
                              const std::optional<at::Tensor>& lora_A, const std::optional<at::Tensor>& lora_B,
                              double scale, const std::optional<at::Tensor>& xl2, int num_sms) {
  const GemvInputs in = gemv_inputs(x2, packed, absmax, args, absmax2, code2, offset, bias, lora_A, lora_B, xl2);
  // The fp32 scratch and xa (16-byte aligned behind it) in one allocation, none where neither is needed: each
  // allocation is host time of every call (tools/host_time.py).
  const int64_t xa_at = (plan.scratch_floats + 3) / 4 * 4;
  const int64_t floats = xa_at + (plan.xa_beside ? (args.M * args.r + 1) / 2 : 0);
  const at::Tensor workspace = floats > 0 ? at::empty({floats}, in.x.options().dtype(at::kFloat)) : at::Tensor();
  float* scratch = workspace.defined() ? workspace.data_ptr<float>() : nullptr;
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_half(in.x.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    T* xa_out = plan.xa_beside ? reinterpret_cast<T*>(scratch + xa_at) : nullptr;
    C10_CUDA_CHECK(launch_lora_gemv_tiled<T>(in.params<T>(args, scale, kTileOrderK), plan, in.x_lora_ptr<T>(),
                                             in.lora_A_ptr<T>(), scratch, xa_out, args.weight.quant_type, num_sms,
                                             stream));
  });
  return in.y;
}

// xa = x_lora·Aᵀ, [M, r] and contiguous (a new tensor): the LoRA branch's down-projection, of x itself unless a
// dropped-out copy is given.
at::Tensor lora_down(const at::Tensor& x2, const at::Tensor& lora_A, const std::optional<at::Tensor>& xl2) {
  return at::mm(xl2.has_value() ? *xl2 : x2, lora_A.t());
}

// s·(x_lora·Aᵀ)·Bᵀ (+ bias), [M, N]: written first by dequantize + cuBLAS, whose large product then accumulates
// onto it.
at::Tensor low_rank_term(const at::Tensor& x2, const LoraLinearArgs& args, const std::optional<at::Tensor>& bias,
                         const std::optional<at::Tensor>& lora_A, const std::optional<at::Tensor>& lora_B,
                         double scale, const std::optional<at::Tensor>& xl2) {
  const at::Tensor xa = lora_down(x2, *lora_A, xl2);
  return bias.has_value() ? at::addmm(*bias, xa, lora_B->t(), 1.0, scale)
                          : at::empty({args.M, args.N}, x2.options()).addmm_(xa, lora_B->t(), 0.0, scale);
}

// Why the tensor-core GEMM cannot take these arguments, or nullptr when it can.
const char* tensor_core_unsupported(const at::Tensor& x, const LoraLinearArgs& args, int64_t blocksize) {
  if (!built_for_sm90a()) return "the library was built without sm_90a code (TORCH_CUDA_ARCH_LIST=9.0a)";
  const cudaDeviceProp* prop = at::cuda::getCurrentDeviceProperties();
  if (prop->major != 9 || prop->minor != 0) return "it needs an sm_90 GPU (H100, H200)";
  if (x.scalar_type() != at::kBFloat16) return "x must be bfloat16";
  if (gemm4bit::tensor_map_encoder() == nullptr) return "the CUDA driver offers no cuTensorMapEncodeTiled";
  if (!gemm_4bit_supported(args.K, blocksize)) return "in_features (K) must be a multiple of 64 and blocksize at least 64";
  if (!gemm4bit::gemm_4bit_rows_fit(args.M)) return "x has too many rows";
  return nullptr;
}

// The stream-K form's arrival counters for `ctas` CTAs on the current stream. A launch leaves them zero, so one
// buffer a stream serves every launch on it, which spares each call the launch that zeroes a fresh one (about 2 µs
// of the op under do_bench: 11008x4096 at M = 32 took 34.5 µs with it, H200, 2026-11-30). While the stream is captured
// into a CUDA graph, whose replays may run beside eager calls, a call gets a zeroed buffer of its own (a graph node).
at::Tensor arrival_counters(const at::Tensor& like, int ctas) {
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream().stream();
  cudaStreamCaptureStatus capture = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &capture));
  const auto options = like.options().dtype(at::kInt);
  if (capture != cudaStreamCaptureStatusNone) return at::zeros({ctas}, options);
  static std::mutex mutex;
  // Never destroyed: freeing CUDA memory during static destruction at exit can fail.
  static auto* buffers = new std::map<std::pair<c10::DeviceIndex, cudaStream_t>, at::Tensor>();
  const std::lock_guard<std::mutex> lock(mutex);
  at::Tensor& buffer = (*buffers)[{like.device().index(), stream}];
  if (!buffer.defined() || buffer.numel() < ctas) buffer = at::zeros({ctas}, options);  // ordered before the launch
  return buffer;
}

// Mid-size M: xa = x_lora·Aᵀ ([M, r], small) comes first and the kernel adds s·xa·Bᵀ and the bias to its fp32
// tile before y's one rounding, instead of a second cuBLAS call writing them into y for the kernel to accumulate
// onto. `python -m bench` on the H200, path 6 forward: 4096x4096 M = 16 47.1-71.8 µs in the two runs before, 28.2
// after; M = 256 48.0-64.5 -> 37.3 (2026-11-29). The kernel is launched as a programmatic dependent of the launch
// that computes xa (launch.cuh) and waits for it only before its epilogue. That launch is lora_down_mma where it
// takes the layout: a few CTAs that allow the GEMM's launch at their start, so that xa is computed beside the GEMM
// instead of ahead of it, as cuBLAS's x·Aᵀ was (5.5-9 µs at M = 256; beside it, 0.2-1.8 µs more than the GEMM with
// xa ready, tools/xa_beside_gemm.cu on the H200, 2026-11-29). Otherwise cuBLAS.
at::Tensor tensor_core_forward(const at::Tensor& x2, const at::Tensor& packed, const at::Tensor& absmax,
                               int64_t blocksize, const LoraLinearArgs& args, const std::optional<at::Tensor>& absmax2,
                               const std::optional<at::Tensor>& code2, const std::optional<at::Tensor>& offset,
                               const std::optional<at::Tensor>& bias, const std::optional<at::Tensor>& lora_A,
                               const std::optional<at::Tensor>& lora_B, double scale,
                               const std::optional<at::Tensor>& xl2, int num_sms, bool wide) {
  const at::Tensor x = aligned_contiguous(x2);
  const at::Tensor p = aligned_contiguous(packed);
  const ScaleInputs scales = contiguous_scales(absmax, absmax2, code2, offset, args.weight.double_quant);
  at::Tensor xa, lb, b;
  if (bias.has_value()) b = bias->contiguous();
  // The stream-K form's workspace, before xa's launch, which must be the last before the kernel.
  // Beyond kTensorCoreMaxM lora_down_mma's few CTAs fall behind the GEMM; cuBLAS computes xa first there.
  const bool xa_beside = args.lora && args.M <= kTensorCoreMaxM && lora_down_mma_supported(args.K, args.r);
  const int stream_k_ctas =
      gemm4bit::gemm_4bit_stream_k_ctas(args.M, args.N, args.K, num_sms, xa_beside ? lora_down_mma::kCtas : 0);
  at::Tensor stream_k_partials, stream_k_arrivals;
  if (stream_k_ctas > 0) {
    stream_k_partials = at::empty({gemm4bit::stream_k_partial_floats(stream_k_ctas)}, x.options().dtype(at::kFloat));
    stream_k_arrivals = arrival_counters(x, stream_k_ctas);
  }
  if (args.lora) {
    lb = lora_B->contiguous();
    // The last launch before the kernel, which starts as its dependent.
    if (xa_beside) {
      const at::Tensor xl = xl2.has_value() ? aligned_contiguous(*xl2) : x;
      const at::Tensor la = aligned_contiguous(*lora_A);
      xa = at::empty({args.M, args.r}, x.options());
      C10_CUDA_CHECK(launch_lora_down_mma(
          static_cast<const __nv_bfloat16*>(xl.const_data_ptr()), static_cast<const __nv_bfloat16*>(la.const_data_ptr()),
          static_cast<__nv_bfloat16*>(xa.data_ptr()), args.M, args.K, static_cast<int>(args.r),
          c10::cuda::getCurrentCUDAStream(), gemm_4bit_cluster_size(args.M, args.N, args.K, num_sms, wide)));
    } else {
      xa = lora_down(x2, *lora_A, xl2);
    }
  }
  at::Tensor y = at::empty({args.M, args.N}, x.options());
  Gemm4bitParams prm;
  prm.x = static_cast<const __nv_bfloat16*>(x.const_data_ptr());
  prm.packed = p.const_data_ptr<uint8_t>();
  prm.tile_order = args.weight.tile_order;
  prm.scales = scales.scales;
  prm.y = static_cast<__nv_bfloat16*>(y.data_ptr());
  prm.M = args.M;
  prm.N = args.N;
  prm.K = args.K;
  prm.log2_blocksize = log2_exact(blocksize);
  if (args.lora) {
    prm.xa = static_cast<const __nv_bfloat16*>(xa.const_data_ptr());
    prm.lora_B = static_cast<const __nv_bfloat16*>(lb.const_data_ptr());
    prm.r = static_cast<int>(args.r);
    prm.lora_scale = static_cast<float>(scale);
  }
  if (b.defined()) prm.bias = static_cast<const __nv_bfloat16*>(b.const_data_ptr());
  if (stream_k_ctas > 0) {
    prm.stream_k_ctas = stream_k_ctas;
    prm.stream_k_partials = stream_k_partials.data_ptr<float>();
    prm.stream_k_arrivals = reinterpret_cast<unsigned*>(stream_k_arrivals.data_ptr<int32_t>());
  }
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  C10_CUDA_CHECK(prm.tile_order ? launch_gemm_4bit_tile_ordered(prm, args.weight.quant_type, num_sms, wide, stream)
                                : launch_gemm_4bit_in_order<false>(prm, args.weight.quant_type, num_sms, wide, stream));
  return y;
}

// Large M: the weight is dequantized into a temporary of x's dtype (the caching allocator hands the same block
// back on the next call, so it acts as a reused workspace) and cuBLAS does the rest. When the LoRA branch reads x
// itself (no dropout) and M is large against N and K, the adapter is merged into that workspace, W + s·B·A,
// instead of two low-rank GEMMs that read all of x and write all of y. Otherwise the low-rank term (and
// bias) is written first and the large GEMM accumulates onto it with beta = 1: reading C costs little inside a
// compute-bound GEMM, where a rank-r update of a finished y would read and write all of y once more.
at::Tensor dequantize_gemm_forward(const at::Tensor& x2, const at::Tensor& packed, const at::Tensor& absmax,
                                   int64_t blocksize, const std::string& quant_type, c10::SymIntArrayRef shape,
                                   const LoraLinearArgs& args,
                                   const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& code2,
                                   const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& bias,
                                   const std::optional<at::Tensor>& lora_A, const std::optional<at::Tensor>& lora_B,
                                   double scale, const std::optional<at::Tensor>& xl2, int64_t path) {
  const bool lora_reads_x = args.lora && !xl2.has_value();
  const bool merge = path == kPathDequantizeGemmMerged ? can_merge_adapter(lora_reads_x, x2.scalar_type(), args.K, args.r)
                     : path == kPathDequantizeGemmUnmerged
                         ? false
                         : merging_adapter_pays(lora_reads_x, x2.scalar_type(), args.M, args.N, args.K, args.r);
  if (merge) {
    const at::Tensor w = call_dequantize_4bit_lora(packed, absmax, blocksize, quant_type, shape, x2.scalar_type(),
                                                   *lora_A, *lora_B, scale, absmax2, code2, offset);
    return bias.has_value() ? at::addmm(*bias, x2, w.t()) : at::mm(x2, w.t());
  }
  const at::Tensor w = call_dequantize_4bit(packed, absmax, blocksize, quant_type, shape, x2.scalar_type(),
                                            absmax2, code2, offset);
  if (!args.lora) return bias.has_value() ? at::addmm(*bias, x2, w.t()) : at::mm(x2, w.t());
  return low_rank_term(x2, args, bias, lora_A, lora_B, scale, xl2).addmm_(x2, w.t());
}

at::Tensor lora_linear_4bit_cuda(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                 int64_t blocksize, const std::string& quant_type, c10::SymIntArrayRef shape,
                                 const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& code2,
                                 const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& bias,
                                 const std::optional<at::Tensor>& lora_A, const std::optional<at::Tensor>& lora_B,
                                 double scale, const std::optional<at::Tensor>& x_lora, int64_t path) {
  const LoraLinearArgs args = check_lora_linear_4bit_args(x, packed, absmax, blocksize, quant_type, shape, absmax2,
                                                          code2, offset, bias, lora_A, lora_B, x_lora, path);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor x2 = x.reshape({args.M, args.K});
  const std::optional<at::Tensor> xl2 =
      x_lora.has_value() ? std::optional<at::Tensor>(x_lora->reshape({args.M, args.K})) : std::nullopt;
  const char* why_not_fused = fused_unsupported(x, args);
  const bool forced_fused = path == kPathFused || path == kPathFusedBlockScaled;
  TORCH_CHECK_VALUE(!forced_fused || why_not_fused == nullptr, "path=", path, " (fused small-M kernel) cannot run: ",
                    why_not_fused == nullptr ? "" : why_not_fused);
  const char* why_not_tensor_core = tensor_core_unsupported(x, args, blocksize);
  const int num_sms = at::cuda::getCurrentDeviceProperties()->multiProcessorCount;
  auto tensor_core_ctas = [&](int64_t M) {
    return why_not_tensor_core == nullptr ? gemm4bit::gemm_4bit_ctas(M, args.N, args.K, num_sms) : 0;
  };
  const bool tensor_core_pays =
      why_not_tensor_core == nullptr && tensor_core_m_in_range(args.M, args.N, args.K) &&
      (args.M <= gemm4bit::kMaxTokens || 4 * tensor_core_ctas(args.M) >= 3 * static_cast<int64_t>(num_sms)) &&
      (args.M <= kTensorCoreNarrowMaxM || gemm4bit::gemm_4bit_wide_tiles_pay(args.M, args.N, args.K, num_sms));
  const int64_t small_tile_ctas = tensor_core_ctas(gemm4bit::kSmallTokensMaxM);
  const bool small_tiles_in_rows =
      small_tile_ctas > 0 &&
      !gemm4bit::launch_plan(gemm4bit::kSmallTokensMaxM, args.N, args.K, num_sms, false).split_form;
  TiledGemvPlan tiled_plan;
  const char* why_not_tiled = tiled_gemv_unsupported(x, args, blocksize, num_sms, &tiled_plan);
  TORCH_CHECK_VALUE(path != kPathFusedTiled || why_not_tiled == nullptr, "path=", path,
                    " (tiled small-M GEMV) cannot run: ", why_not_tiled == nullptr ? "" : why_not_tiled);
  const bool tiled = path == kPathFusedTiled ||
                     (path == kPathAuto && why_not_tiled == nullptr &&
                      tiled_gemv_pays(args.N, args.K, tensor_core_ctas(args.M),
                                      int64_t{tiled_plan.grid.x} * tiled_plan.grid.y * tiled_plan.warps, num_sms));
  // A tile-ordered weight goes to the tensor-core GEMM from one token where the tiled GEMV does not take it: the
  // fused kernels read row-major bytes only and would need a row-major copy of the weight each call.
  const bool fused_reads_weight = !args.weight.tile_order || why_not_tensor_core != nullptr;
  const bool fused = !tiled && (forced_fused || (path == kPathAuto && why_not_fused == nullptr && fused_reads_weight &&
                                                 args.M <= fused_max_m(blocksize, args.K, small_tile_ctas,
                                                                       small_tiles_in_rows, num_sms)));
  const bool forced_tensor_core = path == kPathTensorCore || path == kPathTensorCoreWide;
  TORCH_CHECK_VALUE(!forced_tensor_core || why_not_tensor_core == nullptr, "path=", path,
                    " (tensor-core GEMM) cannot run: ", why_not_tensor_core == nullptr ? "" : why_not_tensor_core);
  const bool tensor_core = !tiled && !fused && why_not_tensor_core == nullptr &&
                           (forced_tensor_core || (path == kPathAuto && tensor_core_pays));
  const at::Tensor y =
      tiled ? tiled_gemv_forward(x2, packed, absmax, args, tiled_plan, absmax2, code2, offset, bias, lora_A, lora_B,
                                 scale, xl2, num_sms)
      : fused ? fused_forward(x2, packed, absmax, blocksize, args, absmax2, code2, offset, bias, lora_A, lora_B, scale,
                            xl2, path != kPathFused, num_sms)
      : tensor_core ? tensor_core_forward(x2, packed, absmax, blocksize, args, absmax2, code2, offset, bias, lora_A,
                                          lora_B, scale, xl2, num_sms, path == kPathTensorCoreWide)
                    : dequantize_gemm_forward(x2, packed, absmax, blocksize, quant_type, shape, args, absmax2, code2,
                                              offset, bias, lora_A, lora_B, scale, xl2, path);
  return y.view(args.out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CUDA, m) { m.impl("lora_linear_4bit", &lora_linear_4bit_cuda); }

}  // namespace qlora
