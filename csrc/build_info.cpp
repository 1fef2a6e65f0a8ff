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

bool built_with_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

bool built_for_sm90a() {
  // With a plain sm_90 image beside it, which of the two an H100/H200 loads is not ours to pick.
  const std::string archs = std::string(" ") + QLORA_CUDA_ARCHS + " ";
  return archs.find(" sm_90a ") != std::string::npos && archs.find(" sm_90 ") == std::string::npos;
}

}  // namespace qlora
