// M = 1 GEMV on CUDA cores reading long row runs ("row stream"), against the library's small-M op (LoRA off).
// A warp owns one 1024-k chunk of x (32 fp32 a lane, in registers) and walks a band of rows down it, 4 rows a
// step, each row's 512 packed bytes one 16-byte load a lane (the "1 row x 512 B" read pattern, 3.1 TB/s in
// tools/read_patterns.cu). A byte of two codes is one PRMT (its table address: table rows 256 B apart) and one
// LDS of a bf16 pair; the lane's 32 products are summed in fp32 and scaled once (half a 64-block a lane). The
// per-chunk row sums go to partial[chunk][n]; the library's split-K epilogue adds the chunks in order.
//   nvcc -O3 -std=c++20 --expt-relaxed-constexpr -gencode arch=compute_90a,code=sm_90a -I csrc/include \
//     tools/row_stream_gemv.cu -o /tmp/row_stream_gemv && /tmp/row_stream_gemv
// Results and why it was not integrated: bench/NOTES.md, "A row-stream GEMV for M = 1".
#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "qlora/lora_linear_4bit.cuh"
#include "flushed_timing.cuh"
#include "tool_host.cuh"

using namespace qlora;
using bf16 = __nv_bfloat16;

constexpr int kChunkK = 1024;  // 32 lanes x 32 weights
constexpr int kTableBytes = 256 * 256;  // 256 byte values x (32 lanes x 4 B, padded to 256 B)

