// CUDA glue for dequantize_4bit_lora: the merged-weight kernel where the layout allows it, else the composite.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../dequantize_4bit_op.h"
#include "../packed_order.h"
#include "../quantize_4bit_args.h"
#include "inputs.h"
#include "dispatch.h"
#include "qlora/dequantize_lora.cuh"

namespace qlora {
namespace {

at::Tensor dequantize_4bit_lora_cuda(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                                     const std::string& quant_type, c10::SymIntArrayRef shape, at::ScalarType dtype,
                                     const at::Tensor& lora_A, const at::Tensor& lora_B, double scale,
                                     const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& code2,
                                     const std::optional<at::Tensor>& offset) {
  int64_t r = 0;
  const DequantizeArgs args = check_dequantize_4bit_lora_args(packed, absmax, blocksize, quant_type, shape, dtype,
                                                              lora_A, lora_B, absmax2, code2, offset, &r);
  const int64_t N = shape[0].expect_int(), K = shape[1].expect_int();
  if (dtype == at::kFloat || !dequantize_lora_supported(K, r))
    return dequantize_4bit_lora_composite(packed, absmax, blocksize, quant_type, shape, dtype, lora_A, lora_B, scale,
                                          absmax2, code2, offset);
  const c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor out = at::empty({N, K}, packed.options().dtype(dtype));
  // The kernel reads tile order where each lane's 16 weights of a row lie in one quantization block.
  const bool tile_order = is_tile_ordered(packed) && blocksize >= kTileOrderK;
  const at::Tensor p = aligned_contiguous(tile_order ? packed : to_row_order(packed));  // 8- and 16-byte loads
  const at::Tensor la = lora_A.contiguous(), lb = lora_B.contiguous();
  const ScaleInputs scales = contiguous_scales(absmax, absmax2, code2, offset, args.double_quant);
  dispatch_half(dtype, [&](auto tag) {
    using T = decltype(tag);
    DequantizeLoraParams<T> prm{};
    prm.packed = p.const_data_ptr<uint8_t>();
    prm.scales = scales.scales;
    prm.lora_A = static_cast<const T*>(la.const_data_ptr());
    prm.lora_B = static_cast<const T*>(lb.const_data_ptr());
    prm.lora_B_pairs = r % 2 == 0 && reinterpret_cast<uintptr_t>(lb.const_data_ptr()) % 4 == 0;
    prm.tile_order = tile_order;
    prm.r = static_cast<int>(r);
    prm.scale = static_cast<float>(scale);
    prm.out = static_cast<T*>(out.data_ptr());
    prm.N = N;
    prm.K = K;
    prm.log2_blocksize = log2_exact(blocksize);
    C10_CUDA_CHECK(launch_dequantize_lora<T>(prm, args.quant_type, c10::cuda::getCurrentCUDAStream()));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CUDA, m) { m.impl("dequantize_4bit_lora", &dequantize_4bit_lora_cuda); }

}  // namespace qlora
