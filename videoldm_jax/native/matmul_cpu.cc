// The weight gradient of a dense layer, dW = x^T dy, for XLA:CPU as an XLA FFI handler.
//
// Why this exists: dW contracts the token axis of both operands. XLA:CPU runs such a
// dot either on Eigen (asynchronously, 70-144 GFLOP/s alone) or, with x^T materialised
// first (models/matmul.py), as a transpose and a canonical YNNPACK dot whose long K
// (all tokens) and few rows kept it at ~76 GFLOP/s in the W1 train step's profile
// (bench/README.md). The register-tiled matmul of cpu_kernels.h broadcasts its A
// operand from any strides, so A = x^T is read in place: no transpose, no copy.
//
// Layouts (row-major, float32): x (N, A), dy (N, B) with B a multiple of the vector
// width and N >= 1, dw (A, B). Tasks are blocks of dW's rows x 64-wide column panels on XLA's
// intra-op threads; each runs over all N tokens in blocks of kTokens rows, so the
// block of dy it reuses for every row tile stays in L2. Every element is a sum over
// the tokens in order whatever the thread count: results are bitwise reproducible.

#include "cpu_kernels.h"

namespace ffi = xla::ffi;
using namespace videoldm;  // NOLINT: this file's kernel is built on its helpers

namespace {

constexpr int64_t kTokens = 256;     // rows of x and dy per inner block
constexpr int64_t kPanel = 4 * W;    // columns of dW per task (four vectors)
constexpr int64_t kTileRows = 6;     // rows of the wide register tile

// dW[i0:i0+m, j0:j0+n] over all tokens.
void block(const float* x, const float* dy, float* dw, int64_t N, int64_t A, int64_t B,
           int64_t i0, int64_t m, int64_t j0, int64_t n) {
  for (int64_t t0 = 0; t0 < N; t0 += kTokens) {
    const int64_t k = std::min(kTokens, N - t0);
    const float* a = x + t0 * A + i0;  // A(i, t) = x[t, i0 + i]: strides (1, A)
    const float* b = dy + t0 * B + j0;
    float* c = dw + i0 * B + j0;
    if (t0 == 0) {
      gemm<false>(m, n, k, a, 1, A, b, B, c, B);
    } else {
      gemm<true>(m, n, k, a, 1, A, b, B, c, B);
    }
  }
}

ffi::Future WeightGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                       ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dw) {
  const int64_t N = x.dimensions()[0], A = x.dimensions()[1], B = dy.dimensions()[1];
  const float *xp = x.typed_data(), *dyp = dy.typed_data();
  float* dwp = dw->typed_data();
  // Enough tasks for the threads (2 per thread); fewer row blocks read dy fewer times.
  const int64_t panels = (B + kPanel - 1) / kPanel;
  const int64_t want = 2 * std::max<int64_t>(1, pool.num_threads());
  const int64_t row_blocks = std::clamp<int64_t>((want + panels - 1) / panels, 1,
                                                 (A + kTileRows - 1) / kTileRows);
  const int64_t rows = round_up((A + row_blocks - 1) / row_blocks, kTileRows);
  const int64_t blocks = (A + rows - 1) / rows;
  return run_tasks(pool, blocks * panels, [=](int64_t t) {
    const int64_t i0 = (t / panels) * rows, j0 = (t % panels) * kPanel;
    block(xp, dyp, dwp, N, A, B, i0, std::min(rows, A - i0), j0, std::min(kPanel, B - j0));
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VideoLdmWeightGrad, WeightGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