// kWide: the table holds each code pair as two floats (8 B a lane and byte value, 64 KB), one LDS.64 and no
// unpacking, at twice the shared-memory traffic.
template <int kWarps, int kStepRows, int kMinCtas, bool kWide>
__global__ void __launch_bounds__(kWarps * 32, kMinCtas) rows_kernel(const LoraLinearParams<bf16> p, int total_warps) {
  extern __shared__ __align__(16) uint8_t smem[];
  __shared__ float code2_s[256];
  const int lane = threadIdx.x % 32;
  {
    uint32_t* t = reinterpret_cast<uint32_t*>(smem);
    for (int i = threadIdx.x; i < 256 * 32; i += blockDim.x) {
      const int byte = i / 32;
      const uint32_t hi = __bfloat16_as_ushort(__float2bfloat16_rn(kNF4ValuesDevice[byte >> 4]));
      const uint32_t lo = __bfloat16_as_ushort(__float2bfloat16_rn(kNF4ValuesDevice[byte & 15]));
      if (kWide)
        reinterpret_cast<uint2*>(smem)[byte * 32 + i % 32] = make_uint2(hi << 16, lo << 16);
      else
        t[byte * 64 + i % 32] = hi << 16 | lo;
    }
    for (int i = threadIdx.x; i < 256; i += blockDim.x) code2_s[i] = p.scales.code2[i];
  }
  __syncthreads();
  const float mean = *p.scales.offset;
  const int warp = blockIdx.x * kWarps + threadIdx.x / 32;
  if (warp >= total_warps) return;
  const int chunks = static_cast<int>(p.K / kChunkK);
  const int chunk = warp % chunks, in_chunk = warp / chunks;
  const int warps_here = total_warps / chunks + (chunk < total_warps % chunks ? 1 : 0);
  const int64_t units = (p.N + kStepRows - 1) / kStepRows;
  const int64_t u_begin = units * in_chunk / warps_here, u_end = units * (in_chunk + 1) / warps_here;

  // x stays as 16 bf16 pairs; each pair is widened once a step and used for all the step's rows.
  uint32_t xp[16];
  {
    const uint4* xs = reinterpret_cast<const uint4*>(p.x + static_cast<int64_t>(chunk) * kChunkK + lane * 32);
#pragma unroll
    for (int q = 0; q < 4; ++q) {
      const uint4 v = xs[q];
      xp[4 * q] = v.x; xp[4 * q + 1] = v.y; xp[4 * q + 2] = v.z; xp[4 * q + 3] = v.w;
    }
  }
  const uint32_t lane_off = lane * (kWide ? 8 : 4);
  const int64_t row_bytes = p.K / 2, blocks_per_row = p.K / 64;
  const int64_t col_byte = static_cast<int64_t>(chunk) * (kChunkK / 2) + lane * 16;
  const int64_t col_block = static_cast<int64_t>(chunk) * (kChunkK / 64) + lane / 2;
  // Rows past N (only in the last unit) repeat the last row; their sums are never stored.
  auto load_step = [&](int64_t u, bool clamp, uint4 (&w)[kStepRows], uint32_t (&q)[kStepRows], float (&a2)[kStepRows]) {
    const int64_t row0 = u * kStepRows;
    const uint8_t* wp = p.packed + row0 * row_bytes + col_byte;
    const int64_t b0 = row0 * blocks_per_row + col_block;
#pragma unroll
    for (int i = 0; i < kStepRows; ++i) {
      const int64_t di = clamp ? min(row0 + i, p.N - 1) - row0 : i;
      w[i] = __ldg(reinterpret_cast<const uint4*>(wp + di * row_bytes));
      const int64_t b = b0 + di * blocks_per_row;
      q[i] = __ldg(p.scales.qabsmax + b);
      a2[i] = __ldg(p.scales.absmax2 + (b >> 8));
    }
  };
  const int64_t last_whole = p.N / kStepRows;  // units below this hold kStepRows real rows
  uint4 w[kStepRows];
  uint32_t q[kStepRows];
  float a2[kStepRows];
  if (u_begin < u_end) load_step(u_begin, u_begin >= last_whole, w, q, a2);
  for (int64_t u = u_begin; u < u_end; ++u) {
    uint4 wn[kStepRows];
    uint32_t qn[kStepRows];
    float a2n[kStepRows];
    if (u + 1 < u_end) load_step(u + 1, u + 1 >= last_whole, wn, qn, a2n);
    float s0[kStepRows], s1[kStepRows];
#pragma unroll
    for (int i = 0; i < kStepRows; ++i) s0[i] = s1[i] = 0.0f;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const float x0 = __uint_as_float(xp[j] << 16), x1 = __uint_as_float(xp[j] & 0xffff0000u);
#pragma unroll
      for (int i = 0; i < kStepRows; ++i) {
        const uint32_t word = j / 4 == 0 ? w[i].x : j / 4 == 1 ? w[i].y : j / 4 == 2 ? w[i].z : w[i].w;
        const uint32_t addr = __byte_perm(word, lane_off, 0x5504 | ((j % 4) << 4));
        if constexpr (kWide) {
          const uint2 e = *reinterpret_cast<const uint2*>(smem + addr);
          s0[i] = fmaf(__uint_as_float(e.x), x0, s0[i]);
          s1[i] = fmaf(__uint_as_float(e.y), x1, s1[i]);
        } else {
          const uint32_t e = *reinterpret_cast<const uint32_t*>(smem + addr);
          s0[i] = fmaf(__uint_as_float(e & 0xffff0000u), x0, s0[i]);
          s1[i] = fmaf(__uint_as_float(e << 16), x1, s1[i]);
        }
      }
    }
    float part[kStepRows];
#pragma unroll
    for (int i = 0; i < kStepRows; ++i) part[i] = (s0[i] + s1[i]) * mul_then_add(code2_s[q[i]], a2[i], mean);
    // Reduce-scatter over the lanes: halves of the warp swap the rows they do not keep, so 4 rows take 6
    // shuffles instead of 20; lane 8i (4 rows) or 16i (2 rows) ends with row i's sum, in one fixed order.
    const bool hi16 = lane & 16, hi8 = lane & 8;
    float t;
    int my_row;
    if constexpr (kStepRows == 4) {
      float k0 = hi16 ? part[2] : part[0], k1 = hi16 ? part[3] : part[1];
      const float s0 = hi16 ? part[0] : part[2], s1 = hi16 ? part[1] : part[3];
      k0 += __shfl_xor_sync(0xffffffffu, s0, 16);
      k1 += __shfl_xor_sync(0xffffffffu, s1, 16);
      t = hi8 ? k1 : k0;
      t += __shfl_xor_sync(0xffffffffu, hi8 ? k0 : k1, 8);
      my_row = (hi16 ? 2 : 0) + (hi8 ? 1 : 0);
    } else {
      static_assert(kStepRows == 2, "4 or 2 rows a step");
      t = hi16 ? part[1] : part[0];
      t += __shfl_xor_sync(0xffffffffu, hi16 ? part[0] : part[1], 16);
      t += __shfl_xor_sync(0xffffffffu, t, 8);
      my_row = hi16 ? 1 : 0;
    }
#pragma unroll
    for (int o = 4; o > 0; o >>= 1) t += __shfl_xor_sync(0xffffffffu, t, o);
    const int64_t row = u * kStepRows + my_row;
    if ((lane & (kStepRows == 4 ? 7 : 15)) == 0 && row < p.N) p.partial[static_cast<int64_t>(chunk) * p.N + row] = t;
    if (u + 1 < u_end) {
#pragma unroll
      for (int i = 0; i < kStepRows; ++i) { w[i] = wn[i]; q[i] = qn[i]; a2[i] = a2n[i]; }
    }
  }
}

