// Causal softmax attention for training on CPU: forward and backward as XLA FFI handlers.
//
// Built and registered at run time by kernels/cpu_kernels.py (g++, -march=native); called through
// kernels/attention_cpu_ffi.py from vesper_jax/attention_cpu.py. Why a kernel: XLA:CPU runs the per-head
// attention products as small batched dots on one thread at a fraction of the matmul rate, and compiles
// one fusion per block (README, "CPU train step"). Here one work item is one (sequence, key/value head): its G query heads,
// all query blocks, and (backward) its own dK, dV sums, so items never write the same memory and run on
// XLA's intra-op thread pool.
//
// Layouts are the model's: q, out, dq [B, T, N, H]; k, v, dk, dv [B, T, K, H]; mask [B, T] (0 = padding,
// never attended to); lse [B, N, T], the log-sum-exp of each query's scaled scores (+inf where a query
// sees no key: its output and gradients are zero). H must be a multiple of 16 (one vector of floats).
// Float32 throughout. The backward pass recomputes the scores from q, k and lse (FlashAttention's).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "cpu_common.h"

namespace {

using namespace vesper;  // NOLINT: the shared vector helpers

constexpr int kQueryBlock = 32;  // query rows per block: the block's scores stay in L2 up to T = 2048

// C[i, j] (+)= sum_k A[i*am + k*ak] * B[k*ldb + j] for i < M, j < N, k < D; N a multiple of 16.
// A register tile of MR rows x NV vectors: 6 x 4 holds 24 accumulators of AVX-512's 32 registers.
template <int MR, int NV>
inline void tile(long D, const float* A, long am, long ak, const float* B, long ldb, float* C, long ldc,
                 bool add) {
  v16 acc[MR][NV];
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) acc[i][j] = add ? load(C + i * ldc + j * kLanes) : v16{};
  for (long k = 0; k < D; ++k) {
    v16 b[NV];
    for (int j = 0; j < NV; ++j) b[j] = load(B + k * ldb + j * kLanes);
    for (int i = 0; i < MR; ++i) {
      const v16 a = splat(A[i * am + k * ak]);
      for (int j = 0; j < NV; ++j) acc[i][j] += a * b[j];
    }
  }
  for (int i = 0; i < MR; ++i)
    for (int j = 0; j < NV; ++j) store(C + i * ldc + j * kLanes, acc[i][j]);
}

template <int NV>
void tile_rows(long M, long D, const float* A, long am, long ak, const float* B, long ldb, float* C,
               long ldc, bool add) {
  long i = 0;
  for (; i + 6 <= M; i += 6) tile<6, NV>(D, A + i * am, am, ak, B, ldb, C + i * ldc, ldc, add);
  const float* a = A + i * am;
  float* c = C + i * ldc;
  switch (M - i) {
    case 5: tile<5, NV>(D, a, am, ak, B, ldb, c, ldc, add); break;
    case 4: tile<4, NV>(D, a, am, ak, B, ldb, c, ldc, add); break;
    case 3: tile<3, NV>(D, a, am, ak, B, ldb, c, ldc, add); break;
    case 2: tile<2, NV>(D, a, am, ak, B, ldb, c, ldc, add); break;
    case 1: tile<1, NV>(D, a, am, ak, B, ldb, c, ldc, add); break;
    default: break;
  }
}

void gemm(long M, long N, long D, const float* A, long am, long ak, const float* B, long ldb, float* C,
          long ldc, bool add) {
  if (M <= 0) return;
  if (D <= 0) {  // an empty sum
    if (!add)
      for (long i = 0; i < M; ++i) std::fill(C + i * ldc, C + i * ldc + N, 0.f);
    return;
  }
  long j = 0;
  for (; j + 4 * kLanes <= N; j += 4 * kLanes) tile_rows<4>(M, D, A, am, ak, B + j, ldb, C + j, ldc, add);
  for (; j + 2 * kLanes <= N; j += 2 * kLanes) tile_rows<2>(M, D, A, am, ak, B + j, ldb, C + j, ldc, add);
  for (; j < N; j += kLanes) tile_rows<1>(M, D, A, am, ak, B + j, ldb, C + j, ldc, add);
}

