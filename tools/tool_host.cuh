// Host-side helpers of the standalone kernel programs in tools/: the device they run on, bf16 bits to and from
// float (round to nearest even), and copies between host vectors and device buffers.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include <cuda_runtime.h>

#include "flushed_timing.cuh"
#include "qlora/codebook.h"
#include "qlora/tile_order.h"

// A GEMM shape from the command line, "N,K,M" with K a multiple of 64 (a stage); false, after saying why, otherwise.
inline bool parse_gemm_shape(const char* arg, long long* N, long long* K, long long* M) {
  if (sscanf(arg, "%lld,%lld,%lld", N, K, M) == 3 && *K % 64 == 0) return true;
  printf("%s: expected N,K,M with K a multiple of 64\n", arg);
  return false;
}

// The GEMM shapes {N, K, M} given from argv[first] on, replacing `shapes` (the program's defaults) where any are
// given; false, after saying why, on one that does not parse.
inline bool gemm_shapes_from_args(int argc, char** argv, int first, std::vector<std::array<int64_t, 3>>* shapes) {
  if (argc > first) shapes->clear();
  for (int a = first; a < argc; ++a) {
    long long N, K, M;
    if (!parse_gemm_shape(argv[a], &N, &K, &M)) return false;
    shapes->push_back({N, K, M});
  }
  return true;
}

// Weight shapes "N,K" (whole tiles: N % 16 == 0, K % 64 == 0) from argv[first] on, replacing `shapes` (the program's
// defaults) where any are given; false, after saying why, on one that does not parse.
inline bool weight_shapes_from_args(int argc, char** argv, int first, std::vector<std::array<int64_t, 2>>* shapes) {
  if (argc > first) shapes->clear();
  for (int a = first; a < argc; ++a) {
    long long N, K;
    if (sscanf(argv[a], "%lld,%lld", &N, &K) != 2 || N % qlora::kTileOrderRows != 0 || K % qlora::kTileOrderK != 0) {
      printf("%s: expected N,K with N a multiple of 16 and K of 64\n", argv[a]);
      return false;
    }
    shapes->push_back({N, K});
  }
  return true;
}

// Device 0's SM count, or 0 (after saying so on stderr) where `program` finds no GPU.
inline int sm_count_or_complain(const char* program) {
  int num_sms = 0;
  if (cudaDeviceGetAttribute(&num_sms, cudaDevAttrMultiProcessorCount, 0) != cudaSuccess || num_sms == 0) {
    fprintf(stderr, "%s needs a GPU\n", program);
    return 0;
  }
  return num_sms;
}

// The start of a program over weight shapes: unbuffered output, a GPU, and the shapes from argv[1] on, else the
// benchmark's four (4096², 8192², 8192x28672, 28672x8192); false, after saying why, otherwise.
inline bool start_weight_tool(const char* program, int argc, char** argv,
                              std::vector<std::array<int64_t, 2>>* shapes) {
  setvbuf(stdout, nullptr, _IONBF, 0);
  if (sm_count_or_complain(program) == 0) return false;
  *shapes = {{4096, 4096}, {8192, 8192}, {8192, 28672}, {28672, 8192}};
  return weight_shapes_from_args(argc, argv, 1, shapes);
}

