// One decode step's attention on x86-64 CPUs with AVX2 and FMA, as an XLA FFI custom call.
//
// What `mtgrpo_jax.models.decode.step` computes with XLA ops (scores against the prompt's prefix and the
// generated-token cache blocks, masked softmax, value sums), in one pass per (prompt, kv head):
//   q       f32 [Bp, Hkv, n, G, D]   the step's queries, head-major (row = prompt * n + sample)
//   k_pre   f32 [Bp, Hkv, D, P]      the prompt's keys, shared by its n samples
//   v_pre   f32 [Bp, Hkv, P, D]
//   mask    pred [Bp, P]             the prompt's valid (non-padding) slots
//   slot    s32 []                   the slot written this step: generated slots 0..slot are attended
//   then per generated-cache block j: k_j f32 [Bp, Hkv, n, D, C_j], v_j f32 [Bp, Hkv, n, C_j, D]
//   out     f32 [Bp, Hkv, n, G, D]   softmax(scale * q k^T) v, normalised
// Why: XLA:CPU runs the generated-cache parts as thousands of tiny batched dots far below the memory
// bandwidth; here each block is streamed once, only up to `slot`, and a prompt's n * G queries share one
// pass over its prefix. The math and the masking are the XLA path's (masked slots get weight 0), and the
// tests hold the two to float32 rounding.
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// exp for 8 floats (Cephes' expf: range reduction by ln 2, degree-5 polynomial; ~1 ulp). Inputs below
// -87.3 give 0, so a masked score (-inf) gets weight exactly 0.
inline __m256 exp8(__m256 x) {
  const __m256 lo = _mm256_set1_ps(-87.33654f), hi = _mm256_set1_ps(88.72283f);
  const __m256 zero_mask = _mm256_cmp_ps(x, lo, _CMP_LT_OQ);
  x = _mm256_min_ps(_mm256_max_ps(x, lo), hi);
  __m256 fx = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                              _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(fx, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(fx), _mm256_set1_epi32(127)), 23);
  y = _mm256_mul_ps(y, _mm256_castsi256_ps(pow2));
  return _mm256_andnot_ps(zero_mask, y);
}

// Asks for [p, p + bytes) to be brought into the cache ahead of use (the next sample's block while this
// one is computed: the blocks are read from memory once per step, and this keeps more reads in flight).
inline void prefetch(const float* p, int64_t bytes) {
  const char* c = reinterpret_cast<const char*>(p);
  for (int64_t off = 0; off < bytes; off += 64) _mm_prefetch(c + off, _MM_HINT_T0);
}

// Lane mask selecting the first `count` (0..8) of 8 lanes.
inline __m256i lanes(int count) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(count), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}

// c[m, :cols] (=|+=) alpha * sum_k a[m, k] b[k, :cols] for m < MR, cols <= 16 (lanes past `cols` are
// neither read nor written). a, b, c row-major with leading dims lda, ldb, ldc.
template <int MR>
inline void tile(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int depth, int cols,
                 float alpha, bool accumulate) {
  __m256 acc[MR][2];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = _mm256_setzero_ps();
  if (cols == 16) {
    for (int k = 0; k < depth; ++k) {
      const __m256 b0 = _mm256_loadu_ps(b + k * ldb), b1 = _mm256_loadu_ps(b + k * ldb + 8);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        const __m256 x = _mm256_broadcast_ss(a + m * lda + k);
        acc[m][0] = _mm256_fmadd_ps(x, b0, acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(x, b1, acc[m][1]);
      }
    }
  } else {
    const __m256i m0 = lanes(std::min(cols, 8)), m1 = lanes(std::max(cols - 8, 0));
    for (int k = 0; k < depth; ++k) {
      const __m256 b0 = _mm256_maskload_ps(b + k * ldb, m0), b1 = _mm256_maskload_ps(b + k * ldb + 8, m1);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        const __m256 x = _mm256_broadcast_ss(a + m * lda + k);
        acc[m][0] = _mm256_fmadd_ps(x, b0, acc[m][0]);
        acc[m][1] = _mm256_fmadd_ps(x, b1, acc[m][1]);
      }
    }
  }
  const __m256 scale = _mm256_set1_ps(alpha);
  const __m256i m0 = lanes(std::min(cols, 8)), m1 = lanes(std::max(cols - 8, 0));
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    float* row = c + m * ldc;
    __m256 r0 = _mm256_mul_ps(acc[m][0], scale), r1 = _mm256_mul_ps(acc[m][1], scale);
    if (accumulate) {
      r0 = _mm256_add_ps(r0, _mm256_maskload_ps(row, m0));
      r1 = _mm256_add_ps(r1, _mm256_maskload_ps(row + 8, m1));
    }
    _mm256_maskstore_ps(row, m0, r0);
    _mm256_maskstore_ps(row + 8, m1, r1);
  }
}

