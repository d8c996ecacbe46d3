// Shared pieces of the C++ kernels for XLA:CPU (attention_cpu.cc): vector
// types for the compile target's widest registers, a register-tiled float32 matmul whose
// A operand may have any strides, per-thread scratch buffers, and running tasks on
// XLA's intra-op thread pool. Header-only; each kernel file is its own library.

#ifndef VIDEOLDM_JAX_NATIVE_CPU_KERNELS_H_
#define VIDEOLDM_JAX_NATIVE_CPU_KERNELS_H_

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace videoldm {

namespace ffi = xla::ffi;

#if defined(__AVX512F__)
constexpr int W = 16;  // floats per vector register
constexpr int kRegisters = 32;
#else
constexpr int W = 8;
constexpr int kRegisters = 16;
#endif

typedef float vec __attribute__((vector_size(W * 4)));
typedef int32_t ivec __attribute__((vector_size(W * 4)));
// The same vector, loadable from any float address (rows of the caller's arrays).
typedef float uvec __attribute__((vector_size(W * 4), aligned(4)));

// A broadcast that compiles to one vbroadcastss (from memory when x was loaded); `vec{}
// + x` would add 0.f first (x + 0 is not x for x = -0).
inline vec splat(float x) {
  const vec v = {x};
  return __builtin_shuffle(v, ivec{});
}
inline vec load(const float* p) { return *reinterpret_cast<const uvec*>(p); }
inline void store(float* p, vec x) { *reinterpret_cast<uvec*>(p) = x; }

inline int64_t round_up(int64_t n, int64_t m) { return (n + m - 1) / m * m; }

// One register tile of C (MR rows x NV vectors) = or += sum over k < K of
// A(i, k) B[k, :], A(i, k) = a[i * ars + k * acs] (any strides: broadcast loads, so a
// transposed A costs nothing), B rows of ldb floats, C rows of ldc floats.
template <int MR, int NV, bool ACC>
inline void tile(int64_t K, const float* a, int64_t ars, int64_t acs, const float* b,
                 int64_t ldb, float* c, int64_t ldc) {
  vec acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = ACC ? load(c + i * ldc + j * W) : vec{};
  for (int64_t k = 0; k < K; ++k) {
    vec bk[NV];
    for (int j = 0; j < NV; ++j) bk[j] = load(b + k * ldb + j * W);
    for (int i = 0; i < MR; ++i) {
      const vec ai = splat(a[i * ars + k * acs]);
      for (int j = 0; j < NV; ++j) acc[i][j] += ai * bk[j];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) store(c + i * ldc + j * W, acc[i][j]);
}

// Calls f(std::integral_constant<int, R>{}) for the R == rows in [1, MAX] (a register
// tile's row count as a compile-time constant: R counts down from MAX); nothing for
// other rows.
template <int MAX, typename F>
inline void with_rows(int64_t rows, F&& f) {
  if constexpr (MAX > 0) {
    if (rows == MAX) return f(std::integral_constant<int, MAX>{});
    with_rows<MAX - 1>(rows, f);
  }
}

// The rows [0, M) of one column panel, MR rows at a time, the last M % MR rows by one
// smaller tile.
template <int MR, int NV, bool ACC>
void panel(int64_t M, int64_t K, const float* a, int64_t ars, int64_t acs,
           const float* b, int64_t ldb, float* c, int64_t ldc) {
  int64_t i = 0;
  for (; i + MR <= M; i += MR)
    tile<MR, NV, ACC>(K, a + i * ars, ars, acs, b, ldb, c + i * ldc, ldc);
  with_rows<MR - 1>(M - i, [&](auto r) {
    tile<decltype(r)::value, NV, ACC>(K, a + i * ars, ars, acs, b, ldb, c + i * ldc, ldc);
  });
}

// C[M, N] (=, or += when ACC) A[M, K] B[K, N]; N a multiple of W. Register tiles use
// about three quarters of the vector registers for accumulators.
template <bool ACC>
void gemm(int64_t M, int64_t N, int64_t K, const float* a, int64_t ars, int64_t acs,
          const float* b, int64_t ldb, float* c, int64_t ldc) {
  constexpr int kWide = kRegisters == 32 ? 4 : 2;  // vectors per row of the wide tile
  constexpr int kWideRows = 6, kNarrowRows = 12;
  int64_t j = 0;
  for (; j + kWide * W <= N; j += kWide * W)
    panel<kWideRows, kWide, ACC>(M, K, a, ars, acs, b + j, ldb, c + j, ldc);
  if constexpr (kWide == 4) {
    if (j + 2 * W <= N) {
      panel<kNarrowRows, 2, ACC>(M, K, a, ars, acs, b + j, ldb, c + j, ldc);
      j += 2 * W;
    }
  }
  for (; j < N; j += W) panel<kNarrowRows, 1, ACC>(M, K, a, ars, acs, b + j, ldb, c + j, ldc);
}

struct FreeDeleter {
  void operator()(float* p) const { std::free(p); }
};
using Floats = std::unique_ptr<float[], FreeDeleter>;

// Per-thread scratch buffers, reused by every task and call that runs on the thread:
// XLA's pool threads live as long as the process, so after the first calls no task
// allocates (a fresh allocation of this size is an mmap whose pages fault in again on
// every call). Not zeroed: callers write every element they read.
class Scratch {
 public:
  // Buffer `slot` with room for n floats, 64-byte aligned; valid until the same slot
  // is asked for again on this thread.
  float* get(size_t slot, int64_t n) {
    if (slot >= buffers_.size()) {
      buffers_.resize(slot + 1);
      sizes_.resize(slot + 1, 0);
    }
    if (sizes_[slot] < n) {
      const int64_t bytes = round_up(n * 4, 64);
      buffers_[slot] = Floats(static_cast<float*>(std::aligned_alloc(64, bytes)));
      sizes_[slot] = n;
    }
    return buffers_[slot].get();
  }

 private:
  std::vector<Floats> buffers_;
  std::vector<int64_t> sizes_;
};

inline Scratch& thread_scratch() {
  thread_local Scratch scratch;
  return scratch;
}

// Runs task(t) for t in [0, n) on the pool's threads and completes the returned
// future when all are done. Tasks are claimed from a shared counter, so a thread that
// starts late (the pool busy elsewhere) takes fewer.
template <typename Task>
ffi::Future run_tasks(ffi::ThreadPool& pool, int64_t n, Task task) {
  const int64_t workers = std::max<int64_t>(1, std::min<int64_t>(pool.num_threads(), n));
  auto next = std::make_shared<std::atomic<int64_t>>(0);
  ffi::CountDownPromise done(workers);
  ffi::Future future(done);
  for (int64_t w = 0; w < workers; ++w) {
    pool.Schedule([next, done, task, n]() mutable {
      for (int64_t t; (t = next->fetch_add(1)) < n;) task(t);
      done.CountDown();
    });
  }
  return future;
}

}  // namespace videoldm

#endif  // VIDEOLDM_JAX_NATIVE_CPU_KERNELS_H_
