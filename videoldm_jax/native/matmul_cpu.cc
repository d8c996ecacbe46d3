// Weight gradients for XLA:CPU as XLA FFI handlers: of a dense layer, dW = x^T dy, and
// of a stride-1 convolution that keeps the size, dW[tap] = sum of shifted x^T dy.
//
// Why this exists: dW contracts the token axis of both operands. XLA:CPU runs such a
// dot either on Eigen (asynchronously, 70-144 GFLOP/s alone) or, with x^T materialised
// first (models/matmul.py), as a transpose and a canonical YNNPACK dot whose long K
// (all tokens) and few rows kept it at ~76 GFLOP/s in the W1 train step's profile; a
// convolution's dW it computes as a convolution over the batch after transposing x
// (bench/README.md). The register-tiled matmul of cpu_kernels.h broadcasts its A
// operand from any strides, so A = x^T (and each tap's shifted x) is read in place.
//
// Layouts (row-major, float32): x (N, A), dy (N, B) with B a multiple of the vector
// width and N >= 1, dw (A, B). Tasks are blocks of dW's rows x 64-wide column panels
// on XLA's intra-op threads; each runs over all N tokens in blocks of kTokens rows, so
// the block of dy it reuses for every row tile stays in L2. Every element is a sum
// over the tokens in order whatever the thread count: results are bitwise reproducible.

#include <type_traits>

#include "cpu_kernels.h"

namespace ffi = xla::ffi;
using namespace videoldm;  // NOLINT: this file's kernels are built on its helpers

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

// A run of k tokens: x's rows from a, dy's rows from b (row strides acs and ldb).
struct Run {
  const float* a;
  const float* b;
  int64_t k;
};

