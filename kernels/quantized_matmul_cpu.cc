// Weight-only int8 / int4 projections for decoding on CPU (vesper_jax/quantize.py): y = x · dequant(w),
// with the dequantization done in registers, so each weight byte is read once per call.
//
// Decoding is memory-bound: a step reads every weight once for a few rows of x. XLA's formulation of
// the same product (dequantize, then dot) writes a float copy of the weights and reads it back, so the
// integers save memory but no time. Here the weight rows stream past once: each 8 int8 values (or 8
// packed int4 pairs) are widened to float in registers and multiplied into the sums, and the scales come
// in once at the end (int8) or once per group (int4):
//   int8: y[m, o] = s[o] · sum_i x[m, i] q[i, o]
//   int4: y[m, o] = sum_g ( s[g, o] · sum_{i in g} x[m, i] q[i, o]  +  m[g, o] · sum_{i in g} x[m, i] )
// Layouts are quantize.py's: q int8 [I, O]; int4 packed uint8 [I/2, O], input row 2j in the low nibble of
// byte row j and 2j + 1 in the high one; scales [O] (int8) or [G, O] with mins [G, O] (int4). x and y
// float32 [M, I] and [M, O]; the bias is added by the caller. Large weights split their columns among
// XLA's intra-op threads. Built by kernels/cpu_kernels.py; called through
// kernels/quantized_matmul_cpu_ffi.py.

#include <cstdint>
#include <cstring>
#include <vector>

#ifdef __AVX2__
#include <immintrin.h>
#endif

#include "cpu_common.h"

