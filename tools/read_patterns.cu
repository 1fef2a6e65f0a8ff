// Read bandwidth of tile access patterns over a [rows, row_bytes] byte matrix, the shapes of the fused GEMV's
// packed 4-bit weights (8192x28672, 28672x8192, 4096x4096 as bytes). A floor for the small-M kernel, timed as
// the benchmarks time (256 MB written between runs, so L2 holds another buffer's dirty lines).
//
//   nvcc -O3 -std=c++20 -arch=sm_90a tools/read_patterns.cu -o /tmp/read_patterns && /tmp/read_patterns
//
// A warp-step reads a tile of RW rows x SB bytes (16-byte loads, lanes row-major in the tile); a CTA has
// WN x WK warps: WN warps on different rows, WK warps interleaved along the same rows; grid.y splits each row
// into ranges. U tiles are loaded before the first is consumed. Prints GB/s for each split count and the best.
#include <algorithm>
#include <cstdio>
#include <vector>
#include <cstdint>
#include "flushed_timing.cuh"

template <int RW, int SB, int WN, int WK, int U>
__global__ void __launch_bounds__(WN * WK * 32) readk(const uint8_t* __restrict__ w, int64_t rows, int64_t row_bytes,
                                                      unsigned* out) {
  constexpr int kG = RW * SB / 16;       // granules per tile
  constexpr int kPer = kG / 32;          // per lane
  static_assert(kPer * 32 == kG, "tile must be a multiple of 512 B");
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wn = warp % WN, wk = warp / WN;
  const int64_t r0 = (static_cast<int64_t>(blockIdx.x) * WN + wn) * RW;
  const int64_t split = ((row_bytes + gridDim.y - 1) / gridDim.y + 511) / 512 * 512;
  const int64_t b0 = blockIdx.y * split, b1 = row_bytes < b0 + split ? row_bytes : b0 + split;
  const uint8_t* src[kPer];
#pragma unroll
  for (int i = 0; i < kPer; ++i) {
    const int gi = lane + 32 * i;
    const int r = gi / (SB / 16), q = gi % (SB / 16);
    src[i] = w + (r0 + r) * row_bytes + q * 16;
  }
  uint4 acc = make_uint4(0, 0, 0, 0);
  for (int64_t b = b0 + static_cast<int64_t>(wk) * SB; b < b1; b += static_cast<int64_t>(U) * WK * SB) {
    uint4 v[U][kPer];
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        const int64_t bb = b + static_cast<int64_t>(u) * WK * SB;
        v[u][i] = bb + SB <= b1 ? __ldg(reinterpret_cast<const uint4*>(src[i] + bb)) : make_uint4(0, 0, 0, 0);
      }
#pragma unroll
    for (int u = 0; u < U; ++u)
#pragma unroll
      for (int i = 0; i < kPer; ++i) {
        acc.x ^= v[u][i].x; acc.y ^= v[u][i].y; acc.z ^= v[u][i].z; acc.w ^= v[u][i].w;
      }
  }
  if ((acc.x ^ acc.y ^ acc.z ^ acc.w) == 0x12345678u) out[0] = 1;
}

static char* flush_buf;
static float time_it(auto launch) { return flushed_median_us(flush_buf, launch, 40, 8); }

template <int RW, int SB, int WN, int WK, int U>
void run(const char* name, const uint8_t* w, int64_t rows, int64_t rb, unsigned* out) {
  const int64_t ctas_n = rows / (RW * WN);
  float best = 0;
  int best_s = 0;
  char line[512];
  int n = 0;
  for (int s : {1, 2, 4, 8, 16, 32}) {
    if (rb / s < SB * WK || rb / s < 512) continue;
    const dim3 grid(static_cast<unsigned>(ctas_n), s);
    const float us = time_it([&] { readk<RW, SB, WN, WK, U><<<grid, WN * WK * 32>>>(w, rows, rb, out); });
    n += snprintf(line + n, sizeof(line) - n, " s%d:%.0f", s, rows * rb / us / 1e3);
    if (best_s == 0 || us < best) { best = us; best_s = s; }
  }
  if (best_s == 0) return;  // no split count fits this tile
  printf("  %-34s best %6.1f us %5.0f GB/s (splits %d) |%s\n", name, best, rows * rb / best / 1e3, best_s, line);
}

int main() {
  setvbuf(stdout, nullptr, _IONBF, 0);
  if (const cudaError_t err = cudaMalloc(&flush_buf, kFlushBytes); err != cudaSuccess) {
    fprintf(stderr, "read_patterns needs a GPU: %s\n", cudaGetErrorString(err));
    return 1;
  }
  unsigned* out;
  cudaMalloc(&out, 4);
  const int64_t shapes[][2] = {{8192, 14336}, {28672, 4096}, {4096, 2048}};
  for (const auto& sh : shapes) {
    const int64_t rows = sh[0], rb = sh[1];
    uint8_t* w;
    cudaMalloc(&w, rows * rb);
    cudaMemset(w, 1, rows * rb);
    printf("rows %lld x %lld bytes (%.0f MB)\n", (long long)rows, (long long)rb, rows * rb / 1e6);
    run<16, 128, 8, 1, 4>("16x128 WN8 WK1 U4 (gemv-like)", w, rows, rb, out);
    run<16, 128, 8, 1, 2>("16x128 WN8 WK1 U2", w, rows, rb, out);
    run<16, 128, 1, 8, 4>("16x128 WN1 WK8 U4", w, rows, rb, out);
    run<16, 128, 2, 4, 4>("16x128 WN2 WK4 U4", w, rows, rb, out);
    run<16, 256, 8, 1, 2>("16x256 WN8 WK1 U2", w, rows, rb, out);
    run<8, 256, 8, 1, 4>("8x256 WN8 WK1 U4", w, rows, rb, out);
    run<4, 512, 8, 1, 4>("4x512 WN8 WK1 U4", w, rows, rb, out);
    run<1, 512, 8, 1, 4>("1x512 WN8 WK1 U4", w, rows, rb, out);
    run<1, 512, 1, 8, 4>("1x512 WN1 WK8 U4 (contiguous)", w, rows, rb, out);
    run<1, 512, 1, 8, 8>("1x512 WN1 WK8 U8 (contiguous)", w, rows, rb, out);
    cudaFree(w);
  }
  printf("%s\n", cudaGetErrorString(cudaGetLastError()));
}
