// The table search of the 8-bit optimizer states (code_8bit_table) against bitsandbytes' binary search
// (code_8bit) that it replaces: every float whose magnitude lies in [2^-30, 4] (where the codes and their
// midpoints are), both signs, for both dynamic codes; a spaced sample of every other float, the specials and
// the bucket edges; the first-moment codes; and codes that fit a table or do not. No torch: it needs only
// the kernel headers. `test_code_8bit_table --all` checks all 2^32 floats instead (15 s on two cores).
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "dynamic_codes.h"
#include "qlora/adamw.h"

namespace {

using namespace qlora;

int failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  if (!ok) ++failures;
}

struct Code {
  const char* name;
  const float* values;
  std::vector<uint32_t> table = std::vector<uint32_t>(kCodeTableSize);
  uint32_t negative_codes = 0;
  bool fits = false;

  Code(const char* n, const float* v) : name(n), values(v) {
    fits = build_code_table(values, table.data());
    for (int i = 0; i < 256; ++i) negative_codes += float_bits(values[i]) >> 31;
  }

  // The first bit pattern in [begin, end) that the two searches disagree on, or end.
  uint64_t first_mismatch(uint64_t begin, uint64_t end, uint64_t stride = 1) const {
    for (uint64_t u = begin; u < end; u += stride) {
      const float x = bits_float(static_cast<uint32_t>(u));
      if (code_8bit_table(table.data(), x) != code_8bit(values, x)) return u;
    }
    return end;
  }
};

// Bit-pattern ranges checked in full on two threads; returns the first mismatch or UINT64_MAX.
uint64_t check_ranges(const Code& code, const std::vector<std::pair<uint64_t, uint64_t>>& ranges) {
  std::vector<uint64_t> found(2, UINT64_MAX);
  std::vector<std::thread> threads;
  for (int t = 0; t < 2; ++t) {
    threads.emplace_back([&, t] {
      for (const auto& [begin, end] : ranges) {
        const uint64_t mid = begin + (end - begin) / 2;
        const uint64_t lo = t == 0 ? begin : mid, hi = t == 0 ? mid : end;
        const uint64_t bad = code.first_mismatch(lo, hi);
        if (bad != hi) {
          found[t] = bad;
          return;
        }
      }
    });
  }
  for (auto& thread : threads) thread.join();
  return found[0] != UINT64_MAX ? found[0] : found[1];
}

std::string hex(uint64_t bits) {
  char text[32];
  std::snprintf(text, sizeof(text), "0x%08llx", static_cast<unsigned long long>(bits));
  return text;
}

void check_dynamic_code(const Code& code, bool all) {
  expect(code.fits, std::string(code.name) + ": the code fits its table");
  bool signs_ok = true;  // code_state1_table's stand-in for the sign of code[c]
  for (uint32_t c = 0; c < 256; ++c) signs_ok &= (c < code.negative_codes) == ((float_bits(code.values[c]) >> 31) != 0);
  expect(signs_ok, std::string(code.name) + ": entries with the sign bit set come first");

  constexpr uint64_t kLow = 97ull << 23;    // 2^-30
  constexpr uint64_t kHigh = 129ull << 23;  // 4
  constexpr uint64_t kNegative = 1ull << 31;
  const std::vector<std::pair<uint64_t, uint64_t>> dense =
      all ? std::vector<std::pair<uint64_t, uint64_t>>{{0, 1ull << 32}}
          : std::vector<std::pair<uint64_t, uint64_t>>{{kLow, kHigh + 1}, {kNegative + kLow, kNegative + kHigh + 1}};
  const uint64_t bad = check_ranges(code, dense);
  expect(bad == UINT64_MAX, std::string(code.name) + (all ? ": every float" : ": every float with |x| in [2^-30, 4]") +
                                (bad == UINT64_MAX ? "" : ", first mismatch " + hex(bad)));
  if (all) return;

  // Elsewhere a spaced sample (a prime stride meets every low-bit pattern), the specials, and both sides
  // of every bucket edge.
  uint64_t sampled = code.first_mismatch(0, 1ull << 32, 4099);
  std::vector<float> specials = {0.0f,
                                 -0.0f,
                                 std::numeric_limits<float>::infinity(),
                                 -std::numeric_limits<float>::infinity(),
                                 std::numeric_limits<float>::quiet_NaN(),
                                 -std::numeric_limits<float>::quiet_NaN(),
                                 bits_float(0x7f800001u),
                                 bits_float(0xff800001u),
                                 std::numeric_limits<float>::max(),
                                 std::numeric_limits<float>::lowest(),
                                 std::numeric_limits<float>::min(),
                                 std::numeric_limits<float>::denorm_min(),
                                 -std::numeric_limits<float>::denorm_min()};
  for (int b = 1; b < kMagnitudeBuckets; ++b) {
    for (uint32_t edge : {magnitude_bucket_start(b) - 1, magnitude_bucket_start(b)}) {
      specials.push_back(bits_float(edge));
      specials.push_back(-bits_float(edge));
    }
  }
  for (float x : specials) {
    if (code_8bit_table(code.table.data(), x) != code_8bit(code.values, x)) sampled = float_bits(x);
  }
  expect(sampled == 1ull << 32, std::string(code.name) + ": a sample of the other floats, specials, bucket edges" +
                                    (sampled == 1ull << 32 ? "" : ", mismatch at " + hex(sampled)));
}

