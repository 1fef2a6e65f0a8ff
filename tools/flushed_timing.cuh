// Timing for the standalone kernel programs in tools/, as the benchmarks time: 256 MB written before each run, so
// L2 holds another buffer's dirty lines, then CUDA events around the launch; the median after a warm-up, in µs.
#pragma once

#include <algorithm>
#include <vector>

#include <cuda_runtime.h>

constexpr size_t kFlushBytes = size_t{256} << 20;

// prepare(i) runs before run i, outside the timed events.
template <typename P, typename F>
float median_us_after(P prepare, F launch, int runs, int warmup) {
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  std::vector<float> t;
  for (int i = 0; i < runs; ++i) {
    prepare(i);
    cudaEventRecord(a);
    launch();
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float ms;
    cudaEventElapsedTime(&ms, a, b);
    if (i >= warmup) t.push_back(ms * 1000);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  std::sort(t.begin(), t.end());
  return t[t.size() / 2];
}

// flush: a device buffer of kFlushBytes.
template <typename F>
float flushed_median_us(char* flush, F launch, int runs, int warmup) {
  return median_us_after([&](int i) { cudaMemsetAsync(flush, i, kFlushBytes); }, launch, runs, warmup);
}
