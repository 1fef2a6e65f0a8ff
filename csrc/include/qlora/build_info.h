// How the operator library was built (defined in csrc/build_info.cpp).
#pragma once

#include <string>

namespace qlora {
bool built_with_cuda();
std::string built_cuda_archs();
// Whether the sm_90a-only kernels (the tensor-core 4-bit GEMM) were compiled and are the sm_90 image.
bool built_for_sm90a();
}  // namespace qlora
