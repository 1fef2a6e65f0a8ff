// How fast the SMs read from L2: every CTA reads the same L2-resident buffer (16-byte ld.global.cg, so L1 is
// bypassed), each from its own starting offset, for several CTA counts and sizes. The ceiling a kernel that streams
// shared operands (x in the tensor-core GEMM) through L2 is measured against.
//
//   nvcc -O3 -arch=sm_90 -I tools tools/l2_bandwidth.cu -o /tmp/l2_bandwidth && /tmp/l2_bandwidth
#include <cstdio>

#include "tool_host.cuh"

__global__ void read_all(const uint4* __restrict__ buf, size_t n16, int passes, unsigned* out) {
  unsigned acc = 0;
  for (int p = 0; p < passes; ++p) {
    const size_t start = (blockIdx.x * 977ull + p * 131ull) * blockDim.x % n16;
    for (size_t i = threadIdx.x; i < n16; i += blockDim.x) {
      size_t j = i + start;
      if (j >= n16) j -= n16;
      uint4 v;
      asm volatile("ld.global.cg.v4.u32 {%0,%1,%2,%3}, [%4];\n" : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(buf + j));
      acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
  }
  if (acc == 0x12345678u) out[0] = acc;  // never true for the bytes written below; keeps the loads
}

int main() {
  const int sms = sm_count_or_complain("l2_bandwidth");
  if (sms == 0) return 1;
  cudaEvent_t start, end;
  cudaEventCreate(&start);
  cudaEventCreate(&end);
  for (const size_t mb : {4, 16}) {
    const size_t bytes = mb << 20;
    uint4* buf;
    unsigned* out;
    cudaMalloc(&buf, bytes);
    cudaMalloc(&out, 4);
    cudaMemset(buf, 1, bytes);
    for (const int ctas_per_sm : {1, 2, 4}) {
      for (const int threads : {512, 1024}) {
        if (ctas_per_sm * threads > 2048) continue;
        const int grid = sms * ctas_per_sm, passes = 4;
        read_all<<<grid, threads>>>(buf, bytes / 16, 1, out);  // warm-up: the buffer into L2
        cudaEventRecord(start);
        read_all<<<grid, threads>>>(buf, bytes / 16, passes, out);
        cudaEventRecord(end);
        cudaEventSynchronize(end);
        float ms = 0;
        cudaEventElapsedTime(&ms, start, end);
        const double total = double(bytes) * grid * passes;
        printf("buffer %zu MB, %d CTAs x %d threads: %.1f us, %.2f TB/s from L2\n", mb, grid, threads, ms * 1e3,
               total / (ms * 1e-3) / 1e12);
      }
    }
    cudaFree(buf);
    cudaFree(out);
  }
  printf("%s\n", cudaGetErrorString(cudaGetLastError()));
  return cudaGetLastError() == cudaSuccess ? 0 : 1;
}
