// The tensor-core GEMM for tile-ordered weights, built in a translation unit of its own (gemm_4bit_tile_ordered.cu)
// so that it compiles beside the row-major kernels of lora_linear_4bit.cu.
#pragma once

#include <cuda_runtime.h>

#include "qlora/codebook.h"

namespace qlora {

struct Gemm4bitParams;

cudaError_t launch_gemm_4bit_tile_ordered(const Gemm4bitParams& p, QuantType quant_type, int num_sms, bool wide,
                                          cudaStream_t stream);

}  // namespace qlora
