// The 4-bit codebooks and the decision thresholds that pick a code, and the searches of 8-bit codes, shared by
// the CPU and CUDA kernels.
// python/qlora/codebook.py holds the same tables; tests/test_quantize_4bit.py checks that they agree bit for bit.
// Hex literals keep every value exact: the thresholds are bitsandbytes' decimal constants rounded to float32.
#pragma once

#include <cstdint>
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

QLORA_HD float nf4_code_finite(float scaled, const FastBucket* table) {
  constexpr float kRoundingBias = 12582912.0f;  // see bucket_index
  const float f = scaled * 16.0f + 16.5f;         // (scaled + 1) * 16, one bucket of offset, minus 1/2 for the floor
  const FastBucket b = table[float_bits(f + kRoundingBias) - float_bits(kRoundingBias)];
#if defined(__CUDA_ARCH__)
  // 1 when scaled > threshold, else 0: two different floats in one bucket differ by at least 2^-28 (the ulp of
  // the smallest threshold), which 2^40 lifts past 1; an absent threshold (+inf) gives -inf, so 0.
  return b.base + __saturatef((scaled - b.threshold) * 0x1p40f);
#else
  // The same 0 or 1 from the comparison as a flag: the host compiler made the clamp two branches on the data,
  // mispredicted about every other element (8.4 ns an element on one core, against 1.8 now).
  return b.base + static_cast<float>(scaled > b.threshold);
#endif
}

// Whether a block's codes may take nf4_code_finite: absmax and its inverse both finite.
QLORA_HD bool finite_scale(float absmax, float inv) {
  return float_bits(absmax) < 0x7f800000u && float_bits(inv) < 0x7f800000u;
}

QLORA_HD uint32_t fp4_code(float x, const Bucket* buckets) {
  // |x| for x < 0, else x itself (-0 and NaN stay as they are; NaN falls to rank 0, like bitsandbytes).
#if defined(__CUDA_ARCH__)
  const uint32_t sign = x < 0.0f ? 8u : 0u;
  const float a = x < 0.0f ? -x : x;
#else
  // The same by a flag and a sign-bit flip: as selects, the host compiler branched on the sign, a coin toss per
  // element (2048x2048 FP4 quantize on one core 36.7 ms, against 20.5 now).
  const uint32_t negative = static_cast<uint32_t>(x < 0.0f);
  const uint32_t sign = negative << 3;
  const float a = bits_float(float_bits(x) ^ (negative << 31));
#endif
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

// Search key k of a code, k < 256: the threshold of midpoint k, or for k = 255 a key past every float; false when
// midpoint k breaks the midpoint rule.
QLORA_HD bool code_key(const float* code, int k, int32_t* keys) {
  if (k == 255) {
    keys[255] = INT32_MAX;
    return true;
  }
  return code_threshold(code, k, &keys[k]);
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
  for (int k = 0; k < 256; ++k) fits = code_key(code, k, keys) && fits;
  for (int j = 0; fits && j < kCodeTableSize; ++j) table[j] = code_table_entry(keys, j, &fits);
  return fits;
}

QLORA_HD bool valid_blocksize_4bit(int64_t blocksize) {
  return blocksize >= 32 && blocksize <= 4096 && (blocksize & (blocksize - 1)) == 0;
}

constexpr int kAbsmaxBlocksize = 256;  // second-level (double quantization) block size

}  // namespace qlora
