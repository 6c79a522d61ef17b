// ERA (vesper_jax/era.py) for training on CPU: forward and backward as XLA FFI handlers.
//
// Per token (a row of F hidden units), with z = x / T, g = sigmoid(z):
//   e_j = softplus(z_j) - z_j g_j          (the binary entropy of gate j, nats)
//   H   = mean_j e_j / ln 2,   s = 1 + lambda H,   y_j = x_j g_j s.
// Backward, for dy:  dx_j = dy_j s (g_j + x_j g_j (1 - g_j) / T)
//                         + [not detached] lambda / (F ln 2) (sum_k dy_k x_k g_k) (-z_j g_j (1 - g_j) / T).
// XLA ran this as about ten passes over the [M, F] activations (its exp, log1p, the mean, the
// broadcasts, each through memory), ~110 ms of small's 8 x 256 step on two cores; here a row stays in
// L1 for its two passes. The backward recomputes g and e from x (no residual but x). Float32.
// Built by kernels/cpu_kernels.py; called through kernels/era_cpu_ffi.py.

#include <cmath>
#include <cstdint>

#include "cpu_common.h"

namespace {

using namespace vesper;  // NOLINT: the shared vector helpers

constexpr long kRowsPerItem = 32;
constexpr float kLn2 = 0.693147180559945309f;

// log(1 + e) for e in [0, 1], as 2 atanh(s) with s = e / (2 + e) in [0, 1/3]: an odd series in s,
// accurate to float32 rounding and without cancellation for tiny e (where it is ~e).
inline v16 vlog1p_unit(v16 e) {
  const v16 s = e / (e + 2.f), s2 = s * s;
  v16 p = splat(1.f / 17.f);
  p = p * s2 + 1.f / 15.f;
  p = p * s2 + 1.f / 13.f;
  p = p * s2 + 1.f / 11.f;
  p = p * s2 + 1.f / 9.f;
  p = p * s2 + 1.f / 7.f;
  p = p * s2 + 1.f / 5.f;
  p = p * s2 + 1.f / 3.f;
  p = p * s2 + 1.f;
  return 2.f * s * p;
}

struct Gate {
  v16 g, e;  // sigmoid(z) and the gate's binary entropy (nats)
};

inline Gate gate(v16 z) {
  const v16 abs_z = z < splat(0.f) ? -z : z;
  const v16 t = vexp(-abs_z);                 // in (0, 1]: no overflow for any z
  const v16 inv = 1.f / (1.f + t);
  const v16 g = z < splat(0.f) ? t * inv : inv;
  const v16 softplus = (z > splat(0.f) ? z : v16{}) + vlog1p_unit(t);
  return {g, softplus - z * g};
}

// body(a, b, n) over the vectors of one row of F floats (b may be null: zeros), its results stored in
// out unless out is null; the tail past the last whole vector is zero-padded, n its real lanes.
template <typename Body>
inline void for_vectors(long F, const float* a, const float* b, float* out, Body body) {
  long c = 0;
  for (; c + kLanes <= F; c += kLanes) {
    const v16 result = body(load(a + c), b ? load(b + c) : v16{}, kLanes);
    if (out) store(out + c, result);
  }
  if (c < F) {
    alignas(64) float ta[kLanes] = {}, tb[kLanes] = {}, to[kLanes];
    std::memcpy(ta, a + c, (F - c) * sizeof(float));
    if (b) std::memcpy(tb, b + c, (F - c) * sizeof(float));
    store(to, body(load(ta), load(tb), F - c));
    if (out) std::memcpy(out + c, to, (F - c) * sizeof(float));
  }
}

inline v16 lanes_below(long n) {
  v16 m;
  for (int i = 0; i < kLanes; ++i) m[i] = i < n ? 1.f : 0.f;
  return m;
}

void forward_rows(long r0, long r1, long F, const float* x, float* y, float temperature, float weight) {
  const float inv_t = 1.f / temperature;
  for (long r = r0; r < r1; ++r) {
    const float* xr = x + r * F;
    float* yr = y + r * F;
    v16 entropy = v16{};
    // Pass 1: y = x g (unscaled) and the entropy sum.
    for_vectors(F, xr, nullptr, yr, [&](v16 xv, v16, long n) {
      const Gate q = gate(xv * inv_t);
      entropy += q.e * lanes_below(n);
      return xv * q.g;
    });
    const float s = 1.f + weight * hsum(entropy) / (float(F) * kLn2);
    for (long c = 0; c < F; ++c) yr[c] *= s;
  }
}

void backward_rows(long r0, long r1, long F, const float* x, const float* dy, float* dx,
                   float temperature, float weight, bool detach) {
  const float inv_t = 1.f / temperature;
  for (long r = r0; r < r1; ++r) {
    const float *xr = x + r * F, *dyr = dy + r * F;
    float* dxr = dx + r * F;
    v16 entropy = v16{}, dy_base = v16{};
    // Pass 1: the entropy (for s) and sum_k dy_k x_k g_k (for the entropy's gradient).
    for_vectors(F, xr, dyr, nullptr, [&](v16 xv, v16 dyv, long n) {
      const Gate q = gate(xv * inv_t);
      const v16 valid = lanes_below(n);
      entropy += q.e * valid;
      dy_base += dyv * xv * q.g * valid;
      return v16{};
    });
    const float s = 1.f + weight * hsum(entropy) / (float(F) * kLn2);
    const float c = detach ? 0.f : weight * hsum(dy_base) / (float(F) * kLn2) * inv_t;
    // Pass 2: dx = dy s d(xg)/dx - c z g (1 - g).
    for_vectors(F, xr, dyr, dxr, [&](v16 xv, v16 dyv, long) {
      const v16 z = xv * inv_t;
      const v16 g = gate(z).g;
      return dyv * s * (g + xv * g * (1.f - g) * inv_t) - c * z * g * (1.f - g);
    });
  }
}

ffi::Error EraForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, float temperature, float weight,
                      ffi::ResultBuffer<ffi::F32> y) {
  const auto d = x.dimensions();
  if (d.size() != 2) return ffi::Error::InvalidArgument("vesper era: x must be [M, F]");
  const long M = d[0], F = d[1];
  const float* xp = x.typed_data();
  float* yp = y->typed_data();
  parallel_for(pool, (M + kRowsPerItem - 1) / kRowsPerItem, [&](long item) {
    forward_rows(item * kRowsPerItem, std::min(M, (item + 1) * kRowsPerItem), F, xp, yp, temperature, weight);
  });
  return ffi::Error::Success();
}

ffi::Error EraBackward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                       float temperature, float weight, int32_t detach, ffi::ResultBuffer<ffi::F32> dx) {
  const auto d = x.dimensions();
  if (d.size() != 2 || dy.element_count() != x.element_count())
    return ffi::Error::InvalidArgument("vesper era: x and dy must be [M, F]");
  const long M = d[0], F = d[1];
  const float *xp = x.typed_data(), *dyp = dy.typed_data();
  float* dxp = dx->typed_data();
  parallel_for(pool, (M + kRowsPerItem - 1) / kRowsPerItem, [&](long item) {
    backward_rows(item * kRowsPerItem, std::min(M, (item + 1) * kRowsPerItem), F, xp, dyp, dxp,
                  temperature, weight, detach != 0);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VesperEraForward, EraForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("temperature")
                                  .Attr<float>("weight")
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(VesperEraBackward, EraBackward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("temperature")
                                  .Attr<float>("weight")
                                  .Attr<int32_t>("detach")
                                  .Ret<ffi::Buffer<ffi::F32>>());
