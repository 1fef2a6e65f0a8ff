#include "packed_order.h"

#include <c10/util/Exception.h>
#include <torch/library.h>

#include "qlora/tile_order.h"
#include "quantize_4bit_args.h"

namespace qlora {

// Row n = 16·tile + 8h + g, byte 32·block + 4j + t of its row  <->  [tile][block][g][t][h][j].
at::Tensor to_tile_order(const at::Tensor& packed, int64_t N, int64_t K) {
  TORCH_CHECK_VALUE(!is_tile_ordered(packed), "packed is already in tile order (shape ", packed.sizes(), ")");
  check_dtype(packed, at::kByte, "packed");
  TORCH_CHECK_VALUE(tile_order_supported(N, K), "tile order needs out_features % ", kTileOrderRows,
                    " == 0 and in_features % ", kTileOrderK, " == 0, got shape [", N, ", ", K, "]");
  check_numel(packed, N * K / 2, "packed", "(two 4-bit codes per byte for the given shape)");
  const int64_t tiles = N / kTileOrderRows, blocks = K / kTileOrderK;
  return packed.reshape({tiles, 2, 8, blocks, 8, 4})
      .permute({0, 3, 2, 5, 1, 4})
      .contiguous()
      .view({tiles, blocks, kTileOrderBytes});
}

at::Tensor to_row_order(const at::Tensor& packed) {
  if (!is_tile_ordered(packed)) return packed;
  TORCH_CHECK_VALUE(packed.size(2) == kTileOrderBytes, "a 3-D packed weight is in tile order, [out_features / 16, ",
                    "in_features / 64, 512], got ", packed.sizes());
  const int64_t tiles = packed.size(0), blocks = packed.size(1);
  return packed.reshape({tiles, blocks, 8, 4, 2, 8})
      .permute({0, 4, 2, 1, 5, 3})
      .contiguous()
      .view({tiles * blocks * kTileOrderBytes, 1});
}

namespace {

at::Tensor tile_order_4bit(const at::Tensor& packed, at::IntArrayRef shape) {
  TORCH_CHECK_VALUE(shape.size() == 2, "shape must be the weight's [out_features, in_features], got ", shape);
  return to_tile_order(packed, shape[0], shape[1]);
}

at::Tensor row_order_4bit(const at::Tensor& packed) {
  check_dtype(packed, at::kByte, "packed");
  return is_tile_ordered(packed) ? to_row_order(packed) : packed.contiguous().clone();
}

}  // namespace

TORCH_LIBRARY_IMPL(qlora, CompositeExplicitAutograd, m) {
  m.impl("tile_order_4bit", &tile_order_4bit);
  m.impl("row_order_4bit", &row_order_4bit);
}

}  // namespace qlora