// c[m, :32] = alpha * sum_k a[m, k] b[k, :32] for m < MR <= 3: a whole 32-slot key block per pass, so
// each of its rows is read once, in order.
template <int MR>
inline void tile32(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int depth,
                   float alpha) {
  __m256 acc[MR][4];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) acc[m][0] = acc[m][1] = acc[m][2] = acc[m][3] = _mm256_setzero_ps();
  for (int k = 0; k < depth; ++k) {
    __m256 x[MR];
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) x[m] = _mm256_broadcast_ss(a + m * lda + k);
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) {
      const __m256 bv = _mm256_loadu_ps(b + k * ldb + 8 * v);
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) acc[m][v] = _mm256_fmadd_ps(x[m], bv, acc[m][v]);
    }
  }
  const __m256 scale = _mm256_set1_ps(alpha);
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int v = 0; v < 4; ++v) _mm256_storeu_ps(c + m * ldc + 8 * v, _mm256_mul_ps(acc[m][v], scale));
}

// c[:rows, :cols] (=|+=) alpha * a[:rows, :depth] b[:depth, :cols], in tiles of up to 6 x 16.
void matmul(const float* a, int64_t lda, const float* b, int64_t ldb, float* c, int64_t ldc, int rows, int depth,
            int cols, float alpha, bool accumulate) {
  if (rows <= 0 || cols <= 0) return;
  if (cols == 32 && !accumulate && rows <= 3) {
    if (rows == 3) tile32<3>(a, lda, b, ldb, c, ldc, depth, alpha);
    if (rows == 2) tile32<2>(a, lda, b, ldb, c, ldc, depth, alpha);
    if (rows == 1) tile32<1>(a, lda, b, ldb, c, ldc, depth, alpha);
    return;
  }
  for (int n0 = 0; n0 < cols; n0 += 16) {
    const int nc = std::min(16, cols - n0);
    int m0 = 0;
    for (; m0 + 6 <= rows; m0 += 6)
      tile<6>(a + m0 * lda, lda, b + n0, ldb, c + m0 * ldc + n0, ldc, depth, nc, alpha, accumulate);
    const float* am = a + m0 * lda;
    float* cm = c + m0 * ldc + n0;
    switch (rows - m0) {
      case 5: tile<5>(am, lda, b + n0, ldb, cm, ldc, depth, nc, alpha, accumulate); break;
      case 4: tile<4>(am, lda, b + n0, ldb, cm, ldc, depth, nc, alpha, accumulate); break;
      case 3: tile<3>(am, lda, b + n0, ldb, cm, ldc, depth, nc, alpha, accumulate); break;
      case 2: tile<2>(am, lda, b + n0, ldb, cm, ldc, depth, nc, alpha, accumulate); break;
      case 1: tile<1>(am, lda, b + n0, ldb, cm, ldc, depth, nc, alpha, accumulate); break;
      default: break;
    }
  }
}

struct Shape {
  int64_t prompts, kv_heads, n, group, dim, prefix;
  std::vector<const float*> k_blocks, v_blocks;
  std::vector<int64_t> block_sizes;
  int64_t slot;
  float scale;
};

