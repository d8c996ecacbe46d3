// Weight gradients for XLA:CPU as XLA FFI handlers: of a dense layer, dW = x^T dy, and
// of a stride-1 convolution that keeps the size, dW[tap] = sum of shifted x^T dy; and
// that convolution itself (ConvSame, below; its input gradient is the same handler).
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

#include "cpu_kernels.h"

namespace ffi = xla::ffi;
using namespace videoldm;  // NOLINT: this file's kernels are built on its helpers

namespace {

constexpr int64_t kTokens = 256;     // tokens (rows of x and dy) per inner block
constexpr int64_t kPanel = 4 * W;    // columns of dW per task (four vectors)
constexpr int64_t kTileRows = 6;     // rows of the wide register tile
constexpr int kWide = kRegisters == 32 ? 4 : 2;  // vectors per row of the wide tile

// A run of k tokens: x's rows from a, dy's rows from b (row strides acs and ldb).
struct Run {
  const float* a;
  const float* b;
  int64_t k;
};

// One register tile of C (MR rows x NV vectors) += sum over the runs' tokens of
// x[t, i0 + i]^T dy[t, j0:]: the accumulators stay in registers across runs.
template <int MR, int NV>
inline void run_tile(const Run* runs, int64_t n_runs, int64_t i0, int64_t j0, int64_t acs,
                     int64_t ldb, float* c, int64_t ldc) {
  vec acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = load(c + i * ldc + j * W);
  for (int64_t r = 0; r < n_runs; ++r) {
    const float *a = runs[r].a + i0, *b = runs[r].b + j0;
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

// The rows [0, M) of one column panel, MR rows at a time, the last M % MR rows by one
// smaller tile, as cpu_kernels.h's panel.
template <int MR, int NV>
void run_panel(int64_t M, const Run* runs, int64_t n_runs, int64_t j0, int64_t acs,
               int64_t ldb, float* c, int64_t ldc) {
  int64_t i = 0;
  for (; i + MR <= M; i += MR)
    run_tile<MR, NV>(runs, n_runs, i, j0, acs, ldb, c + i * ldc + j0, ldc);
  with_rows<MR - 1>(M - i, [&](auto r) {
    run_tile<decltype(r)::value, NV>(runs, n_runs, i, j0, acs, ldb, c + i * ldc + j0, ldc);
  });
}

// C[M, N] += sum over the runs of x^T dy, N a multiple of W; the runs' pointers are
// those of C's first row and column. Register tiles as in cpu_kernels.h's gemm.
void run_gemm(int64_t M, int64_t N, const Run* runs, int64_t n_runs, int64_t acs,
              int64_t ldb, float* c, int64_t ldc) {
  int64_t j = 0;
  for (; j + kWide * W <= N; j += kWide * W)
    run_panel<6, kWide>(M, runs, n_runs, j, acs, ldb, c, ldc);
  for (; j < N; j += W) run_panel<12, 1>(M, runs, n_runs, j, acs, ldb, c, ldc);
}

// dW (rows x cols) split for the threads: blocks of `rows` rows x column panels, with
// `per_block` tasks of each block and panel (the convolution's kernel rows), at least
// `want` tasks where the rows allow; fewer row blocks read dy fewer times.
struct Split {
  int64_t rows, blocks, panels;
  Split(int64_t num_rows, int64_t cols, int64_t per_block, int64_t want) {
    panels = (cols + kPanel - 1) / kPanel;
    const int64_t row_blocks =
        std::clamp<int64_t>((want + panels * per_block - 1) / (panels * per_block), 1,
                            (num_rows + kTileRows - 1) / kTileRows);
    rows = round_up((num_rows + row_blocks - 1) / row_blocks, kTileRows);
    blocks = (num_rows + rows - 1) / rows;
  }
};

void zero(float* c, int64_t m, int64_t n, int64_t ldc) {
  for (int64_t i = 0; i < m; ++i) std::fill(c + i * ldc, c + i * ldc + n, 0.f);
}

ffi::Future WeightGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                       ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dw) {
  const int64_t N = x.dimensions()[0], A = x.dimensions()[1], B = dy.dimensions()[1];
  const float *xp = x.typed_data(), *dyp = dy.typed_data();
  float* dwp = dw->typed_data();
  const Split split(A, B, 1, 2 * std::max<int64_t>(1, pool.num_threads()));
  return run_tasks(pool, split.blocks * split.panels, [=](int64_t t) {
    const int64_t i0 = (t / split.panels) * split.rows, j0 = (t % split.panels) * kPanel;
    const int64_t m = std::min(split.rows, A - i0), n = std::min(kPanel, B - j0);
    float* c = dwp + i0 * B + j0;
    zero(c, m, n, B);
    for (int64_t t0 = 0; t0 < N; t0 += kTokens) {
      // A(i, t) = x[t, i0 + i]: strides (1, A); the block of dy stays in L2.
      const Run run{xp + t0 * A + i0, dyp + t0 * B + j0, std::min(kTokens, N - t0)};
      run_gemm(m, n, &run, 1, A, B, c, B);
    }
  });
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
  const Split split(Cin, Cout, KH, 4 * std::max<int64_t>(1, pool.num_threads()));
  const int64_t blocks = split.blocks, panels = split.panels;
  return run_tasks(pool, KH * blocks * panels, [=](int64_t t) {
    const int64_t kh = t / (blocks * panels), i0 = (t / panels % blocks) * split.rows,
                  j0 = (t % panels) * kPanel;
    const int64_t m = std::min(split.rows, Cin - i0), n = std::min(kPanel, Cout - j0);
    for (int64_t kw = 0; kw < KW; ++kw)
      zero(dwp + ((kh * KW + kw) * Cin + i0) * Cout + j0, m, n, Cout);
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
        run_gemm(m, n, runs.data(), runs.size(), Cin, Cout,
                 dwp + ((kh * KW + kw) * Cin + i0) * Cout + j0, Cout);
      }
    }
  });
}