// One register tile of C (MR rows x NV vectors) += sum over the runs' tokens of
// x[t, i]^T dy[t, :]: the accumulators stay in registers across runs.
template <int MR, int NV>
inline void run_tile(const Run* runs, int64_t n_runs, int64_t acs, int64_t ldb, float* c,
                     int64_t ldc) {
  vec acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = load(c + i * ldc + j * W);
  for (int64_t r = 0; r < n_runs; ++r) {
    const float *a = runs[r].a, *b = runs[r].b;
    for (int64_t k = 0; k < runs[r].k; ++k) {
      vec bk[NV];
      for (int j = 0; j < NV; ++j) bk[j] = load(b + k * ldb + j * W);
      for (int i = 0; i < MR; ++i) {
        const vec ai = splat(a[i + k * acs]);
        for (int j = 0; j < NV; ++j) acc[i][j] += ai * bk[j];
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) store(c + i * ldc + j * W, acc[i][j]);
}

template <int R, int NV>
inline void run_tail(int64_t rows, const Run* runs, int64_t n_runs, int64_t acs,
                     int64_t ldb, float* c, int64_t ldc) {
  if constexpr (R > 0) {
    if (rows == R) return run_tile<R, NV>(runs, n_runs, acs, ldb, c, ldc);
    run_tail<R - 1, NV>(rows, runs, n_runs, acs, ldb, c, ldc);
  }
}

// C[M, N] += sum over the runs of x^T dy, N a multiple of W and at most kPanel; the
// runs' pointers are those of C's first row and column. Tiles as in gemm.
void run_gemm(int64_t M, int64_t N, const std::vector<Run>& runs, int64_t acs, int64_t ldb,
              float* c, int64_t ldc) {
  std::vector<Run> shifted(runs.size());
  auto panel = [&](auto rows_tag, auto nv_tag, int64_t j) {
    constexpr int MR = decltype(rows_tag)::value, NV = decltype(nv_tag)::value;
    int64_t i = 0;
    for (; i < M; i += MR) {
      for (size_t r = 0; r < runs.size(); ++r)
        shifted[r] = Run{runs[r].a + i, runs[r].b + j, runs[r].k};
      if (i + MR <= M) {
        run_tile<MR, NV>(shifted.data(), runs.size(), acs, ldb, c + i * ldc + j, ldc);
      } else {
        run_tail<MR - 1, NV>(M - i, shifted.data(), runs.size(), acs, ldb,
                             c + i * ldc + j, ldc);
      }
    }
  };
  int64_t j = 0;
  constexpr int kWide = kRegisters == 32 ? 4 : 2;
  for (; j + kWide * W <= N; j += kWide * W)
    panel(std::integral_constant<int, 6>{}, std::integral_constant<int, kWide>{}, j);
  for (; j < N; j += W)
    panel(std::integral_constant<int, 12>{}, std::integral_constant<int, 1>{}, j);
}

// The weight gradient of a stride-1 convolution with zero padding that keeps the size
// (kernel KH x KW, odd, padding KH / 2 and KW / 2): dw[dh, dw] (Cin, Cout) = sum over b,
// h, w of x[b, h + dh - ph, w + dw - pw, :]^T dy[b, h, w, :], the x of each tap read in
// place from the unpadded input (the taps' row ranges clipped at the borders). XLA
// computes it as a convolution over the batch after transposing x to (Cin, H, W, B).
ffi::Future ConvWeightGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                           ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dw) {
  auto xd = x.dimensions();
  auto wd = dw->dimensions();
  const int64_t B = xd[0], H = xd[1], Wd = xd[2], Cin = xd[3];
  const int64_t KH = wd[0], KW = wd[1], Cout = wd[3];
  const int64_t ph = KH / 2, pw = KW / 2;
  const float *xp = x.typed_data(), *dyp = dy.typed_data();
  float* dwp = dw->typed_data();
  // Tasks: one kernel row (KH) x a block of Cin x a column panel; the KW taps of a
  // kernel row read the same row of x, so each task keeps its rows in cache.
  const int64_t panels = (Cout + kPanel - 1) / kPanel;
  const int64_t want = 4 * std::max<int64_t>(1, pool.num_threads());
  const int64_t row_blocks = std::clamp<int64_t>((want + panels * KH - 1) / (panels * KH), 1,
                                                 (Cin + kTileRows - 1) / kTileRows);
  const int64_t rows = round_up((Cin + row_blocks - 1) / row_blocks, kTileRows);
  const int64_t blocks = (Cin + rows - 1) / rows;
  return run_tasks(pool, KH * blocks * panels, [=](int64_t t) {
    const int64_t kh = t / (blocks * panels), i0 = (t / panels % blocks) * rows,
                  j0 = (t % panels) * kPanel;
    const int64_t m = std::min(rows, Cin - i0), n = std::min(kPanel, Cout - j0);
    for (int64_t kw = 0; kw < KW; ++kw) {
      float* c = dwp + ((kh * KW + kw) * Cin + i0) * Cout + j0;
      for (int64_t i = 0; i < m; ++i) std::fill(c + i * Cout, c + i * Cout + n, 0.f);
    }
    // Output rows (b, h) in chunks of about kTokens tokens, whose x and dy rows stay in
    // L2 while every register tile of the task's block passes over them.
    const int64_t chunk = std::max<int64_t>(1, kTokens / Wd);
    std::vector<Run> runs;
    for (int64_t r0 = 0; r0 < B * H; r0 += chunk) {
      for (int64_t kw = 0; kw < KW; ++kw) {
        const int64_t w0 = std::max<int64_t>(0, pw - kw),
                      w1 = std::min<int64_t>(Wd, Wd + pw - kw);
        if (w1 <= w0) continue;
        runs.clear();
        for (int64_t r = r0; r < std::min(B * H, r0 + chunk); ++r) {
          const int64_t b = r / H, h = r % H, hin = h + kh - ph;
          if (hin < 0 || hin >= H) continue;
          runs.push_back(Run{xp + ((b * H + hin) * Wd + w0 + kw - pw) * Cin + i0,
                             dyp + ((b * H + h) * Wd + w0) * Cout + j0, w1 - w0});
        }
        if (runs.empty()) continue;
        run_gemm(m, n, runs, Cin, Cout, dwp + ((kh * KW + kw) * Cin + i0) * Cout + j0, Cout);
      }
    }
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VideoLdmConvWeightGrad, ConvWeightGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(VideoLdmWeightGrad, WeightGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
