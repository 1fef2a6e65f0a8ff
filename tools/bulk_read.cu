// How fast a kernel can read a packed weight under the benchmarks' timing (256 MB written before each run, so L2
// holds another buffer's dirty lines): 1-D bulk copies (cp.async.bulk, the copy engine of each SM) into a ring of
// shared-memory slots against plain 16-byte loads. A tile-ordered weight keeps each 16-row tile's whole K range in one
// run of bytes, so a small-M GEMV could take its weight that way; this times the read alone.
//
//   nvcc -O3 -std=c++20 -arch=sm_90a tools/bulk_read.cu -o /tmp/bulk_read && /tmp/bulk_read
//
// Each CTA reads one contiguous span (the buffer cut evenly over the grid). Bulk form: thread 0 keeps `kSlots` copies
// of `kSlotBytes` in flight; the CTA's threads read each slot from shared memory (16 bytes a thread at a time, xored)
// before thread 0 refills it. Plain form: `read_kernel` (read_kernel.cuh). Prints µs and GB/s.
#include <cstdint>
#include <cstdio>

#include "flushed_timing.cuh"
#include "qlora/l2_policy.h"
#include "qlora/mbarrier.cuh"
#include "read_kernel.cuh"

using qlora::bulk_copy_to_shared;
using qlora::mbar_arrive_expecting;
using qlora::mbar_init;
using qlora::mbar_init_fence;
using qlora::mbar_wait;

template <int kSlots, int kSlotBytes, bool kConsume, bool kEvictFirst>
__global__ void __launch_bounds__(128) bulk_read(const uint8_t* __restrict__ w, int64_t bytes, unsigned* out) {
  extern __shared__ __align__(128) uint8_t ring[];
  __shared__ __align__(8) uint64_t full[kSlots];
  const int64_t span = (bytes / gridDim.x + kSlotBytes - 1) / kSlotBytes * kSlotBytes;
  const int64_t b0 = blockIdx.x * span, b1 = b0 + span < bytes ? b0 + span : bytes;
  const int chunks = b1 > b0 ? static_cast<int>((b1 - b0 + kSlotBytes - 1) / kSlotBytes) : 0;
  const uint32_t ring_s = static_cast<uint32_t>(__cvta_generic_to_shared(ring));
  const uint32_t full_s = static_cast<uint32_t>(__cvta_generic_to_shared(full));
  auto issue = [&](int chunk) {
    const int64_t at = b0 + int64_t{chunk} * kSlotBytes;
    const uint32_t n = static_cast<uint32_t>(b1 - at < kSlotBytes ? b1 - at : kSlotBytes);
    const int slot = chunk % kSlots;
    mbar_arrive_expecting(full_s + 8 * slot, n);
    if constexpr (kEvictFirst)
      bulk_copy_to_shared(ring_s + slot * kSlotBytes, w + at, n, full_s + 8 * slot, qlora::kL2EvictFirst);
    else
      bulk_copy_to_shared(ring_s + slot * kSlotBytes, w + at, n, full_s + 8 * slot);
  };
  if (threadIdx.x == 0) {
    for (int s = 0; s < kSlots; ++s) mbar_init(full_s + 8 * s, 1);
    mbar_init_fence();
    for (int c = 0; c < kSlots && c < chunks; ++c) issue(c);
  }
  __syncthreads();
  uint4 acc = make_uint4(0, 0, 0, 0);
  for (int c = 0; c < chunks; ++c) {
    const int slot = c % kSlots;
    mbar_wait(full_s + 8 * slot, (c / kSlots) & 1);
    if constexpr (kConsume) {
      const uint4* s = reinterpret_cast<const uint4*>(ring + slot * kSlotBytes);
      for (int i = threadIdx.x; i < kSlotBytes / 16; i += blockDim.x) {
        const uint4 v = s[i];
        acc.x ^= v.x; acc.y ^= v.y; acc.z ^= v.z; acc.w ^= v.w;
      }
      __syncthreads();  // every thread is done with the slot before it is refilled
    }
    if (threadIdx.x == 0 && c + kSlots < chunks) issue(c + kSlots);
  }
  if ((acc.x ^ acc.y ^ acc.z ^ acc.w) == 0x12345678u) out[0] = 1;
}

static char* flush_buf;
static float time_it(auto launch) { return flushed_median_us(flush_buf, launch, 40, 8); }

template <int kSlots, int kSlotBytes, bool kConsume, bool kEvictFirst>
void run_bulk(const uint8_t* w, int64_t bytes, unsigned* out, int sms) {
  constexpr int kSmem = kSlots * kSlotBytes;
  auto kernel = bulk_read<kSlots, kSlotBytes, kConsume, kEvictFirst>;
  cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmem);
  printf("  bulk %d x %2d KB%s%s |", kSlots, kSlotBytes / 1024, kConsume ? " read" : "     ",
         kEvictFirst ? " evict_first" : "            ");
  for (int per_sm : {1, 2, 4}) {
    if (per_sm * (kSmem + 1024) > 227 * 1024) continue;
    const int grid = sms * per_sm;
    const float us = time_it([&] { kernel<<<grid, 128, kSmem>>>(w, bytes, out); });
    printf(" %d/SM %6.1f us %5.0f GB/s |", per_sm, us, bytes / us / 1e3);
  }
  printf("\n");
}

int main() {
  setvbuf(stdout, nullptr, _IONBF, 0);
  if (const cudaError_t err = cudaMalloc(&flush_buf, kFlushBytes); err != cudaSuccess) {
    fprintf(stderr, "bulk_read needs a GPU: %s\n", cudaGetErrorString(err));
    return 1;
  }
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  unsigned* out;
  cudaMalloc(&out, 4);
  const int64_t shapes[][2] = {{8192, 28672}, {8192, 8192}, {4096, 4096}};
  for (const auto& sh : shapes) {
    const int64_t bytes = sh[0] * sh[1] / 2;
    uint8_t* w;
    cudaMalloc(&w, bytes);
    cudaMemset(w, 1, bytes);
    printf("%lld x %lld 4-bit weight, %.1f MB\n", (long long)sh[0], (long long)sh[1], bytes / 1e6);
    for (int per_sm : {4, 8}) {
      const int64_t n16 = bytes / 16;
      const float us = time_it([&] { read_kernel<false><<<sms * per_sm, 256>>>(reinterpret_cast<const uint4*>(w), n16, out); });
      const float ef = time_it([&] { read_kernel<true><<<sms * per_sm, 256>>>(reinterpret_cast<const uint4*>(w), n16, out); });
      printf("  plain 16-byte loads, %d CTAs of 256 an SM: %6.1f us %5.0f GB/s; evict_first %6.1f us %5.0f GB/s\n",
             per_sm, us, bytes / us / 1e3, ef, bytes / ef / 1e3);
    }
    run_bulk<4, 8192, false, false>(w, bytes, out, sms);
    run_bulk<4, 16384, false, false>(w, bytes, out, sms);
    run_bulk<8, 8192, false, false>(w, bytes, out, sms);
    run_bulk<4, 32768, false, false>(w, bytes, out, sms);
    run_bulk<8, 16384, false, false>(w, bytes, out, sms);
    run_bulk<4, 16384, true, false>(w, bytes, out, sms);
    run_bulk<8, 8192, true, false>(w, bytes, out, sms);
    run_bulk<8, 16384, true, false>(w, bytes, out, sms);
    run_bulk<4, 16384, false, true>(w, bytes, out, sms);
    run_bulk<8, 16384, false, true>(w, bytes, out, sms);
    cudaFree(w);
  }
  printf("%s\n", cudaGetErrorString(cudaGetLastError()));
}
