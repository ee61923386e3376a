// Decode attention scores with AMX (tdpbf16ps): q . k for up to 16 query heads x 16 cached positions per
// tile product, fp32 accumulation.
//
// Computes S^T = K . Q^T so that the keys are read as the paged cache stores them:
//   A tile: 16 positions x 32 channels of k (64 bytes a row), loaded straight from a cache block;
//   B tile: Q^T in AMX's pair layout, 16 pairs of channels (rows) x 16 query heads (2 bf16 each), packed
//           once per call from the rotated q heads, zero past the last head;
//   C tile: 16 positions x 16 heads fp32, stored as rows of the scores.
// A head size that is not a multiple of 32 ends with narrower A / B tiles (tiles 3 and 4). The vector
// path of decode_layer.cpp widens every key to fp32 and reduces 16-lane dot products across lanes: at 16
// sequences x ~100 positions it spent ~150 us a layer.
#include <immintrin.h>

#include <algorithm>
#include <cstring>
#include <vector>

#include "amx_tiles.h"
#include "kernels.h"

namespace zili_cpu {
namespace {

// Tiles: 0 C (16 x 16 fp32), 1 / 2 A / B for 32 channels, 3 / 4 A / B for the last `tail` channels.
void configure_score_tiles(int64_t tail) {
  TileConfig config;
  config.tile(0, 16, 64).tile(1, 16, 64).tile(2, 16, 64);
  if (tail > 0) config.tile(3, 16, static_cast<int>(tail * 2)).tile(4, static_cast<int>(tail / 2), 64);
  config.load();
}

}  // namespace

void amx_attention_scores(const uint16_t* q, int64_t q_ld, int64_t heads, int64_t D, const uint16_t* const* keys,
                          int64_t key_ld, int64_t runs, float* scores, int64_t scores_ld) {
  const int64_t full = D / 32, tail = D % 32, chunks = full + (tail > 0 ? 1 : 0);
  thread_local std::vector<uint32_t> packed;
  packed.resize(static_cast<size_t>(chunks) * 256 + 16);
  // 64-byte aligned start inside the buffer
  uint32_t* qp = reinterpret_cast<uint32_t*>((reinterpret_cast<uintptr_t>(packed.data()) + 63) & ~uintptr_t{63});
  configure_score_tiles(tail);
  for (int64_t h0 = 0; h0 < heads; h0 += 16) {
    const int64_t count = std::min<int64_t>(16, heads - h0);
    compiler_barrier();  // the previous heads' tile loads before their packed q is overwritten
    // chunk c, line p, column g: channels (32c + 2p, 32c + 2p + 1) of head h0 + g
    std::fill(qp, qp + chunks * 256, 0u);
    for (int64_t g = 0; g < count; ++g) {
      const uint16_t* row = q + (h0 + g) * q_ld;
      for (int64_t i = 0; i < D; i += 2) {
        uint32_t pair;
        std::memcpy(&pair, row + i, 4);
        qp[(i / 32) * 256 + (i % 32) / 2 * 16 + g] = pair;
      }
    }
    compiler_barrier();  // the packed q before the tile loads
    for (int64_t r = 0; r < runs; ++r) {
      _tile_zero(0);
      for (int64_t c = 0; c < full; ++c) {
        _tile_loadd(1, keys[r] + 32 * c, key_ld * 2);
        _tile_loadd(2, qp + c * 256, 64);
        _tile_dpbf16ps(0, 1, 2);
      }
      if (tail > 0) {
        _tile_loadd(3, keys[r] + 32 * full, key_ld * 2);
        _tile_loadd(4, qp + full * 256, 64);
        _tile_dpbf16ps(0, 3, 4);
      }
      _tile_stored(0, scores + r * 16 * scores_ld + h0, scores_ld * 4);
    }
  }
  _tile_release();
  compiler_barrier();  // the caller's reads of `scores` after the tile stores
}

}  // namespace zili_cpu
