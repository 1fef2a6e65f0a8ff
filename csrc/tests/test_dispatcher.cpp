// Loads libqlora_ops the way a C++ (LibTorch) program or another framework would, and calls the
// quantization ops through the dispatcher by name, with no Python involved.
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <dlfcn.h>

#include <cmath>
#include <cstdio>
#include <string>

namespace {

int checks = 0;
int failures = 0;

void expect(bool ok, const std::string& what) {
  std::printf("%s %s\n", ok ? "ok  " : "FAIL", what.c_str());
  ++checks;
  if (!ok) ++failures;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: %s path/to/libqlora_ops.so\n", argv[0]);
    return 2;
  }
  if (dlopen(argv[1], RTLD_NOW | RTLD_GLOBAL) == nullptr) {
    std::fprintf(stderr, "cannot load %s: %s\n", argv[1], dlerror());
    return 2;
  }
  auto quantize = c10::Dispatcher::singleton()
                      .findSchemaOrThrow("qlora::quantize_4bit", "")
                      .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t, const std::string&)>();
  auto dequantize = c10::Dispatcher::singleton()
                        .findSchemaOrThrow("qlora::dequantize_4bit", "")
                        .typed<at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, const std::string&,
                                          c10::SymIntArrayRef, at::ScalarType, const std::optional<at::Tensor>&,
                                          const std::optional<at::Tensor>&, const std::optional<at::Tensor>&)>();

  // One block of 64: the extremes and zero land on exact codes (NF4 -1.0 is code 0, 0.0 is 7, 1.0 is 15).
  at::Tensor w = at::zeros({64});
  w[0] = -2.0f;
  w[1] = 0.0f;
  w[2] = 2.0f;
  const std::string nf4 = "nf4";
  auto [packed, absmax] = quantize.call(w, 64, nf4);
  expect(packed.sizes() == at::IntArrayRef({32, 1}), "packed shape is [numel/2, 1]");
  expect(absmax.item<float>() == 2.0f, "absmax is the block's largest magnitude");
  expect(packed[0][0].item<uint8_t>() == 0x07, "first byte holds codes 0 (high nibble) and 7");
  expect(packed[1][0].item<uint8_t>() == 0xf7, "second byte holds codes 15 and 7");

  at::manual_seed(0);
  at::Tensor x = at::randn({300, 129}, at::kBFloat16);
  auto [p, a] = quantize.call(x, 64, nf4);
  const c10::SymInt dims[] = {c10::SymInt(300), c10::SymInt(129)};
  at::Tensor y = dequantize.call(p, a, 64, nf4, c10::SymIntArrayRef(dims, 2), at::kBFloat16, std::nullopt,
                                 std::nullopt, std::nullopt);
  const double mean_abs_err = (y.to(at::kFloat) - x.to(at::kFloat)).abs().mean().item<double>();
  expect(y.sizes() == x.sizes() && y.scalar_type() == at::kBFloat16, "dequantize restores shape and dtype");
  expect(mean_abs_err > 0.05 && mean_abs_err < 0.09, "NF4 round-trip error on N(0,1) data is about 0.073 (got " +
                                                         std::to_string(mean_abs_err) + ")");

  bool rejected = false;
  try {
    quantize.call(x, 48, nf4);
  } catch (const c10::Error& e) {
    rejected = std::string(e.what()).find("blocksize") != std::string::npos;
  }
  expect(rejected, "a bad blocksize is refused with a message naming it");

  std::printf("%d passed, %d failed\n", checks - failures, failures);
  return failures == 0 ? 0 : 1;
}
