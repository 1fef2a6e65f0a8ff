// Conversions of a packed 4-bit weight between bitsandbytes' row-major order and the tile order of
// qlora/tile_order.h, as ATen views and copies (any device), and the ops that expose them.
#pragma once

#include <ATen/core/Tensor.h>

namespace qlora {

// Whether a packed tensor is in tile order ([N / 16, K / 64, 512]).
inline bool is_tile_ordered(const at::Tensor& packed) { return packed.dim() == 3; }

// The tile-ordered bytes of a row-major packed weight of shape [N, K].
at::Tensor to_tile_order(const at::Tensor& packed, int64_t N, int64_t K);

// Row-major bytes [(N·K) / 2, 1]: a copy of a tile-ordered packed weight, or packed itself.
at::Tensor to_row_order(const at::Tensor& packed);

}  // namespace qlora
