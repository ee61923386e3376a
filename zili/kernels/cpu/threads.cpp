// See threads.h.
#include "threads.h"

#include <ATen/Parallel.h>

#include <algorithm>

namespace zili_cpu {

namespace {
constexpr int64_t kGrainRows = 32;  // smallest slice of N worth a thread
}  // namespace

void linear_bf16_threads(const uint16_t* x, int64_t M, int64_t K, const uint16_t* w, Bias bias, void* out,
                         OutType out_type, int64_t N) {
  const int64_t blocks = (N + 15) / 16;
  at::parallel_for(0, blocks, kGrainRows / 16, [&](int64_t begin, int64_t end) {
    matmul_bf16(x, K, M, K, w, bias, out, N, out_type, begin * 16, std::min(end * 16, N));
  });
}

}  // namespace zili_cpu
