// Shared by every CPU kernel: bf16 vector loads and rounding, reductions, exp, transposes, the task runner and
// per-thread scratch, and argument checks. Everything here is inline.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace glm47::cpu {

using bf16 = at::BFloat16;

inline __m512bh load_bh(const bf16* p) { return (__m512bh)_mm512_loadu_si512(p); }
inline __m512bh load_bh(const bf16* p, __mmask32 m) { return (__m512bh)_mm512_maskz_loadu_epi16(m, p); }

inline float to_float(bf16 v) { return static_cast<float>(v); }
inline bf16 round_bf16(float v) { return bf16(v); }  // round to nearest even, as torch does

// Sixteen vectors -> one vector of their sixteen horizontal sums: out[i] = sum(v[i]). Halves, then quarters,
// then pairs and single floats are added across vectors, ~3 instructions per sum instead of ~8.
inline __m512 reduce16(const __m512* v) {
  __m512 s[8], u[4], w[2];
  for (int i = 0; i < 8; ++i) {  // 256-bit halves: [a.lo + a.hi | b.lo + b.hi]
    const __m512 a = v[2 * i], b = v[2 * i + 1];
    s[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, 0x44), _mm512_shuffle_f32x4(a, b, 0xEE));
  }
  for (int i = 0; i < 4; ++i) {  // 128-bit lanes: one lane per source, 4 sources
    const __m512 a = s[2 * i], b = s[2 * i + 1];
    u[i] = _mm512_add_ps(_mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(2, 0, 2, 0)),
                         _mm512_shuffle_f32x4(a, b, _MM_SHUFFLE(3, 1, 3, 1)));
  }
  for (int i = 0; i < 2; ++i) {  // pairs within a lane: lane l holds sources l and l + 4 (then l + 8, l + 12)
    const __m512 a = u[2 * i], b = u[2 * i + 1];
    w[i] = _mm512_add_ps(_mm512_shuffle_ps(a, b, _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(a, b, _MM_SHUFFLE(3, 2, 3, 2)));
  }
  const __m512 r = _mm512_add_ps(_mm512_shuffle_ps(w[0], w[1], _MM_SHUFFLE(2, 0, 2, 0)),
                                 _mm512_shuffle_ps(w[0], w[1], _MM_SHUFFLE(3, 1, 3, 1)));
  // r[4 * l + j] is the sum of source l + 4 * j; put source i at position i.
  const __m512i order = _mm512_setr_epi32(0, 4, 8, 12, 1, 5, 9, 13, 2, 6, 10, 14, 3, 7, 11, 15);
  return _mm512_permutexvar_ps(order, r);
}

// out[4 * m + j] = dot(x[m], W row j) for m < MT rows of x and the 4 rows of W given by pointer (all K long):
// 16 independent dpbf16 chains at MT = 4. Meanwhile it prefetches the pf_bytes at pf into L1, a few lines per
// k step in address order: the caller spreads the next block over its tiles, so that memory streams while
// the tiles compute (one sequential stream; the 4 rows read side by side alone get ~2/3 of the bandwidth).
// Runs task(0..ntasks-1) on torch's intra-op threads. Thread i owns the i-th contiguous share of the tasks and
// takes them in order, so that each thread reads its weights as one sequential stream (what the prefetching in
// gemm_rows assumes); a thread done with its share takes the next tasks of the others' (so a thread slowed down
// by another process does not hold the step up).
template <typename Task>
void run_tasks(int64_t ntasks, const Task& task) {
  const int64_t nt = std::min<int64_t>(at::get_num_threads(), ntasks);
  if (nt <= 1 || at::in_parallel_region()) {
    for (int64_t i = 0; i < ntasks; ++i) task(i);
    return;
  }
  std::vector<std::atomic<int64_t>> next(nt);
  for (int64_t r = 0; r < nt; ++r) next[r].store(ntasks * r / nt, std::memory_order_relaxed);
  at::parallel_for(0, nt, 1, [&](int64_t begin, int64_t end) {
    for (int64_t self = begin; self < end; ++self)
      for (int64_t k = 0; k < nt; ++k) {
        const int64_t r = (self + k) % nt, stop = ntasks * (r + 1) / nt;
        for (int64_t i; (i = next[r].fetch_add(1, std::memory_order_relaxed)) < stop;) task(i);
      }
  });
}

// Rows of W per task: about 64 KB of weights, a multiple of the 4-row block.
inline int64_t rows_per_task(int64_t K) { return std::max<int64_t>(4, (32768 / std::max<int64_t>(K, 1)) & ~3); }