// The first-moment code (the nearest code moved toward the value's sign) by table and by search, for a
// spaced sample of scaled values, each with values of either sign, zeros and NaN.
void check_state1(const Code& code) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  uint64_t bad = 1ull << 32;
  for (uint64_t u = 0; u < 1ull << 32 && bad == 1ull << 32; u += 4099) {
    const float x = bits_float(static_cast<uint32_t>(u));
    for (float value : {x, -x, 0.0f, -0.0f, nan, -nan, 1.0f, -1.0f}) {
      if (code_state1_table(code.table.data(), code.negative_codes, x, value) != code_state1(code.values, x, value))
        bad = u;
    }
  }
  expect(bad == 1ull << 32, std::string(code.name) + ": first-moment codes of a sample of floats" +
                                (bad == 1ull << 32 ? "" : ", first mismatch " + hex(bad)));
}

void check_buckets() {
  constexpr int kLast = kMagnitudeBuckets - 1;
  bool ok = magnitude_bucket(0) == 0 && magnitude_bucket(kBucketFloor - 1) == 0 &&
            magnitude_bucket(kBucketTop) == kLast && magnitude_bucket(0x7f800000u) == kLast;
  for (int b = 1; b < kMagnitudeBuckets; ++b) {
    ok &= magnitude_bucket(magnitude_bucket_start(b)) == b && magnitude_bucket(magnitude_bucket_start(b) - 1) == b - 1;
  }
  expect(ok, "bucket starts and the bucket function agree");
}

// Other codes: one with a zero midpoint and an unsorted one must not fit (they keep the binary search); two
// that fit must search exactly as the binary search.
void check_other_codes() {
  float linear[256], linear_unsigned[256], scaled[256];
  for (int i = 0; i < 256; ++i) {
    linear[i] = -1.0f + 2.0f * static_cast<float>(i) / 255.0f;
    linear_unsigned[i] = static_cast<float>(i) / 255.0f;
    scaled[i] = qlora_test::kDynamicSigned[i] * 0.75f;
  }
  float unsorted[256];
  for (int i = 0; i < 256; ++i) unsorted[i] = qlora_test::kDynamicSigned[(i * 37) % 256];
  expect(!Code("linear", linear).fits, "a code with a midpoint at zero does not fit");
  expect(!Code("unsorted", unsorted).fits, "an unsorted code does not fit");
  for (const Code& code : {Code("scaled signed code", scaled), Code("linear unsigned code", linear_unsigned)}) {
    expect(code.fits, std::string(code.name) + ": fits its table");
    const uint64_t bad = code.first_mismatch(0, 1ull << 32, 257);
    expect(bad == 1ull << 32, std::string(code.name) + ": a sample of all floats" +
                                  (bad == 1ull << 32 ? "" : ", first mismatch " + hex(bad)));
  }
}

}  // namespace

int main(int argc, char** argv) {
  const bool all = argc > 1 && std::string(argv[1]) == "--all";
  check_buckets();
  const Code signed_code("signed dynamic code", qlora_test::kDynamicSigned);
  check_dynamic_code(signed_code, all);
  check_state1(signed_code);
  check_dynamic_code(Code("unsigned dynamic code", qlora_test::kDynamicUnsigned), all);
  if (!all) check_other_codes();
  std::printf("%d failure(s)\n", failures);
  return failures == 0 ? 0 : 1;
}
