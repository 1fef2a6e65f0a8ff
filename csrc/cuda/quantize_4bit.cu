// CUDA glue for the quantization ops: argument checks, allocation, the current stream, dtype dispatch.
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../quantize_4bit_args.h"
#include "inputs.h"
#include "dispatch.h"
#include "qlora/quantize_4bit.cuh"

namespace qlora {
namespace {

std::tuple<at::Tensor, at::Tensor> quantize_4bit_cuda(const at::Tensor& A, int64_t blocksize,
                                                      const std::string& quant_type) {
  check_float_input(A, "A");
  check_blocksize(blocksize);
  const QuantType qt = parse_quant_type(quant_type);
  const c10::cuda::CUDAGuard guard(A.device());
  const at::Tensor a = aligned_contiguous(A);
  const int64_t n = a.numel();
  at::Tensor packed = at::empty({ceil_div(n, 2), 1}, a.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({ceil_div(n, blocksize)}, a.options().dtype(at::kFloat));
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(a.scalar_type(), [&](auto tag) {
    using T = decltype(tag);
    C10_CUDA_CHECK(launch_quantize_4bit<T>(static_cast<const T*>(a.const_data_ptr()), packed.data_ptr<uint8_t>(),
                                           absmax.data_ptr<float>(), n, blocksize, qt, stream));
  });
  return {packed, absmax};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> double_quantize_cuda(const at::Tensor& absmax, const at::Tensor& code) {
  check_double_quantize_args(absmax, code);
  const c10::cuda::CUDAGuard guard(absmax.device());
  const at::Tensor a = aligned_contiguous(absmax);
  const at::Tensor c = code.contiguous();
  const int64_t n = a.numel();
  at::Tensor qabsmax = at::empty({n}, a.options().dtype(at::kByte));
  at::Tensor absmax2 = at::empty({ceil_div(n, kAbsmaxBlocksize)}, a.options());
  at::Tensor offset = at::zeros({}, a.options());
  at::Tensor scratch = at::empty({ceil_div(double_quantize_scratch_bytes(n), 8)}, a.options().dtype(at::kDouble));
  C10_CUDA_CHECK(launch_double_quantize(a.const_data_ptr<float>(), c.const_data_ptr<float>(), qabsmax.data_ptr<uint8_t>(),
                                        absmax2.data_ptr<float>(), offset.data_ptr<float>(), scratch.data_ptr(), n,
                                        at::cuda::getCurrentDeviceProperties()->multiProcessorCount,
                                        c10::cuda::getCurrentCUDAStream()));
  return {qabsmax, absmax2, offset};
}

at::Tensor dequantize_4bit_cuda(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                                const std::string& quant_type, c10::SymIntArrayRef shape, at::ScalarType dtype,
                                const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& code2,
                                const std::optional<at::Tensor>& offset) {
  const DequantizeArgs args =
      check_dequantize_4bit_args(packed, absmax, blocksize, quant_type, shape, dtype, absmax2, code2, offset);
  const c10::cuda::CUDAGuard guard(packed.device());
  at::Tensor out = at::empty(C10_AS_INTARRAYREF_SLOW(shape), packed.options().dtype(dtype));
  const at::Tensor p = aligned_contiguous(packed);
  const ScaleInputs scales = contiguous_scales(absmax, absmax2, code2, offset, args.double_quant);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  dispatch_float(dtype, [&](auto tag) {
    using T = decltype(tag);
    C10_CUDA_CHECK(launch_dequantize_4bit<T>(p.const_data_ptr<uint8_t>(), scales.scales,
                                             static_cast<T*>(out.data_ptr()), args.numel, blocksize, args.quant_type,
                                             stream, args.tile_order ? shape[1].expect_int() : 0));
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CUDA, m) {
  m.impl("quantize_4bit", &quantize_4bit_cuda);
  m.impl("double_quantize", &double_quantize_cuda);
  m.impl("dequantize_4bit", &dequantize_4bit_cuda);
}

}  // namespace qlora
