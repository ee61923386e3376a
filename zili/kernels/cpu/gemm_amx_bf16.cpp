// bf16 weight x bf16 activation small-M matmul with AMX (tdpbf16ps), fp32 accumulation.
//
// Computes C^T = W . X^T so that W is read row-major as the checkpoint stores it (no packed copy):
//   A tile: 16 rows of W x 32 bf16 (64 bytes a row, stride K * 2), loaded straight from the weight;
//   B tile: X^T in AMX's pair layout, 16 pairs of k (rows) x 16 rows of x (2 bf16 each), from a copy of
//           x packed once per call (prepare_bf16_rows) and read by every thread, zero-padded up to 16
//           rows of x and to K rounded up to 32;
//   C tile: 16 (rows of W) x 16 (rows of x) fp32.
// Each step loads 2 A tiles (32 rows of W) and 1 or 2 B tiles (up to 32 rows of x) and issues up to 4
// tdpbf16ps into 4 C tiles, so every byte of W read serves 32 rows of x; larger M loops over groups of
// 32 rows of x while the 32 rows of W stay in cache. The K tail goes through a zero-padded copy of the
// 32 rows' last K % 32 inputs; an N tail under 16 rows goes to gemv_bf16. On a CPU without AMX, or
// where the kernel may not use the tile registers (no permission), matmul_bf16 runs gemv_bf16. Each call
// loads its tile configuration and releases the tiles at the end (oneDNN's AMX kernels share the threads).
#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>
#include <cpuid.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <type_traits>

#include "amx_tiles.h"
#include "kernels.h"
#include "rows.h"