// The attention of one (prompt, kv head): its n * G query rows against the prefix and the generated slots
// 0..slot. `scores` is scratch of (n * G) x (prefix + generated) floats.
void attend(const Shape& s, int64_t item, const float* q, const float* k_pre, const float* v_pre, const bool* mask,
            float* out, std::vector<float>& scores) {
  const int64_t prompt = item / s.kv_heads;
  const int rows = static_cast<int>(s.n * s.group), d = static_cast<int>(s.dim), p = static_cast<int>(s.prefix);
  // Generated slots attended, per block.
  std::vector<int> valid(s.block_sizes.size());
  int64_t start = 0, generated = 0;
  for (size_t j = 0; j < s.block_sizes.size(); ++j) {
    valid[j] = static_cast<int>(std::clamp<int64_t>(s.slot + 1 - start, 0, s.block_sizes[j]));
    generated += valid[j];
    start += s.block_sizes[j];
  }
  const int64_t width = p + generated;
  scores.resize(rows * width);
  float* sc = scores.data();
  const float* qi = q + item * rows * d;
  // Scores: the prefix for all rows at once, then each sample's own generated slots.
  matmul(qi, d, k_pre + item * d * p, p, sc, width, rows, d, p, s.scale, false);
  int64_t offset = p;
  for (size_t j = 0; j < s.block_sizes.size(); ++j) {
    const int64_t c = s.block_sizes[j];
    for (int64_t i = 0; i < s.n; ++i) {
      const float* kb = s.k_blocks[j] + ((item * s.n + i) * d) * c;
      if (i + 1 < s.n && valid[j] > 0) prefetch(kb + d * c, static_cast<int64_t>(d) * c * 4);
      matmul(qi + i * s.group * d, d, kb, c, sc + i * s.group * width + offset, width, static_cast<int>(s.group), d,
             valid[j], s.scale, false);
    }
    offset += valid[j];
  }
  // Softmax numerators in place (masked prefix slots -> weight 0); totals per row.
  const bool* pm = mask + prompt * p;
  std::vector<float> totals(rows);
  const __m256 neg_inf = _mm256_set1_ps(-INFINITY);
  for (int r = 0; r < rows; ++r) {
    float* row = sc + r * width;
    for (int j = 0; j < p; ++j)
      if (!pm[j]) row[j] = -INFINITY;
    __m256 vmax = neg_inf;
    int64_t j = 0;
    for (; j + 8 <= width; j += 8) vmax = _mm256_max_ps(vmax, _mm256_loadu_ps(row + j));
    float mx = -INFINITY;
    alignas(32) float lanes_out[8];
    _mm256_store_ps(lanes_out, vmax);
    for (float v : lanes_out) mx = std::max(mx, v);
    for (; j < width; ++j) mx = std::max(mx, row[j]);
    const __m256 vm = _mm256_set1_ps(mx);
    __m256 vsum = _mm256_setzero_ps();
    for (j = 0; j + 8 <= width; j += 8) {
      const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(row + j), vm));
      _mm256_storeu_ps(row + j, e);
      vsum = _mm256_add_ps(vsum, e);
    }
    if (j < width) {
      const __m256i tail = lanes(static_cast<int>(width - j));
      const __m256 e = exp8(_mm256_sub_ps(_mm256_maskload_ps(row + j, tail), vm));
      _mm256_maskstore_ps(row + j, tail, e);
      vsum = _mm256_add_ps(vsum, _mm256_and_ps(e, _mm256_castsi256_ps(tail)));
    }
    _mm256_store_ps(lanes_out, vsum);
    float total = 0.0f;
    for (float v : lanes_out) total += v;
    totals[r] = total;
  }
  // Value sums: the prefix for all rows, then each sample's generated blocks; then normalise.
  float* o = out + item * rows * d;
  matmul(sc, width, v_pre + item * p * d, d, o, d, rows, p, d, 1.0f, false);
  offset = p;
  for (size_t j = 0; j < s.block_sizes.size(); ++j) {
    const int64_t c = s.block_sizes[j];
    for (int64_t i = 0; i < s.n; ++i) {
      const float* vb = s.v_blocks[j] + ((item * s.n + i) * c) * d;
      if (i + 1 < s.n) prefetch(vb + c * d, static_cast<int64_t>(valid[j]) * d * 4);
      matmul(sc + i * s.group * width + offset, width, vb, d, o + i * s.group * d, d, static_cast<int>(s.group),
             valid[j], d, 1.0f, true);
    }
    offset += valid[j];
  }
  for (int r = 0; r < rows; ++r) {
    const __m256 total = _mm256_set1_ps(totals[r]);
    float* row = o + r * d;
    int j = 0;
    for (; j + 8 <= d; j += 8) _mm256_storeu_ps(row + j, _mm256_div_ps(_mm256_loadu_ps(row + j), total));
    for (; j < d; ++j) row[j] /= totals[r];
  }
}

