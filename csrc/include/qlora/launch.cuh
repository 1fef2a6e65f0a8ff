// Programmatic dependent launch (sm_90): a kernel launched as a dependent of the launch just before it in the
// stream may start before that one finishes. Torch-free.
//
// The small-M op (lora_linear_4bit.cuh) is three launches: lora_down, the GEMV, the split-K epilogue. The GEMV does
// not need lora_down's output unless it finishes y itself, so it is launched as a dependent of lora_down and starts
// while lora_down runs; the epilogue is launched as a dependent of the GEMV, so its launch latency hides under the
// GEMV's last CTAs. The tensor-core GEMM (gemm_4bit.cuh) is launched as a dependent of the launch that computes xa
// (lora_down_mma.cuh, or cuBLAS), which it reads only in its epilogue. A kernel launched that way calls
// wait_for_prior_grid before it reads what its predecessor writes, and before it exits, so that its completion still
// implies its predecessors'. Both device calls are no-ops in a kernel launched normally, and compiled out below sm_90.
#pragma once

#include <cuda_runtime.h>

#include <utility>

namespace qlora {

__device__ __forceinline__ void allow_dependent_launch() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void wait_for_prior_grid() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Whether the current device runs programmatic dependent launches (compute capability 9.0 or newer); asked of
// the runtime once per device.
inline bool dependent_launch_supported() {
  int device = 0;
  if (cudaGetDevice(&device) != cudaSuccess || device >= 64) return false;
  static int major[64] = {};
  if (major[device] == 0 && cudaDeviceGetAttribute(&major[device], cudaDevAttrComputeCapabilityMajor, device) != cudaSuccess)
    return false;
  return major[device] >= 9;
}

// Lets Kernel take up to `bytes` of dynamic shared memory, beyond the default 48 KB a CTA may take; asked of the
// runtime once per kernel and device, not on every launch.
template <auto Kernel>
cudaError_t opt_in_dynamic_smem(int bytes) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) return err;
  static bool done[64] = {};
  if (device < 64 && done[device]) return cudaSuccess;
  err = cudaFuncSetAttribute(Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (err == cudaSuccess && device < 64) done[device] = true;
  return err;
}

// kernel<<<grid, block, smem, stream>>>(args...), as a programmatic dependent of the launch just before it in
// the stream when `dependent` (see allow_dependent_launch), with the grid in clusters of `cluster` CTAs when that
// holds more than one.
template <typename... Params, typename... Args>
cudaError_t launch_in_clusters(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                               bool dependent, dim3 cluster, Args&&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.dynamicSmemBytes = smem;
  config.stream = stream;
  cudaLaunchAttribute attributes[2] = {};
  config.attrs = attributes;
  if (dependent) {
    attributes[config.numAttrs].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attributes[config.numAttrs++].val.programmaticStreamSerializationAllowed = 1;
  }
  if (cluster.x * cluster.y * cluster.z > 1) {
    attributes[config.numAttrs].id = cudaLaunchAttributeClusterDimension;
    attributes[config.numAttrs++].val.clusterDim = {cluster.x, cluster.y, cluster.z};
  }
  return cudaLaunchKernelEx(&config, kernel, std::forward<Args>(args)...);
}
template <typename... Params, typename... Args>
cudaError_t launch_maybe_dependent(void (*kernel)(Params...), dim3 grid, dim3 block, size_t smem, cudaStream_t stream,
                                   bool dependent, Args&&... args) {
  return launch_in_clusters(kernel, grid, block, smem, stream, dependent, dim3(1, 1, 1), std::forward<Args>(args)...);
}

}  // namespace qlora