static char* flush_buf;
static float time_it(auto launch) { return flushed_median_us(flush_buf, launch, 60, 10); }

static float host_bf16(uint16_t b) { uint32_t u = uint32_t{b} << 16; float f; memcpy(&f, &u, 4); return f; }

template <int kWarps, int kStepRows, int kMinCtas, bool kWide = false>
static cudaError_t launch_rows(LoraLinearParams<bf16> p, float* partial, int sms, int min_units, int* warps_out) {
  p.partial = partial;
  const int chunks = static_cast<int>(p.K / kChunkK);
  const int64_t units = (p.N + kStepRows - 1) / kStepRows;
  const int64_t want = std::max<int64_t>(chunks, std::min<int64_t>(int64_t{sms} * kWarps * kMinCtas, chunks * units / min_units));
  const int total = static_cast<int>(want);
  *warps_out = total;
  constexpr auto kernel = rows_kernel<kWarps, kStepRows, kMinCtas, kWide>;
  cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kTableBytes);
  if (err != cudaSuccess) return err;
  kernel<<<(total + kWarps - 1) / kWarps, kWarps * 32, kTableBytes>>>(p, total);
  err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  const int epi_rows = lora_epilogue_rows(p.M, p.N, 0, sms);
  lora_epilogue_kernel<bf16><<<dim3(static_cast<unsigned>((p.N + kEpilogueThreads - 1) / kEpilogueThreads), 1),
                               kEpilogueThreads, 0>>>(p, chunks, epi_rows);
  return cudaGetLastError();
}

