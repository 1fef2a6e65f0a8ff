// What the dirty lines of the benchmarks' L2 flush cost a streaming kernel, and whether an L2 evict_first policy
// on its reads avoids that cost. After 256 MB written (the benchmarks' flush) L2 is full of dirty lines: every line
// a kernel allocates then evicts one, written back to DRAM beside the kernel's own traffic. Lines read with
// evict_first are the next victims instead, and they are clean.
//
//   nvcc -O3 -std=c++20 -arch=sm_90a tools/l2_evict.cu -o /tmp/l2_evict && /tmp/l2_evict
//
// Kernels: `read` xors 16-byte loads over a buffer (4 in flight a thread); `expand` reads a buffer and writes 4
// bytes for each byte read, as dequantize_4bit writes 4 bytes of bf16 for each packed byte; `cp.async` copies
// 16-byte pieces into a shared-memory ring as the small-M GEMV does. Each after a written flush and after a read
// one (which leaves L2 clean); `read` and `expand` also with an evict_first cache hint on their loads.
// cp.async with the hint is not timed: nvcc 13.0's ptxas gives its LDGSTS a descriptor register it never sets
// (with createpolicy and with the constant alike), and the copy traps as an illegal instruction on the H200.
#include <cstdint>
#include <cstdio>

#include "flushed_timing.cuh"
#include "read_kernel.cuh"
#include "ring_read.cuh"

__device__ __forceinline__ uint64_t created_policy() {
  uint64_t policy;
  asm volatile("createpolicy.fractional.L2::evict_first.b64 %0, 1.0;\n" : "=l"(policy));
  return policy;
}

__global__ void print_policy(uint64_t* out) { out[0] = created_policy(); }

// Each 16-byte load becomes four 16-byte stores (byte b of the load to word b of the output, zero-extended).
template <bool kEvictFirst>
__global__ void __launch_bounds__(256) expand_kernel(const uint4* __restrict__ w, uint4* __restrict__ y, int64_t n16) {
  const uint64_t policy = kEvictFirst ? evict_first_policy() : 0;
  const int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (i >= n16) return;
  const uint4 v = load16<kEvictFirst>(w + i, policy);
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int q = 0; q < 4; ++q) {
    const uint32_t x = words[q];
    y[4 * i + q] = make_uint4(x & 0xff, (x >> 8) & 0xff, (x >> 16) & 0xff, x >> 24);
  }
}

__global__ void read_flush_kernel(const uint4* __restrict__ f, int64_t n16, unsigned* out) {
  uint4 acc = make_uint4(0, 0, 0, 0);
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n16; i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const uint4 v = f[i];
    acc.x ^= v.x;
  }
  if (acc.x == 0x12345678u) out[0] = 1;
}

static char* flush_buf;
static unsigned* out;
static int sms;

// The median of 32 runs after a written flush (as the benchmarks) and after a read one: the flush buffer written,
// then read twice, so L2 holds its lines clean.
template <typename F>
void report(const char* name, double bytes_moved, F launch) {
  const float written = flushed_median_us(flush_buf, launch, 40, 8);
  const float read_flushed = median_us_after([&](int i) {
    cudaMemsetAsync(flush_buf, i, kFlushBytes);
    for (int pass = 0; pass < 2; ++pass)
      read_flush_kernel<<<sms * 8, 256>>>(reinterpret_cast<const uint4*>(flush_buf), kFlushBytes / 16, out);
  }, launch, 40, 8);
  printf("  %-28s written flush %7.1f us %5.0f GB/s | read flush %7.1f us %5.0f GB/s\n", name, written,
         bytes_moved / written / 1e3, read_flushed, bytes_moved / read_flushed / 1e3);
}

int main() {
  setvbuf(stdout, nullptr, _IONBF, 0);
  if (cudaMalloc(&flush_buf, kFlushBytes) != cudaSuccess) {
    fprintf(stderr, "l2_evict needs a GPU\n");
    return 1;
  }
  cudaMalloc(&out, 8);
  uint64_t created = 0;
  print_policy<<<1, 1>>>(reinterpret_cast<uint64_t*>(out));
  cudaMemcpy(&created, out, 8, cudaMemcpyDeviceToHost);
  printf("createpolicy evict_first 1.0 = 0x%016llx, constant 0x%016llx: %s\n", (unsigned long long)created,
         (unsigned long long)qlora::kL2EvictFirst, created == qlora::kL2EvictFirst ? "equal" : "DIFFERENT");
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  for (const int64_t bytes : {int64_t{8192} * 14336, int64_t{4096} * 2048, int64_t{8192} * 4096}) {
    uint8_t *w, *y;
    cudaMalloc(&w, bytes);
    cudaMalloc(&y, 4 * bytes);
    cudaMemset(w, 1, bytes);
    const int64_t n16 = bytes / 16;
    printf("%.1f MB\n", bytes / 1e6);
    const unsigned grid_read = sms * 8;
    report("read", bytes, [&] { read_kernel<false><<<grid_read, 256>>>(reinterpret_cast<const uint4*>(w), n16, out); });
    report("read, evict_first", bytes, [&] { read_kernel<true><<<grid_read, 256>>>(reinterpret_cast<const uint4*>(w), n16, out); });
    report("cp.async", bytes, [&] { launch_ring_read<8192, 4>(sms * 4, 256, w, bytes, out); });
    const unsigned grid_expand = static_cast<unsigned>((n16 + 255) / 256);
    report("expand x4", 5.0 * bytes, [&] { expand_kernel<false><<<grid_expand, 256>>>(reinterpret_cast<const uint4*>(w), reinterpret_cast<uint4*>(y), n16); });
    report("expand x4, evict_first", 5.0 * bytes, [&] { expand_kernel<true><<<grid_expand, 256>>>(reinterpret_cast<const uint4*>(w), reinterpret_cast<uint4*>(y), n16); });
    cudaFree(w);
    cudaFree(y);
  }
  printf("%s\n", cudaGetErrorString(cudaGetLastError()));
}
