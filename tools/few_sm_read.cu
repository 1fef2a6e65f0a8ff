// How fast a few SMs can stream a buffer from DRAM: the bound on a kernel that computes x·Aᵀ for the LoRA term on
// the SMs a one-wave GEMM leaves idle (4 of 132 at M = 256 on 8192×28672, 8192² and 4096²; x is 14.7 MB at
// K = 28672, 2-4 MB at K = 4096-8192). G CTAs of 1024 threads, one an SM, each thread U 16-byte loads in flight,
// plain or through a cp.async ring; timed after the benchmarks' 256 MB flush.
//
//   nvcc -O3 -std=c++20 -arch=sm_90a tools/few_sm_read.cu -o /tmp/few_sm_read && /tmp/few_sm_read
#include <cstdint>
#include <cstdio>

#include "flushed_timing.cuh"
#include "ring_read.cuh"

template <int U>
__global__ void __launch_bounds__(1024, 1) read_kernel(const uint4* __restrict__ w, int64_t n16, unsigned* out) {
  const int64_t per_cta = (n16 + gridDim.x - 1) / gridDim.x;
  const int64_t begin = blockIdx.x * per_cta, end = n16 < begin + per_cta ? n16 : begin + per_cta;
  uint4 acc = make_uint4(0, 0, 0, 0);
  for (int64_t i = begin + threadIdx.x; i < end; i += static_cast<int64_t>(U) * blockDim.x) {
    uint4 v[U];
#pragma unroll
    for (int u = 0; u < U; ++u) v[u] = i + u * blockDim.x < end ? __ldg(w + i + u * blockDim.x) : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int u = 0; u < U; ++u) { acc.x ^= v[u].x; acc.y ^= v[u].y; acc.z ^= v[u].z; acc.w ^= v[u].w; }
  }
  if ((acc.x ^ acc.y ^ acc.z ^ acc.w) == 0x12345678u) out[0] = 1;
}

static char* flush_buf;

int main() {
  setvbuf(stdout, nullptr, _IONBF, 0);
  if (cudaMalloc(&flush_buf, kFlushBytes) != cudaSuccess) {
    fprintf(stderr, "few_sm_read needs a GPU\n");
    return 1;
  }
  unsigned* out;
  cudaMalloc(&out, 4);
  const int64_t bytes = int64_t{256} * 28672 * 2;  // x of M = 256, K = 28672, bf16
  uint8_t* w;
  cudaMalloc(&w, bytes);
  cudaMemset(w, 1, bytes);
  printf("%.1f MB, GB/s (us) by CTAs, one an SM\n", bytes / 1e6);
  for (const int ctas : {1, 2, 4, 8, 16}) {
    auto show = [&](const char* name, float us) { printf("  %2d CTAs %-18s %7.1f us %6.0f GB/s\n", ctas, name, us, bytes / us / 1e3); };
    const int64_t n16 = bytes / 16;
    show("loads, U 4", flushed_median_us(flush_buf, [&] { read_kernel<4><<<ctas, 1024>>>(reinterpret_cast<const uint4*>(w), n16, out); }, 20, 4));
    show("loads, U 8", flushed_median_us(flush_buf, [&] { read_kernel<8><<<ctas, 1024>>>(reinterpret_cast<const uint4*>(w), n16, out); }, 20, 4));
    show("ring, 8 x 16 KB", flushed_median_us(flush_buf, [&] { launch_ring_read<16384, 8>(ctas, 1024, w, bytes, out); }, 20, 4));
    show("ring, 12 x 16 KB", flushed_median_us(flush_buf, [&] { launch_ring_read<16384, 12>(ctas, 1024, w, bytes, out); }, 20, 4));
  }
  printf("%s\n", cudaGetErrorString(cudaGetLastError()));
}
