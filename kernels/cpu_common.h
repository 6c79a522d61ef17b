// Shared by the CPU kernels (kernels/*.cc): 16-float vectors, a vectorisable
// exp, and a parallel loop on XLA's intra-op thread pool. Built by kernels/cpu_kernels.py.
#ifndef VESPER_KERNELS_CPU_COMMON_H_
#define VESPER_KERNELS_CPU_COMMON_H_

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace vesper {

namespace ffi = xla::ffi;

inline constexpr int kLanes = 16;      // floats per vector (AVX-512; GCC splits them on narrower machines)
typedef float v16 __attribute__((vector_size(64)));
typedef int32_t v16i __attribute__((vector_size(64)));

inline v16 load(const float* p) { v16 v; std::memcpy(&v, p, sizeof v); return v; }
inline void store(float* p, v16 v) { std::memcpy(p, &v, sizeof v); }
// Element by element, so that GCC emits one vbroadcastss (from memory): `v16{} + x` cost a scalar add
// of 0.0 (not an identity for -0.0 under strict IEEE) before every broadcast of the GEMM's inner loop.
inline v16 splat(float x) { return v16{x, x, x, x, x, x, x, x, x, x, x, x, x, x, x, x}; }
inline long round_up(long x) { return (x + kLanes - 1) / kLanes * kLanes; }

inline float hmax(v16 v) {
  float m = v[0];
  for (int i = 1; i < kLanes; ++i) m = std::max(m, v[i]);
  return m;
}
inline float hsum(v16 v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v[i];
  return s;
}

// exp(x) for x <= ~0 (Cephes' expf: x = n ln2 + r, |r| <= ln2/2, a degree-6 polynomial for e^r, 2^n
// put in the exponent bits): ~1 ulp, and a loop of it vectorises, which std::exp's does not without
// -ffast-math. Below -87 it returns ~1e-38 instead of underflowing to 0; callers zero masked entries.
inline v16 vexp(v16 x) {
  x = x < splat(-87.f) ? splat(-87.f) : x;
  const v16 n = (x * 1.44269504088896341f + 12582912.f) - 12582912.f;  // round(x / ln2)
  v16 r = x - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  v16 p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const v16i bits = (__builtin_convertvector(n, v16i) + 127) << 23;
  v16 two_n;
  std::memcpy(&two_n, &bits, sizeof two_n);
  return p * two_n;
}

// Runs fn(0) .. fn(n - 1) on the calling thread and XLA's intra-op pool. Items are claimed from a shared
// counter, so a pool task that starts late (its thread busy elsewhere) finds nothing left and returns
// without touching fn: the caller never waits for a task to start, only for claimed items to finish.
template <typename F>
void parallel_for(ffi::ThreadPool& pool, long n, F&& fn) {
  struct State {
    std::atomic<long> next{0}, done{0};
  };
  auto state = std::make_shared<State>();
  auto work = [state, n, &fn] {
    for (long i; (i = state->next.fetch_add(1)) < n;) {
      fn(i);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  const long helpers = std::min<long>(pool.num_threads(), n - 1);
  for (long t = 0; t < helpers; ++t) pool.Schedule([work] { work(); });
  work();
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

}  // namespace vesper

#endif  // VESPER_KERNELS_CPU_COMMON_H_
