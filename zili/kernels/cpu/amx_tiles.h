// AMX tile configuration shared by the AMX kernels (gemm_amx_bf16.cpp, attention_amx.cpp).
#pragma once

#include <immintrin.h>

#include <cstdint>

namespace zili_cpu {

// ldtilecfg's 64-byte operand, palette 1: rows and bytes per row of each tile (0: unused).
struct alignas(64) TileConfig {
  uint8_t palette_id = 1;
  uint8_t start_row = 0;
  uint8_t reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};

  TileConfig& tile(int index, int tile_rows, int bytes_per_row) {
    rows[index] = static_cast<uint8_t>(tile_rows);
    colsb[index] = static_cast<uint16_t>(bytes_per_row);
    return *this;
  }
  // Loaded by every kernel call: other code on the thread (oneDNN's AMX kernels) loads its own
  // configuration or releases the tiles in between.
  void load() const { _tile_loadconfig(this); }
};

// tileloadd / tilestored are asm statements without memory operands: order plain loads and stores around them.
inline void compiler_barrier() { __asm__ volatile("" ::: "memory"); }

}  // namespace zili_cpu
