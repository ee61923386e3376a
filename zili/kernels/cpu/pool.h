// The kernels' own worker threads: parallel_chunks runs a loop's chunks on the calling thread and
// at::get_num_threads() - 1 workers, which claim chunks one at a time as they come.
//
// Why not at::parallel_for (OpenMP): it gives each thread one fixed slice and returns when every
// thread has reached the closing barrier. A thread that starts late (woken from sleep: ~0.1 ms on a
// VM, every kernel call under OMP_WAIT_POLICY=PASSIVE, which the server's engine process uses) or
// is preempted (the HTTP process and its clients share the cores) holds the whole call back by its
// delay. Here the caller starts on the first chunk at once, the others join when they can, and a
// call waits only for chunks actually claimed: a missing thread costs its share, not a stall.
//
// Workers spin for ZILI_CPU_SPIN_US microseconds (default 200) after their last chunk, which
// bridges the gaps between a decode step's kernel calls (Python between layers), then sleep until
// the next call. A call made from a worker, while another thread holds the pool, or with one
// thread runs inline on the calling thread. A chunk's result must not depend on the thread that
// runs it (the kernels split at fixed boundaries). A fork()ed child starts a pool of its own.
#pragma once

#include <cstdint>

namespace zili_cpu {

using ChunkFn = void (*)(const void* context, int64_t begin, int64_t end);

// fn(context, begin, end) for [0, n) cut into chunks of `chunk` items; the last chunks shrink to
// multiples of `grain` items (grain >= chunk: all chunks `chunk` items, the last may be shorter).
void run_chunks(int64_t n, int64_t chunk, int64_t grain, ChunkFn fn, const void* context);

// parallel_chunks(n, chunk, [&](int64_t begin, int64_t end) { ... }): run_chunks for a lambda. An
// exception thrown by a chunk is rethrown here after the other chunks have finished.
template <typename F>
void parallel_chunks(int64_t n, int64_t chunk, const F& f, int64_t grain = 0) {
  run_chunks(n, chunk, grain > 0 ? grain : chunk, [](const void* context, int64_t begin, int64_t end) {
    (*static_cast<const F*>(context))(begin, end);
  }, &f);
}

}  // namespace zili_cpu
