// L2 cache policies for loads and bulk copies. Torch-free.
#pragma once

#include <cstdint>

namespace qlora {

// What createpolicy.fractional.L2::evict_first.b64 with fraction 1.0 gives (tools/l2_evict.cu checks it): lines read
// with it become L2's next victims instead of other data's. As a constant, ptxas keeps it in a uniform register, and
// nvcc 13's ptxas can drop a createpolicy whose only users are cp.async copies (they then trap).
constexpr uint64_t kL2EvictFirst = 0x12F0000000000000ull;

}  // namespace qlora
