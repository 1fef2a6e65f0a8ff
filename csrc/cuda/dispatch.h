// dtype dispatch for the CUDA glue: calls f with a value of the CUDA element type matching `dtype`.
#pragma once

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace qlora {

template <typename F>
void dispatch_float(at::ScalarType dtype, const F& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    default: TORCH_CHECK_TYPE(false, "unsupported dtype ", dtype);
  }
}

// The 16-bit types only (tensor-core kernels).
template <typename F>
void dispatch_half(at::ScalarType dtype, const F& f) {
  if (dtype == at::kHalf) {
    f(__half{});
  } else {
    TORCH_CHECK_TYPE(dtype == at::kBFloat16, "unsupported dtype ", dtype);
    f(__nv_bfloat16{});
  }
}

}  // namespace qlora
