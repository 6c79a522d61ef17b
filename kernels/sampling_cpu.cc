// Top-k, top-p and the draw of vesper_jax/sampling.py for CPU decoding, as one XLA FFI handler.
//
// For each row of float32 logits [R, V] (already penalised and divided by the temperature) and its
// uniform u in [0, 1), returns the token that sampling.py's 'search' filters and `_draw` choose:
//   top-k: keep every token whose logit is >= the k-th largest (k = 0 or k >= V: off);
//   top-p: with w = exp(logit - max) over the kept tokens, keep those with w >= the weight of the least
//          likely member of the smallest most-likely set holding >= p of the mass (p >= 1: off);
//   draw:  the first kept token, in index order, whose running weight exceeds u × the kept total; if
//          rounding leaves none above, the last kept token with weight > 0.
// Logits are compared through sampling._ordered_bits' keys (both zeros one key), so ties and -inf
// entries are kept or removed as the XLA code keeps them.
// XLA's 'search' finds each threshold in 32 passes over V (~0.6 ms a row at V = 16k on a CPU core); here
// one selection finds the k-th key (nth_element), and only the ~k kept weights are sorted for top-p.
// Without top-k, top-p sorts all V weights (correct, but slower than the search, so sampling.py leaves
// that setting to XLA). Rows are split over XLA's intra-op pool.
// Built by kernels/cpu_kernels.py; called through kernels/sampling_cpu_ffi.py.

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <vector>

#include "cpu_common.h"

namespace {

using namespace vesper;  // NOLINT: the shared helpers

// sampling._ordered_bits: a < b iff key(a) < key(b), both zeros one key.
inline uint32_t ordered_key(float x) {
  if (x == 0.f) x = 0.f;
  uint32_t i;
  std::memcpy(&i, &x, sizeof i);
  return (i >> 31) ? ~i : i | 0x80000000u;
}

// The weight of the nucleus' least likely member: the largest w such that the weights >= w sum to at
// least `mass` (sampling.top_p_filter). Sorts w. 0 (keep everything) when rounding leaves the whole
// mass short of it.
float nucleus_threshold(float* w, long m, double mass) {
  std::sort(w, w + m, std::greater<float>());
  double cumulative = 0.0;
  for (long j = 0; j < m; ++j) {
    cumulative += w[j];
    if (cumulative >= mass) return w[j];
  }
  return 0.f;
}

int32_t sample_row(const float* x, long V, float u, long k, float p, std::vector<uint32_t>& keys,
                   std::vector<int32_t>& kept, std::vector<float>& w, std::vector<float>& scratch) {
  // The k-th largest key; with k off, 0 keeps every key.
  uint32_t kth = 0;
  if (k > 0 && k < V) {
    for (long i = 0; i < V; ++i) keys[i] = ordered_key(x[i]);
    std::nth_element(keys.begin(), keys.begin() + (k - 1), keys.begin() + V, std::greater<uint32_t>());
    kth = keys[k - 1];
  }
  long m = 0;
  float top = -INFINITY;
  for (long i = 0; i < V; ++i) {
    if (ordered_key(x[i]) >= kth) {
      kept[m++] = int32_t(i);
      top = std::max(top, x[i]);
    }
  }
  double total = 0.0;
  for (long j = 0; j < m; ++j) {
    w[j] = std::exp(x[kept[j]] - top);  // -inf: 0
    total += w[j];
  }
  float threshold = 0.f;
  if (p < 1.f) {
    std::copy(w.begin(), w.begin() + m, scratch.begin());
    threshold = nucleus_threshold(scratch.data(), m, double(p) * total);
    total = 0.0;
    for (long j = 0; j < m; ++j) total += w[j] >= threshold ? w[j] : 0.f;
  }
  // No kept weight above 0 (every logit -inf): V - 1, as the XLA draw gives when V fills its blocks.
  const double target = double(u) * total;
  double running = 0.0;
  int32_t last = int32_t(V - 1);
  for (long j = 0; j < m; ++j) {
    if (w[j] > 0.f && w[j] >= threshold) {
      running += w[j];
      last = kept[j];
      if (running > target) return last;
    }
  }
  return last;
}

ffi::Error Sample(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> logits, ffi::Buffer<ffi::F32> uniforms,
                  int32_t top_k, float top_p, ffi::ResultBuffer<ffi::S32> tokens) {
  const auto d = logits.dimensions();
  if (d.size() < 1 || d.back() <= 0 || uniforms.element_count() * d.back() != logits.element_count())
    return ffi::Error::InvalidArgument("vesper sampling: expected logits [..., V] and one uniform per row");
  const long V = d.back(), R = uniforms.element_count();
  const float *xp = logits.typed_data(), *up = uniforms.typed_data();
  int32_t* out = tokens->typed_data();
  parallel_for(pool, R, [&](long r) {
    std::vector<uint32_t> keys(V);
    std::vector<int32_t> kept(V);
    std::vector<float> w(V), scratch(V);
    out[r] = sample_row(xp + r * V, V, up[r], top_k, top_p, keys, kept, w, scratch);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VesperSample, Sample,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<int32_t>("top_k")
                                  .Attr<float>("top_p")
                                  .Ret<ffi::Buffer<ffi::S32>>());
