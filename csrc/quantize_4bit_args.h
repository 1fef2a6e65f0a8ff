// Argument checks shared by the CPU and CUDA implementations of the quantization ops: one wording for
// every error, each naming the argument at fault. Defined in quantize_4bit_args.cpp, so that only the host
// compiler ever builds the error paths.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>

#include "qlora/codebook.h"

namespace qlora {

QuantType parse_quant_type(const std::string& quant_type);
void check_blocksize(int64_t blocksize);
void check_float_input(const at::Tensor& t, const char* name);
void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name);
void check_dtype(const at::Tensor& t, at::ScalarType dtype, const char* name);
void check_numel(const at::Tensor& t, int64_t expected, const char* name, const char* why);

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// The validated arguments of dequantize_4bit.
struct DequantizeArgs {
  QuantType quant_type;
  int64_t numel;
  bool double_quant;
  bool tile_order = false;  // packed is [N / 16, K / 64, 512] (qlora/tile_order.h)
};

DequantizeArgs check_dequantize_4bit_args(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                                          const std::string& quant_type, c10::SymIntArrayRef shape,
                                          at::ScalarType dtype, const std::optional<at::Tensor>& absmax2,
                                          const std::optional<at::Tensor>& code2,
                                          const std::optional<at::Tensor>& offset);

void check_double_quantize_args(const at::Tensor& absmax, const at::Tensor& code);

// dequantize_4bit's checks, plus: a 2-D shape [N, K], lora_A [r, K] and lora_B [N, r] of `dtype` on packed's
// device. Returns r in `rank`.
DequantizeArgs check_dequantize_4bit_lora_args(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                                               const std::string& quant_type, c10::SymIntArrayRef shape,
                                               at::ScalarType dtype, const at::Tensor& lora_A,
                                               const at::Tensor& lora_B, const std::optional<at::Tensor>& absmax2,
                                               const std::optional<at::Tensor>& code2,
                                               const std::optional<at::Tensor>& offset, int64_t* rank);

}  // namespace qlora
