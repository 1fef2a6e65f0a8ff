// A case for the tiled GEMV's programs (tools/tiled_ring_gemv.cu, tools/tiled_gemv_16.cu): an NF4 weight [N, K] with
// double-quantized scales, x [M, K] and a rank-r bf16 adapter with scale s, drawn from a fixed seed, on the device as
// the op's parameters with the weight in tile order (y allocated; scratch and xa are the caller's). The host samples
// stay for the fp64 reference (lora_reference_error).
#pragma once

#include <random>
#include <vector>

#include "qlora/lora_linear_4bit.cuh"
#include "tool_host.cuh"

struct TiledLoraCase {
  DqWeightSample w;
  std::vector<uint16_t> A_host, B_host;
  DqWeightOnDevice weight;
  const __nv_bfloat16* A = nullptr;
  qlora::LoraLinearParams<__nv_bfloat16> p{};
};

inline TiledLoraCase tiled_lora_case(int64_t N, int64_t K, int64_t M, int r, float s) {
  using bf16 = __nv_bfloat16;
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> unit(-1.0f, 1.0f);
  TiledLoraCase c;
  c.w = dq_weight_sample(N, K, M, rng);
  c.A_host = bf16_values(r * K, [&] { return 0.02f * unit(rng); });
  c.B_host = bf16_values(N * r, [&] { return 0.02f * unit(rng); });
  c.weight = dq_weight_on_device(c.w, N, K);
  c.A = reinterpret_cast<const bf16*>(device_copy(c.A_host));
  qlora::LoraLinearParams<bf16>& p = c.p;
  p.x = reinterpret_cast<const bf16*>(device_copy(c.w.x));
  p.packed = c.weight.tiled;
  p.scales.qabsmax = c.weight.qabsmax;
  p.scales.absmax2 = c.weight.absmax2;
  p.scales.code2 = c.weight.code2;
  p.scales.offset = c.weight.offset;
  p.lora_B = reinterpret_cast<const bf16*>(device_copy(c.B_host));
  p.r = r;
  p.scale = s;
  cudaMalloc(&p.y, N * M * 2);
  p.M = M;
  p.N = N;
  p.K = K;
  p.log2_blocksize = 6;
  return c;
}