namespace zili_cpu {
namespace {

// Where matmul_bf16 takes the AMX path: benchmarks/kernels_bench.py --parts amx (benchmark shapes)
// measured AMX ahead of gemv_bf16 from one row on (one row, 2 threads: 896 -> 9728 23.4 vs 19.0 GB/s,
// 896 -> 32000 24.6 vs 19.6), except for one row of long inputs, where gemv_bf16's 8 rows of W at a
// time stream better (4864 -> 896: 25.5 vs 26.4 GB/s on 2 threads, 12.9 vs 13.7 on one; at K = 2432
// AMX is still ahead, 12.3 vs 11.8).
constexpr int64_t kAmxMinRows = 1;
constexpr int64_t kGemvMinInputsForOneRow = 4096;

constexpr int kArchReqXcompPerm = 0x1023;
constexpr int kXfeatureXtiledata = 18;

// The path matmul_bf16 takes: 0 = by M and K (kAmxMinRows, kGemvMinInputsForOneRow), 1 = AMX whenever
// available, 2 = gemv_bf16 always (for tests and benchmarks: set_bf16_matmul_path).
std::atomic<int> g_path_mode{0};

bool xcr0_has_tiles() {
  uint32_t lo, hi;
  __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
  const uint64_t xcr0 = (static_cast<uint64_t>(hi) << 32) | lo;
  return (xcr0 & (3ull << 17)) == (3ull << 17);  // XTILECFG and XTILEDATA state enabled by the OS
}

bool detect_amx() {
  unsigned a, b, c, d;
  if (!__get_cpuid(1, &a, &b, &c, &d) || !((c >> 27) & 1)) return false;  // OSXSAVE
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return false;
  if (!((d >> 24) & 1) || !((d >> 22) & 1)) return false;  // AMX-TILE, AMX-BF16
  if (!xcr0_has_tiles()) return false;
  // Linux gives a process the tile data state on request only (oneDNN may have asked already).
  return syscall(SYS_arch_prctl, kArchReqXcompPerm, kXfeatureXtiledata) == 0;
}

bool amx_available() {
  static const bool available = [] {
    const char* switch_value = std::getenv("ZILI_CPU_AMX");
    return (switch_value == nullptr || std::string(switch_value) != "0") && detect_amx();
  }();
  return available;
}

// Every tile is 16 rows x 64 bytes.
void configure_tiles() {
  TileConfig config;
  for (int t = 0; t < 8; ++t) config.tile(t, 16, 64);
  config.load();
}

// In-register transpose of 16 rows of 16 floats, in 4 stages: the stage of bit h swaps, for every pair of
// rows i, i + h (i without bit h), the columns with bit h of row i and those without it of row i + h.
inline void transpose16(__m512 (&r)[16]) {
  for (int h = 8; h >= 1; h /= 2) {
    alignas(64) int low[16], high[16];
    for (int j = 0; j < 16; ++j) {
      low[j] = (j & h) ? 16 + j - h : j;   // row i: its own columns without bit h, row i + h's without it
      high[j] = (j & h) ? 16 + j : j + h;  // row i + h: row i's columns with bit h, its own with it
    }
    const __m512i low_index = _mm512_load_si512(low), high_index = _mm512_load_si512(high);
    for (int i = 0; i < 16; ++i) {
      if (i & h) continue;
      const __m512 a = r[i], b = r[i + h];
      r[i] = _mm512_permutex2var_ps(a, low_index, b);
      r[i + h] = _mm512_permutex2var_ps(a, high_index, b);
    }
  }
}

// x (M, K) -> groups of 16 rows: group g holds Kp / 2 lines of 16 uint32, line p column j the bf16 pair
// (x[16g + j][2p], x[16g + j][2p + 1]); zero past M and K. Kp = K rounded up to 32. Per 32 inputs, the
// 16 rows' 16 pairs are a 16 x 16 transpose.
void pack_x(const uint16_t* x, int64_t ldx, int64_t M, int64_t K, int64_t Kp, uint32_t* dst) {
  const int64_t group_size = Kp / 2 * 16;
  for (int64_t g = 0; g * 16 < M; ++g) {
    for (int64_t k = 0; k < Kp; k += 32) {
      const __mmask32 mask = tail_mask32(K - k);  // K - k > 0: Kp - K < 32
      __m512 r[16];
      for (int j = 0; j < 16; ++j) {
        const int64_t m = g * 16 + j;
        r[j] = m < M ? _mm512_castsi512_ps(_mm512_maskz_loadu_epi16(mask, x + m * ldx + k)) : _mm512_setzero_ps();
      }
      transpose16(r);
      uint32_t* d = dst + g * group_size + k / 2 * 16;
      for (int p = 0; p < 16; ++p) _mm512_storeu_ps(reinterpret_cast<float*>(d + p * 16), r[p]);
    }
  }
}

// The tile products of 16 NA rows of W (the first 16 at w0, the next 16 at w1, both K * 2 bytes a row)
// and 16 NB rows of x (xg: their packed groups, gstride uint32 apart), left in the C tiles 0-3
// (C[a][b] = tmm(2a + b)). A tiles 4-5, B tiles 6-7.
template <int NA, int NB>
void amx_products(const uint32_t* xg, int64_t gstride, int64_t K, const uint16_t* w0, const uint16_t* w1) {
  static_assert(NA >= 1 && NA <= 2 && NB >= 1 && NB <= 2, "2 x 2 C tiles at most");
  _tile_zero(0);
  if constexpr (NB == 2) _tile_zero(1);
  if constexpr (NA == 2) _tile_zero(2);
  if constexpr (NA == 2 && NB == 2) _tile_zero(3);
  const int64_t stride = K * 2;
  const int64_t k_full = K / 32 * 32;
  auto step = [&](const void* a0, const void* a1, int64_t a_stride, const uint32_t* b) {
    _tile_loadd(4, a0, a_stride);
    if constexpr (NA == 2) _tile_loadd(5, a1, a_stride);
    _tile_loadd(6, b, 64);
    if constexpr (NB == 2) _tile_loadd(7, b + gstride, 64);
    _tile_dpbf16ps(0, 4, 6);
    if constexpr (NB == 2) _tile_dpbf16ps(1, 4, 7);
    if constexpr (NA == 2) _tile_dpbf16ps(2, 5, 6);
    if constexpr (NA == 2 && NB == 2) _tile_dpbf16ps(3, 5, 7);
  };
  // No software prefetch: the hardware prefetchers alone measured best (one thread, 896 -> 9728 and
  // 896 -> 32000: 11.7 GB/s; prefetching each row kPrefetchBytes ahead 10.1, the next 32 rows ahead
  // into L1 8.0 or L2 9.1, touching them with loads 8.5).
  // Alternating two sets of A / B tiles (so that loads need not wait for the last products) measured
  // 2-4% slower.
  for (int64_t k = 0; k < k_full; k += 32) step(w0 + k, w1 + k, stride, xg + k * 8);
  if (k_full < K) {  // the last K % 32 inputs of each row, zero-padded to 32
    alignas(64) uint16_t tail[NA][16][32];
    std::memset(tail, 0, sizeof(tail));
    for (int a = 0; a < NA; ++a) {
      for (int r = 0; r < 16; ++r) std::memcpy(tail[a][r], (a == 0 ? w0 : w1) + r * K + k_full, (K - k_full) * 2);
    }
    compiler_barrier();
    step(tail[0], tail[NA - 1], 64, xg + k_full * 8);
  }
}

// C tile [a][b] stored to c (16 x 16 fp32).
inline void store_c_tile(int a, int b, float* c) {
  if (a == 0 && b == 0) _tile_stored(0, c, 64);
  if (a == 0 && b == 1) _tile_stored(1, c, 64);
  if (a == 1 && b == 0) _tile_stored(2, c, 64);
  if (a == 1 && b == 1) _tile_stored(3, c, 64);
}

// Output row j of a stored C tile is its column j: one strided gather per row. A 16 x 16 transpose in
// registers (64 permutes a tile) instead held back the weight stream: the bench model's decode step, 2
// threads, same build alternated, took 36.9 -> 34.8 ms at batch 1, 44.3 -> 42.2 at 16 rows and 72.9 ->
// 67.7 at 48 with the gathers.
inline __m512 tile_column(const float* c, int64_t j) {
  const __m512i column = _mm512_mullo_epi32(_mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0),
                                            _mm512_set1_epi32(16));
  return _mm512_i32gather_ps(column, c + j, 4);
}

// c: a stored C tile (16 rows of W x 16 rows of x, fp32) -> out rows m0 .. m0 + rows - 1, columns n0 .. n0 + 15.
inline void write_tile(const float* c, int64_t rows, int64_t m0, int64_t n0, __m512 bias, void* out, int64_t ldo,
                       OutType out_type) {
  for (int64_t j = 0; j < rows; ++j) {
    const __m512 v = _mm512_add_ps(tile_column(c, j), bias);
    const int64_t index = (m0 + j) * ldo + n0;
    if (out_type == OutType::kBFloat16) {
      const __m256bh h = _mm512_cvtneps_pbh(v);
      std::memcpy(static_cast<uint16_t*>(out) + index, &h, 32);
    } else {
      _mm512_storeu_ps(static_cast<float*>(out) + index, v);
    }
  }
}

// Rows n0 .. n0 + 16 NA - 1 of W times rows m0 .. m0 + 16 NB - 1 of x, written to out.
template <int NA, int NB>
void amx_block(const uint32_t* xg, int64_t gstride, int64_t M, int64_t K, const uint16_t* w, int64_t n0, int64_t m0,
               const Bias& bias, void* out, int64_t ldo, OutType out_type) {
  const uint16_t* w0 = w + n0 * K;
  amx_products<NA, NB>(xg, gstride, K, w0, w0 + 16 * K);
  alignas(64) float c[16 * 16];
  for (int a = 0; a < NA; ++a) {
    const __m512 bv = bias.lanes(n0 + 16 * a);
    for (int b = 0; b < NB; ++b) {
      const int64_t rows = std::min<int64_t>(16, M - m0 - 16 * b);
      if (rows <= 0) continue;
      store_c_tile(a, b, c);
      write_tile(c, rows, m0 + 16 * b, n0 + 16 * a, bv, out, ldo, out_type);
    }
  }
}

// Gate rows n0 .. n0 + 15 of W = [gate (I rows) | up (I rows)] and their up rows I + n0 .. I + n0 + 15 times
// the M <= 16 rows of x (xg: packed): out[m][n] = bf16(bf16(silu(g)) * u), g and u the two products plus
// their biases rounded to bf16, the same operations as a bf16 gate_up output followed by gate_row (rows.h).
void amx_gated_block(const uint32_t* xg, int64_t M, int64_t K, const uint16_t* w, int64_t I, int64_t n0,
                     const Bias& bias, uint16_t* out, int64_t ldo) {
  amx_products<2, 1>(xg, 0, K, w + n0 * K, w + (I + n0) * K);
  const __m512 gate_bias = bias.lanes(n0), up_bias = bias.lanes(I + n0);
  alignas(64) float gate[16 * 16], up[16 * 16];
  store_c_tile(0, 0, gate);
  store_c_tile(1, 0, up);
  for (int64_t m = 0; m < M; ++m) {
    const __m512 g = round_bf16(_mm512_add_ps(tile_column(gate, m), gate_bias));
    const __m512 u = round_bf16(_mm512_add_ps(tile_column(up, m), up_bias));
    store_bf16(out + m * ldo + n0, silu_gate(g, u), 0xffff);
  }
}

// uint32 between consecutive groups of 16 packed rows of x: K rounded up to 32, in pairs, x 16 rows.
inline int64_t packed_group_stride(int64_t K) { return (K + 31) / 32 * 32 / 2 * 16; }

// Per-thread scratch for the packed x, 64-byte aligned, grown as needed.
uint32_t* packed_buffer(size_t count) {
  thread_local std::unique_ptr<uint32_t[]> storage;
  thread_local size_t capacity = 0;
  if (capacity < count + 16) {
    capacity = count + 16;
    storage.reset(new uint32_t[capacity]);
  }
  const auto address = reinterpret_cast<uintptr_t>(storage.get());
  return reinterpret_cast<uint32_t*>((address + 63) & ~uintptr_t{63});
}

// Rows [n_begin, n_end) of W (at least 16) against x packed by prepare_bf16_rows.
void amx_matmul(const Bf16Rows& rows, const uint16_t* w, const Bias& bias, void* out, int64_t ldo, OutType out_type,
                int64_t n_begin, int64_t n_end) {
  const int64_t M = rows.M, K = rows.K;
  const int64_t gstride = packed_group_stride(K);
  configure_tiles();
  // W rows [n, n + 16 * NB) against every group of up to 32 rows of x
  auto w_block = [&](auto nb, int64_t n) {
    constexpr int NB = decltype(nb)::value;
    for (int64_t m0 = 0; m0 < M; m0 += 32) {
      const uint32_t* xg = rows.packed + (m0 / 16) * gstride;
      if (M - m0 > 16) {
        amx_block<NB, 2>(xg, gstride, M, K, w, n, m0, bias, out, ldo, out_type);
      } else {
        amx_block<NB, 1>(xg, gstride, M, K, w, n, m0, bias, out, ldo, out_type);
      }
    }
  };
  int64_t n = n_begin;
  for (; n + 32 <= n_end; n += 32) w_block(std::integral_constant<int, 2>{}, n);
  if (n + 16 <= n_end) {
    w_block(std::integral_constant<int, 1>{}, n);
    n += 16;
  }
  _tile_release();  // back to the init state: cheaper context switches, no stale config for others
  if (n < n_end) gemv_bf16(rows.x, rows.ldx, M, K, w, bias, out, ldo, out_type, n, n_end);
}

bool use_amx(int64_t M, int64_t K) {
  const int mode = g_path_mode.load(std::memory_order_relaxed);
  if (mode == 2 || !amx_available()) return false;
  return mode == 1 || (M >= kAmxMinRows && !(M == 1 && K >= kGemvMinInputsForOneRow));
}

// The path matmul_bf16 takes for `rows` rows of x with `k` inputs ("amx" or "gemv") under the current setting.
std::string bf16_matmul_path(int64_t rows, int64_t k) { return use_amx(rows, k) ? "amx" : "gemv"; }

// "auto" (by rows), "amx" (AMX where available), "gemv" (gemv_bf16 always); returns the previous setting.
std::string set_bf16_matmul_path(const std::string& path) {
  static const char* names[] = {"auto", "amx", "gemv"};
  int mode = -1;
  for (int i = 0; i < 3; ++i) {
    if (path == names[i]) mode = i;
  }
  TORCH_CHECK(mode >= 0, "bf16 matmul path must be auto, amx or gemv, not ", path);
  return names[g_path_mode.exchange(mode)];
}

}  // namespace

