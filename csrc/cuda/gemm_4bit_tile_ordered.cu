#include "gemm_4bit_tile_ordered.h"

#include "qlora/gemm_4bit.cuh"

namespace qlora {

cudaError_t launch_gemm_4bit_tile_ordered(const Gemm4bitParams& p, QuantType quant_type, int num_sms, bool wide,
                                          cudaStream_t stream) {
  return launch_gemm_4bit_in_order<true>(p, quant_type, num_sms, wide, stream);
}

}  // namespace qlora
