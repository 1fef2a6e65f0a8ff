// Unified ("paged") memory: allocation, prefetch and placement advice. Torch-free wrappers over the CUDA
// runtime that hide the CUDA 12 / CUDA 13 differences (CUDA 13 takes a cudaMemLocation where CUDA 12 took
// a device ordinal, with cudaCpuDeviceId for the host).
#pragma once

#include <cuda_runtime.h>

#include <cstddef>

namespace qlora {

// Whether `device` can migrate managed pages on demand while kernels run (Linux, Pascal or newer, not
// under most virtualisation). Without it, managed memory cannot page and qlora falls back to device memory.
inline cudaError_t managed_memory_pageable(int device, bool* pageable) {
  int value = 0;
  const cudaError_t err = cudaDeviceGetAttribute(&value, cudaDevAttrConcurrentManagedAccess, device);
  *pageable = err == cudaSuccess && value != 0;
  return err;
}

inline cudaError_t is_managed_pointer(const void* ptr, bool* managed) {
  cudaPointerAttributes attributes{};
  const cudaError_t err = cudaPointerGetAttributes(&attributes, ptr);
  *managed = err == cudaSuccess && attributes.type == cudaMemoryTypeManaged;
  return err;
}

// device >= 0: that GPU; device < 0: host memory.
#if CUDART_VERSION >= 13000
inline cudaMemLocation memory_location(int device) {
  cudaMemLocation location{};
  location.type = device >= 0 ? cudaMemLocationTypeDevice : cudaMemLocationTypeHost;
  location.id = device >= 0 ? device : 0;
  return location;
}
#endif

// Migrates [ptr, ptr + bytes) to `device` (or the host when device < 0), ordered on `stream`.
inline cudaError_t prefetch_managed(const void* ptr, size_t bytes, int device, cudaStream_t stream) {
#if CUDART_VERSION >= 13000
  return cudaMemPrefetchAsync(ptr, bytes, memory_location(device), 0, stream);
#else
  return cudaMemPrefetchAsync(ptr, bytes, device >= 0 ? device : cudaCpuDeviceId, stream);
#endif
}

// Sets (or, with unset, clears) the preferred location of [ptr, ptr + bytes): `device`, or the host when
// device < 0. Pages stay where they prefer to be until memory pressure evicts them.
inline cudaError_t advise_preferred_location(const void* ptr, size_t bytes, int device, bool unset) {
  const cudaMemoryAdvise advice = unset ? cudaMemAdviseUnsetPreferredLocation : cudaMemAdviseSetPreferredLocation;
#if CUDART_VERSION >= 13000
  return cudaMemAdvise(ptr, bytes, advice, memory_location(device));
#else
  return cudaMemAdvise(ptr, bytes, advice, device >= 0 ? device : cudaCpuDeviceId);
#endif
}

}  // namespace qlora
