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

// ---- 8-bit code search by table ----------------------------------------------------------------------
// code_8bit, bitsandbytes' binary search, costs eight dependent loads and divergent branches per value. For
// a code whose neighbour midpoints M_k = (code[k] + code[k+1]) * 0.5 (in float) satisfy
// code[k] < M_k < code[k+1] and M_k != 0, its result is the number of midpoints x passes, an even k being
// passed when x > M_k and an odd k when x >= M_k: the search compares x with odd entries only and ends on an
// even pivot p with code[p-1] < x <= code[p+1], so every midpoint but M_{p-1} and M_p lies wholly below or
// above x, and its final comparison with one of those two sends ties to p. NaN gets code 0, as -inf does.
//
// A table turns that count into one load: it splits the floats into buckets (by |x|: one below 2^-23, 32
// per binade up to 2^-4, 128 per binade up to 1, one from 1 to inf; each for either sign) that each hold at
// most one midpoint. An entry is the count below its bucket in the top 8 bits, plus a 24-bit addend that
// carries into them exactly when x is past the bucket's midpoint. Both dynamic codes fit; a code that does
// not (build_code_table returns false) keeps the binary search.

// Floats as int32 in float order (-1 - |x|bits for negative x); the one disorder, -0 below +0, is harmless
// because no midpoint is zero.
QLORA_HD int32_t ordered_key(float x) {
  const uint32_t bits = float_bits(x);
  return static_cast<int32_t>(bits ^ (static_cast<uint32_t>(static_cast<int32_t>(bits) >> 31) >> 1));
}

constexpr uint32_t kBucketFloor = 104u << 23;  // 2^-23, below the smallest midpoint of either dynamic code
constexpr uint32_t kBucketFine = 123u << 23;   // 2^-4: from here the codes are dense enough to need 128 per binade
constexpr uint32_t kBucketTop = 127u << 23;    // 1.0, above the largest midpoint
constexpr int kCoarseBucketShift = 18;         // 32 buckets per binade
constexpr int kFineBucketShift = 16;           // 128 buckets per binade
constexpr int kCoarseBuckets = static_cast<int>((kBucketFine - kBucketFloor) >> kCoarseBucketShift);
constexpr int kFineBuckets = static_cast<int>((kBucketTop - kBucketFine) >> kFineBucketShift);
constexpr int kMagnitudeBuckets = 1 + kCoarseBuckets + kFineBuckets + 1;
constexpr int kCodeTableSize = 2 * kMagnitudeBuckets;
// Bucket b >= 1 begins where (|x|bits >> shift) - bias first reaches b, for either shift: the coarse
// buckets start at bucket 1, the fine ones follow them.
constexpr int kCoarseBucketBias = static_cast<int>(kBucketFloor >> kCoarseBucketShift) - 1;
constexpr int kFineBucketBias = static_cast<int>(kBucketFine >> kFineBucketShift) - (1 + kCoarseBuckets);
constexpr uint32_t kCarryBits = 0xffffffu;  // x's offset in its bucket: the low 24 bits of its key

QLORA_HD int magnitude_bucket(uint32_t abs_bits) {
  const int fine = static_cast<int>(abs_bits >> kFineBucketShift) - kFineBucketBias;
  const int coarse = static_cast<int>(abs_bits >> kCoarseBucketShift) - kCoarseBucketBias;
  const int b = fine > coarse ? fine : coarse;
  return b < 0 ? 0 : (b < kMagnitudeBuckets - 1 ? b : kMagnitudeBuckets - 1);
}

// The smallest |x| bits in bucket b (1 <= b < kMagnitudeBuckets).
QLORA_HD uint32_t magnitude_bucket_start(int b) {
  const uint32_t fine = static_cast<uint32_t>(b + kFineBucketBias) << kFineBucketShift;
  const uint32_t coarse = static_cast<uint32_t>(b + kCoarseBucketBias) << kCoarseBucketShift;
  return fine < coarse ? fine : coarse;
}

// The table search: exactly code_8bit(code, x) for every float x when table was built from a code that fits.
QLORA_HD uint32_t code_8bit_table(const uint32_t* table, float x) {
  // NaN and -inf become the lowest finite float, which passes no midpoint either.
#if defined(__CUDA_ARCH__)
  const float clamped = fmaxf(x, -0x1.fffffep127f);
#else
  const float clamped = x > -0x1.fffffep127f ? x : -0x1.fffffep127f;
#endif
  const uint32_t bits = float_bits(clamped);
  const uint32_t negative = static_cast<uint32_t>(static_cast<int32_t>(bits) >> 31);
  // The negative half is stored in reverse, so that the table runs in float order: ~b = -1 - b.
  const uint32_t entry = table[kMagnitudeBuckets + (magnitude_bucket(bits & 0x7fffffffu) ^ static_cast<int>(negative))];
  return (entry + ((bits ^ negative) & kCarryBits)) >> 24;
}

// Midpoint k as the key that x's key must exceed to pass it; false when the code breaks the midpoint rule.
QLORA_HD bool code_threshold(const float* code, int k, int32_t* key) {
  const float mid = (code[k] + code[k + 1]) * 0.5f;
  *key = ordered_key(mid) - (k & 1);
  return code[k] < mid && mid < code[k + 1] && mid != 0.0f;
}

// Table entry j from the 255 threshold keys (increasing, as a code that keeps the midpoint rule gives them)
// followed by INT32_MAX; clears *fits when the bucket holds two thresholds, or one it cannot carry.
QLORA_HD uint32_t code_table_entry(const int32_t* keys, int j, bool* fits) {
  const bool negative = j < kMagnitudeBuckets;
  const int b = negative ? kMagnitudeBuckets - 1 - j : j - kMagnitudeBuckets;
  const uint32_t lo = b == 0 ? 0u : magnitude_bucket_start(b);
  const uint32_t hi = b == kMagnitudeBuckets - 1 ? 0x7f800000u : magnitude_bucket_start(b + 1) - 1;
  const int32_t first = negative ? -1 - static_cast<int32_t>(hi) : static_cast<int32_t>(lo);
  const int32_t last = negative ? -1 - static_cast<int32_t>(lo) : static_cast<int32_t>(hi);
  int below = 0;  // thresholds below the bucket
  for (int step = 128; step > 0; step >>= 1)
    if (keys[below + step - 1] < first) below += step;
  const bool inside = keys[below] < last;  // a threshold in [first, last): passed within the bucket
  if (inside && (keys[below + 1] < last || ((static_cast<uint32_t>(first) ^ static_cast<uint32_t>(last)) >> 24) != 0))
    *fits = false;
  const uint32_t carry = inside ? kCarryBits - (static_cast<uint32_t>(keys[below]) & kCarryBits) : 0u;
  return (static_cast<uint32_t>(below) << 24) + carry;
}

// Builds the table of a 256-entry code on the host; false when the code does not fit it.
inline bool build_code_table(const float* code, uint32_t* table) {
  int32_t keys[256];
  bool fits = true;
  for (int k = 0; k < 255; ++k) fits = code_threshold(code, k, &keys[k]) && fits;
  keys[255] = INT32_MAX;
  for (int j = 0; fits && j < kCodeTableSize; ++j) table[j] = code_table_entry(keys, j, &fits);
  return fits;
}

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
