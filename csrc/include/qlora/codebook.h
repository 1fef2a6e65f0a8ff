// The 4-bit codebooks and the decision thresholds that pick a code, shared by the CPU and CUDA kernels.
// python/qlora/codebook.py holds the same tables; tests/test_quantize_4bit.py checks that they agree bit for bit.
// Hex literals keep every value exact: the thresholds are bitsandbytes' decimal constants rounded to float32.
#pragma once

#include <limits>

#include "qlora/common.cuh"

namespace qlora {

enum class QuantType : int { NF4 = 0, FP4 = 1 };

// Codebook value of each 4-bit code, in code order.
#define QLORA_NF4_VALUES                                                                              \
  {-0x1p+0f,         -0x1.647362p-1f, -0x1.0cd660p-1f, -0x1.946540p-2f, -0x1.23449ap-2f, -0x1.7a6a7ep-3f, \
   -0x1.74f0e2p-4f,  0x0p+0f,         0x1.45f5fep-4f,  0x1.4995c6p-3f,  0x1.f809bap-3f,  0x1.5a0674p-2f,  \
   0x1.c34970p-2f,   0x1.200f56p-1f,  0x1.722766p-1f,  0x1p+0f}

// FP4 (1 sign, 2 exponent, 1 mantissa bit) scaled so that the largest magnitude is 1; code 8 is -0.
#define QLORA_FP4_VALUES                                                                              \
  {0x0p+0f,          0x1.555556p-8f,  0x1.555556p-1f,  0x1p+0f,         0x1.555556p-2f,  0x1p-1f,         \
   0x1.555556p-3f,   0x1p-2f,         -0x0p+0f,        -0x1.555556p-8f, -0x1.555556p-1f, -0x1p+0f,        \
   -0x1.555556p-2f,  -0x1p-1f,        -0x1.555556p-3f, -0x1p-2f}

// NF4: code = number of thresholds strictly below the scaled value (ties go to the lower code).
#define QLORA_NF4_THRESHOLDS                                                                          \
  {-0x1.b239b2p-1f, -0x1.38a4e0p-1f, -0x1.d70900p-2f, -0x1.5bd4ecp-2f, -0x1.e079d8p-3f,                   \
   -0x1.1a7178p-3f, -0x1.74f0e2p-5f, 0x1.45f5fep-5f,  0x1.ec90c6p-4f,  0x1.a0cfc0p-3f,                    \
   0x1.2b05a8p-2f,  0x1.8ea7f2p-2f,  0x1.00da06p-1f,  0x1.491b5ep-1f,  0x1.b913b2p-1f}

// FP4: rank of |x| = number of these below |x|; kFP4CodeOfRank maps the rank to the 3 magnitude bits.
#define QLORA_FP4_THRESHOLDS \
  {0x1.555572p-9f, 0x1.6p-4f, 0x1.aaaaaap-3f, 0x1.2aaaaap-2f, 0x1.aaaaacp-2f, 0x1.2aaaa0p-1f, 0x1.aaaaaap-1f}

// Magnitude codes in increasing value order, one nibble each (lowest nibble first): 0,1,6,7,4,5,2,3.
constexpr uint32_t kFP4CodeOfRank = 0x32547610u;

constexpr float kNF4Values[16] = QLORA_NF4_VALUES;
constexpr float kFP4Values[16] = QLORA_FP4_VALUES;
constexpr float kNF4Thresholds[15] = QLORA_NF4_THRESHOLDS;
constexpr float kFP4Thresholds[7] = QLORA_FP4_THRESHOLDS;

// Code search by bucket: the scaled value's bucket (32 equal buckets over [-1, 1] for NF4, 16 over |x| in
// [0, 1] for FP4) holds at most one threshold, so the code is the bucket's base count plus one comparison.
// Buckets are narrower than the closest pair of thresholds, and no threshold lies within 1e-3 of a bucket
// edge, so a value rounded into the neighbouring bucket still gets the right code; the tests probe every
// threshold and its neighbours on both sides.
struct Bucket {
  float threshold;  // the threshold inside the bucket, or +inf
  uint32_t base;    // thresholds below the bucket
};

template <int N>
struct BucketTable {
  Bucket bucket[N];
};

template <int N, int T>
constexpr BucketTable<N> make_buckets(const float (&thresholds)[T], float lo) {
  BucketTable<N> table{};
  const float width = (1.0f - lo) / N;
  for (int b = 0; b < N; ++b) {
    const float edge = lo + b * width;
    table.bucket[b] = {std::numeric_limits<float>::infinity(), 0};
    for (int i = 0; i < T; ++i) {
      if (thresholds[i] < edge) table.bucket[b].base += 1;
      else if (thresholds[i] < edge + width) table.bucket[b].threshold = thresholds[i];
    }
  }
  return table;
}

constexpr int kNF4Buckets = 32;
constexpr int kFP4Buckets = 16;
constexpr BucketTable<kNF4Buckets> kNF4BucketTable = make_buckets<kNF4Buckets>(kNF4Thresholds, -1.0f);
constexpr BucketTable<kFP4Buckets> kFP4BucketTable = make_buckets<kFP4Buckets>(kFP4Thresholds, 0.0f);

// floor(v * per_unit + origin) clamped to [0, count - 1]; NaN goes to bucket 0. The floor is a
// round-to-nearest of (f - 0.5) by adding 1.5 * 2^23, which keeps the float-to-int conversion (a
// quarter-rate instruction on the GPU) out of the loop; a value that lands exactly on an edge may
// round either way, which the bucket layout tolerates.
QLORA_HD uint32_t bucket_index(float v, float per_unit, float origin, int count) {
  const float f = v * per_unit + (origin - 0.5f);
#if defined(__CUDA_ARCH__)
  const float clamped = fminf(fmaxf(f, 0.0f), static_cast<float>(count - 1));
#else
  const float clamped = f > 0.0f ? (f < static_cast<float>(count - 1) ? f : static_cast<float>(count - 1)) : 0.0f;
#endif
  constexpr float kRoundingBias = 12582912.0f;  // 1.5 * 2^23: adding it leaves round(f) in the low mantissa bits
  return float_bits(clamped + kRoundingBias) - float_bits(kRoundingBias);
}

QLORA_HD uint32_t nf4_code(float x, const Bucket* buckets) {
  const Bucket b = buckets[bucket_index(x, kNF4Buckets / 2.0f, kNF4Buckets / 2.0f, kNF4Buckets)];
  return b.base + (x > b.threshold ? 1u : 0u);  // NaN: bucket 0, no comparison holds, code 0
}

// NF4 code of a finite scaled value, by arithmetic alone (no comparison, select or min/max, which run at half
// rate on the GPU). The table has one spare bucket on each side, so the index needs no clamp for
// |scaled| <= 1 + 2^-20, which x * (1 / absmax) of a block with finite absmax and finite 1/absmax satisfies.
// Returns the code as an exact small float.
struct FastBucket {
  float threshold;  // as in Bucket
  float base;
};

constexpr int kNF4FastBuckets = kNF4Buckets + 2;

struct FastBucketTable {
  FastBucket bucket[kNF4FastBuckets];
};

constexpr FastBucketTable make_nf4_fast_buckets() {
  FastBucketTable table{};
  for (int i = 0; i < kNF4FastBuckets; ++i) {
    const Bucket b = kNF4BucketTable.bucket[i == 0 ? 0 : i > kNF4Buckets ? kNF4Buckets - 1 : i - 1];
    table.bucket[i] = {b.threshold, static_cast<float>(b.base)};
  }
  return table;
}

constexpr FastBucketTable kNF4FastBucketTable = make_nf4_fast_buckets();

QLORA_HD float saturate(float v) {
#if defined(__CUDA_ARCH__)
  return __saturatef(v);
#else
  return v > 0.0f ? (v < 1.0f ? v : 1.0f) : 0.0f;
#endif
}

QLORA_HD float nf4_code_finite(float scaled, const FastBucket* table) {
  constexpr float kRoundingBias = 12582912.0f;  // see bucket_index
  const float f = scaled * 16.0f + 16.5f;         // (scaled + 1) * 16, one bucket of offset, minus 1/2 for the floor
  const FastBucket b = table[float_bits(f + kRoundingBias) - float_bits(kRoundingBias)];
  // 1 when scaled > threshold, else 0: two different floats in one bucket differ by at least 2^-28 (the ulp of
  // the smallest threshold), which 2^40 lifts past 1; an absent threshold (+inf) gives -inf, so 0.
  return b.base + saturate((scaled - b.threshold) * 0x1p40f);
}

// Whether a block's codes may take nf4_code_finite: absmax and its inverse both finite.
QLORA_HD bool finite_scale(float absmax, float inv) {
  return float_bits(absmax) < 0x7f800000u && float_bits(inv) < 0x7f800000u;
}

QLORA_HD uint32_t fp4_code(float x, const Bucket* buckets) {
  const uint32_t sign = x < 0.0f ? 8u : 0u;
  const float a = x < 0.0f ? -x : x;  // NaN stays NaN and falls to rank 0, like bitsandbytes
  const Bucket b = buckets[bucket_index(a, kFP4Buckets, 0.0f, kFP4Buckets)];
  const uint32_t rank = b.base + (a > b.threshold ? 1u : 0u);
  return sign | ((kFP4CodeOfRank >> (4u * rank)) & 0xfu);
}

template <QuantType QT>
QLORA_HD uint32_t code_4bit(float scaled, const Bucket* buckets) {
  if constexpr (QT == QuantType::NF4) {
    return nf4_code(scaled, buckets);
  } else {
    return fp4_code(scaled, buckets);
  }
}

template <QuantType QT>
constexpr const Bucket* host_buckets() {
  if constexpr (QT == QuantType::NF4) {
    return kNF4BucketTable.bucket;
  } else {
    return kFP4BucketTable.bucket;
  }
}

// Index of the nearest entry of a sorted 256-entry code for x, exactly as bitsandbytes' 8-bit
// blockwise quantizer finds it: a 7-step binary search, then a comparison with the float midpoint
// of the neighbours, ties going to the search's final pivot.
QLORA_HD uint32_t code_8bit(const float* code, float x) {
  int pivot = 127, upper_pivot = 255, lower_pivot = 0;
  float lower = -1.0f, upper = 1.0f, val = code[127];
  for (int step = 64; step > 0; step >>= 1) {
    if (x > val) {
      lower_pivot = pivot;
      lower = val;
      pivot += step;
    } else {
      upper_pivot = pivot;
      upper = val;
      pivot -= step;
    }
    val = code[pivot];
  }
  if (upper_pivot == 255) upper = code[upper_pivot];
  if (lower_pivot == 0) lower = code[lower_pivot];
  if (x > val) {
    const float midpoint = (upper + val) * 0.5f;
    return x > midpoint ? upper_pivot : pivot;
  }
  const float midpoint = (lower + val) * 0.5f;
  return x < midpoint ? lower_pivot : pivot;
}

QLORA_HD bool valid_blocksize_4bit(int64_t blocksize) {
  return blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0;
}

constexpr int kAbsmaxBlocksize = 256;  // second-level (double quantization) block size

}  // namespace qlora
