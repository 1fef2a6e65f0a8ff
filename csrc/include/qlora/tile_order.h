// The tile order of a packed 4-bit weight [N, K]: the order in which the tensor-core kernels read it, so that a warp's
// load of one 16-row tile is 512 contiguous bytes instead of 16 rows of 32 bytes each a row apart (row-major bytes
// are bitsandbytes' order, kept at every boundary: checkpoints, QuantState's dict form).
//
// For N % 16 == 0 and K % 64 == 0 the bytes are [N / 16][K / 64][lane 0..31][h 0..1][j 0..7]: byte j of lane
// 4g + t, half h, of the tile at rows 16·tile.. and the 64-column block at k = 64·block.. is byte 4j + t of the
// block's 32 bytes of row 16·tile + 8h + g (codes k = 64·block + 8j + 2t and + 1). A lane's 16 bytes are thus
// exactly its mma.sync / wgmma A fragments of the block's four k16 steps (rows g and g + 8, k 2t, 2t + 1, 2t + 8,
// 2t + 9 of each), in the natural k order, so x is read as for row-major bytes.
//
// A tile-ordered packed tensor has shape [N / 16, K / 64, 512] (row-major: [(N·K + 1) / 2, 1]); the ops tell the
// orders apart by that. python/qlora/reference.py defines the same order by its index formula, and the tests check
// the conversion against it.
#pragma once

#include <cstdint>

#include "qlora/common.cuh"

namespace qlora {

constexpr int kTileOrderRows = 16;
constexpr int kTileOrderK = 64;
constexpr int kTileOrderBytes = kTileOrderRows * kTileOrderK / 2;  // 512

QLORA_HD bool tile_order_supported(int64_t N, int64_t K) {
  return N > 0 && K > 0 && N % kTileOrderRows == 0 && K % kTileOrderK == 0;
}

}  // namespace qlora