// Runs fn(item) for item in [0, count) on the calling thread and XLA's intra-op pool. The caller waits
// for the items, not for the scheduled tasks: a task that starts late finds nothing left and returns.
template <typename F>
void parallel_for(ffi::ThreadPool& pool, int64_t count, F fn) {
  struct State {
    std::atomic<int64_t> next{0}, done{0};
    std::mutex mu;
    std::condition_variable cv;
  };
  auto state = std::make_shared<State>();
  const int64_t chunk = 2;
  auto work = [state, count, chunk, &fn]() {
    for (;;) {
      const int64_t first = state->next.fetch_add(chunk);
      if (first >= count) return;
      const int64_t last = std::min(count, first + chunk);
      for (int64_t i = first; i < last; ++i) fn(i);
      if (state->done.fetch_add(last - first) + (last - first) == count) {
        std::lock_guard<std::mutex> lock(state->mu);
        state->cv.notify_all();
      }
    }
  };
  const int helpers = std::max(0, std::min<int>(pool.num_threads(), static_cast<int>(count / chunk)) - 1);
  // Scheduled tasks hold `state` but not `fn` (a stack reference): they may run after this call returns,
  // when every item is done, so they must not touch it then. They only call `fn` for items they claimed.
  for (int t = 0; t < helpers; ++t) pool.Schedule([work]() { work(); });
  work();
  std::unique_lock<std::mutex> lock(state->mu);
  state->cv.wait(lock, [&] { return state->done.load() == count; });
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k_pre,
                           ffi::Buffer<ffi::F32> v_pre, ffi::Buffer<ffi::PRED> mask, ffi::Buffer<ffi::S32> slot,
                           ffi::RemainingArgs blocks, ffi::ResultBuffer<ffi::F32> out, float scale) {
  const auto qd = q.dimensions();
  if (qd.size() != 5) return ffi::Error::InvalidArgument("decode_attention: q must be [Bp, Hkv, n, G, D]");
  Shape s;
  s.prompts = qd[0], s.kv_heads = qd[1], s.n = qd[2], s.group = qd[3], s.dim = qd[4];
  const auto kd = k_pre.dimensions();
  if (kd.size() != 4 || kd[0] != s.prompts || kd[1] != s.kv_heads || kd[2] != s.dim)
    return ffi::Error::InvalidArgument("decode_attention: k_pre must be [Bp, Hkv, D, P]");
  s.prefix = kd[3];
  const auto vd = v_pre.dimensions(), md = mask.dimensions();
  if (vd.size() != 4 || vd[0] != s.prompts || vd[1] != s.kv_heads || vd[2] != s.prefix || vd[3] != s.dim)
    return ffi::Error::InvalidArgument("decode_attention: v_pre must be [Bp, Hkv, P, D]");
  if (md.size() != 2 || md[0] != s.prompts || md[1] != s.prefix)
    return ffi::Error::InvalidArgument("decode_attention: mask must be [Bp, P]");
  if (s.prefix < 1 || out->dimensions().size() != 5)
    return ffi::Error::InvalidArgument("decode_attention: needs a prefix of at least one slot and a 5-d output");
  if (blocks.size() % 2 != 0) return ffi::Error::InvalidArgument("decode_attention: blocks come as k, v pairs");
  for (size_t j = 0; j < blocks.size(); j += 2) {
    auto kb = blocks.get<ffi::Buffer<ffi::F32>>(j);
    auto vb = blocks.get<ffi::Buffer<ffi::F32>>(j + 1);
    if (!kb.has_value() || !vb.has_value())
      return ffi::Error::InvalidArgument("decode_attention: cache blocks must be float32");
    const auto kbd = kb->dimensions(), vbd = vb->dimensions();
    if (kbd.size() != 5 || kbd[0] != s.prompts || kbd[1] != s.kv_heads || kbd[2] != s.n || kbd[3] != s.dim)
      return ffi::Error::InvalidArgument("decode_attention: a k block must be [Bp, Hkv, n, D, C]");
    if (vbd.size() != 5 || vbd[0] != s.prompts || vbd[1] != s.kv_heads || vbd[2] != s.n || vbd[3] != kbd[4] ||
        vbd[4] != s.dim)
      return ffi::Error::InvalidArgument("decode_attention: a v block must be [Bp, Hkv, n, C, D]");
    s.k_blocks.push_back(kb->typed_data());
    s.v_blocks.push_back(vb->typed_data());
    s.block_sizes.push_back(kbd[4]);
  }
  s.slot = *slot.typed_data();
  s.scale = scale;
  const float* qp = q.typed_data();
  const float* kp = k_pre.typed_data();
  const float* vp = v_pre.typed_data();
  const bool* mp = mask.typed_data();
  float* op = out->typed_data();
  parallel_for(pool, s.prompts * s.kv_heads, [&](int64_t item) {
    thread_local std::vector<float> scores;
    attend(s, item, qp, kp, vp, mp, op, scores);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(MtgrpoDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()   // q
                                  .Arg<ffi::Buffer<ffi::F32>>()   // k_pre
                                  .Arg<ffi::Buffer<ffi::F32>>()   // v_pre
                                  .Arg<ffi::Buffer<ffi::PRED>>()  // mask
                                  .Arg<ffi::Buffer<ffi::S32>>()   // slot
                                  .RemainingArgs()                // k_0, v_0, k_1, v_1, ...
                                  .Ret<ffi::Buffer<ffi::F32>>()   // out
                                  .Attr<float>("scale"));