// S[i, :] = q_i . (keys as columns of KT) for the rows [r0, r0 + rows) of one query head, each row tile
// only up to the columns its last row can see (its position, rounded up to a vector).
void causal_scores(long r0, long rows, long H, const float* q, long ldq, const float* kt, long ldk,
                   float* s, long lds) {
  for (long i = 0; i < rows; i += 6) {
    const long mr = std::min(6L, rows - i);
    gemm(mr, std::min(ldk, round_up(r0 + i + mr)), H, q + i * ldq, ldq, 1, kt, ldk, s + i * lds, lds,
         false);
  }
}

struct Dims {
  long B, T, N, K, H, G, Tp;  // Tp: T rounded up to a vector, the row length of the score buffers
  float scale;
};

Dims dims_of(const ffi::Buffer<ffi::F32>& q, const ffi::Buffer<ffi::F32>& k, float scale) {
  const auto qd = q.dimensions(), kd = k.dimensions();
  Dims d{qd[0], qd[1], qd[2], kd[2], qd[3], qd[2] / kd[2], round_up(qd[1]), scale};
  return d;
}

ffi::Error check(const Dims& d, const ffi::Buffer<ffi::F32>& k, const ffi::Buffer<ffi::S32>& mask) {
  const auto kd = k.dimensions(), md = mask.dimensions();
  if (kd.size() != 4 || kd[0] != d.B || kd[1] != d.T || kd[3] != d.H || d.K == 0 || d.N % d.K != 0)
    return ffi::Error::InvalidArgument("vesper attention: k/v must be [B, T, K, H] with N % K == 0");
  if (md.size() != 2 || md[0] != d.B || md[1] != d.T)
    return ffi::Error::InvalidArgument("vesper attention: mask must be [B, T]");
  if (d.H % kLanes != 0) return ffi::Error::InvalidArgument("vesper attention: H must be a multiple of 16");
  return ffi::Error::Success();
}

// The keys (or values) of one (sequence, kv head) as columns: out[h * Tp + s], zero past T.
void transpose_head(const Dims& d, const float* x, long b, long kh, float* out) {
  std::fill(out, out + d.H * d.Tp, 0.f);
  for (long s = 0; s < d.T; ++s) {
    const float* row = x + ((b * d.T + s) * d.K + kh) * d.H;
    for (long h = 0; h < d.H; ++h) out[h * d.Tp + s] = row[h];
  }
}

// The probabilities of rows [r0, r0 + rows) in place of their raw scores s, up to column `cols`: a
// visible key (not padding, not after the query) gets e^(scale * s - base), the others 0. Backward:
// base = lse_in, so they come out normalised. Forward (lse_in null): base = the row's max, one exp per
// score, and the row's log-sum-exp and 1 / sum go to lse_out and inv_sum (the caller scales the output
// rows: H divisions instead of a pass over the row). A row that sees no key gets lse = +inf, p = 0 and
// inv_sum = 0: a zero output, and zero gradients.
void probabilities(const Dims& d, long r0, long rows, long cols, const float* key_ok, float* s, long lds,
                   const float* lse_in, float* lse_out, float* inv_sum) {
  const v16 iota = [] { v16 v; for (int i = 0; i < kLanes; ++i) v[i] = float(i); return v; }();
  const float inf = std::numeric_limits<float>::infinity();
  for (long i = 0; i < rows; ++i) {
    const long r = r0 + i, seen = round_up(r + 1);  // columns that hold scores for this row
    const v16 last = splat(float(r));
    float* row = s + i * lds;
    float base;
    if (lse_in) {
      base = lse_in[i];
    } else {
      v16 m = splat(-inf);
      for (long c = 0; c < seen; c += kLanes) {
        const auto visible = (iota + float(c) <= last) & (load(key_ok + c) > splat(0.f));
        const v16 x = load(row + c) * d.scale;
        m = visible ? (x > m ? x : m) : m;
      }
      base = hmax(m);
    }
    const bool none = base == -inf || base == inf;
    v16 sum = v16{};
    for (long c = 0; c < seen; c += kLanes) {
      const auto visible = (iota + float(c) <= last) & (load(key_ok + c) > splat(0.f));
      const v16 p = none ? v16{} : (visible ? vexp(load(row + c) * d.scale - base) : v16{});
      store(row + c, p);
      sum += p;
    }
    std::fill(row + seen, row + cols, 0.f);
    if (!lse_in) {
      const float total = hsum(sum);
      lse_out[i] = none ? inf : base + std::log(total);
      inv_sum[i] = none ? 0.f : 1.f / total;
    }
  }
}

