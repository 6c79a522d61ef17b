// The softmax part of the fused head's training pass (vesper_jax/losses.py) as an XLA FFI handler.
//
// For one chunk of logits z [M, V] (float32), integer targets [M] and weights [M] (each token's share
// of the loss: its padding weight / the number of real targets), writes in place of z
//   dz = (softmax(z) - onehot(target)) * weight      (the gradient of the weighted mean nll)
// and per token nll = logsumexp(z) - z[target], the softmax's entropy, and correct = 1.0 where the
// target holds the largest logit. XLA computed these in five passes over the [M, V] chunk (64 MiB at
// small's 1,024 x 16,384), each through main memory; here each row (64 KiB) is read from memory once,
// stays in L2 for its other passes, and is written once. Rows are split over XLA's intra-op pool.
// Built by kernels/cpu_kernels.py; called through kernels/cross_entropy_cpu_ffi.py.

#include <cmath>
#include <cstdint>
#include <limits>

#include "cpu_common.h"

namespace {

using namespace vesper;  // NOLINT: the shared vector helpers

constexpr long kRowsPerItem = 16;

void rows(long r0, long r1, long V, float* z, const int32_t* targets, const float* weights, float* nll,
          float* entropy, float* correct) {
  const float inf = std::numeric_limits<float>::infinity();
  const long Vv = V / kLanes * kLanes;
  for (long r = r0; r < r1; ++r) {
    float* row = z + r * V;
    v16 m = splat(-inf);
    for (long c = 0; c < Vv; c += kLanes) {
      const v16 x = load(row + c);
      m = x > m ? x : m;
    }
    float mx = hmax(m);
    for (long c = Vv; c < V; ++c) mx = std::max(mx, row[c]);
    // As XLA's gather of the target logit: a negative id counts from the end, one out of range reads NaN
    // (and, as its one-hot, subtracts nothing from the gradient).
    const int32_t t = targets[r];
    const long wrapped = t < 0 ? t + V : t;
    const float target_shifted = (wrapped >= 0 && wrapped < V) ? row[wrapped] - mx
                                                               : std::numeric_limits<float>::quiet_NaN();
    // e = exp(z - max), in place; sum e and sum e * (z - max) for the entropy.
    v16 s = v16{}, es = v16{};
    for (long c = 0; c < Vv; c += kLanes) {
      const v16 x = load(row + c) - mx, e = vexp(x);
      s += e;
      es += e * x;
      store(row + c, e);
    }
    float sum = hsum(s), esum = hsum(es);
    for (long c = Vv; c < V; ++c) {
      const float x = row[c] - mx, e = std::exp(x);
      sum += e;
      esum += e * x;
      row[c] = e;
    }
    const float log_sum = std::log(sum), w = weights[r], scale = w / sum;
    nll[r] = log_sum - target_shifted;
    entropy[r] = log_sum - esum / sum;
    correct[r] = target_shifted >= 0.f ? 1.f : 0.f;
    for (long c = 0; c < Vv; c += kLanes) store(row + c, load(row + c) * scale);
    for (long c = Vv; c < V; ++c) row[c] *= scale;
    if (t >= 0 && t < V) row[t] -= w;
  }
}

ffi::Error SoftmaxCrossEntropy(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> z, ffi::Buffer<ffi::S32> targets,
                               ffi::Buffer<ffi::F32> weights, ffi::ResultBuffer<ffi::F32> dz,
                               ffi::ResultBuffer<ffi::F32> nll, ffi::ResultBuffer<ffi::F32> entropy,
                               ffi::ResultBuffer<ffi::F32> correct) {
  const auto zd = z.dimensions();
  if (zd.size() != 2 || targets.element_count() != zd[0] || weights.element_count() != zd[0])
    return ffi::Error::InvalidArgument("vesper cross entropy: z [M, V], targets [M], weights [M]");
  const long M = zd[0], V = zd[1];
  float* out = dz->typed_data();
  if (out != z.typed_data()) std::memcpy(out, z.typed_data(), M * V * sizeof(float));  // not aliased
  const int32_t* tp = targets.typed_data();
  const float* wp = weights.typed_data();
  float *np_ = nll->typed_data(), *ep = entropy->typed_data(), *cp = correct->typed_data();
  parallel_for(pool, (M + kRowsPerItem - 1) / kRowsPerItem, [&](long item) {
    rows(item * kRowsPerItem, std::min(M, (item + 1) * kRowsPerItem), V, out, tp, wp, np_, ep, cp);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VesperSoftmaxCrossEntropy, SoftmaxCrossEntropy,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
