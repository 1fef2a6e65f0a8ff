// Input preparation shared by the CUDA glue.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>

#include "qlora/quantize_4bit.cuh"

namespace qlora {

// The kernels' vector loads (up to 16 bytes) need an aligned start; a view that starts mid-allocation is copied
// first.
inline at::Tensor aligned_contiguous(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.const_data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

// Contiguous scale tensors, alive for as long as the launch needs them, and the pointers the kernels read.
struct ScaleInputs {
  at::Tensor absmax, absmax2, code2, offset;
  BlockScales scales;
};

// absmax is float32 (plain) or the uint8 codes of double quantization, described by absmax2, code2, offset.
inline ScaleInputs contiguous_scales(const at::Tensor& absmax, const std::optional<at::Tensor>& absmax2,
                                     const std::optional<at::Tensor>& code2, const std::optional<at::Tensor>& offset,
                                     bool double_quant) {
  ScaleInputs in;
  in.absmax = absmax.contiguous();
  if (!double_quant) {
    in.scales.absmax = in.absmax.const_data_ptr<float>();
    return in;
  }
  in.absmax2 = absmax2->contiguous();
  in.code2 = code2->contiguous();
  in.offset = offset->contiguous();
  in.scales.qabsmax = in.absmax.const_data_ptr<uint8_t>();
  in.scales.absmax2 = in.absmax2.const_data_ptr<float>();
  in.scales.code2 = in.code2.const_data_ptr<float>();
  in.scales.offset = in.offset.const_data_ptr<float>();
  return in;
}

}  // namespace qlora
