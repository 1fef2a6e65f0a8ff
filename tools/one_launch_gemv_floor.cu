// What an M = 1 GEMV in one launch can reach at the small shapes, before any decoding: the memory skeleton of a
// tile-ordered GEMV, timed as the benchmarks time (256 MB written before each run, CUDA events, median).
//
//   nvcc -O3 -std=c++20 -arch=sm_90a -I csrc/include -I tools tools/one_launch_gemv_floor.cu -o /tmp/gemv_floor \
//     && /tmp/gemv_floor
//
// A warp owns a 16-row tile over a K split of `blocks` 64-blocks (tile order: a warp's blocks are contiguous 512-byte
// runs) and requests all of them at entry (cp.async, one 16-byte piece a lane and block), with its rows' block-scale
// bytes and its piece of x. The words are summed as they are (no lookup, no mma), the sums reduced over the quad, and
// each K split's row sums stored. With `tail` the last CTA of a row group to finish (an atomic ticket) adds the
// splits and writes y, as a one-launch split-K would; without it the partial sums are the output.
// Beside them: a one-element add (the timing's fixed cost) and a plain read of the packed bytes (read_kernel.cuh:
// 16-byte loads, four in flight a thread, as tools/l2_evict.cu launches it).
#include <cstdint>
#include <cstdio>
#include <utility>
#include <vector>

#include "flushed_timing.cuh"
#include "read_kernel.cuh"
#include "tool_host.cuh"

namespace {

struct Buffers {
  const uint4* packed;
  const uint8_t* qabsmax;
  const uint4* x;
  float* partial;     // [splits, N]
  unsigned* ticket;   // a row group's finished splits, zero between launches
  uint16_t* y;
};

template <int kBlocks>
__global__ void __launch_bounds__(512) gemv_skeleton(Buffers b, int K, bool tail) {
  extern __shared__ uint4 pieces[];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  const int split = blockIdx.x, splits = gridDim.x, group = blockIdx.y;
  const int tile = group * warps + warp, k_blocks = K / 64, rows = warps * 16;
  const uint4* src = b.packed + (size_t(tile) * k_blocks + size_t(split) * kBlocks) * 32 + lane;
  uint4* mine = pieces + threadIdx.x * kBlocks;
#pragma unroll
  for (int i = 0; i < kBlocks; ++i)
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(uint32_t(__cvta_generic_to_shared(mine + i))),
                 "l"(src + i * 32));
  asm volatile("cp.async.commit_group;");
  const int g = lane / 4;
  const uint8_t* scales = b.qabsmax + size_t(tile * 16 + g) * k_blocks + split * kBlocks;
  uint32_t scale_sum = 0;
#pragma unroll
  for (int i = 0; i < kBlocks; ++i) scale_sum += __ldg(scales + i) + __ldg(scales + 8 * k_blocks + i);
  const uint4 xv = __ldg(b.x + split * kBlocks * 8 + lane % (kBlocks * 8));
  asm volatile("cp.async.wait_all;" ::: "memory");
  float row_g = scale_sum, row_g8 = 0;
#pragma unroll
  for (int i = 0; i < kBlocks; ++i) {
    const uint4 v = mine[i];
    row_g += __uint_as_float(v.x & 0x3f7fffff) * __uint_as_float(xv.x & 0x3f7fffff) + float(v.y & 0xff);
    row_g8 += __uint_as_float(v.z & 0x3f7fffff) * __uint_as_float(xv.y & 0x3f7fffff) + float(v.w & 0xff);
  }
  for (int d = 1; d < 4; d *= 2) {
    row_g += __shfl_xor_sync(~0u, row_g, d);
    row_g8 += __shfl_xor_sync(~0u, row_g8, d);
  }
  float* my_partial = b.partial + size_t(split) * gridDim.y * rows + group * rows + warp * 16;
  if (lane % 4 == 0) {
    my_partial[g] = row_g;
    my_partial[g + 8] = row_g8;
  }
  if (!tail) return;
  __shared__ bool last;
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(b.ticket + group, 1u) == unsigned(splits - 1);
  __syncthreads();
  if (!last) return;
  __threadfence();
  for (int r = threadIdx.x; r < rows; r += blockDim.x) {
    float sum = 0;
    for (int s = 0; s < splits; ++s) sum += __ldcg(b.partial + size_t(s) * gridDim.y * rows + group * rows + r);
    b.y[group * rows + r] = uint16_t(__float_as_uint(sum) >> 16);
  }
  if (threadIdx.x == 0) b.ticket[group] = 0;
}

