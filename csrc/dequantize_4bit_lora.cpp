// dequantize_4bit_lora built from other ops: the CPU implementation, and the CUDA one's fallback.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "dequantize_4bit_op.h"
#include "quantize_4bit_args.h"

namespace qlora {

at::Tensor dequantize_4bit_lora_composite(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                                          const std::string& quant_type, c10::SymIntArrayRef shape,
                                          at::ScalarType dtype, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                          double scale, const std::optional<at::Tensor>& absmax2,
                                          const std::optional<at::Tensor>& code2,
                                          const std::optional<at::Tensor>& offset) {
  int64_t r = 0;
  check_dequantize_4bit_lora_args(packed, absmax, blocksize, quant_type, shape, dtype, lora_A, lora_B, absmax2, code2,
                                  offset, &r);
  at::Tensor w = call_dequantize_4bit(packed, absmax, blocksize, quant_type, shape, at::kFloat, absmax2, code2, offset);
  w.addmm_(lora_B.to(at::kFloat), lora_A.to(at::kFloat), 1.0, scale);
  return w.to(dtype);
}

TORCH_LIBRARY_IMPL(qlora, CPU, m) { m.impl("dequantize_4bit_lora", &dequantize_4bit_lora_composite); }

}  // namespace qlora