// exp(x) for 16 floats: 2^n * p(r) with n = round(x / ln 2), r = x - n ln 2 in two parts, p a degree-7 Taylor
// polynomial (|r| <= 0.35: truncation ~1e-8 relative). Overflows to inf and underflows to 0 like expf.
inline __m512 exp16(__m512 x) {
  x = _mm512_max_ps(_mm512_min_ps(x, _mm512_set1_ps(100.f)), _mm512_set1_ps(-110.f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187045e-06f), r);
  __m512 p = _mm512_set1_ps(1.f / 5040);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 720));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
  return _mm512_scalef_ps(p, n);
}

// float -> bf16 bits, round to nearest even, NaN -> 0x7FC0: bit for bit c10::BFloat16(float).
inline __m256i round_bf16x16(__m512 v) {
  const __m512i b = _mm512_castps_si512(v);
  const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(b, 16), _mm512_set1_epi32(1));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(b, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7FFF))), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
}

inline __m512 bf16x16_to_float(__m256i h) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

// bf16(bf16(silu(g)) * u) for 16 gate and up values that are bf16 (held as floats): F.silu(gate) * up.
inline __m256i silu_mul16(__m512 g, __m512 u) {
  const __m512 s = _mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), exp16(_mm512_sub_ps(_mm512_setzero_ps(), g))));
  return round_bf16x16(_mm512_mul_ps(bf16x16_to_float(round_bf16x16(s)), u));
}

// The first n of 16 lanes (none for n <= 0, all for n >= 16): the mask of a vector loop's tail.
inline __mmask16 lanes16(int64_t n) {
  return n >= 16 ? (__mmask16)0xFFFF : n <= 0 ? (__mmask16)0 : (__mmask16)((1u << n) - 1);
}

// h[j] = bf16(bf16(silu(gate[j])) * up[j]) for n values: F.silu(gate) * up on bf16 tensors, vectorised.
inline void silu_mul(const bf16* gate, const bf16* up, bf16* h, int64_t n) {
  for (int64_t j = 0; j < n; j += 16) {
    const __mmask16 m = lanes16(n - j);
    _mm256_mask_storeu_epi16(h + j, m, silu_mul16(bf16x16_to_float(_mm256_maskz_loadu_epi16(m, gate + j)),
                                                  bf16x16_to_float(_mm256_maskz_loadu_epi16(m, up + j))));
  }
}

// The _mm512_permutex2var_epi16 index that interleaves two vectors a, b of 32 bf16 into the pairs
// (a[i], b[i]) for i in [first, first + 16): two keys' values side by side, as a dpbf16 operand wants them.
inline __m512i pairs_index(int first) {
  alignas(64) int16_t idx[32];
  for (int i = 0; i < 16; ++i) {
    idx[2 * i] = static_cast<int16_t>(first + i);  // a[first + i]
    idx[2 * i + 1] = static_cast<int16_t>(32 + first + i);  // b[first + i]
  }
  return _mm512_load_si512(idx);
}

inline void check_bf16_matrix(const at::Tensor& t, const char* name, int64_t dim) {
  TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kBFloat16, name, " must be a bf16 CPU tensor, got ",
              t.scalar_type(), " on ", t.device());
  TORCH_CHECK(t.dim() == dim, name, " must have ", dim, " dims, got ", t.sizes());
}


// out[j * ldo + i] = row_i[j] for 16 rows of 16 32-bit words: three rounds of interleaving (32-bit, 64-bit, then
// 128-bit lanes twice).
inline void transpose16(const uint32_t* const* row, uint32_t* out, int64_t ldo) {
  __m512i r[16], t[16];
  for (int i = 0; i < 16; ++i) r[i] = _mm512_loadu_si512(row[i]);
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 4; ++i) {
    t[i] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0x88);
    t[i + 4] = _mm512_shuffle_i32x4(r[i], r[i + 4], 0xDD);
    t[i + 8] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0x88);
    t[i + 12] = _mm512_shuffle_i32x4(r[i + 8], r[i + 12], 0xDD);
  }
  for (int i = 0; i < 4; ++i) {
    r[i] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0x88);
    r[i + 8] = _mm512_shuffle_i32x4(t[i], t[i + 8], 0xDD);
    r[i + 4] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0x88);
    r[i + 12] = _mm512_shuffle_i32x4(t[i + 4], t[i + 12], 0xDD);
  }
  for (int i = 0; i < 16; ++i) _mm512_storeu_si512(out + i * ldo, r[i]);
}

// A grow-only scratch buffer per thread: the packed path's blocks are tens of MB for a long prefill chunk, and a
// fresh allocation each call would page-fault them in every time.
template <typename T>
T* scratch(int slot, size_t n) {
  thread_local std::vector<T> buffers[3];
  if (buffers[slot].size() < n) buffers[slot].resize(n);
  return buffers[slot].data();
}

}  // namespace glm47::cpu
