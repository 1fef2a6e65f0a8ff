// Paged tensors on the CPU, where every tensor already lives in host memory: paged_empty is at::empty and
// prefetch and advice have nothing to do. Also the routing of paged_empty, a factory op whose only hint of
// a backend is its device argument.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DispatchKeySet.h>
#include <torch/library.h>

#include <string>

namespace qlora {
namespace {

void check_location(const std::string& location) {
  TORCH_CHECK_VALUE(location == "device" || location == "host" || location == "none",
                    "location must be 'device', 'host' or 'none', got '", location, "'");
}

at::Tensor paged_empty_cpu(c10::SymIntArrayRef size, at::ScalarType dtype, at::Device device) {
  return at::empty(C10_AS_INTARRAYREF_SLOW(size), at::TensorOptions().dtype(dtype).device(device));
}

void paged_prefetch_cpu(const at::Tensor&, bool) {}

void paged_advise_cpu(const at::Tensor&, const std::string& location) { check_location(location); }

bool is_paged_cpu(const at::Tensor&) { return false; }

// A factory op has no tensor argument to dispatch on, so this kernel (which the dispatcher always tries
// first for such ops) picks the backend from `device`, as ATen's factory functions do.
at::Tensor paged_empty_backend_select(c10::SymIntArrayRef size, at::ScalarType dtype, at::Device device) {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("qlora::paged_empty", "")
                             .typed<at::Tensor(c10::SymIntArrayRef, at::ScalarType, at::Device)>();
  const c10::DispatchKeySet keys(c10::computeDispatchKey(dtype, at::kStrided, device));
  return op.redispatch(keys, size, dtype, device);
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, BackendSelect, m) { m.impl("paged_empty", &paged_empty_backend_select); }

TORCH_LIBRARY_IMPL(qlora, CPU, m) {
  m.impl("paged_empty", &paged_empty_cpu);
  m.impl("paged_prefetch", &paged_prefetch_cpu);
  m.impl("paged_advise", &paged_advise_cpu);
  m.impl("is_paged", &is_paged_cpu);
}

}  // namespace qlora