void key_mask(const Dims& d, const int32_t* mask, long b, float* key_ok) {
  for (long s = 0; s < d.Tp; ++s) key_ok[s] = (s < d.T && mask[b * d.T + s] != 0) ? 1.f : 0.f;
}

void forward_item(const Dims& d, long item, const float* q, const float* k, const float* v,
                  const int32_t* mask, float* out, float* lse) {
  const long b = item / d.K, kh = item % d.K, ldq = d.N * d.H, ldk = d.K * d.H;
  std::vector<float> kt(d.H * d.Tp), key_ok(d.Tp), s(kQueryBlock * d.Tp), inv_sum(kQueryBlock);
  transpose_head(d, k, b, kh, kt.data());
  key_mask(d, mask, b, key_ok.data());
  const float* v_b = v + (b * d.T * d.K + kh) * d.H;
  for (long g = 0; g < d.G; ++g) {
    const long n = kh * d.G + g;
    for (long r0 = 0; r0 < d.T; r0 += kQueryBlock) {
      const long rows = std::min<long>(kQueryBlock, d.T - r0), end = r0 + rows;
      const float* q_r = q + ((b * d.T + r0) * d.N + n) * d.H;
      float* out_r = out + ((b * d.T + r0) * d.N + n) * d.H;
      causal_scores(r0, rows, d.H, q_r, ldq, kt.data(), d.Tp, s.data(), d.Tp);
      probabilities(d, r0, rows, round_up(end), key_ok.data(), s.data(), d.Tp, nullptr,
                    lse + (b * d.N + n) * d.T + r0, inv_sum.data());
      gemm(rows, d.H, end, s.data(), d.Tp, 1, v_b, ldk, out_r, ldq, false);
      for (long i = 0; i < rows; ++i)
        for (long h = 0; h < d.H; h += kLanes)
          store(out_r + i * ldq + h, load(out_r + i * ldq + h) * inv_sum[i]);
    }
  }
}

