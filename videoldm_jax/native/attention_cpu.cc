// Softmax attention for XLA:CPU, forward and backward, as XLA FFI handlers.
//
// Why this exists: XLA:CPU runs the blocked attention of models/blocked_attention.py
// as a loop whose small dots run one after another on one core (bench/README.md, "Why:
// XLA:CPU runs the blocked attention on one of the two cores"), at less than half the
// speed of torch's CPU flash kernel. Here every (batch, head) pair (in the forward, with
// fewer pairs than 4 per thread, every chunk of its queries) is a task on XLA's own
// intra-op thread pool, and each task runs FlashAttention's algorithm in blocks of
// queries whose logits stay in the core's L2.
//
// Layouts (row-major, float32): q (B, L, H, D), k and v (B, S, H, D), out (B, L, H, D),
// lse (B, H, L) = the log-sum-exp of each query's scaled logits, kept for the backward.
// The (B, L, H, D) layout is the projections' (B, L, H*D) output as it is, so no
// transpose runs before or after the call.
//
// Numerics: logits s = (scale q) k^T, p = exp(s - max) / sum (the 1 / sum applied to
// the output row), all in float32; exp is a polynomial after the usual range reduction
// (relative error ~1e-7). NaN or infinite logits give NaN outputs, as the formula does.
// Each output element is a sum in a fixed order whatever the thread count, so results
// are bitwise reproducible.

#include <cmath>
#include <limits>

#include "cpu_kernels.h"

namespace ffi = xla::ffi;
using namespace videoldm;  // NOLINT: this file's kernels are built on its helpers

