// The tiled small-M GEMV's launches, built in a translation unit of their own (lora_gemv_tiled.cu) so that they
// compile beside the kernels of lora_linear_4bit.cu.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "qlora/lora_gemv_tiled.cuh"

namespace qlora {

extern template cudaError_t launch_lora_gemv_tiled<__half>(LoraLinearParams<__half>, const TiledGemvPlan&,
                                                            const __half*, const __half*, float*, __half*, QuantType,
                                                            int, cudaStream_t);
extern template cudaError_t launch_lora_gemv_tiled<__nv_bfloat16>(LoraLinearParams<__nv_bfloat16>,
                                                                   const TiledGemvPlan&, const __nv_bfloat16*,
                                                                   const __nv_bfloat16*, float*, __nv_bfloat16*,
                                                                   QuantType, int, cudaStream_t);

}  // namespace qlora