void backward_item(const Dims& d, long item, const float* q, const float* k, const float* v,
                   const int32_t* mask, const float* out, const float* lse, const float* dout, float* dq,
                   float* dk, float* dv) {
  const long b = item / d.K, kh = item % d.K, ldq = d.N * d.H, ldk = d.K * d.H;
  std::vector<float> kt(d.H * d.Tp), vt(d.H * d.Tp), key_ok(d.Tp), p(kQueryBlock * d.Tp),
      ds(kQueryBlock * d.Tp), delta(kQueryBlock), dk_acc(d.T * d.H, 0.f), dv_acc(d.T * d.H, 0.f);
  transpose_head(d, k, b, kh, kt.data());
  transpose_head(d, v, b, kh, vt.data());
  key_mask(d, mask, b, key_ok.data());
  const float* k_b = k + (b * d.T * d.K + kh) * d.H;
  for (long g = 0; g < d.G; ++g) {
    const long n = kh * d.G + g;
    for (long r0 = 0; r0 < d.T; r0 += kQueryBlock) {
      const long rows = std::min<long>(kQueryBlock, d.T - r0), end = r0 + rows, cols = round_up(end);
      const long at = (b * d.T + r0) * d.N + n;
      const float *q_r = q + at * d.H, *out_r = out + at * d.H, *dout_r = dout + at * d.H;
      causal_scores(r0, rows, d.H, q_r, ldq, kt.data(), d.Tp, p.data(), d.Tp);
      probabilities(d, r0, rows, cols, key_ok.data(), p.data(), d.Tp, lse + (b * d.N + n) * d.T + r0,
                    nullptr, nullptr);
      // dP = dout . v^T, then dS = P (dP - delta) * scale, delta = sum_h dout * out (= sum_s P dP).
      causal_scores(r0, rows, d.H, dout_r, ldq, vt.data(), d.Tp, ds.data(), d.Tp);
      for (long i = 0; i < rows; ++i) {
        v16 acc = v16{};
        for (long h = 0; h < d.H; h += kLanes)
          acc += load(dout_r + i * ldq + h) * load(out_r + i * ldq + h);
        const v16 dl = splat(hsum(acc));
        float *pr = p.data() + i * d.Tp, *dsr = ds.data() + i * d.Tp;
        const long seen = round_up(r0 + i + 1);
        for (long c = 0; c < seen; c += kLanes)
          store(dsr + c, load(pr + c) * (load(dsr + c) - dl) * d.scale);
        std::fill(dsr + seen, dsr + cols, 0.f);
      }
      // dv[s] += sum_i P[i, s] dout_i; dk[s] += sum_i dS[i, s] q_i; dq_i = sum_s dS[i, s] k_s.
      gemm(end, d.H, rows, p.data(), 1, d.Tp, dout_r, ldq, dv_acc.data(), d.H, true);
      gemm(end, d.H, rows, ds.data(), 1, d.Tp, q_r, ldq, dk_acc.data(), d.H, true);
      gemm(rows, d.H, end, ds.data(), d.Tp, 1, k_b, ldk, dq + at * d.H, ldq, false);
    }
  }
  for (long s = 0; s < d.T; ++s) {
    const long at = ((b * d.T + s) * d.K + kh) * d.H;
    std::memcpy(dk + at, dk_acc.data() + s * d.H, d.H * sizeof(float));
    std::memcpy(dv + at, dv_acc.data() + s * d.H, d.H * sizeof(float));
  }
}

ffi::Error AttentionForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                            ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> mask, float scale,
                            ffi::ResultBuffer<ffi::F32> out, ffi::ResultBuffer<ffi::F32> lse) {
  const Dims d = dims_of(q, k, scale);
  if (ffi::Error e = check(d, k, mask); e.failure()) return e;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data();
  const int32_t* mp = mask.typed_data();
  float *op = out->typed_data(), *lp = lse->typed_data();
  parallel_for(pool, d.B * d.K, [&](long item) { forward_item(d, item, qp, kp, vp, mp, op, lp); });
  return ffi::Error::Success();
}

ffi::Error AttentionBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                             ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::S32> mask,
                             ffi::Buffer<ffi::F32> out, ffi::Buffer<ffi::F32> lse,
                             ffi::Buffer<ffi::F32> dout, float scale, ffi::ResultBuffer<ffi::F32> dq,
                             ffi::ResultBuffer<ffi::F32> dk, ffi::ResultBuffer<ffi::F32> dv) {
  const Dims d = dims_of(q, k, scale);
  if (ffi::Error e = check(d, k, mask); e.failure()) return e;
  const float *qp = q.typed_data(), *kp = k.typed_data(), *vp = v.typed_data(), *op = out.typed_data(),
              *lp = lse.typed_data(), *gp = dout.typed_data();
  const int32_t* mp = mask.typed_data();
  float *dqp = dq->typed_data(), *dkp = dk->typed_data(), *dvp = dv->typed_data();
  parallel_for(pool, d.B * d.K, [&](long item) {
    backward_item(d, item, qp, kp, vp, mp, op, lp, gp, dqp, dkp, dvp);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VesperAttentionForward, AttentionForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(VesperAttentionBackward, AttentionBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("scale")
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
