#include "qlora/build_info.h"

#ifndef QLORA_CUDA_ARCHS
#define QLORA_CUDA_ARCHS ""
#endif

namespace qlora {

bool built_with_cuda() {
#ifdef QLORA_WITH_CUDA
  return true;
#else
  return false;
#endif
}

std::string built_cuda_archs() { return QLORA_CUDA_ARCHS; }

}  // namespace qlora