__global__ void one_add(float* p) { p[0] += 1; }

template <int kBlocks>
void time_skeleton(const Buffers& b, char* flush, int N, int K, int warps, bool tail) {
  const int splits = K / 64 / kBlocks, groups = N / 16 / warps, smem = warps * 32 * kBlocks * 16;
  cudaFuncSetAttribute(gemv_skeleton<kBlocks>, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
  auto launch = [&] { gemv_skeleton<kBlocks><<<dim3(splits, groups), warps * 32, smem>>>(b, K, tail); };
  printf("  %2d blocks a warp, %2d warps a CTA, %3d splits x %3d row groups = %4d CTAs, %-12s %6.1f us\n", kBlocks,
         warps, splits, groups, splits * groups, tail ? "one launch:" : "partials:", flushed_median_us(flush, launch, 41, 5));
}

}  // namespace

int main() {
  setvbuf(stdout, nullptr, _IONBF, 0);
  const int sms = sm_count_or_complain("one_launch_gemv_floor");
  if (sms == 0) return 1;
  char* flush;
  cudaMalloc(&flush, kFlushBytes);
  for (auto [N, K] : std::vector<std::pair<int, int>>{{4096, 4096}, {8192, 8192}, {4096, 14336}}) {
    const size_t packed_bytes = size_t(N) * K / 2;
    void *packed, *qabsmax, *x, *partial, *ticket, *y;
    cudaMalloc(&packed, packed_bytes);
    cudaMemset(packed, 0x35, packed_bytes);
    cudaMalloc(&qabsmax, size_t(N) * K / 64);
    cudaMemset(qabsmax, 3, size_t(N) * K / 64);
    cudaMalloc(&x, K * 2);
    cudaMemset(x, 0x3c, K * 2);
    cudaMalloc(&partial, size_t(K / 256) * N * 4);
    cudaMalloc(&ticket, N / 16 * 4);
    cudaMemset(ticket, 0, N / 16 * 4);
    cudaMalloc(&y, N * 2);
    const Buffers b{static_cast<const uint4*>(packed), static_cast<const uint8_t*>(qabsmax), static_cast<const uint4*>(x),
                    static_cast<float*>(partial), static_cast<unsigned*>(ticket), static_cast<uint16_t*>(y)};
    printf("%dx%d, M = 1 (%.1f MB packed)\n", N, K, packed_bytes / 1e6);
    printf("  one-element add %6.1f us\n", flushed_median_us(flush, [&] { one_add<<<1, 1>>>(b.partial); }, 41, 5));
    printf("  plain read      %6.1f us\n",
           flushed_median_us(flush, [&] {
             read_kernel<false><<<sms * 8, 256>>>(b.packed, packed_bytes / 16, reinterpret_cast<unsigned*>(b.partial));
           }, 41, 5));
    for (bool tail : {false, true}) {
      time_skeleton<4>(b, flush, N, K, 16, tail);
      time_skeleton<8>(b, flush, N, K, 16, tail);
      time_skeleton<8>(b, flush, N, K, 8, tail);
      time_skeleton<16>(b, flush, N, K, 8, tail);
    }
    for (void* p : {packed, qabsmax, x, partial, ticket, y}) cudaFree(p);
  }
  const cudaError_t err = cudaDeviceSynchronize();
  printf("%s\n", cudaGetErrorString(err));
  return err == cudaSuccess ? 0 : 1;
}