namespace {

using namespace vesper;  // NOLINT: the shared helpers

// 8 floats: one AVX2 register.
typedef float v8 __attribute__((vector_size(32)));
typedef int32_t v8i __attribute__((vector_size(32)));

inline v8 load8(const float* p) { v8 v; std::memcpy(&v, p, sizeof v); return v; }
inline void store8(float* p, v8 v) { std::memcpy(p, &v, sizeof v); }
inline v8 splat8(float x) { return v8{x, x, x, x, x, x, x, x}; }
// 8 int8 → 8 floats, 8 uint8 → 8 int32. GCC scalarises __builtin_convertvector from 8-byte vectors
// (a vpinsrd per byte, 5x slower), so on AVX2 these are its two instructions (vpmovsxbd / vpmovzxbd
// from memory); elsewhere plain loops.
#ifdef __AVX2__
inline v8 widen_s8(const int8_t* p) {
  const __m256i w = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
  return reinterpret_cast<v8>(_mm256_cvtepi32_ps(w));
}
inline v8i widen_u8(const uint8_t* p) {
  return reinterpret_cast<v8i>(_mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
#else
inline v8 widen_s8(const int8_t* p) {
  v8 v;
  for (int k = 0; k < 8; ++k) v[k] = float(p[k]);
  return v;
}
inline v8i widen_u8(const uint8_t* p) {
  v8i v;
  for (int k = 0; k < 8; ++k) v[k] = p[k];
  return v;
}
#endif

// Rows of the weight are read front to back (a few at a time, R), each across the item's columns, with
// the sums kept in the output rows (int8) or in a group buffer (int4), in L1/L2: every weight row is
// one long contiguous run, which the hardware prefetchers stream. (Blocks of columns walked down all
// the rows, with the sums in registers, read one cache line per row at a stride of O bytes and ran at
// half the speed.) Each weight vector is widened once and used for every row of x.

// One decoding sequence (M = 1) asks for the cache line of each of the next R rows as it enters a line
// of the current ones, a band ahead: the hardware prefetchers follow each row's stream, but late for R
// interleaved streams, and a chain of small's int8 projections ran 1.6x faster with it (in the L3) and
// medium's 1.14x (from DRAM), in one process against the same code without.
constexpr long kLine = 64;

template <int R, typename T>
inline void prefetch_rows(const T* p, long stride) {
  for (int r = 0; r < R; ++r) __builtin_prefetch(p + r * stride);
}

// out[m, c .. c+8) += sum_r x[m, i+r] · w_r for the R widened weight vectors w_r of rows i .. i+R, for
// several rows of x (M > 1): the broadcasts of x are redone per vector (out may alias nothing, but the
// compiler cannot know); decoding one sequence takes the loops' M = 1 branches below instead, with the
// broadcasts hoisted: 4 widened rows then cost 4 loads, 4 conversions, 4 FMAs and one load and store.
template <int R>
inline void accumulate(long M, const float* x, long x_stride, long i, const v8* w, float* out,
                       long out_stride, long c) {
  for (long m = 0; m < M; ++m) {
    const float* xm = x + m * x_stride + i;
    v8 a = load8(out + m * out_stride + c);
    for (int r = 0; r < R; ++r) a += splat8(xm[r]) * w[r];
    store8(out + m * out_stride + c, a);
  }
}

// y[:, c0:c1) += x[:, i0:i1) · q[i0:i1, c0:c1) (unscaled int8), R rows at a time.
template <int R>
void int8_rows(long M, const float* x, long I, long i0, long i1, const int8_t* q, long O, long c0, long c1,
               float* y) {
  for (long i = i0; i + R <= i1; i += R) {
    long c = c0;
    if (M == 1) {
      v8 xs[R];
      for (int r = 0; r < R; ++r) xs[r] = splat8(x[i + r]);
      for (; c + 8 <= c1; c += 8) {
        if (c % kLine == 0) prefetch_rows<R>(q + (i + R) * O + c, O);
        v8 a = load8(y + c);
        for (int r = 0; r < R; ++r) a += xs[r] * widen_s8(q + (i + r) * O + c);
        store8(y + c, a);
      }
    }
    for (; c + 8 <= c1; c += 8) {
      v8 w[R];
      for (int r = 0; r < R; ++r) w[r] = widen_s8(q + (i + r) * O + c);
      accumulate<R>(M, x, I, i, w, y, O, c);
    }
    for (; c < c1; ++c)
      for (long m = 0; m < M; ++m)
        for (int r = 0; r < R; ++r) y[m * O + c] += x[m * I + i + r] * float(q[(i + r) * O + c]);
  }
}

// acc[:, 0:c1-c0) += the int4 product of input rows 2 j0 .. 2 j1 (byte rows j0 .. j1), R byte rows at a time.
template <int R>
void int4_rows(long M, const float* x, long I, long j0, long j1, const uint8_t* packed, long O, long c0,
               long c1, float* acc, long W) {
  for (long j = j0; j + R <= j1; j += R) {
    long c = c0;
    if (M == 1) {
      v8 xs[2 * R];
      for (int r = 0; r < 2 * R; ++r) xs[r] = splat8(x[2 * j + r]);
      for (; c + 8 <= c1; c += 8) {
        if (c % kLine == 0) prefetch_rows<R>(packed + (j + R) * O + c, O);
        v8 a = load8(acc + c - c0);
        for (int r = 0; r < R; ++r) {
          const v8i b = widen_u8(packed + (j + r) * O + c);
          a += xs[2 * r] * __builtin_convertvector(b & 15, v8);
          a += xs[2 * r + 1] * __builtin_convertvector(b >> 4, v8);
        }
        store8(acc + c - c0, a);
      }
    }
    for (; c + 8 <= c1; c += 8) {
      v8 w[2 * R];  // input rows 2j, 2j+1, 2j+2, ...: the low then the high nibble of each byte row
      for (int r = 0; r < R; ++r) {
        const v8i b = widen_u8(packed + (j + r) * O + c);
        w[2 * r] = __builtin_convertvector(b & 15, v8);
        w[2 * r + 1] = __builtin_convertvector(b >> 4, v8);
      }
      accumulate<2 * R>(M, x, I, 2 * j, w, acc, W, c - c0);
    }
    for (; c < c1; ++c)
      for (long m = 0; m < M; ++m)
        for (int r = 0; r < R; ++r) {
          const uint8_t b = packed[(j + r) * O + c];
          const float* xm = x + m * I + 2 * (j + r);
          acc[m * W + c - c0] += xm[0] * float(b & 15) + xm[1] * float(b >> 4);
        }
  }
}

// Several rows of x (M > kRowSplitMaxRows: batched decode steps, short prefills) are a small GEMM, and
// the streaming loops above would load and store every row's sums once per weight vector. Instead, as
// a GEMM packs its operand: a panel of kPanel columns is dequantized once into floats (I x 16, 128 KB at
// I = 2048: it stays in L2), then each band of up to 6 rows of x runs down it with its 6 x 16 sums in
// registers, so a weight costs one widening for all M rows and each FMA one broadcast.
constexpr long kPanel = 16;
constexpr int kMaxBand = 6;  // rows of x per pass down a panel
constexpr long kRowSplitMaxRows = 4;  // up to this many rows of x: the streaming loops above

template <int MR>
void panel_product(long I, const float* x, long m0, const float* panel, float* out, long out_stride) {
  v8 acc[MR][2] = {};
  for (long i = 0; i < I; ++i) {
    const v8 w0 = load8(panel + i * kPanel), w1 = load8(panel + i * kPanel + 8);
    for (int r = 0; r < MR; ++r) {
      const v8 xb = splat8(x[(m0 + r) * I + i]);
      acc[r][0] += xb * w0;
      acc[r][1] += xb * w1;
    }
  }
  for (int r = 0; r < MR; ++r) {
    store8(out + r * out_stride, acc[r][0]);
    store8(out + r * out_stride + 8, acc[r][1]);
  }
}

// y[:, c0:c1) = x · panel for every row of x, panel after panel; dequantize(c, panel) fills the I x 16
// floats of columns c .. c+16 (zeros past O).
// Rows m .. m + MR of y[:, c .. c + width) = x · panel, through `tail` when the panel is the last, narrow
// one.
template <int MR>
void panel_rows(long I, const float* x, long m, const float* panel, float* y, long O, long c, long width,
                float* tail) {
  if (width == kPanel) {
    panel_product<MR>(I, x, m, panel, y + m * O + c, O);
    return;
  }
  panel_product<MR>(I, x, m, panel, tail, kPanel);
  for (int r = 0; r < MR; ++r) std::copy(tail + r * kPanel, tail + r * kPanel + width, y + (m + r) * O + c);
}

// y[:, c0:c1) = x · panel for every row of x, panel after panel; dequantize(c, panel) fills the I x 16
// floats of columns c .. c+16 (zeros past O). Rows go 6 at a time (12 sums + 2 weight vectors + the
// broadcast: 15 of AVX2's 16 registers; 6 rows ran a chain of small's projections at 32 rows 1.25x
// faster than 4), the last few in one band of their own.
template <typename D>
void panel_columns(long M, const float* x, long I, long O, long c0, long c1, float* y, D&& dequantize) {
  std::vector<float> panel(I * kPanel);
  float tail[kMaxBand * kPanel];
  for (long c = c0; c < c1; c += kPanel) {
    const long width = std::min(kPanel, c1 - c);
    dequantize(c, panel.data());
    long m = 0;
    for (; m + kMaxBand <= M; m += kMaxBand)
      panel_rows<kMaxBand>(I, x, m, panel.data(), y, O, c, width, tail);
    switch (M - m) {
      case 5: panel_rows<5>(I, x, m, panel.data(), y, O, c, width, tail); break;
      case 4: panel_rows<4>(I, x, m, panel.data(), y, O, c, width, tail); break;
      case 3: panel_rows<3>(I, x, m, panel.data(), y, O, c, width, tail); break;
      case 2: panel_rows<2>(I, x, m, panel.data(), y, O, c, width, tail); break;
      case 1: panel_rows<1>(I, x, m, panel.data(), y, O, c, width, tail); break;
      default: break;
    }
  }
}

// The panels' dequantization, column c's 16 (or the last few) weights of every input row: q · s (int8),
// q · s[g] + m[g] (int4, low nibble then high nibble of each byte row).
void int8_panel(const int8_t* q, const float* s, long I, long O, long c, float* panel) {
  if (c + kPanel <= O) {
    const v8 s0 = load8(s + c), s1 = load8(s + c + 8);
    for (long i = 0; i < I; ++i) {
      store8(panel + i * kPanel, widen_s8(q + i * O + c) * s0);
      store8(panel + i * kPanel + 8, widen_s8(q + i * O + c + 8) * s1);
    }
    return;
  }
  for (long i = 0; i < I; ++i)
    for (long k = 0; k < kPanel; ++k)
      panel[i * kPanel + k] = c + k < O ? float(q[i * O + c + k]) * s[c + k] : 0.f;
}

void int4_panel(const uint8_t* packed, const float* s, const float* mn, long I, long O, long G, long c,
                float* panel) {
  for (long j = 0; j < I / 2; ++j) {
    const long g = 2 * j / G;
    float* lo = panel + 2 * j * kPanel;
    float* hi = lo + kPanel;
    if (c + kPanel <= O) {
      for (long h = 0; h < kPanel; h += 8) {
        const v8i b = widen_u8(packed + j * O + c + h);
        const v8 sg = load8(s + g * O + c + h), mg = load8(mn + g * O + c + h);
        store8(lo + h, __builtin_convertvector(b & 15, v8) * sg + mg);
        store8(hi + h, __builtin_convertvector(b >> 4, v8) * sg + mg);
      }
    } else {
      for (long k = 0; k < kPanel; ++k) {
        const bool in = c + k < O;
        const uint8_t b = in ? packed[j * O + c + k] : 0;
        const float sg = in ? s[g * O + c + k] : 0.f, mg = in ? mn[g * O + c + k] : 0.f;
        lo[k] = float(b & 15) * sg + mg;
        hi[k] = float(b >> 4) * sg + mg;
      }
    }
  }
}

// How a product is split among XLA's intra-op threads (the calling thread and the pool).
//
// A decode step (a few rows of x) splits the weight's rows (the reduction): each work item streams one
// contiguous band of whole weight rows into sums of its own, [M, O], added up at the end. Every thread
// then reads one long run of memory that the prefetchers follow, which matters once the weights are
// larger than the last-level cache (medium's int8 weights are 110 MB): with the columns split instead,
// each thread read a few hundred bytes of a row, then jumped a row ahead, and a chain of medium's
// projections streamed 7.2 G weights/s against 15-19 for one cached matrix. The partial sums cost
// items x M x O floats, so larger M (up to KERNEL_MAX_ROWS, short prefills) split the columns, where each
// weight is reused M times and the stride matters less.
//
// Items: at most two per thread, so a thread held up elsewhere (the CPU is shared) leaves its second to
// the others, and none smaller than kItemWeights weights: waking the pool's threads costs more than they
// save on small products. On this project's 2-core VM, small's projections (0.15-0.39 M weights) ran
// 1.0-1.6x faster on the calling thread alone than split (in one-process A/B chains of all of a step's
// projections), medium's (0.59-1.6 M) 1.03-1.09x faster split, and both heads (6.3 and 12.6 M) split.
// Column pieces are at least kMinWidth wide: narrower ones (64 or 128) were slower on average and far
// noisier, each thread streaming short rows.
constexpr long kItemWeights = 1L << 18;
constexpr long kMinWidth = 256;

long item_count(ffi::ThreadPool& pool, long weights) {
  return std::max(1L, std::min(2 * (pool.num_threads() + 1), weights / kItemWeights));
}

// fn(c0, c1) over column pieces of the O columns.
template <typename F>
void for_column_items(ffi::ThreadPool& pool, long O, long weights, F&& fn) {
  const long n = item_count(pool, weights);
  long width = (O + n - 1) / n;
  width = std::max(kMinWidth, (width + kPanel - 1) / kPanel * kPanel);
  const long items = (O + width - 1) / width;
  parallel_for(pool, items, [&](long item) { fn(item * width, std::min(O, (item + 1) * width)); });
}

// fn(r0, r1, sums) over bands of the R rows (multiples of `align` but the last), each adding into its own
// zeroed [M, O] sums; returns them, items x [M, O].
template <typename F>
std::vector<float> for_row_items(ffi::ThreadPool& pool, long R, long align, long weights, long MO,
                                 long* items_out, F&& fn) {
  const long n = item_count(pool, weights);
  long band = (R + n - 1) / n;
  band = std::max(align, (band + align - 1) / align * align);
  const long items = (R + band - 1) / band;
  std::vector<float> sums(items * MO, 0.f);
  parallel_for(pool, items, [&](long item) {
    fn(item * band, std::min(R, (item + 1) * band), sums.data() + item * MO);
  });
  *items_out = items;
  return sums;
}

// y[m, c] = scale(c) * sum over items of sums[item, m, c].
template <typename S>
void reduce_items(const std::vector<float>& sums, long items, long M, long O, float* y, S&& scale) {
  for (long m = 0; m < M; ++m)
    for (long c = 0; c < O; ++c) {
      float t = 0.f;
      for (long k = 0; k < items; ++k) t += sums[(k * M + m) * O + c];
      y[m * O + c] = scale(c) * t;
    }
}

// y [M, O] = x [M, I] times a weight of R stored rows (I for int8, I/2 packed int4 rows), split as above:
// on the calling thread alone or by column pieces, columns(c0, c1) writing y's columns whole; or by bands
// of stored rows, band(r0, r1, sums) adding a band's unscaled product into its own zeroed [M, O] sums,
// which are added up and multiplied by scale(c).
template <typename C, typename B, typename S>
void split_product(ffi::ThreadPool& pool, long M, long I, long O, long R, float* y, C&& columns, B&& band,
                   S&& scale) {
  // Past kRowSplitMaxRows rows each weight is used M times, and the work grows with M.
  const long work = M > kRowSplitMaxRows ? M * I * O : I * O;
  if (item_count(pool, work) == 1) {
    columns(0, O);
  } else if (M > kRowSplitMaxRows) {
    for_column_items(pool, O, work, columns);
  } else {
    long items;
    const auto sums = for_row_items(pool, R, 4, I * O, M * O, &items, band);
    reduce_items(sums, items, M, O, y, scale);
  }
}

// y[:, c0:c1) = sums of x[:, i0:i1) · q[i0:i1, c0:c1) (unscaled), into y with row stride O.
void int8_band(long M, const float* x, long I, long i0, long i1, const int8_t* q, long O, long c0, long c1,
               float* y) {
  const long i4 = i0 + (i1 - i0) / 4 * 4;
  int8_rows<4>(M, x, I, i0, i4, q, O, c0, c1, y);
  int8_rows<1>(M, x, I, i4, i1, q, O, c0, c1, y);
}

ffi::Error Int8Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::S8> q,
                      ffi::Buffer<ffi::F32> scales, ffi::ResultBuffer<ffi::F32> y) {
  const auto dx = x.dimensions(), dq = q.dimensions();
  if (dx.size() != 2 || dq.size() != 2 || dq[0] != dx[1] || scales.element_count() != dq[1])
    return ffi::Error::InvalidArgument("vesper int8 matmul: expected x [M, I], q [I, O], scales [O]");
  const long M = dx[0], I = dx[1], O = dq[1];
  const float *xp = x.typed_data(), *sp = scales.typed_data();
  const int8_t* qp = q.typed_data();
  float* yp = y->typed_data();
  auto columns = [&](long c0, long c1) {
    if (M > kRowSplitMaxRows) {
      panel_columns(M, xp, I, O, c0, c1, yp,
                    [&](long c, float* panel) { int8_panel(qp, sp, I, O, c, panel); });
      return;
    }
    for (long m = 0; m < M; ++m) std::fill(yp + m * O + c0, yp + m * O + c1, 0.f);
    int8_band(M, xp, I, 0, I, qp, O, c0, c1, yp);
    for (long m = 0; m < M; ++m)
      for (long c = c0; c < c1; ++c) yp[m * O + c] *= sp[c];
  };
  split_product(pool, M, I, O, I, yp, columns,
                [&](long i0, long i1, float* part) { int8_band(M, xp, I, i0, i1, qp, O, 0, O, part); },
                [&](long c) { return sp[c]; });
  return ffi::Error::Success();
}

// out[:, 0:c1-c0) += the int4 product of byte rows j0 .. j1 (input rows 2 j0 .. 2 j1), group by group:
// within a group the unscaled sums gather in acc, then come in scaled, with the mins times the sum of
// x over the same rows (a band may start or end inside a group: both terms are linear in the rows).
void int4_band(long M, const float* x, long I, long j0, long j1, const uint8_t* packed, const float* sp,
               const float* mp, long O, long J, long c0, long c1, float* out, long out_stride) {
  const long W = c1 - c0;
  std::vector<float> acc(M * W);
  for (long j = j0; j < j1;) {
    const long g = j / J, end = std::min(j1, (g + 1) * J), j4 = j + (end - j) / 4 * 4;
    std::fill(acc.begin(), acc.end(), 0.f);
    int4_rows<4>(M, x, I, j, j4, packed, O, c0, c1, acc.data(), W);
    int4_rows<1>(M, x, I, j4, end, packed, O, c0, c1, acc.data(), W);
    for (long m = 0; m < M; ++m) {
      float xs = 0.f;
      for (long i = 2 * j; i < 2 * end; ++i) xs += x[m * I + i];
      for (long c = c0; c < c1; ++c)
        out[m * out_stride + c - c0] += acc[m * W + c - c0] * sp[g * O + c] + xs * mp[g * O + c];
    }
    j = end;
  }
}

ffi::Error Int4Matmul(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::U8> packed,
                      ffi::Buffer<ffi::F32> scales, ffi::Buffer<ffi::F32> mins,
                      ffi::ResultBuffer<ffi::F32> y) {
  const auto dx = x.dimensions(), dp = packed.dimensions(), ds = scales.dimensions();
  if (dx.size() != 2 || dp.size() != 2 || ds.size() != 2 || 2 * dp[0] != dx[1] || ds[1] != dp[1]
      || ds[0] <= 0 || dx[1] % ds[0] || (dx[1] / ds[0]) % 2 || mins.element_count() != scales.element_count())
    return ffi::Error::InvalidArgument(
        "vesper int4 matmul: expected x [M, I], packed [I/2, O], scales and mins [I/G, O], G even");
  const long M = dx[0], I = dx[1], O = dp[1], J = I / ds[0] / 2;  // J byte rows per group
  const float *xp = x.typed_data(), *sp = scales.typed_data(), *mp = mins.typed_data();
  const uint8_t* qp = packed.typed_data();
  float* yp = y->typed_data();
  auto columns = [&](long c0, long c1) {
    if (M > kRowSplitMaxRows) {
      panel_columns(M, xp, I, O, c0, c1, yp,
                    [&](long c, float* panel) { int4_panel(qp, sp, mp, I, O, 2 * J, c, panel); });
      return;
    }
    for (long m = 0; m < M; ++m) std::fill(yp + m * O + c0, yp + m * O + c1, 0.f);
    int4_band(M, xp, I, 0, I / 2, qp, sp, mp, O, J, c0, c1, yp + c0, O);
  };
  split_product(pool, M, I, O, I / 2, yp, columns,
                [&](long j0, long j1, float* part) {
                  int4_band(M, xp, I, j0, j1, qp, sp, mp, O, J, 0, O, part, O);
                },
                [](long) { return 1.f; });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(VesperInt8Matmul, Int8Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(VesperInt4Matmul, Int4Matmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::U8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
