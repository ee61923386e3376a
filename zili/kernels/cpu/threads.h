// Whole-matrix entry points over the raw kernels of kernels.h: y (M, N) = x (M, K) @ W.T with N
// split across threads (at::parallel_for). The torch ops (ops.cpp) and the fused decoder layer
// (decode_layer.cpp) both call these, so every path splits and dispatches the same way.
#pragma once

#include "kernels.h"

namespace zili_cpu {

// x (M, K) bf16, row stride K; w (N, K) bf16. Threads split N at multiples of 16 rows (the AMX tile
// height): each row of W takes the same path and summation order whatever the number of threads.
void linear_bf16_threads(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, Bias bias, void* out,
                         OutType out_type, int64_t N);

}  // namespace zili_cpu
