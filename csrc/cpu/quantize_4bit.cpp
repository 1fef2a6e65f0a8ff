// CPU implementation of the quantization ops: the same element functions as the CUDA kernels
// (qlora/codebook.h) and the same summation order for the mean, so the two give identical bits.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../packed_order.h"
#include "../quantize_4bit_args.h"
#include "qlora/codebook.h"

namespace qlora {
namespace {

constexpr int kMeanThreads = 256;  // mirrors the CUDA kernels' reduction shape
constexpr int kMeanPerThread = 8;
constexpr int kMeanChunk = kMeanThreads * kMeanPerThread;

template <typename T, QuantType QT>
void quantize_blocks(const T* A, uint8_t* packed, float* absmax, int64_t n, int64_t blocksize) {
  const int64_t blocks = ceil_div(n, blocksize);
  at::parallel_for(0, blocks, 64, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t start = b * blocksize;
      const int64_t stop = std::min(n, start + blocksize);
      uint32_t m = 0;
      for (int64_t i = start; i < stop; ++i) m = std::max(m, abs_bits(static_cast<float>(A[i])));
      const float block_absmax = bits_float(m);
      const float inv = inverse_scale(block_absmax);
      absmax[b] = block_absmax;
      const Bucket* buckets = host_buckets<QT>();
      const bool fast = QT == QuantType::NF4 && finite_scale(block_absmax, inv);
      const auto code = [&](float scaled) {
        return fast ? static_cast<uint32_t>(nf4_code_finite(scaled, kNF4FastBucketTable.bucket))
                    : code_4bit<QT>(scaled, buckets);
      };
      for (int64_t i = start; i < stop; i += 2) {
        const uint32_t hi = code(static_cast<float>(A[i]) * inv);
        const uint32_t lo = code(i + 1 < stop ? static_cast<float>(A[i + 1]) * inv : 0.0f);
        packed[i / 2] = static_cast<uint8_t>((hi << 4) | lo);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> quantize_4bit_cpu(const at::Tensor& A, int64_t blocksize,
                                                     const std::string& quant_type) {
  check_float_input(A, "A");
  check_blocksize(blocksize);
  const QuantType qt = parse_quant_type(quant_type);
  const at::Tensor a = A.contiguous();
  const int64_t n = a.numel();
  at::Tensor packed = at::empty({ceil_div(n, 2), 1}, a.options().dtype(at::kByte));
  at::Tensor absmax = at::empty({ceil_div(n, blocksize)}, a.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, a.scalar_type(), "quantize_4bit_cpu", [&] {
    if (qt == QuantType::NF4) {
      quantize_blocks<scalar_t, QuantType::NF4>(a.const_data_ptr<scalar_t>(), packed.data_ptr<uint8_t>(),
                                                absmax.data_ptr<float>(), n, blocksize);
    } else {
      quantize_blocks<scalar_t, QuantType::FP4>(a.const_data_ptr<scalar_t>(), packed.data_ptr<uint8_t>(),
                                                absmax.data_ptr<float>(), n, blocksize);
    }
  });
  return {packed, absmax};
}

// The mean of the absmax in exactly the CUDA kernels' order: per chunk, thread t adds its 8 consecutive
// elements; a halving tree over the 256 thread sums; then thread t adds chunk sums t, t+256, ... and the
// same tree again.
double tree_sum(std::vector<double>& lanes) {
  for (int stride = kMeanThreads / 2; stride > 0; stride >>= 1)
    for (int t = 0; t < stride; ++t) lanes[t] += lanes[t + stride];
  return lanes[0];
}

float absmax_mean(const float* absmax, int64_t n) {
  const int64_t chunks = ceil_div(n, kMeanChunk);
  std::vector<double> partial(chunks);
  at::parallel_for(0, chunks, 1, [&](int64_t begin, int64_t end) {
    std::vector<double> lanes(kMeanThreads);
    for (int64_t c = begin; c < end; ++c) {
      for (int t = 0; t < kMeanThreads; ++t) {
        double acc = 0.0;
        for (int j = 0; j < kMeanPerThread; ++j) {
          const int64_t i = c * kMeanChunk + t * kMeanPerThread + j;
          if (i < n) acc += static_cast<double>(absmax[i]);
        }
        lanes[t] = acc;
      }
      partial[c] = tree_sum(lanes);
    }
  });
  std::vector<double> lanes(kMeanThreads, 0.0);
  for (int t = 0; t < kMeanThreads; ++t)
    for (int64_t i = t; i < chunks; i += kMeanThreads) lanes[t] += partial[i];
  return static_cast<float>(tree_sum(lanes) / static_cast<double>(n));
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> double_quantize_cpu(const at::Tensor& absmax, const at::Tensor& code) {
  check_double_quantize_args(absmax, code);
  const at::Tensor a = absmax.contiguous();
  const at::Tensor c = code.contiguous();
  const int64_t n = a.numel();
  const int64_t blocks = ceil_div(n, kAbsmaxBlocksize);
  at::Tensor qabsmax = at::empty({n}, a.options().dtype(at::kByte));
  at::Tensor absmax2 = at::empty({blocks}, a.options());
  at::Tensor offset = at::zeros({}, a.options());
  if (n == 0) return {qabsmax, absmax2, offset};
  const float* x = a.const_data_ptr<float>();
  const float* code_ptr = c.const_data_ptr<float>();
  const float mean = absmax_mean(x, n);
  offset.fill_(mean);
  uint8_t* q = qabsmax.data_ptr<uint8_t>();
  float* scale_out = absmax2.data_ptr<float>();
  at::parallel_for(0, blocks, 16, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t start = b * kAbsmaxBlocksize;
      const int64_t stop = std::min(n, start + kAbsmaxBlocksize);
      uint32_t m = 0;
      for (int64_t i = start; i < stop; ++i) m = std::max(m, abs_bits(x[i] - mean));
      const float scale = bits_float(m);
      const float inv = inverse_scale(scale);
      scale_out[b] = scale;
      for (int64_t i = start; i < stop; ++i) q[i] = static_cast<uint8_t>(code_8bit(code_ptr, (x[i] - mean) * inv));
    }
  });
  return {qabsmax, absmax2, offset};
}

template <typename T>
void dequantize_blocks(const uint8_t* packed, const float* values, const std::vector<float>& scales, T* out, int64_t n,
                       int64_t blocksize) {
  // Blocks hold an even number of elements, so every byte lies inside one block.
  const int64_t blocks = ceil_div(n, blocksize);
  at::parallel_for(0, blocks, std::max<int64_t>(1, 16384 / blocksize), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const float scale = scales[b];
      const int64_t stop = std::min(n, (b + 1) * blocksize);
      for (int64_t i = b * blocksize; i < stop; i += 2) {
        const uint8_t bits = packed[i / 2];
        out[i] = static_cast<T>(values[bits >> 4] * scale);
        if (i + 1 < stop) out[i + 1] = static_cast<T>(values[bits & 15] * scale);
      }
    }
  });
}

at::Tensor dequantize_4bit_cpu(const at::Tensor& packed, const at::Tensor& absmax, int64_t blocksize,
                               const std::string& quant_type, c10::SymIntArrayRef shape, at::ScalarType dtype,
                               const std::optional<at::Tensor>& absmax2, const std::optional<at::Tensor>& code2,
                               const std::optional<at::Tensor>& offset) {
  const DequantizeArgs args =
      check_dequantize_4bit_args(packed, absmax, blocksize, quant_type, shape, dtype, absmax2, code2, offset);
  at::Tensor out = at::empty(C10_AS_INTARRAYREF_SLOW(shape), packed.options().dtype(dtype));
  const int64_t blocks = ceil_div(args.numel, blocksize);
  std::vector<float> scales(blocks);
  const at::Tensor a = absmax.contiguous();
  if (args.double_quant) {
    const at::Tensor s2 = absmax2->contiguous();
    const at::Tensor c2 = code2->contiguous();
    const float off = offset->item<float>();
    const uint8_t* q = a.const_data_ptr<uint8_t>();
    for (int64_t b = 0; b < blocks; ++b)
      scales[b] = mul_then_add(c2.const_data_ptr<float>()[q[b]], s2.const_data_ptr<float>()[b / kAbsmaxBlocksize], off);
  } else {
    std::copy_n(a.const_data_ptr<float>(), blocks, scales.begin());
  }
  const float* values = args.quant_type == QuantType::NF4 ? kNF4Values : kFP4Values;
  const at::Tensor p = to_row_order(packed).contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "dequantize_4bit_cpu", [&] {
    dequantize_blocks<scalar_t>(p.const_data_ptr<uint8_t>(), values, scales, out.data_ptr<scalar_t>(), args.numel,
                                blocksize);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CPU, m) {
  m.impl("quantize_4bit", &quantize_4bit_cpu);
  m.impl("double_quantize", &double_quantize_cpu);
  m.impl("dequantize_4bit", &dequantize_4bit_cpu);
}

}  // namespace qlora
