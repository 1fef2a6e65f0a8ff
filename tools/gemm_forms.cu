// The tensor-core GEMM (gemm_4bit.cuh) in the launch form launch_gemm_4bit picks for each case, no LoRA term: the
// form (token tile, split or row form, K splits, CTAs), a hash of y (so that two builds can be compared bit for bit)
// and the median time, as the benchmarks time. With --dq the weight's scales are double-quantized (a code byte a
// block, one fp32 scale a 256 blocks, 256 codes and an offset), as the library stores them; else one fp32 absmax.
//
//   nvcc -O3 -std=c++20 --expt-relaxed-constexpr -arch=sm_90a -I csrc/include -I tools -diag-suppress 177 \
//        tools/gemm_forms.cu -o /tmp/gemm_forms && /tmp/gemm_forms --dq 4096,4096,256 8192,28672,32
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "flushed_timing.cuh"
#include "gemm_tool.cuh"
#include "tool_host.cuh"

int main(int argc, char** argv) {
  setvbuf(stdout, nullptr, _IONBF, 0);
  const int num_sms = sm_count_or_complain("gemm_forms");
  char* flush;
  if (num_sms == 0 || cudaMalloc(&flush, kFlushBytes) != cudaSuccess) return 1;
  const bool dq = argc > 1 && strcmp(argv[1], "--dq") == 0;
  if (argc < 2 + dq) {
    printf("usage: gemm_forms [--dq] N,K,M ...\n");
    return 1;
  }
  for (int a = 1 + dq; a < argc; ++a) {
    long long N, K, M;
    if (!parse_gemm_shape(argv[a], &N, &K, &M)) return 1;
    std::mt19937 rng(0);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    auto scale_like = [&] { return 0.02f * (1.0f + 0.5f * std::fabs(normal(rng))); };
    const auto x = bf16_values(M * K, [&] { return normal(rng); });
    std::vector<float> absmax(N * K / 64);
    for (auto& v : absmax) v = scale_like();
    std::vector<void*> buffers;
    auto on_device = [&](const auto& v) {
      auto* d = device_copy(v);
      buffers.push_back(d);
      return d;
    };
    __nv_bfloat16* dy;
    cudaMalloc(&dy, M * N * 2);
    buffers.push_back(dy);
    qlora::Gemm4bitParams p = nf4_gemm_params(on_device(x), on_device(random_bytes(N * K / 2, rng)), on_device(absmax), M, N, K);
    if (dq) {
      std::vector<float> code2(256), absmax2(N * K / 64 / 256 + 1), offset(1, 0.03f);
      for (int i = 0; i < 256; ++i) code2[i] = (i - 127.5f) / 128.0f;
      for (auto& v : absmax2) v = scale_like();
      p.scales.absmax = nullptr;
      p.scales.qabsmax = on_device(random_bytes(N * K / 64, rng));
      p.scales.code2 = on_device(code2);
      p.scales.absmax2 = on_device(absmax2);
      p.scales.offset = on_device(offset);
    }
    p.y = dy;
    auto gemm = [&] { return qlora::launch_gemm_4bit(p, qlora::QuantType::NF4, num_sms, false, nullptr); };
    const cudaError_t launched = gemm(), done = cudaDeviceSynchronize();
    if (launched != cudaSuccess || done != cudaSuccess) {
      printf("%s: %s / %s\n", argv[a], cudaGetErrorString(launched), cudaGetErrorString(done));
      return 1;
    }
    const auto y = host_copy(dy, M * N);
    const uint64_t hash = bits_hash(y);
    const float us = flushed_median_us(flush, [&] { gemm(); }, 40, 5);
    const auto plan = qlora::gemm4bit::launch_plan(M, N, K, num_sms, false);
    printf("%lldx%lld M=%lld%s: %d-token tiles, %s form, %d K split(s), %lld CTAs; y %016llx; %.1f us\n", N, K, M,
           dq ? " dq" : "", plan.tokens, plan.split_form ? "split" : "row", plan.splits,
           static_cast<long long>(qlora::gemm4bit::gemm_4bit_ctas(M, N, K, num_sms)),
           static_cast<unsigned long long>(hash), us);
    for (void* b : buffers) cudaFree(b);
  }
  return 0;
}
