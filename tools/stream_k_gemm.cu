// The tensor-core GEMM in the stream-K form (gemm_4bit_stream_k_ctas: one CTA an SM, each with an even share of all
// tiles' stages; 256-token tiles, and the split form's small token tiles) against the tile-a-CTA form, where the tiles
// make a wave or more and a poorly filled last one: both against an fp64 sum where they part, stream-K's y the same
// on a second run (the counters reset), with and without the LoRA term; the time of each. Exits 1 when stream-K is
// off or differs between runs.
//
//   nvcc -O3 -std=c++20 --expt-relaxed-constexpr -arch=sm_90a -I csrc/include -I tools -diag-suppress 177 \
//        tools/stream_k_gemm.cu -o /tmp/stream_k_gemm && /tmp/stream_k_gemm [N,K,M ...]
#include <array>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "flushed_timing.cuh"
#include "gemm_tool.cuh"
#include "tool_host.cuh"

using qlora::Gemm4bitParams;

int main(int argc, char** argv) {
  setvbuf(stdout, nullptr, _IONBF, 0);
  const int num_sms = sm_count_or_complain("stream_k_gemm");
  char* flush;
  if (num_sms == 0 || cudaMalloc(&flush, kFlushBytes) != cudaSuccess) return 1;
  float* partials;
  unsigned* arrivals;
  cudaMalloc(&partials, qlora::gemm4bit::stream_k_partial_floats(num_sms) * sizeof(float));
  cudaMalloc(&arrivals, num_sms * sizeof(unsigned));
  cudaMemset(arrivals, 0, num_sms * sizeof(unsigned));
  const int r = 16;
  bool failed = false;
  std::vector<std::array<int64_t, 3>> shapes = {{28672, 8192, 256}, {14336, 4096, 512}, {28672, 8192, 512},
                                                {14336, 4096, 1024}, {28672, 8192, 200}, {8192, 8192, 1024},
                                                {28672, 8192, 16}, {28672, 8192, 64}};  // N, K, M
  if (!gemm_shapes_from_args(argc, argv, 1, &shapes)) return 1;
  std::mt19937 rng(0);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (const auto& s : shapes) {
    const int64_t N = s[0], K = s[1], M = s[2];
    const int ctas = qlora::gemm4bit::gemm_4bit_stream_k_ctas(M, N, K, num_sms);
    const int tokens = qlora::gemm4bit::launch_plan(M, N, K, num_sms, false).tokens;
    const bool block_scaled = qlora::gemm4bit::block_scaled_tiles(tokens);
    if (ctas == 0) {
      printf("%lldx%lld M=%lld: no stream-K form\n", (long long)N, (long long)K, (long long)M);
      continue;
    }
    const auto x = bf16_values(M * K, [&] { return normal(rng); });
    const auto xa = bf16_values(M * r, [&] { return normal(rng); });
    const auto B = bf16_values(N * r, [&] { return 0.01f * normal(rng); });
    const auto bias = bf16_values(N, [&] { return normal(rng); });
    const auto packed = random_bytes(N * K / 2, rng);
    std::vector<float> absmax(N * K / 64);
    for (auto& v : absmax) v = 0.02f * (1.0f + 0.5f * std::fabs(normal(rng)));
    auto* dx = device_copy(x);
    auto* dxa = device_copy(xa);
    auto* dB = device_copy(B);
    auto* dbias = device_copy(bias);
    auto* dp = device_copy(packed);
    auto* dabs = device_copy(absmax);
    __nv_bfloat16 *dy_tiles, *dy_stream, *dy_again;
    cudaMalloc(&dy_tiles, M * N * 2);
    cudaMalloc(&dy_stream, M * N * 2);
    cudaMalloc(&dy_again, M * N * 2);
    for (const bool lora : {false, true}) {
      Gemm4bitParams p = nf4_gemm_params(dx, dp, dabs, M, N, K);
      if (lora) {
        p.xa = reinterpret_cast<const __nv_bfloat16*>(dxa);
        p.lora_B = reinterpret_cast<const __nv_bfloat16*>(dB);
        p.r = r;
        p.lora_scale = 2.0f;
        p.bias = reinterpret_cast<const __nv_bfloat16*>(dbias);
      }
      auto gemm = [&](__nv_bfloat16* y, bool stream_k) {
        p.y = y;
        p.stream_k_ctas = stream_k ? ctas : 0;
        p.stream_k_partials = stream_k ? partials : nullptr;
        p.stream_k_arrivals = stream_k ? arrivals : nullptr;
        return qlora::launch_gemm_4bit(p, qlora::QuantType::NF4, num_sms, false, nullptr);
      };
      const cudaError_t e1 = gemm(dy_tiles, false), e2 = gemm(dy_stream, true), e3 = gemm(dy_again, true);
      const cudaError_t sync = cudaDeviceSynchronize();
      if (e1 != cudaSuccess || e2 != cudaSuccess || e3 != cudaSuccess || sync != cudaSuccess) {
        printf("%lldx%lld M=%lld: launch failed: %s / %s / %s / %s\n", (long long)N, (long long)K, (long long)M,
               cudaGetErrorString(e1), cudaGetErrorString(e2), cudaGetErrorString(e3), cudaGetErrorString(sync));
        return 1;
      }
      const auto y_tiles = host_copy(dy_tiles, M * N), y_stream = host_copy(dy_stream, M * N),
                 y_again = host_copy(dy_again, M * N);
      // Where the two forms part, and a random sample, against an fp64 sum of the weights as the kernels decode
      // them: bf16 code value times the scale split in two bf16 parts, or where the tiles are block-scaled times the
      // fp32 scale itself, which multiplies a stage's fp32 products. Allowed: half a unit in y's last place plus
      // fp32 accumulation, 2^-18 of the sum of the terms' magnitudes (values that cancel to near zero part by many
      // of their own units in either form).
      auto weight = [&](int64_t n, int64_t k) {
        const uint8_t bits = packed[(n * K + k) / 2];
        const double v = from_bf16(to_bf16(qlora::kNF4Values[k % 2 ? bits & 15 : bits >> 4]));
        const float scale = absmax[(n * K + k) / 64];
        if (block_scaled) return v * scale;
        const float hi = from_bf16(to_bf16(scale)), lo = from_bf16(to_bf16(scale - hi));
        return static_cast<double>(from_bf16(to_bf16(static_cast<float>(v * hi + from_bf16(to_bf16(v * lo))))));
      };
      auto off_bound = [&](int64_t i, double y) {  // how far y is from exact, in units of the allowed error
        const int64_t m = i / N, n = i % N;
        double sum = 0, magnitude = 0;
        for (int64_t k = 0; k < K; ++k) {
          const double t = from_bf16(x[m * K + k]) * weight(n, k);
          sum += t, magnitude += std::fabs(t);
        }
        if (lora) {
          for (int j = 0; j < r; ++j) sum += 2.0 * from_bf16(xa[m * r + j]) * from_bf16(B[n * r + j]);
          sum += from_bf16(bias[n]);
        }
        const double allowed = std::ldexp(1.0, std::ilogb(std::fabs(sum)) - 8) + std::ldexp(magnitude, -18);
        return std::fabs(y - sum) / allowed;
      };
      double worst_tiles = 0, worst_stream = 0;
      int64_t differ = 0, checked = 0;
      std::uniform_int_distribution<int64_t> any(0, M * N - 1);
      for (int64_t i = 0; i < M * N; ++i) {
        if (y_tiles[i] == y_stream[i]) continue;
        if (differ++ % 16 == 0 && checked < 400) {
          ++checked;
          worst_tiles = std::max(worst_tiles, off_bound(i, from_bf16(y_tiles[i])));
          worst_stream = std::max(worst_stream, off_bound(i, from_bf16(y_stream[i])));
        }
      }
      for (int t = 0; t < 200; ++t, ++checked) {
        const int64_t i = any(rng);
        worst_tiles = std::max(worst_tiles, off_bound(i, from_bf16(y_tiles[i])));
        worst_stream = std::max(worst_stream, off_bound(i, from_bf16(y_stream[i])));
      }
      const bool repeat = y_stream == y_again, accurate = worst_stream <= 1.0;
      const float t_tiles = flushed_median_us(flush, [&] { gemm(dy_tiles, false); }, 30, 5);
      const float t_stream = flushed_median_us(flush, [&] { gemm(dy_stream, true); }, 30, 5);
      printf("%lldx%lld M=%lld%s: stream-K CTAs %d; %.2f %% of y differs from the tiles' y; worst of %lld values "
             "against fp64, in units of the allowed error: tiles %.2f, stream-K %.2f%s; second run %s; tiles %.1f us, "
             "stream-K %.1f us\n",
             (long long)N, (long long)K, (long long)M, lora ? " +LoRA+bias" : "", ctas, 100.0 * differ / (M * N),
             (long long)checked, worst_tiles, worst_stream, accurate ? "" : " (WRONG)", repeat ? "identical" : "DIFFERS",
             t_tiles, t_stream);
      failed |= !accurate || !repeat;
    }
    for (void* ptr : {static_cast<void*>(dx), static_cast<void*>(dxa), static_cast<void*>(dB), static_cast<void*>(dbias),
                      static_cast<void*>(dp), static_cast<void*>(dabs), static_cast<void*>(dy_tiles),
                      static_cast<void*>(dy_stream), static_cast<void*>(dy_again)})
      cudaFree(ptr);
  }
  printf("%s\n", cudaGetErrorString(cudaGetLastError()));
  return failed ? 1 : 0;
}