namespace {

// exp(x) for x <= 0 (softmax after subtracting the row max): exp(x) = 2^i exp(f) with
// i = round(x log2 e), f = x - i ln 2 in [-ln2 / 2, ln2 / 2] (ln 2 split in two parts so
// that i ln 2 is exact to float precision), exp(f) by its degree-7 Taylor polynomial.
inline vec exp_nonpositive(vec x) {
  x = x < splat(-87.0f) ? splat(-87.0f) : x;  // exp(-87) ~ 1.6e-38: no denormals
  const vec t = x * splat(1.44269504088896341f) - splat(0.5f);
  const ivec i = __builtin_convertvector(t, ivec);  // t < 0: truncation rounds up, so
  const vec r = __builtin_convertvector(i, vec);    // r = round(x log2 e)
  const vec f = (x - r * splat(0.693359375f)) + r * splat(2.12194440e-4f);
  vec p = splat(1.f / 5040);
  p = p * f + splat(1.f / 720);
  p = p * f + splat(1.f / 120);
  p = p * f + splat(1.f / 24);
  p = p * f + splat(1.f / 6);
  p = p * f + splat(0.5f);
  p = p * f + splat(1.f);
  p = p * f + splat(1.f);
  const ivec bits = (i + 127) << 23;
  vec scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return p * scale;
}

struct Shape {
  int64_t B, L, S, H, D;
  int64_t Dp() const { return round_up(D, W); }  // head dim padded to whole vectors
  int64_t Sp() const { return round_up(S, W); }
  // Row stride of the (., S) arrays: one cache line more than Sp, so that the rows of a
  // block do not all map to the same L1 set (with S = 1024, rows 4 KB apart did).
  int64_t Ls() const { return Sp() + 16; }
};

// Queries per block: logits of 64K floats (256 KB), within a core's L2 with the
// packed keys and values of the head (2 x S x Dp floats) beside them.
int64_t query_block(const Shape& s) {
  return std::clamp<int64_t>((64 * 1024) / s.Sp(), 4, 256);
}

// Copies rows [first, first + count) of one head of x (B, n, H, D) into dst (count, Dp),
// times `scale`, zeros in the padding columns (they enter the logits' dot products).
void pack_rows(const float* x, const Shape& s, int64_t n, int64_t b, int64_t h,
               int64_t first, int64_t count, float scale, float* dst) {
  const int64_t dp = s.Dp();
  for (int64_t r = 0; r < count; ++r) {
    const float* src = x + ((b * n + first + r) * s.H + h) * s.D;
    for (int64_t d = 0; d < s.D; ++d) dst[r * dp + d] = src[d] * scale;
    for (int64_t d = s.D; d < dp; ++d) dst[r * dp + d] = 0.f;
  }
}

// Transposed: dst (Dp, Ls) with dst[d, r] = x[b, r, h, d], zeros elsewhere.
void pack_transposed(const float* x, const Shape& s, int64_t b, int64_t h, float* dst) {
  const int64_t ls = s.Ls();
  for (int64_t r = 0; r < s.S; ++r) {
    const float* src = x + ((b * s.S + r) * s.H + h) * s.D;
    for (int64_t d = 0; d < s.D; ++d) dst[d * ls + r] = src[d];
  }
  for (int64_t d = 0; d < s.D; ++d) std::fill(dst + d * ls + s.S, dst + (d + 1) * ls, 0.f);
  std::fill(dst + s.D * ls, dst + s.Dp() * ls, 0.f);
}

void unpack_rows(const float* src, const Shape& s, int64_t n, int64_t b, int64_t h,
                 int64_t first, int64_t count, float scale, float* x) {
  const int64_t dp = s.Dp();
  for (int64_t r = 0; r < count; ++r) {
    float* dst = x + ((b * n + first + r) * s.H + h) * s.D;
    for (int64_t d = 0; d < s.D; ++d) dst[d] = src[r * dp + d] * scale;
  }
}

// The forward pass of queries [q0, q0 + nq) of head (b, h).
void forward_chunk(const float* q, const float* k, const float* v, float* out, float* lse,
                   const Shape& s, float scale, int64_t b, int64_t h, int64_t q0, int64_t nq) {
  const int64_t dp = s.Dp(), sp = s.Sp(), ls = s.Ls(), bq = query_block(s);
  Scratch& scratch = thread_scratch();
  float *kt = scratch.get(0, dp * ls), *vp = scratch.get(1, s.S * dp),
        *qb = scratch.get(2, bq * dp), *logits = scratch.get(3, bq * ls),
        *ob = scratch.get(4, bq * dp), *inv_sum = scratch.get(5, bq);
  pack_transposed(k, s, b, h, kt);
  pack_rows(v, s, s.S, b, h, 0, s.S, 1.f, vp);
  for (int64_t i0 = q0; i0 < q0 + nq; i0 += bq) {
    const int64_t m = std::min(bq, q0 + nq - i0);
    pack_rows(q, s, s.L, b, h, i0, m, scale, qb);
    gemm<false>(m, sp, dp, qb, dp, 1, kt, ls, logits, ls);
    for (int64_t r = 0; r < m; ++r) {
      float* row = logits + r * ls;
      vec vmx = splat(-std::numeric_limits<float>::infinity());
      int64_t c0 = 0;
      for (; c0 + W <= s.S; c0 += W) {
        const vec x = load(row + c0);
        vmx = x > vmx ? x : vmx;
      }
      float mx = vmx[0];
      for (int i = 1; i < W; ++i) mx = std::max(mx, vmx[i]);
      for (; c0 < s.S; ++c0) mx = std::max(mx, row[c0]);
      vec total{};
      int64_t c = 0;
      for (; c + W <= s.S; c += W) {
        const vec e = exp_nonpositive(load(row + c) - splat(mx));
        store(row + c, e);
        total += e;
      }
      float sum = 0.f;
      for (int i = 0; i < W; ++i) sum += total[i];
      for (; c < s.S; ++c) {  // the last partial vector, then the padding: p = 0
        vec e = exp_nonpositive(splat(row[c] - mx));
        row[c] = e[0];
        sum += e[0];
      }
      for (c = s.S; c < sp; ++c) row[c] = 0.f;
      inv_sum[r] = 1.f / sum;  // applied to the output row: one pass less over p
      lse[(b * s.H + h) * s.L + i0 + r] = mx + std::log(sum);
    }
    gemm<false>(m, dp, s.S, logits, ls, 1, vp, dp, ob, dp);
    for (int64_t r = 0; r < m; ++r) {
      float* dst = out + ((b * s.L + i0 + r) * s.H + h) * s.D;
      for (int64_t d = 0; d < s.D; ++d) dst[d] = ob[r * dp + d] * inv_sum[r];
    }
  }
}

// The backward pass of head (b, h): dq, dk, dv of that head from its q, k, v, out,
// lse and d_out, recomputing each query block's probabilities.
void backward_head(const float* q, const float* k, const float* v, const float* out,
                   const float* lse, const float* dout, float* dq, float* dk, float* dv,
                   const Shape& s, float scale, int64_t b, int64_t h) {
  const int64_t dp = s.Dp(), sp = s.Sp(), ls = s.Ls(), bq = query_block(s);
  Scratch& scratch = thread_scratch();
  float *kt = scratch.get(0, dp * ls), *vt = scratch.get(1, dp * ls),
        *kp = scratch.get(2, s.S * dp), *qb = scratch.get(3, bq * dp),
        *dob = scratch.get(4, bq * dp), *p = scratch.get(5, bq * ls),
        *dp_ = scratch.get(6, bq * ls), *dqb = scratch.get(7, bq * dp),
        *dkh = scratch.get(8, s.S * dp), *dvh = scratch.get(9, s.S * dp),
        *delta = scratch.get(10, bq);
  pack_transposed(k, s, b, h, kt);
  pack_transposed(v, s, b, h, vt);
  pack_rows(k, s, s.S, b, h, 0, s.S, 1.f, kp);
  std::fill(dkh, dkh + s.S * dp, 0.f);  // accumulated over the query blocks
  std::fill(dvh, dvh + s.S * dp, 0.f);
  for (int64_t i0 = 0; i0 < s.L; i0 += bq) {
    const int64_t m = std::min(bq, s.L - i0);
    pack_rows(q, s, s.L, b, h, i0, m, scale, qb);
    pack_rows(dout, s, s.L, b, h, i0, m, 1.f, dob);
    for (int64_t r = 0; r < m; ++r) {  // delta_i = sum_j p_ij dp_ij = d_out_i . out_i
      const float* o = out + ((b * s.L + i0 + r) * s.H + h) * s.D;
      float dot = 0.f;
      for (int64_t d = 0; d < s.D; ++d) dot += dob[r * dp + d] * o[d];
      delta[r] = dot;
    }
    // p = exp(s - lse), recomputed.
    gemm<false>(m, sp, dp, qb, dp, 1, kt, ls, p, ls);
    for (int64_t r = 0; r < m; ++r) {
      float* row = p + r * ls;
      const vec l = splat(lse[(b * s.H + h) * s.L + i0 + r]);
      int64_t c = 0;
      for (; c + W <= s.S; c += W) store(row + c, exp_nonpositive(load(row + c) - l));
      for (; c < s.S; ++c) row[c] = exp_nonpositive(splat(row[c]) - l)[0];
      for (; c < sp; ++c) row[c] = 0.f;
    }
    // dv += p^T d_out: A(i = key, k = query) = p[query, key].
    gemm<true>(s.S, dp, m, p, 1, ls, dob, dp, dvh, dp);
    // dp = d_out v^T
    gemm<false>(m, sp, dp, dob, dp, 1, vt, ls, dp_, ls);
    // ds = p (dp - delta), in place of dp (padding columns: p = 0, so ds = 0).
    for (int64_t r = 0; r < m; ++r) {
      float* ds = dp_ + r * ls;
      const float* pr = p + r * ls;
      const vec dl = splat(delta[r]);
      for (int64_t c = 0; c < sp; c += W) store(ds + c, load(pr + c) * (load(ds + c) - dl));
    }
    // dq = scale ds k; dk += ds^T (scale q).
    gemm<false>(m, dp, s.S, dp_, ls, 1, kp, dp, dqb, dp);
    unpack_rows(dqb, s, s.L, b, h, i0, m, scale, dq);
    gemm<true>(s.S, dp, m, dp_, 1, ls, qb, dp, dkh, dp);
  }
  unpack_rows(dkh, s, s.S, b, h, 0, s.S, 1.f, dk);
  unpack_rows(dvh, s, s.S, b, h, 0, s.S, 1.f, dv);
}

Shape shape_of(ffi::Buffer<ffi::F32>& q, ffi::Buffer<ffi::F32>& k) {
  auto qd = q.dimensions();
  auto kd = k.dimensions();
  return Shape{qd[0], qd[1], kd[1], qd[2], qd[3]};
}

ffi::Future Forward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                    ffi::Buffer<ffi::F32> v, ffi::ResultBuffer<ffi::F32> out,
                    ffi::ResultBuffer<ffi::F32> lse, float scale) {
  const Shape s = shape_of(q, k);
  // Whole heads per task when there are enough of them for the threads (k and v are
  // packed once per task); else the queries in chunks of whole blocks.
  const int64_t bq = query_block(s), blocks = (s.L + bq - 1) / bq;
  const int64_t want = 4 * std::max<int64_t>(1, pool.num_threads());
  const int64_t split = std::clamp<int64_t>((want + s.B * s.H - 1) / (s.B * s.H), 1, blocks);
  const int64_t blocks_per_chunk = (blocks + split - 1) / split;
  const int64_t chunk = blocks_per_chunk * bq;
  const int64_t chunks = (blocks + blocks_per_chunk - 1) / blocks_per_chunk;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  float *op = out->typed_data(), *lp = lse->typed_data();
  return run_tasks(pool, s.B * s.H * chunks, [=](int64_t t) {
    const int64_t bh = t / chunks, c = t % chunks;
    const int64_t q0 = c * chunk;
    forward_chunk(qp, kp, vp, op, lp, s, scale, bh / s.H, bh % s.H, q0,
                  std::min(chunk, s.L - q0));
  });
}

ffi::Future Backward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                     ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::F32> out,
                     ffi::Buffer<ffi::F32> lse, ffi::Buffer<ffi::F32> dout,
                     ffi::ResultBuffer<ffi::F32> dq, ffi::ResultBuffer<ffi::F32> dk,
                     ffi::ResultBuffer<ffi::F32> dv, float scale) {
  const Shape s = shape_of(q, k);
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data(),
              *op = out.typed_data(), *lp = lse.typed_data(), *gp = dout.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  return run_tasks(pool, s.B * s.H, [=](int64_t t) {
    backward_head(qp, kp, vp, op, lp, gp, dqp, dkp, dvp, s, scale, t / s.H, t % s.H);
  });
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VideoLdmAttentionForward, Forward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(VideoLdmAttentionBackward, Backward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale"));
