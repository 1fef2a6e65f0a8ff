// qlora::dequantize_4bit called through the dispatcher, for C++ code that needs a weight dense (the CPU
// lora_linear_4bit, the autograd backward): every caller then decodes exactly as the op does, on any device.
#pragma once

#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>

#include <optional>
#include <string>

namespace qlora {

inline at::Tensor call_dequantize_4bit(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                                       const std::string& quant_type, c10::SymIntArrayRef shape, at::ScalarType dtype,
                                       const std::optional<at::Tensor>& absmax2,
                                       const std::optional<at::Tensor>& code2,
                                       const std::optional<at::Tensor>& offset) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("qlora::dequantize_4bit", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, const std::string&, c10::SymIntArrayRef,
                            at::ScalarType, const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&)>();
  return op.call(packed, absmax, blocksize, quant_type, shape, dtype, absmax2, code2, offset);
}

// qlora::dequantize_4bit_lora through the dispatcher: dequant(W) + scale·lora_B·lora_A.
inline at::Tensor call_dequantize_4bit_lora(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                                            const std::string& quant_type, c10::SymIntArrayRef shape,
                                            at::ScalarType dtype, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                            double scale, const std::optional<at::Tensor>& absmax2,
                                            const std::optional<at::Tensor>& code2,
                                            const std::optional<at::Tensor>& offset) {
  static const auto op =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("qlora::dequantize_4bit_lora", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, const std::string&, c10::SymIntArrayRef,
                            at::ScalarType, const at::Tensor&, const at::Tensor&, double,
                            const std::optional<at::Tensor>&, const std::optional<at::Tensor>&,
                            const std::optional<at::Tensor>&)>();
  return op.call(packed, absmax, blocksize, quant_type, shape, dtype, lora_A, lora_B, scale, absmax2, code2, offset);
}

// dequantize_4bit_lora from other ops, on any device (the CPU implementation, and the CUDA one's fallback for
// layouts its kernel does not take): the weight dequantized to float32, the adapter added by addmm, one rounding.
at::Tensor dequantize_4bit_lora_composite(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                                          const std::string& quant_type, c10::SymIntArrayRef shape,
                                          at::ScalarType dtype, const at::Tensor& lora_A, const at::Tensor& lora_B,
                                          double scale, const std::optional<at::Tensor>& absmax2,
                                          const std::optional<at::Tensor>& code2,
                                          const std::optional<at::Tensor>& offset);

}  // namespace qlora
