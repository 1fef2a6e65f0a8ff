// How the operator library was built (defined in csrc/build_info.cpp).
#pragma once

#include <string>

namespace qlora {
bool built_with_cuda();
std::string built_cuda_archs();
// Whether the sm_90a-only kernels (the tensor-core 4-bit GEMM) were compiled and are the sm_90 image.
bool built_for_sm90a();
// Whether the CPU kernels' at::parallel_for runs on OpenMP threads: ATen's OpenMP backend is header code, compiled
// into the library, so the library itself must be built with OpenMP.
bool built_with_openmp();
}  // namespace qlora
