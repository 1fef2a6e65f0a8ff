// CUDA glue for paged tensors: unified memory exposed as ordinary CUDA tensors, prefetch and advice on the
// current stream. The runtime calls themselves are qlora/paged.cuh.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <c10/core/ScalarType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAFunctions.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/accumulate.h>
#include <torch/library.h>

#include <string>

#include "qlora/paged.cuh"

namespace qlora {
namespace {

int device_index(const at::Device& device) {
  return device.has_index() ? device.index() : static_cast<int>(c10::cuda::current_device());
}

// The pages a tensor can touch: its whole storage, so that views prefetch what they may read.
bool managed_storage(const at::Tensor& t, const void** base, size_t* bytes) {
  *base = t.storage().data();
  *bytes = t.storage().nbytes();
  if (*base == nullptr || *bytes == 0) return false;
  bool managed = false;
  C10_CUDA_CHECK(is_managed_pointer(*base, &managed));
  return managed;
}

at::Tensor paged_empty_cuda(c10::SymIntArrayRef size, at::ScalarType dtype, at::Device device) {
  const at::IntArrayRef sizes = C10_AS_INTARRAYREF_SLOW(size);
  for (const int64_t s : sizes) TORCH_CHECK_VALUE(s >= 0, "size must not have negative sizes, got ", sizes);
  const int dev = device_index(device);
  const c10::cuda::CUDAGuard guard(static_cast<c10::DeviceIndex>(dev));
  const at::Device target(at::kCUDA, static_cast<c10::DeviceIndex>(dev));
  const at::TensorOptions options = at::TensorOptions().dtype(dtype).device(target);
  const size_t bytes = c10::multiply_integers(sizes) * c10::elementSize(dtype);
  bool pageable = false;
  C10_CUDA_CHECK(managed_memory_pageable(dev, &pageable));
  if (!pageable) {
    TORCH_WARN_ONCE("qlora paged tensors: GPU ", dev, " lacks concurrent managed access ",
                    "(cudaDevAttrConcurrentManagedAccess is 0, e.g. Windows, some virtual machines), so unified ",
                    "memory cannot page on demand. Paged tensors fall back to ordinary device memory and stay on the ",
                    "GPU; qlora.optim.is_paged() reports False for them.");
    return at::empty(sizes, options);
  }
  if (bytes == 0) return at::empty(sizes, options);
  size_t free_bytes = 0, total_bytes = 0;
  C10_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  TORCH_CHECK_WITH(OutOfMemoryError, bytes <= free_bytes, "paged_empty: ", bytes, " bytes of unified memory requested but GPU ",
                   dev, " has only ", free_bytes, " bytes free (torch.cuda.mem_get_info). Unified memory is never ",
                   "allocated beyond the GPU's free memory: oversubscribing a shared GPU can stall it.");
  void* ptr = nullptr;
  C10_CUDA_CHECK(cudaMallocManaged(&ptr, bytes, cudaMemAttachGlobal));
  return at::for_blob(ptr, sizes)
      .options(options)
      .target_device(target)
      .deleter([](void* p) {
        // cudaFree waits for the device, so no kernel still uses the pages. At interpreter exit the runtime
        // may already be gone; clear the error so that it does not surface in an unrelated later check.
        if (cudaFree(p) != cudaSuccess) (void)cudaGetLastError();
      })
      .make_tensor();
}

void paged_prefetch_cuda(const at::Tensor& t, bool to_device) {
  const void* base = nullptr;
  size_t bytes = 0;
  if (!managed_storage(t, &base, &bytes)) return;
  const int dev = t.device().index();
  bool pageable = false;
  C10_CUDA_CHECK(managed_memory_pageable(dev, &pageable));
  if (!pageable) return;
  const c10::cuda::CUDAGuard guard(t.device());
  C10_CUDA_CHECK(prefetch_managed(base, bytes, to_device ? dev : -1, c10::cuda::getCurrentCUDAStream()));
}

void paged_advise_cuda(const at::Tensor& t, const std::string& location) {
  TORCH_CHECK_VALUE(location == "device" || location == "host" || location == "none",
                    "location must be 'device', 'host' or 'none', got '", location, "'");
  const void* base = nullptr;
  size_t bytes = 0;
  if (!managed_storage(t, &base, &bytes)) return;
  const c10::cuda::CUDAGuard guard(t.device());
  const int dev = t.device().index();
  C10_CUDA_CHECK(advise_preferred_location(base, bytes, location == "host" ? -1 : dev, location == "none"));
}

bool is_paged_cuda(const at::Tensor& t) {
  const void* base = nullptr;
  size_t bytes = 0;
  return managed_storage(t, &base, &bytes);
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CUDA, m) {
  m.impl("paged_empty", &paged_empty_cuda);
  m.impl("paged_prefetch", &paged_prefetch_cuda);
  m.impl("paged_advise", &paged_advise_cuda);
  m.impl("is_paged", &is_paged_cuda);
}

}  // namespace qlora
