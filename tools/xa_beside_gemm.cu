// The tensor-core GEMM's LoRA term with xa = x·Aᵀ from lora_down_mma (a few CTAs that let the GEMM start at once)
// against the GEMM alone with xa ready and without LoRA: is the down-projection hidden, and what does the term cost?
// Also checks xa against a host fp32 reference and that the GEMM waits for it (xa filled with NaN before the pair
// runs; y must equal the GEMM's with xa ready).
//
//   nvcc -O3 -std=c++20 --expt-relaxed-constexpr -arch=sm_90a -I csrc/include -I tools -diag-suppress 177 \
//        tools/xa_beside_gemm.cu -o /tmp/xa_beside_gemm && /tmp/xa_beside_gemm [N,K,M ...]
#include <array>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "flushed_timing.cuh"
#include "gemm_tool.cuh"
#include "tool_host.cuh"
#include "qlora/lora_down_mma.cuh"

using qlora::Gemm4bitParams;

int main(int argc, char** argv) {
  setvbuf(stdout, nullptr, _IONBF, 0);
  const int num_sms = sm_count_or_complain("xa_beside_gemm");
  char* flush;
  if (num_sms == 0 || cudaMalloc(&flush, kFlushBytes) != cudaSuccess) return 1;
  const int r = 16;
  std::vector<std::array<int64_t, 3>> shapes = {{4096, 4096, 256}, {8192, 8192, 256}, {8192, 28672, 256},
                                                {28672, 8192, 256}, {8192, 28672, 64}, {4096, 4096, 32},
                                                {8192, 28672, 1024}};
  if (!gemm_shapes_from_args(argc, argv, 1, &shapes)) return 1;
  std::mt19937 rng(0);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  for (const auto& s : shapes) {
    const int64_t N = s[0], K = s[1], M = s[2];
    const auto x = bf16_values(M * K, [&] { return normal(rng); });
    const auto A = bf16_values(r * K, [&] { return normal(rng) / std::sqrt(static_cast<float>(K)); });
    const auto B = bf16_values(N * r, [&] { return 0.01f * normal(rng); });
    const auto packed = random_bytes(N * K / 2, rng);
    std::vector<float> absmax(N * K / 64, 0.02f);
    auto* dx = device_copy(x);
    auto* dA = device_copy(A);
    auto* dB = device_copy(B);
    auto* dp = device_copy(packed);
    auto* dabs = device_copy(absmax);
    __nv_bfloat16 *dxa, *dy_ready, *dy_pair;
    cudaMalloc(&dxa, M * r * 2);
    cudaMalloc(&dy_ready, M * N * 2);
    cudaMalloc(&dy_pair, M * N * 2);
    const auto* bx = reinterpret_cast<const __nv_bfloat16*>(dx);
    const auto* bA = reinterpret_cast<const __nv_bfloat16*>(dA);

    // xa against the host.
    qlora::launch_lora_down_mma(bx, bA, dxa, M, K, r, nullptr);
    std::vector<uint16_t> xa(M * r);
    cudaMemcpy(xa.data(), dxa, M * r * 2, cudaMemcpyDeviceToHost);
    double worst = 0, scale = 0;
    for (int64_t m = 0; m < M; ++m)
      for (int j = 0; j < r; ++j) {
        double ref = 0;
        for (int64_t k = 0; k < K; ++k) ref += static_cast<double>(from_bf16(x[m * K + k])) * from_bf16(A[j * K + k]);
        worst = std::max(worst, std::fabs(from_bf16(xa[m * r + j]) - ref));
        scale = std::max(scale, std::fabs(ref));
      }

    Gemm4bitParams p = nf4_gemm_params(bx, dp, dabs, M, N, K);
    p.xa = dxa;
    p.lora_B = reinterpret_cast<const __nv_bfloat16*>(dB);
    p.r = r;
    p.lora_scale = 2.0f;
    auto gemm = [&](__nv_bfloat16* y) {
      p.y = y;
      return qlora::launch_gemm_4bit(p, qlora::QuantType::NF4, num_sms, false, nullptr);
    };
    auto down = [&] { return qlora::launch_lora_down_mma(bx, bA, dxa, M, K, r, nullptr); };
    gemm(dy_ready);
    cudaMemset(dxa, 0xff, M * r * 2);  // NaN: a GEMM that reads xa before lora_down_mma wrote it shows
    down();
    gemm(dy_pair);
    std::vector<uint16_t> y_ready(M * N), y_pair(M * N);
    cudaMemcpy(y_ready.data(), dy_ready, M * N * 2, cudaMemcpyDeviceToHost);
    cudaMemcpy(y_pair.data(), dy_pair, M * N * 2, cudaMemcpyDeviceToHost);
    const bool same = y_ready == y_pair;

    const float t_gemm = flushed_median_us(flush, [&] { gemm(dy_ready); }, 30, 5);
    p.r = 0;
    const float t_plain = flushed_median_us(flush, [&] { gemm(dy_ready); }, 30, 5);
    p.r = r;
    const float t_down = flushed_median_us(flush, down, 30, 5);
    const float t_pair = flushed_median_us(flush, [&] { down(); gemm(dy_pair); }, 30, 5);
    const float t_pair2 = flushed_median_us(flush, [&] {
      qlora::launch_lora_down_mma(bx, bA, dxa, M, K, r, nullptr, 2);
      gemm(dy_pair);
    }, 30, 5);
    printf("%lldx%lld M=%lld: xa max err %.2e of max %.2e; y %016llx, %s; GEMM without LoRA %.1f us, with xa ready %.1f, "
           "lora_down_mma %.1f, both %.1f (%+.1f), both with lora_down_mma in clusters of 2 %.1f (%+.1f)\n",
           (long long)N, (long long)K, (long long)M, worst, scale,
           static_cast<unsigned long long>(bits_hash(y_ready)), same ? "identical" : "DIFFERS", t_plain, t_gemm, t_down,
           t_pair, t_pair - t_gemm, t_pair2, t_pair2 - t_gemm);
    for (void* ptr : {static_cast<void*>(dx), static_cast<void*>(dA), static_cast<void*>(dB), static_cast<void*>(dp),
                      static_cast<void*>(dabs), static_cast<void*>(dxa), static_cast<void*>(dy_ready),
                      static_cast<void*>(dy_pair)})
      cudaFree(ptr);
  }
  printf("%s\n", cudaGetErrorString(cudaGetLastError()));
}
