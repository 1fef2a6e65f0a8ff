// CPU implementation of lora_linear_4bit: the weight is dequantized to float32 by dequantize_4bit and every
// product accumulates in float32 before one rounding to x's dtype.
#include <ATen/ATen.h>
#include <torch/library.h>

#include "../dequantize_4bit_op.h"
#include "../lora_linear_4bit_args.h"

namespace qlora {
namespace {

at::Tensor lora_linear_4bit_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                int64_t blocksize, const std::string& quant_type, c10::SymIntArrayRef shape,
                                const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& code2,
                                const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& lora_A, const std::optional<at::Tensor>& lora_B,
                                double scale, const std::optional<at::Tensor>& x_lora, int64_t path) {
  const LoraLinearArgs args = check_lora_linear_4bit_args(x, packed, absmax, blocksize, quant_type, shape, absmax2,
                                                          code2, offset, bias, lora_A, lora_B, x_lora, path);
  // `path` picks between CUDA implementations; the CPU has one.
  const at::Tensor w =
      call_dequantize_4bit(packed, absmax, blocksize, quant_type, shape, at::kFloat, absmax2, code2, offset);
  const at::Tensor x2 = x.reshape({args.M, args.K}).to(at::kFloat);
  at::Tensor y = bias.has_value() ? at::addmm(bias->to(at::kFloat), x2, w.t()) : at::mm(x2, w.t());
  if (args.lora) {
    const at::Tensor xl = x_lora.has_value() ? x_lora->reshape({args.M, args.K}).to(at::kFloat) : x2;
    const at::Tensor xa = at::mm(xl, lora_A->to(at::kFloat).t());
    y.addmm_(xa, lora_B->to(at::kFloat).t(), 1.0, scale);
  }
  return y.to(x.scalar_type()).view(args.out_shape);
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CPU, m) { m.impl("lora_linear_4bit", &lora_linear_4bit_cpu); }

}  // namespace qlora
