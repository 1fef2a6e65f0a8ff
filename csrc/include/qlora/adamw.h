// AdamW element arithmetic shared by the CPU and CUDA optimizer kernels: no torch, no CUDA runtime.
//
// Every float operation is written as a separately rounded IEEE operation (rn_*), so that the host build
// (-ffp-contract=off) and the device build (where nvcc would otherwise fuse a*b+c into an FMA) compute
// the same bits. The update follows torch.optim.AdamW's single-tensor algorithm operation for operation:
//
//   p  = p * (1 - lr * weight_decay)
//   m  = m + (1 - beta1) * (g - m)                       (lerp toward g)
//   v  = v * beta2 + (1 - beta2) * g * g
//   p  = p + (-lr / bc1) * m / (sqrt(v) / sqrt(bc2) + eps),   bc_i = 1 - beta_i^step
//
// Non-finite gradients: an element whose gradient is NaN or +-Inf is skipped: its parameter and both
// moments keep their values (no weight decay either). Every other element updates normally. The rule is
// decided per element on the device, so it costs neither a host synchronisation nor an extra pass.
#pragma once

#include <cmath>
#include <cstdint>

#include "qlora/codebook.h"

namespace qlora {

QLORA_HD float rn_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

QLORA_HD float rn_add(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

QLORA_HD float rn_sub(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

QLORA_HD float rn_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

QLORA_HD float rn_sqrt(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

QLORA_HD double rn_dmul(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

QLORA_HD double rn_dsqrt(double a) {
#if defined(__CUDA_ARCH__)
  return __dsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

QLORA_HD bool is_finite_bits(float x) { return (float_bits(x) & 0x7f800000u) != 0x7f800000u; }

// base^e for a whole e >= 0 by repeated squaring: the same sequence of double products on the host and the
// device (pow() differs between libm and CUDA in the last place, which would break CPU/CUDA bit agreement).
QLORA_HD double pow_int(double base, int64_t e) {
  double result = 1.0;
  while (e > 0) {
    if (e & 1) result = rn_dmul(result, base);
    base = rn_dmul(base, base);
    e >>= 1;
  }
  return result;
}

// The per-tensor constants of one AdamW step. They are computed in double from the hyperparameters, as
// torch.optim.AdamW computes them in Python floats, then rounded once to float.
struct AdamWScalars {
  float decay;            // 1 - lr * weight_decay
  float one_minus_beta1;  // lerp weight of the first moment
  float beta2;
  float one_minus_beta2;
  float neg_step_size;    // -lr / (1 - beta1^step)
  float bc2_sqrt;         // sqrt(1 - beta2^step)
  float eps;
};

QLORA_HD AdamWScalars adamw_scalars(double lr, double step, double beta1, double beta2, double eps, double weight_decay) {
  const int64_t t = static_cast<int64_t>(step);
  const double bc1 = 1.0 - pow_int(beta1, t);
  const double bc2 = 1.0 - pow_int(beta2, t);
  AdamWScalars s;
  s.decay = static_cast<float>(1.0 - rn_dmul(lr, weight_decay));
  s.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  s.beta2 = static_cast<float>(beta2);
  s.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  s.neg_step_size = static_cast<float>(-(lr / bc1));
  s.bc2_sqrt = static_cast<float>(rn_dsqrt(bc2));
  s.eps = static_cast<float>(eps);
  return s;
}

// The update of one element whose gradient is finite.
QLORA_HD void adamw_update(float& p, float g, float& m, float& v, const AdamWScalars& s) {
  p = rn_mul(p, s.decay);
  m = rn_add(m, rn_mul(s.one_minus_beta1, rn_sub(g, m)));
  v = rn_add(rn_mul(v, s.beta2), rn_mul(rn_mul(s.one_minus_beta2, g), g));
  const float denom = rn_add(rn_div(rn_sqrt(v), s.bc2_sqrt), s.eps);
  p = rn_add(p, rn_div(rn_mul(s.neg_step_size, m), denom));
}

// One element of AdamW; returns false (and changes nothing) when the gradient is not finite.
QLORA_HD bool adamw_element(float& p, float g, float& m, float& v, const AdamWScalars& s) {
  if (!is_finite_bits(g)) return false;
  adamw_update(p, g, m, v, s);
  return true;
}

// ---- 8-bit blockwise states (bitsandbytes' layout) ---------------------------------------------------
// Each state is one uint8 code per element into a 256-entry dynamic code (signed for the first moment,
// unsigned for the second), scaled by one float32 absmax per block of kOptimizerBlocksize elements. A block
// is dequantized, updated, and requantized against its new absmax.
constexpr int kOptimizerBlocksize = 256;

// Code of the first moment: the nearest signed code c, moved one step toward the value when code c has the
// opposite sign (as bitsandbytes does), so that a small moment never flips direction. The top bit of
// sign_difference says whether the signs differ.
QLORA_HD uint32_t toward_value_sign(uint32_t c, uint32_t sign_difference, float value) {
  const bool opposite = static_cast<int32_t>(sign_difference) < 0;
  const bool up = opposite && value > 0.0f && c < 255;
  const bool down = opposite && value <= 0.0f && c > 0;  // not for NaN
  return c + (up ? 1u : 0u) - (down ? 1u : 0u);
}

QLORA_HD uint32_t code_state1(const float* code, float scaled, float value) {
  const uint32_t c = code_8bit(code, scaled);
  return toward_value_sign(c, float_bits(code[c]) ^ float_bits(value), value);
}

// As code_state1, for a code that fits its table, whose first `negative_codes` entries have the sign bit set
// (so that c - negative_codes has the sign of code c).
QLORA_HD uint32_t code_state1_table(const uint32_t* table, uint32_t negative_codes, float scaled, float value) {
  const uint32_t c = code_8bit_table(table, scaled);
  return toward_value_sign(c, (c - negative_codes) ^ float_bits(value), value);
}

}  // namespace qlora