inline uint16_t to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>((u + 0x7fff + ((u >> 16) & 1)) >> 16);
}
inline float from_bf16(uint16_t h) {
  const uint32_t u = static_cast<uint32_t>(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// n bf16 values, each draw() rounded.
template <typename F>
std::vector<uint16_t> bf16_values(size_t n, F draw) {
  std::vector<uint16_t> v(n);
  for (auto& e : v) e = to_bf16(draw());
  return v;
}

// n random bytes (4-bit code pairs) from rng.
template <typename Rng>
std::vector<uint8_t> random_bytes(size_t n, Rng& rng) {
  std::uniform_int_distribution<int> byte(0, 255);
  std::vector<uint8_t> v(n);
  for (auto& e : v) e = static_cast<uint8_t>(byte(rng));
  return v;
}

template <typename T>
T* device_copy(const std::vector<T>& v) {
  T* d;
  cudaMalloc(&d, v.size() * sizeof(T));
  cudaMemcpy(d, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
  return d;
}

template <typename T>
std::vector<uint16_t> host_copy(const T* d, size_t n) {  // n 2-byte elements (bf16) back to the host
  static_assert(sizeof(T) == 2, "bf16 elements");
  std::vector<uint16_t> h(n);
  cudaMemcpy(h.data(), d, n * 2, cudaMemcpyDeviceToHost);
  return h;
}
// FNV-1a over bf16 bits, so that two builds' outputs can be compared bit for bit.
inline uint64_t bits_hash(const std::vector<uint16_t>& values) {
  uint64_t hash = 1469598103934665603ull;
  for (const uint16_t v : values) hash = (hash ^ v) * 1099511628211ull;
  return hash;
}

// A kernel writing n bf16 values to `out`, as the dequantizing tools report it: ptxas' registers and local bytes, the
// CTAs an SM holds at `threads`, whether one launch into a zeroed `out` gives the bits of `reference` (bits_hash),
// and the median µs of `launch` after the benchmarks' flush.
struct KernelRun {
  int registers, local_bytes, ctas_per_sm;
  bool same;
  float us;
};
template <typename Kernel, typename Launch>
KernelRun run_against_reference(Kernel kernel, int threads, Launch launch, void* out, int64_t n, uint64_t reference,
                                char* flush) {
  cudaFuncAttributes attr{};
  cudaFuncGetAttributes(&attr, kernel);
  int ctas = 0;
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&ctas, kernel, threads, 0);
  cudaMemset(out, 0, n * 2);
  launch();
  const bool same = bits_hash(host_copy(static_cast<const uint16_t*>(out), n)) == reference;
  return {attr.numRegs, static_cast<int>(attr.localSizeBytes), ctas, same, flushed_median_us(flush, launch, 41, 5)};
}

// An NF4 weight [N, K] with double-quantized scales (packed codes, a code byte a 64-block, one float a 256 blocks,
// the 256 second-level codes and their offset) and x [M, K], drawn from rng in that order, uniform in [-1, 1).
struct DqWeightSample {
  std::vector<uint8_t> packed, qabsmax;
  std::vector<float> absmax2, code2;
  float offset;
  std::vector<uint16_t> x;
};
template <typename Rng>
DqWeightSample dq_weight_sample(int64_t N, int64_t K, int64_t M, Rng& rng) {
  std::uniform_real_distribution<float> unit(-1.0f, 1.0f);
  DqWeightSample s;
  s.packed = random_bytes(N * K / 2, rng);
  s.qabsmax = random_bytes(N * K / 64, rng);
  s.absmax2.resize(N * K / 64 / 256 + 1);
  for (auto& v : s.absmax2) v = 0.01f + (rng() % 1000) * 1e-4f;
  s.code2.resize(256);
  for (int i = 0; i < 256; ++i) s.code2[i] = (i - 128) / 128.0f;
  s.offset = 0.05f;
  s.x = bf16_values(M * K, [&] { return unit(rng); });
  return s;
}

// Row n of an NF4 weight [N, K] (blocksize 64, double-quantized block scales: a code byte a block, one float a 256
// blocks, code2 and an offset) times x, in fp64: sum over k of code value · scale · x(k), each block's scale rounded as
// the kernels round it (code2[q] · absmax2 + offset in fp32). x(k) gives element k of the row of x.
template <typename X>
double nf4_dq_row_dot(const std::vector<uint8_t>& packed, const std::vector<uint8_t>& qabsmax,
                      const std::vector<float>& absmax2, const std::vector<float>& code2, float offset, int64_t n,
                      int64_t K, X x) {
  double acc = 0;
  for (int64_t b = 0; b < K / 64; ++b) {
    const int64_t block = n * (K / 64) + b;
    const float scale = code2[qabsmax[block]] * absmax2[block >> 8] + offset;
    double part = 0;
    for (int e = 0; e < 64; ++e) {
      const int64_t k = b * 64 + e, idx = n * K + k;
      const int code = idx % 2 == 0 ? packed[idx / 2] >> 4 : packed[idx / 2] & 15;
      part += static_cast<double>(qlora::kNF4Values[code]) * x(k);
    }
    acc += part * scale;
  }
  return acc;
}
template <typename X>
double nf4_dq_row_dot(const DqWeightSample& w, int64_t n, int64_t K, X x) {
  return nf4_dq_row_dot(w.packed, w.qabsmax, w.absmax2, w.code2, w.offset, n, K, x);
}

// max |y - ref| / max |ref| of y = x·dequant(W)ᵀ + s·(x·Aᵀ)·Bᵀ ([M, N], bf16 bits) against fp64 on `rows` rows of
// N spread evenly; A [r, K] and B [N, r] as bf16 bits.
inline double lora_reference_error(const DqWeightSample& w, const std::vector<uint16_t>& A,
                                   const std::vector<uint16_t>& B, int r, float s, int64_t N, int64_t K, int64_t M,
                                   const std::vector<uint16_t>& y, int rows) {
  std::vector<double> xa(M * r, 0.0);  // x·Aᵀ once for all rows
  for (int64_t m = 0; m < M; ++m)
    for (int j = 0; j < r; ++j)
      for (int64_t k = 0; k < K; ++k) xa[m * r + j] += static_cast<double>(from_bf16(w.x[m * K + k])) * from_bf16(A[j * K + k]);
  double max_err = 0, max_ref = 0;
  for (int i = 0; i < rows; ++i) {
    const int64_t n = (N - 1) * i / (rows - 1);
    for (int64_t m = 0; m < M; ++m) {
      double acc = nf4_dq_row_dot(w, n, K, [&](int64_t k) { return from_bf16(w.x[m * K + k]); });
      for (int j = 0; j < r; ++j) acc += s * xa[m * r + j] * from_bf16(B[n * r + j]);
      max_err = std::max(max_err, std::fabs(from_bf16(y[m * N + n]) - acc));
      max_ref = std::max(max_ref, std::fabs(acc));
    }
  }
  return max_err / max_ref;
}

// Row-major packed bytes [N, K / 2] in tile order (qlora/tile_order.h); N % 16 == 0, K % 64 == 0.
inline std::vector<uint8_t> to_tile_order(const std::vector<uint8_t>& packed, int64_t N, int64_t K) {
  std::vector<uint8_t> tiled(packed.size());
  size_t i = 0;
  for (int64_t tile = 0; tile < N / qlora::kTileOrderRows; ++tile)
    for (int64_t block = 0; block < K / qlora::kTileOrderK; ++block)
      for (int lane = 0; lane < 32; ++lane)
        for (int h = 0; h < 2; ++h)
          for (int j = 0; j < 8; ++j) {
            const int64_t row = tile * qlora::kTileOrderRows + 8 * h + lane / 4;
            tiled[i++] = packed[row * (K / 2) + 32 * block + 4 * j + lane % 4];
          }
  return tiled;
}

// A DqWeightSample's weight [N, K] on the device: its codes in both byte orders and its double-quantized scales.
struct DqWeightOnDevice {
  const uint8_t *packed, *tiled, *qabsmax;
  const float *absmax2, *code2, *offset;
  void release() const {
    for (const void* p : {static_cast<const void*>(packed), static_cast<const void*>(tiled),
                          static_cast<const void*>(qabsmax), static_cast<const void*>(absmax2),
                          static_cast<const void*>(code2), static_cast<const void*>(offset)})
      cudaFree(const_cast<void*>(p));
  }
};
inline DqWeightOnDevice dq_weight_on_device(const DqWeightSample& s, int64_t N, int64_t K) {
  return {device_copy(s.packed), device_copy(to_tile_order(s.packed, N, K)), device_copy(s.qabsmax),
          device_copy(s.absmax2), device_copy(s.code2), device_copy(std::vector<float>{s.offset})};
}
