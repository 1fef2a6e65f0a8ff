// CPU implementation of the fused AdamW ops: the same element arithmetic (qlora/adamw.h) and the same 8-bit
// code search as the CUDA kernels, so CPU and CUDA produce identical parameters and states.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../adamw_args.h"
#include "qlora/adamw.h"

namespace qlora {
namespace {

double lr_value(double lr, const std::optional<at::Tensor>& lr_tensor) {
  return lr_tensor.has_value() ? lr_tensor->item<double>() : lr;
}

template <typename T>
void adamw_32bit_tensor(T* p, const T* g, float* m, float* v, int64_t n, const AdamWScalars& s) {
  at::parallel_for(0, n, 16384, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      float pv = static_cast<float>(p[i]), mv = m[i], vv = v[i];
      if (adamw_element(pv, static_cast<float>(g[i]), mv, vv, s)) {
        p[i] = static_cast<T>(pv);
        m[i] = mv;
        v[i] = vv;
      }
    }
  });
}

void adamw_32bit_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                     at::TensorList steps, double lr, double beta1, double beta2, double eps, double weight_decay,
                     const std::optional<at::Tensor>& lr_tensor) {
  const at::ScalarType dtype = check_adamw_32bit_args(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2,
                                                      eps, weight_decay, lr_tensor);
  const double lr_now = lr_value(lr, lr_tensor);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "adamw_32bit_cpu", [&] {
    for (size_t i = 0; i < params.size(); ++i) {
      const at::Tensor g = grads[i].contiguous();
      const AdamWScalars s =
          adamw_scalars(lr_now, steps[i].item<float>(), beta1, beta2, eps, weight_decay);
      adamw_32bit_tensor<scalar_t>(params[i].data_ptr<scalar_t>(), g.const_data_ptr<scalar_t>(),
                                   exp_avgs[i].data_ptr<float>(), exp_avg_sqs[i].data_ptr<float>(), params[i].numel(), s);
    }
  });
}

// The two codes and, when both fit them, their search tables (as the CUDA kernel builds them).
struct Codes8bit {
  const float* code1;
  const float* code2;
  std::vector<uint32_t> table1, table2;
  uint32_t negative_codes1 = 0;  // entries of code1 with the sign bit set
  bool tables_fit = false;

  Codes8bit(const float* c1, const float* c2)
      : code1(c1), code2(c2), table1(kCodeTableSize), table2(kCodeTableSize) {
    tables_fit = build_code_table(code1, table1.data()) && build_code_table(code2, table2.data());
    for (int i = 0; i < 256; ++i) negative_codes1 += float_bits(code1[i]) >> 31;
  }
};

// One block of 8-bit states, as one warp of the CUDA kernel updates it: dequantize, update, new absmax,
// requantize.
template <typename T>
void adamw_8bit_block(T* p, const T* g, uint8_t* c1, uint8_t* c2, float* absmax1, float* absmax2, int64_t count,
                      const Codes8bit& codes, const AdamWScalars& s) {
  float m[kOptimizerBlocksize], v[kOptimizerBlocksize];
  const float scale1 = *absmax1, scale2 = *absmax2;
  uint32_t max1 = 0, max2 = 0;
  for (int64_t i = 0; i < count; ++i) {
    m[i] = rn_mul(codes.code1[c1[i]], scale1);
    v[i] = rn_mul(codes.code2[c2[i]], scale2);
    float pv = static_cast<float>(p[i]);
    if (adamw_element(pv, static_cast<float>(g[i]), m[i], v[i], s)) p[i] = static_cast<T>(pv);
    max1 = std::max(max1, abs_bits(m[i]));
    max2 = std::max(max2, abs_bits(v[i]));
  }
  const float new1 = bits_float(max1), new2 = bits_float(max2);
  const float inv1 = inverse_scale(new1), inv2 = inverse_scale(new2);
  for (int64_t i = 0; i < count; ++i) {
    const float scaled1 = rn_mul(m[i], inv1), scaled2 = rn_mul(v[i], inv2);
    if (codes.tables_fit) {
      c1[i] = static_cast<uint8_t>(code_state1_table(codes.table1.data(), codes.negative_codes1, scaled1, m[i]));
      c2[i] = static_cast<uint8_t>(code_8bit_table(codes.table2.data(), scaled2));
    } else {
      c1[i] = static_cast<uint8_t>(code_state1(codes.code1, scaled1, m[i]));
      c2[i] = static_cast<uint8_t>(code_8bit(codes.code2, scaled2));
    }
  }
  *absmax1 = new1;
  *absmax2 = new2;
}

void adamw_8bit_blockwise_cpu(at::TensorList params, at::TensorList grads, at::TensorList state1, at::TensorList state2,
                              at::TensorList absmax1, at::TensorList absmax2, const at::Tensor& qmap1,
                              const at::Tensor& qmap2, at::TensorList steps, double lr, double beta1, double beta2,
                              double eps, double weight_decay, const std::optional<at::Tensor>& lr_tensor) {
  const at::ScalarType dtype = check_adamw_8bit_args(params, grads, state1, state2, absmax1, absmax2, qmap1, qmap2,
                                                     steps, lr, beta1, beta2, eps, weight_decay, lr_tensor);
  if (params.empty()) return;
  const double lr_now = lr_value(lr, lr_tensor);
  const at::Tensor q1 = qmap1.contiguous(), q2 = qmap2.contiguous();
  const Codes8bit codes(q1.const_data_ptr<float>(), q2.const_data_ptr<float>());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "adamw_8bit_blockwise_cpu", [&] {
    for (size_t i = 0; i < params.size(); ++i) {
      const at::Tensor g = grads[i].contiguous();
      const AdamWScalars s = adamw_scalars(lr_now, steps[i].item<float>(), beta1, beta2, eps, weight_decay);
      const int64_t n = params[i].numel();
      scalar_t* p = params[i].data_ptr<scalar_t>();
      const scalar_t* gp = g.const_data_ptr<scalar_t>();
      uint8_t* s1 = state1[i].data_ptr<uint8_t>();
      uint8_t* s2 = state2[i].data_ptr<uint8_t>();
      float* a1 = absmax1[i].data_ptr<float>();
      float* a2 = absmax2[i].data_ptr<float>();
      const int64_t blocks = (n + kOptimizerBlocksize - 1) / kOptimizerBlocksize;
      at::parallel_for(0, blocks, 64, [&](int64_t begin, int64_t end) {
        for (int64_t b = begin; b < end; ++b) {
          const int64_t e0 = b * kOptimizerBlocksize;
          adamw_8bit_block<scalar_t>(p + e0, gp + e0, s1 + e0, s2 + e0, a1 + b, a2 + b,
                                     std::min<int64_t>(kOptimizerBlocksize, n - e0), codes, s);
        }
      });
    }
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CPU, m) {
  m.impl("adamw_32bit", &adamw_32bit_cpu);
  m.impl("adamw_8bit_blockwise", &adamw_8bit_blockwise_cpu);
}

}  // namespace qlora
