#include "quantize_4bit_args.h"

#include <c10/util/Exception.h>

#include "packed_order.h"
#include "qlora/tile_order.h"

namespace qlora {

QuantType parse_quant_type(const std::string& quant_type) {
  if (quant_type == "nf4") return QuantType::NF4;
  TORCH_CHECK_VALUE(quant_type == "fp4", "quant_type must be 'nf4' or 'fp4', got '", quant_type, "'");
  return QuantType::FP4;
}

void check_blocksize(int64_t blocksize) {
  TORCH_CHECK_VALUE(valid_blocksize_4bit(blocksize),
                    "blocksize must be one of 32, 64, 128, 256, 512, 1024, 2048, 4096, got ", blocksize);
}

void check_float_input(const at::Tensor& t, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
                   name, " must be float32, float16 or bfloat16, got ", t.scalar_type());
}

void check_same_device(const at::Tensor& t, const at::Tensor& ref, const char* name, const char* ref_name) {
  TORCH_CHECK(t.device() == ref.device(), name, " is on ", t.device(), " but ", ref_name, " is on ", ref.device());
}

void check_dtype(const at::Tensor& t, at::ScalarType dtype, const char* name) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, name, " must be ", dtype, ", got ", t.scalar_type());
}

void check_numel(const at::Tensor& t, int64_t expected, const char* name, const char* why) {
  TORCH_CHECK_VALUE(t.numel() == expected, name, " has ", t.numel(), " elements but ", expected, " are expected ", why);
}

DequantizeArgs check_dequantize_4bit_args(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                                                 const std::string& quant_type, c10::SymIntArrayRef shape,
                                                 at::ScalarType dtype, const std::optional<at::Tensor>& absmax2,
                                                 const std::optional<at::Tensor>& code2,
                                                 const std::optional<at::Tensor>& offset) {
  DequantizeArgs args{parse_quant_type(quant_type), 1, false};
  check_blocksize(blocksize);
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16,
                   "dtype must be float32, float16 or bfloat16, got ", dtype);
  for (const auto& s : shape) {
    const int64_t d = s.expect_int();
    TORCH_CHECK_VALUE(d >= 0, "shape must not have negative sizes, got ", shape);
    args.numel *= d;
  }
  check_dtype(packed, at::kByte, "packed");
  check_numel(packed, ceil_div(args.numel, 2), "packed", "(two 4-bit codes per byte for the given shape)");
  args.tile_order = is_tile_ordered(packed);
  if (args.tile_order) {
    const bool fits = shape.size() == 2 && tile_order_supported(shape[0].expect_int(), shape[1].expect_int()) &&
                      packed.size(0) * kTileOrderRows == shape[0].expect_int() &&
                      packed.size(1) * kTileOrderK == shape[1].expect_int() && packed.size(2) == kTileOrderBytes;
    TORCH_CHECK_VALUE(fits, "a 3-D packed is a tile-ordered weight [out_features / 16, in_features / 64, 512]; got ",
                      packed.sizes(), " for shape ", shape);
  }
  check_same_device(absmax, packed, "absmax", "packed");
  const int64_t blocks = ceil_div(args.numel, blocksize);
  check_numel(absmax, blocks, "absmax", "(one per block of the given shape and blocksize)");
  args.double_quant = absmax.scalar_type() == at::kByte;
  if (!args.double_quant) {
    check_dtype(absmax, at::kFloat, "absmax");
    TORCH_CHECK_VALUE(!absmax2.has_value() && !code2.has_value() && !offset.has_value(),
                      "absmax2, code2 and offset are only used with a double-quantized (uint8) absmax");
    return args;
  }
  TORCH_CHECK_VALUE(absmax2.has_value() && code2.has_value() && offset.has_value(),
                    "a uint8 absmax is double-quantized and needs absmax2, code2 and offset");
  check_dtype(*absmax2, at::kFloat, "absmax2");
  check_dtype(*code2, at::kFloat, "code2");
  check_dtype(*offset, at::kFloat, "offset");
  check_same_device(*absmax2, packed, "absmax2", "packed");
  check_same_device(*code2, packed, "code2", "packed");
  check_same_device(*offset, packed, "offset", "packed");
  check_numel(*absmax2, ceil_div(blocks, kAbsmaxBlocksize), "absmax2", "(one per 256 absmax codes)");
  check_numel(*code2, 256, "code2", "(an 8-bit code)");
  check_numel(*offset, 1, "offset", "(a scalar)");
  return args;
}

DequantizeArgs check_dequantize_4bit_lora_args(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                                               const std::string& quant_type, c10::SymIntArrayRef shape,
                                               at::ScalarType dtype, const at::Tensor& lora_A,
                                               const at::Tensor& lora_B, const std::optional<at::Tensor>& absmax2,
                                               const std::optional<at::Tensor>& code2,
                                               const std::optional<at::Tensor>& offset, int64_t* rank) {
  TORCH_CHECK_VALUE(shape.size() == 2, "shape must be the weight's [out_features, in_features], got ", shape);
  const DequantizeArgs args =
      check_dequantize_4bit_args(packed, absmax, blocksize, quant_type, shape, dtype, absmax2, code2, offset);
  const int64_t N = shape[0].expect_int(), K = shape[1].expect_int();
  check_dtype(lora_A, dtype, "lora_A");
  check_dtype(lora_B, dtype, "lora_B");
  check_same_device(lora_A, packed, "lora_A", "packed");
  check_same_device(lora_B, packed, "lora_B", "packed");
  TORCH_CHECK_VALUE(lora_A.dim() == 2 && lora_A.size(1) == K, "lora_A must be [r, in_features] = [r, ", K, "], got ",
                    lora_A.sizes());
  const int64_t r = lora_A.size(0);
  TORCH_CHECK_VALUE(lora_B.dim() == 2 && lora_B.size(0) == N && lora_B.size(1) == r,
                    "lora_B must be [out_features, r] = [", N, ", ", r, "], got ", lora_B.sizes());
  *rank = r;
  return args;
}

void check_double_quantize_args(const at::Tensor& absmax, const at::Tensor& code) {
  check_dtype(absmax, at::kFloat, "absmax");
  check_dtype(code, at::kFloat, "code");
  check_same_device(code, absmax, "code", "absmax");
  check_numel(code, 256, "code", "(an 8-bit code)");
}

}  // namespace qlora
