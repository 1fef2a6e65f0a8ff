// How the operator library was built (defined in csrc/build_info.cpp).
#pragma once

#include <string>

namespace qlora {
bool built_with_cuda();
std::string built_cuda_archs();
}  // namespace qlora