// One register tile of a convolution's output, MR tokens x NV vectors: y = (the tile
// as stored when ACC) + sum over the taps t < n_taps and k < K of x_t(i)[k] w_t[k, :],
// where x_t(i) points at the input row token i reads for tap t (a row of zeros outside
// the image) and w_t at tap t's kernel rows (ldb floats apart). The accumulators stay in
// registers across all the taps.
template <int MR, int NV, bool ACC>
inline void conv_tile(const float* const* rows, const float* const* w, int64_t n_taps,
                      int64_t K, int64_t ldb, float* c, int64_t ldc) {
  vec acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = ACC ? load(c + i * ldc + j * W) : vec{};
  for (int64_t t = 0; t < n_taps; ++t) {
    const float* a[MR];
    for (int i = 0; i < MR; ++i) a[i] = rows[t * kTileRows + i];
    const float* b = w[t];
    for (int64_t k = 0; k < K; ++k) {
      vec bk[NV];
      for (int j = 0; j < NV; ++j) bk[j] = load(b + k * ldb + j * W);
      for (int i = 0; i < MR; ++i) {
        const vec ai = splat(a[i][k]);
        for (int j = 0; j < NV; ++j) acc[i][j] += ai * bk[j];
      }
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) store(c + i * ldc + j * W, acc[i][j]);
}

// A stride-1 convolution with zero padding that keeps the size (kernel KH x KW, odd,
// padding KH / 2 and KW / 2): y[b, h, w, :] = sum over the taps (u, v) of
// x[b, h + u - ph, w + v - pw, :] k[u, v] (Cin, Cout), x read in place (a tap that falls
// outside the image reads a row of zeros; no padded copy, no im2col). Tasks are blocks
// of kTokens consecutive output tokens (b, h, w) x 64-wide column panels; within a task
// the taps of one kernel row are summed in registers for a tile of six tokens, the
// kernel rows accumulated in y, so the kernel rows a task reuses for all its tiles
// (KW x Cin x 64 floats) stay in L2. XLA runs this convolution on Eigen (and its input
// gradient, the same convolution of dy with the flipped, transposed kernel).
ffi::Future ConvSame(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> k,
                     ffi::ResultBuffer<ffi::F32> y) {
  auto xd = x.dimensions();
  auto kd = k.dimensions();
  const int64_t B = xd[0], H = xd[1], Wd = xd[2], Cin = xd[3];
  const int64_t KH = kd[0], KW = kd[1], Cout = kd[3];
  const int64_t ph = KH / 2, pw = KW / 2, N = B * H * Wd;
  const float *xp = x.typed_data(), *kp = k.typed_data();
  float* yp = y->typed_data();
  const int64_t blocks = (N + kTokens - 1) / kTokens, panels = (Cout + kPanel - 1) / kPanel;
  return run_tasks(pool, blocks * panels, [=](int64_t task) {
    const int64_t n0 = (task / panels) * kTokens, j0 = (task % panels) * kPanel;
    const int64_t n1 = std::min(N, n0 + kTokens), width = std::min(kPanel, Cout - j0);
    float* zeros = thread_scratch().get(0, Cin);
    std::fill(zeros, zeros + Cin, 0.f);
    const float* rows[16 * kTileRows];  // KW <= 16 taps per kernel row
    const float* w[16];
    for (int64_t kh = 0; kh < KH; ++kh) {
      for (int64_t kw = 0; kw < KW; ++kw) w[kw] = kp + (kh * KW + kw) * Cin * Cout + j0;
      for (int64_t n = n0; n < n1; n += kTileRows) {
        const int64_t tokens = std::min<int64_t>(kTileRows, n1 - n);
        for (int64_t i = 0; i < kTileRows; ++i) {
          const int64_t token = std::min(n + i, n1 - 1), bh = token / Wd, col = token % Wd;
          const int64_t row = bh % H + kh - ph;
          for (int64_t kw = 0; kw < KW; ++kw) {
            const int64_t c = col + kw - pw;
            rows[kw * kTileRows + i] = (row < 0 || row >= H || c < 0 || c >= Wd)
                                           ? zeros
                                           : xp + ((bh + kh - ph) * Wd + c) * Cin;
          }
        }
        // The tile of `tokens` tokens x NV vectors at column j, stored (the first
        // kernel row) or accumulated.
        auto tiles = [&](auto nv, int64_t j) {
          constexpr int NV = decltype(nv)::value;
          const float* wj[16];
          for (int64_t kw = 0; kw < KW; ++kw) wj[kw] = w[kw] + j;
          float* c = yp + n * Cout + j0 + j;
          with_rows<kTileRows>(tokens, [&](auto r) {
            constexpr int R = decltype(r)::value;
            if (kh == 0) conv_tile<R, NV, false>(rows, wj, KW, Cin, Cout, c, Cout);
            else conv_tile<R, NV, true>(rows, wj, KW, Cin, Cout, c, Cout);
          });
        };
        int64_t j = 0;
        for (; j + kWide * W <= width; j += kWide * W)
          tiles(std::integral_constant<int, kWide>{}, j);
        for (; j < width; j += W) tiles(std::integral_constant<int, 1>{}, j);
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(VideoLdmConvSame, ConvSame,
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
