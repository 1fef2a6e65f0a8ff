// Input preparation shared by the CUDA glue.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace qlora {

// The kernels' vector loads (up to 16 bytes) need an aligned start; a view that starts mid-allocation is copied
// first.
inline at::Tensor aligned_contiguous(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (reinterpret_cast<uintptr_t>(c.const_data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

}  // namespace qlora
