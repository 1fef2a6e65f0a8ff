// qlora._C: importing it loads the operator library (libqlora_ops), which registers torch.ops.qlora.*.
// The module itself only reports how the library was built and exposes the C++ codebooks to the tests.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <vector>

#include "qlora/build_info.h"
#include "qlora/codebook.h"

namespace {

std::vector<float> code_table(const std::string& name) {
  using namespace qlora;
  if (name == "nf4") return {std::begin(kNF4Values), std::end(kNF4Values)};
  if (name == "fp4") return {std::begin(kFP4Values), std::end(kFP4Values)};
  if (name == "nf4_thresholds") return {std::begin(kNF4Thresholds), std::end(kNF4Thresholds)};
  if (name == "fp4_thresholds") return {std::begin(kFP4Thresholds), std::end(kFP4Thresholds)};
  throw pybind11::value_error("unknown code table '" + name + "'");
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "qlora operator library loader";
  m.def("code_table", &code_table, "The C++ copy of a codebook or threshold table, for consistency tests.");
  m.def("with_cuda", &qlora::built_with_cuda, "Whether the CUDA kernels were compiled into the library.");
  m.def("cuda_archs", &qlora::built_cuda_archs, "The CUDA architectures the kernels were compiled for.");
  m.def("sm90a", &qlora::built_for_sm90a, "Whether the sm_90a kernels (tensor-core 4-bit GEMM) were compiled.");
  m.def("openmp", &qlora::built_with_openmp, "Whether the CPU kernels run on torch's OpenMP threads.");
}