bool amx_usable() { return amx_available(); }

Bf16Rows prepare_bf16_rows(const uint16_t* x, int64_t ldx, int64_t M, int64_t K) {
  Bf16Rows rows{x, ldx, M, K, nullptr};
  if (K > 0 && use_amx(M, K)) {
    uint32_t* packed = packed_buffer((M + 15) / 16 * packed_group_stride(K));
    pack_x(x, ldx, M, K, (K + 31) / 32 * 32, packed);
    compiler_barrier();
    rows.packed = packed;
  }
  return rows;
}

void matmul_bf16(const Bf16Rows& rows, const uint16_t* w, Bias bias, void* out, int64_t ldo, OutType out_type,
                 int64_t n_begin, int64_t n_end) {
  if (rows.packed != nullptr && n_end - n_begin >= 16) {
    amx_matmul(rows, w, bias, out, ldo, out_type, n_begin, n_end);
  } else {
    gemv_bf16(rows.x, rows.ldx, rows.M, rows.K, w, bias, out, ldo, out_type, n_begin, n_end);
  }
}

// Rows of x up to which the gate runs inside the gate_up matmul. Bench model, decode steps, fused and
// unfused builds alternated: 1 row 29.2 -> 28.6 ms a step; 4 and 8 rows alike; 16 rows 33.8 -> 34.5 ms
// (16 exp / div rows per pair of C tiles between their weight streams held the streams back longer
// than the separate pass over gate_up took).
constexpr int64_t kFusedGateMaxRows = 8;
static_assert(kFusedGateMaxRows <= 16, "amx_gated_block takes one tile of x rows");

bool silu_gate_fusable(int64_t M, int64_t K, int64_t I) {
  return M <= kFusedGateMaxRows && I % 16 == 0 && use_amx(M, K);
}

// Gate rows [n_begin, n_end) of W = [gate | up], 16 at a time, against the x rows prepare_bf16_rows packed.
void matmul_bf16_silu_gated(const Bf16Rows& rows, const uint16_t* w, int64_t I, Bias bias, uint16_t* out,
                            int64_t ldo, int64_t n_begin, int64_t n_end) {
  configure_tiles();
  for (int64_t n = n_begin; n < n_end; n += 16) amx_gated_block(rows.packed, rows.M, rows.K, w, I, n, bias, out, ldo);
  _tile_release();
}

TORCH_LIBRARY_FRAGMENT(zili_cpu, m) {
  m.def("bf16_matmul_path(int rows, int k) -> str", &bf16_matmul_path);
  m.def("set_bf16_matmul_path(str path) -> str", &set_bf16_matmul_path);
}

}  // namespace zili_cpu
