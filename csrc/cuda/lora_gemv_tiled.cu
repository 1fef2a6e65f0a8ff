#include "lora_gemv_tiled.h"

namespace qlora {

template cudaError_t launch_lora_gemv_tiled<__half>(LoraLinearParams<__half>, const TiledGemvPlan&, const __half*,
                                                     const __half*, float*, __half*, QuantType, int, cudaStream_t);
template cudaError_t launch_lora_gemv_tiled<__nv_bfloat16>(LoraLinearParams<__nv_bfloat16>, const TiledGemvPlan&,
                                                            const __nv_bfloat16*, const __nv_bfloat16*, float*,
                                                            __nv_bfloat16*, QuantType, int, cudaStream_t);

}  // namespace qlora