int main() {
  setvbuf(stdout, nullptr, _IONBF, 0);
  if (cudaMalloc(&flush_buf, kFlushBytes) != cudaSuccess) { printf("no GPU\n"); return 1; }
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, 0);
  const int64_t shapes[][2] = {{4096, 4096}, {8192, 8192}, {8192, 28672}, {28672, 8192}, {14336, 4096}, {4096, 14336}};
  for (const auto& shape : shapes) {
    const int64_t N = shape[0], K = shape[1], M = 1;
    std::mt19937 rng(1);
    std::vector<uint8_t> hp(N * K / 2), hq(N * K / 64);
    for (auto& v : hp) v = rng();
    for (auto& v : hq) v = rng();
    std::vector<float> ha2(N * K / 64 / 256 + 1), hc(256);
    for (auto& v : ha2) v = 0.01f + (rng() % 1000) * 1e-4f;
    for (int i = 0; i < 256; ++i) hc[i] = (i - 128) / 128.0f;
    const float off = 0.05f;
    std::vector<bf16> hx(K);
    for (auto& v : hx) v = __float2bfloat16((static_cast<int>(rng() % 2001) - 1000) / 1000.0f);
    uint8_t *packed, *q;
    float *a2, *code2, *offset, *scratch, *partial;
    bf16 *x, *y_lib, *y_var;
    cudaMalloc(&packed, hp.size()); cudaMalloc(&q, hq.size()); cudaMalloc(&a2, ha2.size() * 4);
    cudaMalloc(&code2, 1024); cudaMalloc(&offset, 4); cudaMalloc(&x, K * 2);
    cudaMalloc(&y_lib, N * 2); cudaMalloc(&y_var, N * 2);
    cudaMemcpy(packed, hp.data(), hp.size(), cudaMemcpyHostToDevice);
    cudaMemcpy(q, hq.data(), hq.size(), cudaMemcpyHostToDevice);
    cudaMemcpy(a2, ha2.data(), ha2.size() * 4, cudaMemcpyHostToDevice);
    cudaMemcpy(code2, hc.data(), 1024, cudaMemcpyHostToDevice);
    cudaMemcpy(offset, &off, 4, cudaMemcpyHostToDevice);
    cudaMemcpy(x, hx.data(), K * 2, cudaMemcpyHostToDevice);
    LoraLinearPlan plan;
    plan_lora_linear_4bit<bf16>(M, N, K, 0, 6, QuantType::NF4, sms, true, &plan);
    cudaMalloc(&scratch, std::max<int64_t>(plan.scratch_floats, 1) * 4);
    cudaMalloc(&partial, (K / kChunkK) * N * 4);
    LoraLinearParams<bf16> p{};
    p.x = x; p.packed = packed; p.scales.qabsmax = q; p.scales.absmax2 = a2; p.scales.code2 = code2;
    p.scales.offset = offset; p.M = M; p.N = N; p.K = K; p.log2_blocksize = 6; p.scale = 1.0f;
    // fp64 reference from the decoded weights (scale as the kernels round it)
    std::vector<double> ref(N);
    for (int64_t n = 0; n < N; ++n)
      ref[n] = nf4_dq_row_dot(hp, hq, ha2, hc, off, n, K, [&](int64_t k) { return __bfloat162float(hx[k]); });
    auto err_of = [&](bf16* y) {
      std::vector<uint16_t> h(N);
      cudaMemcpy(h.data(), y, N * 2, cudaMemcpyDeviceToHost);
      double max_err = 0, max_ref = 0;
      for (int64_t n = 0; n < N; ++n) {
        max_err = std::max(max_err, std::fabs(host_bf16(h[n]) - ref[n]));
        max_ref = std::max(max_ref, std::fabs(ref[n]));
      }
      return max_err / max_ref;
    };
    const double bytes = N * K / 2.0 + N * K / 64.0;
    auto lib = [&] {
      LoraLinearParams<bf16> pl = p;
      pl.y = y_lib;
      launch_lora_linear_4bit<bf16>(pl, plan, nullptr, nullptr, scratch, QuantType::NF4, sms, 0);
    };
    lib();
    cudaDeviceSynchronize();
    const float lib_us = time_it(lib);
    printf("%6lldx%-6lld library      %7.1f us %5.0f GB/s  splits %2d  max err / max |y| %.1e\n", (long long)N,
           (long long)K, lib_us, bytes / lib_us / 1e3, plan.splits, err_of(y_lib));
    LoraLinearParams<bf16> pv = p;
    pv.y = y_var;
    auto run = [&](const char* name, auto launch) {
      for (int min_units : {8, 32}) {
        int warps = 0;
        auto var = [&] { launch(min_units, &warps); };
        var();
        cudaError_t e = cudaDeviceSynchronize();
        if (e != cudaSuccess) { printf("  error %s\n", cudaGetErrorString(e)); exit(1); }
        const float us = time_it(var);
        printf("%13s %-22s %7.1f us %5.0f GB/s  warps %4d (>= %2d steps)  max err / max |y| %.1e\n", "", name, us,
               bytes / us / 1e3, warps, min_units, err_of(y_var));
      }
    };
    run("16 warps, 4 rows", [&](int mu, int* w) { launch_rows<16, 4, 1>(pv, partial, sms, mu, w); });
    run("16 warps, 2 rows", [&](int mu, int* w) { launch_rows<16, 2, 1>(pv, partial, sms, mu, w); });
    run("8 warps x 2, 4 rows", [&](int mu, int* w) { launch_rows<8, 4, 2>(pv, partial, sms, mu, w); });
    run("16 warps, 4 rows, wide", [&](int mu, int* w) { launch_rows<16, 4, 1, true>(pv, partial, sms, mu, w); });
    run("8 warps x 2, 4, wide", [&](int mu, int* w) { launch_rows<8, 4, 2, true>(pv, partial, sms, mu, w); });
    cudaFree(packed); cudaFree(q); cudaFree(a2); cudaFree(code2); cudaFree(offset); cudaFree(x);
    cudaFree(y_lib); cudaFree(y_var); cudaFree(scratch); cudaFree(partial);
  }
  return 0;
}
