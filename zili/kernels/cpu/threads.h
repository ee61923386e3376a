// Whole-matrix entry points over the raw kernels of kernels.h: y (M, N) = x (M, K) @ W.T with N cut
// into chunks that the threads of pool.h claim as they come. The torch ops (ops.cpp) and the fused
// decoder layer (decode_layer.cpp) both call these, so every path splits and dispatches the same way.
#pragma once

#include "kernels.h"

namespace at {
class Tensor;
}

namespace zili_cpu {

constexpr int64_t kGrainRows = 32;  // smallest slice of N (weight rows) worth a thread
// Chunks per thread: enough that the others take over a late or preempted thread's share, few enough
// that each chunk streams a long run of W (the hardware prefetchers ramp up per run). The last chunks
// of a call are smaller (run_chunks' grain), so that the threads run out of rows together: while one
// thread finishes a whole chunk alone, the matmul streams at one core's share of the bandwidth.
constexpr int64_t kChunksPerThread = 4;

// Rows of N per chunk: N / (threads x kChunksPerThread) rounded up to `multiple`, kGrainRows at least.
int64_t chunk_rows(int64_t N, int64_t multiple);

// x (M, K) bf16, row stride K; w (N, K) bf16. Chunks of N start at multiples of 32 rows (two AMX tiles):
// each row of W takes the same path and summation order whatever the number of threads.
void linear_bf16_threads(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, Bias bias, void* out,
                         OutType out_type, int64_t N);

// out (M, I) bf16 = matmul_bf16_silu_gated over all I columns, in chunks across threads. Only where
// silu_gate_fusable(M, K, I).
void linear_bf16_silu_gated_threads(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, int64_t I, Bias bias,
                                    uint16_t* out);

// A quantized weight's scales (N, G) and, where the zero points differ between groups, its zero_scales
// = s * z (N, G), both contiguous fp32 (G < 0: the scales' own); `what` prefixes the error. Returns the
// zero_scales pointer for linear_quant_threads (nullptr without them: one zero point for every group).
const float* check_quant_scales(const at::Tensor& scales, const at::Tensor* zero_scales, int64_t N, int64_t G,
                                const char* what);

// x (M, K) fp32 or bf16, row stride K, quantized to int8 per activation block (quant_layout) into
// scratch buffers, then the VNNI kernel on W as gemv_quant describes, N in chunks across threads.
void linear_quant_threads(const void* x, bool x_is_bf16, int64_t M, int64_t K, const uint8_t* w, int bits,
                          const float* scales, const float* zero_scales, float zero_point, int64_t group_size,
                          Bias bias, void* out,
                          OutType out_type, int64_t N);

}  // namespace zili_cpu
