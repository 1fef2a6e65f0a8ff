// CPU implementation of lora_linear_4bit: the weight is dequantized to float32 (the same element values as
// dequantize_4bit) and every product accumulates in float32 before one rounding to x's dtype.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <vector>

#include "../lora_linear_4bit_args.h"
#include "qlora/codebook.h"

namespace qlora {
namespace {

at::Tensor dequantize_weight_f32(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                                 const LoraLinearArgs& args, const std::optional<at::Tensor>& absmax2,
                                 const std::optional<at::Tensor>& code2, const std::optional<at::Tensor>& offset) {
  const int64_t n = args.N * args.K;
  const int64_t blocks = ceil_div(n, blocksize);
  std::vector<float> scales(blocks);
  const at::Tensor a = absmax.contiguous();
  if (args.weight.double_quant) {
    const at::Tensor s2 = absmax2->contiguous();
    const at::Tensor c2 = code2->contiguous();
    const float off = offset->item<float>();
    const uint8_t* q = a.const_data_ptr<uint8_t>();
    for (int64_t b = 0; b < blocks; ++b)
      scales[b] = mul_then_add(c2.const_data_ptr<float>()[q[b]], s2.const_data_ptr<float>()[b / kAbsmaxBlocksize], off);
  } else {
    std::copy_n(a.const_data_ptr<float>(), blocks, scales.begin());
  }
  const float* values = args.weight.quant_type == QuantType::NF4 ? kNF4Values : kFP4Values;
  const at::Tensor p = packed.contiguous();
  const uint8_t* bytes = p.const_data_ptr<uint8_t>();
  at::Tensor w = at::empty({args.N, args.K}, packed.options().dtype(at::kFloat));
  float* out = w.data_ptr<float>();
  at::parallel_for(0, ceil_div(n, 2), 4096, [&](int64_t begin, int64_t end) {
    for (int64_t byte = begin; byte < end; ++byte) {
      const int64_t i = 2 * byte;
      out[i] = values[bytes[byte] >> 4] * scales[i / blocksize];
      if (i + 1 < n) out[i + 1] = values[bytes[byte] & 15] * scales[(i + 1) / blocksize];
    }
  });
  return w;
}

at::Tensor lora_linear_4bit_cpu(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& absmax,
                                int64_t blocksize, const std::string& quant_type, c10::SymIntArrayRef shape,
                                const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& code2,
                                const std::optional<at::Tensor>& offset, const std::optional<at::Tensor>& bias,
                                const std::optional<at::Tensor>& lora_A, const std::optional<at::Tensor>& lora_B,
                                double scale, const std::optional<at::Tensor>& x_lora, int64_t path) {
  const LoraLinearArgs args = check_lora_linear_4bit_args(x, packed, absmax, blocksize, quant_type, shape, absmax2,
                                                          code2, offset, bias, lora_A, lora_B, x_lora, path);
  // `path` picks between CUDA implementations; the CPU has one.
  const at::Tensor w = dequantize_weight_f32(packed, absmax, blocksize, args, absmax2, code2, offset);
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
